"""Errors the converter raises. Each names what went wrong, where in the user's code, and what to do."""
from __future__ import annotations

import importlib
import re
from typing import Any


class TracerError(Exception):
    """Base class: every error the converter raises on purpose."""


class InputError(TracerError):
    """The user's input (file, class name, shapes, weights) is not usable."""


class CaptureError(TracerError):
    """torch.fx could not capture the model."""


class UnsupportedOpsError(TracerError):
    """Some operations have no rule. ``ops`` lists each (op, source, module path, stub)."""

    def __init__(self, ops: list[dict]):
        self.ops = ops
        lines = [f"{len(ops)} operation(s) have no conversion rule; nothing was written.", ""]
        for i, o in enumerate(ops, 1):
            lines.append(f"{i}. {o['op']}  (node {o['node']}, called {o['count']}x)")
            lines.append(f"   at {o['source']}")
            if o["module_path"]:
                lines.append(f"   in module {o['module_path']}")
        lines += ["", "Add a rule for each (see README 'Adding a rule for your own layer'), for example:", "",
                  "import keras", "import torch", "from tracer import Emit, KerasTensor, Layout, OpNode, rule", ""]
        lines += [o["stub"] for o in ops]
        super().__init__("\n".join(lines))


class ConversionError(TracerError):
    """A rule failed or produced a wrong shape while converting one node."""


class ParityError(TracerError):
    """PyTorch and the converted model disagree beyond tolerance."""

    def __init__(self, report):
        self.report = report
        super().__init__(report.summary())


# where users import torch's functions from, searched in this order for the target itself
PUBLIC_NAMESPACES = ("torch", "torch.nn.functional", "torch.special", "torch.fft", "torch.linalg")
DIM_ARGUMENTS = ("dim", "dims", "axis", "dim0", "dim1", "start_dim", "end_dim", "shape", "size", "keepdim")


def public_target(target: Any) -> str:
    """How a user names ``target``: ``torch.cumprod`` (not ``torch._VariableFunctionsClass.cumprod``),
    ``torch.nn.Conv2d``, ``Tensor.cumprod`` for a Tensor method (its rule key is ``"cumprod"``), the
    class name for a class defined in the user's file."""
    from tracer.ir import target_name
    if isinstance(target, str):
        return f"Tensor.{target}"
    if isinstance(target, type):
        module = target.__module__
        if module.startswith("torch.nn.modules") and getattr(importlib.import_module("torch.nn"), target.__name__,
                                                              None) is target:
            return f"torch.nn.{target.__name__}"
        own = module == "__main__" or module.startswith("tracer_user_")  # a file the CLI imported
        return target.__qualname__ if own else f"{module}.{target.__qualname__}"
    name = getattr(target, "__name__", "")
    for path in PUBLIC_NAMESPACES:
        space = importlib.import_module(path)
        short = name.removeprefix(path.rpartition(".")[2] + "_")  # torch._C._special.special_erfcx -> erfcx
        found = next((n for n in (name, short) if n and getattr(space, n, None) is target), None)
        if found:
            return f"{path}.{found}"
    return target_name(target)


def rule_stub(node: Any) -> str:
    """A ready ``@rule`` for an op without one, with the layout it most likely needs: an op that
    takes a dim (a reduction, a reshape) gets ``Layout.TORCH`` (its dims are PyTorch's axes), an
    elementwise function ``Layout.ANY``, a module class ``Layout.TORCH`` (always right;
    ``Layout.CHANNELS_LAST`` is faster for conv-like layers)."""
    t = node.target
    target = repr(t) if isinstance(t, str) else public_target(t)
    fname = re.sub(r"\W", "_", (t if isinstance(t, str) else t.__name__.lower() if isinstance(t, type)
                                 else target.rpartition(".")[2])).strip("_") or "op"
    if any(k in node.kw for k in DIM_ARGUMENTS):
        layout = "Layout.TORCH)  # dims are PyTorch's axes: TORCH hands the input over in PyTorch's order"
    elif isinstance(t, type):
        layout = "Layout.TORCH)  # always right; CHANNELS_LAST (NHWC in and out) is faster for conv-like layers"
    else:
        layout = "Layout.ANY)  # elementwise: runs in whatever layout its input has"
    if node.shape is None and node.structure:  # several results: return them as a tuple, in torch's order
        names = ", ".join(f"y{i}" for i in range(len(node.structure)))
        result = (f"    {names} = ...  # shapes must be {', '.join(map(str, node.structure))}\n"
                  f"    return ({names}{',' if len(node.structure) == 1 else ''})\n")
    else:
        result = f"    return keras.ops.<your op>(x)  # shape must be {node.shape}\n"
    return (f"@rule({target}, layout={layout}\n"
            f"def {fname}(node: OpNode, ctx: Emit) -> KerasTensor:\n"
            f"    x = ctx.input(node, 0)\n" + result)
