"""Capture a PyTorch model with torch.fx into the NetworkX IR.

Modules that have a rule stay leaves; everything else is traced through. A run of the traced
module on the sample input records each node's shape and dtype; nodes that do not depend on
the inputs (parameter arithmetic, creation ops, ``x.size()`` arithmetic) are folded into
constants so rules see plain numbers. Models fx cannot trace are captured with torch.export
into the same IR (tracer/capture_export.py).
"""
from __future__ import annotations

import inspect
import operator
import os
import re
from typing import Any, Callable

import networkx as nx
import torch
import torch.fx as fx
from torch.fx.operator_schemas import get_signature_for_torch_op

from tracer.errors import CaptureError, InputError
from tracer.ir import OP, OpNode, Ref, Source

_TORCH_DIR = os.path.dirname(torch.__file__)
_OWN_DIRS = tuple(
    os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), d) + os.sep
    for d in ("tracer", "op_rules", "emitter", "fixes")
)
_FRAME = re.compile(r'File "([^"]+)", line (\d+), in [^\n]*\n\s*([^\n]*)')
# Tensor methods taking their shape/dims as varargs: x.view(2, -1) == x.view((2, -1)).
_VARARG_METHODS = {"view": "shape", "reshape": "shape", "permute": "dims", "repeat": "sizes",
                   "expand": "size", "tile": "dims", "flip": "dims", "new_zeros": "size",
                   "new_ones": "size", "new_empty": "size"}

# Creation ops: their result depends on size arguments only (sizes are folded into literals).
_CREATION = {torch.arange, torch.zeros, torch.ones, torch.full, torch.empty, torch.eye, torch.linspace,
             torch.tensor, torch.as_tensor}
_EXPANDS = {torch.ops.aten.expand.default, torch.ops.aten.repeat.default}
# torch.export's creation ops: their sizes are plain numbers, ``x.shape[0]`` among them
_ATEN_CREATION = {torch.ops.aten.zeros.default, torch.ops.aten.ones.default, torch.ops.aten.full.default,
                  torch.ops.aten.empty.memory_format}
_NEW = {"new_zeros", "new_ones", "new_full", "new_empty", "new_tensor"}


class _Tracer(fx.Tracer):
    def __init__(self, is_leaf: Callable[[torch.nn.Module], bool]):
        super().__init__()
        self.record_stack_traces = True
        self._is_leaf = is_leaf

    def is_leaf_module(self, m: torch.nn.Module, module_qualified_name: str) -> bool:
        return self._is_leaf(m)


class _Recorder(fx.Interpreter):
    """Runs the traced module once, keeping each node's result and whether it depends on inputs."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm, garbage_collect_values=False)
        self.results: dict[str, Any] = {}
        self.dynamic: set[str] = set()
        self.batch: int | None = None  # axis 0 of the first input
        self.batch_sized: set[str] = set()  # size values equal to a computed tensor's batch size
        self.batch_shapes: set[str] = set()  # shapes whose first entry is one

    def run_node(self, n: fx.Node) -> Any:
        try:
            result = super().run_node(n)
        except Exception as exc:
            raise CaptureError(f"PyTorch failed to run {n.format_node()} at {source_of(n)}: {exc}") from exc
        if n.op == "placeholder" and self.batch is None:
            self.batch = result.shape[0] if isinstance(result, torch.Tensor) and result.dim() else 0
        if (n.op == "placeholder" or any(a.name in self.dynamic for a in self._value_inputs(n, result))
                or self._expands_to_batch(n, result)):
            self.dynamic.add(n.name)
        self.results[n.name] = result
        return result

    def _value_inputs(self, n: fx.Node, result: Any) -> list[fx.Node]:
        """The inputs whose values flow into ``n``'s result. A creation op (``torch.arange(x.shape[-1])``,
        ``x.new_zeros(4)``) reads only sizes, dtype and device, so it is a constant of those sizes,
        unless its axis 0 has the batch size (``torch.zeros(x.shape[0], 4)``): that follows the input."""
        self._track_batch_sizes(n)
        if (n.op == "call_function" and n.target in _CREATION) or (n.op == "call_method" and n.target in _NEW):
            if (isinstance(result, torch.Tensor) and result.dim() and result.shape[0] == self.batch
                    and any(a.name in self.batch_sized or a.name in self.batch_shapes for a in n.all_input_nodes)):
                return n.all_input_nodes
            return [a for a in n.all_input_nodes if isinstance(self.results.get(a.name), torch.Tensor)
                    and not (n.op == "call_method" and n.args and a is n.args[0])]
        return n.all_input_nodes

    def _expands_to_batch(self, n: fx.Node, result: Any) -> bool:
        """A constant's unit axis 0 expanded or repeated to the batch size (over 1): ``cls.expand(x.shape[0],
        -1, -1)``, ``pos.repeat(B, 1, 1, 1)`` captured by torch.export, where the size is a plain number, or a tensor created with the batch
        size as axis 0 there (``torch.zeros(x.shape[0], ...)``). Either follows the input's batch."""
        if not (isinstance(result, torch.Tensor) and result.dim() and self.batch and self.batch > 1
                and result.shape[0] == self.batch):
            return False
        if n.op == "call_function" and n.target in _ATEN_CREATION:  # torch.zeros(x.shape[0], ...) exported
            return True
        if not (n.op == "call_method" and n.target in ("expand", "repeat") or n.target in _EXPANDS):
            return False
        src = self.results.get(n.args[0].name) if isinstance(n.args[0], fx.Node) else None
        return isinstance(src, torch.Tensor) and src.dim() == result.dim() and src.shape[0] == 1

    def _track_batch_sizes(self, n: fx.Node) -> None:
        """Mark sizes that are the batch size of a computed tensor: ``x.size(0)``, ``x.shape[0]``,
        arithmetic on them; ``x.shape`` / ``x.size()`` as shapes that start with it."""
        ins = n.all_input_nodes
        dyn = bool(ins) and ins[0].name in self.dynamic
        if (n.op == "call_function" and n.target is getattr and n.args[1:] == ("shape",) and dyn) or (
                n.op == "call_method" and n.target == "size" and len(n.args) == 1 and dyn):
            self.batch_shapes.add(n.name)
        elif n.op == "call_method" and n.target == "size" and dyn and n.args[1:] in ((0,), (-len(
                self.results[ins[0].name].shape),)):
            self.batch_sized.add(n.name)
        elif n.op == "call_function" and n.target is operator.getitem and ins and ins[0].name in self.batch_shapes:
            if n.args[1] == 0:
                self.batch_sized.add(n.name)
            elif isinstance(n.args[1], slice) and n.args[1].start in (None, 0):
                self.batch_shapes.add(n.name)
        elif n.op == "call_function" and getattr(n.target, "__module__", "") in ("_operator", "operator") and any(
                a.name in self.batch_sized for a in ins):
            self.batch_sized.add(n.name)


def source_of(n: fx.Node) -> Source:
    """The deepest frame of the node's stack trace that is the user's code."""
    trace = n.stack_trace or ""
    best = Source()
    for file, line, code in _FRAME.findall(trace):
        path = os.path.abspath(file)
        if path.startswith(_TORCH_DIR) or path.startswith(_OWN_DIRS):
            continue
        best = Source(file, int(line), code.strip())
    return best


def module_path_of(n: fx.Node) -> str:
    if n.op == "call_module":
        return str(n.target)
    stack = n.meta.get("nn_module_stack") or {}
    if stack:
        path = list(stack.values())[-1][0]
        return str(path)
    return ""


def normalize(n: fx.Node, args: tuple, kwargs: dict) -> dict:
    """Name every argument once: {parameter name: value}. Falls back to positional keys."""
    target = n.target
    if n.op == "call_method":
        if target in _VARARG_METHODS:
            rest = args[1:]
            if len(rest) == 1 and isinstance(rest[0], (tuple, list)):
                rest = tuple(rest[0])
            return {"input": args[0], _VARARG_METHODS[target]: tuple(rest), **kwargs}
        target = getattr(torch, target, None)
        if target is None:
            return _positional(args, kwargs)
    if n.op not in ("call_function", "call_method"):
        return _positional(args, kwargs)
    for sig in _signatures(target):
        try:
            bound = sig.bind(*args, **kwargs)
        except TypeError:
            continue
        bound.apply_defaults()
        return dict(bound.arguments)
    return _positional(args, kwargs)


def _signatures(target: Any) -> list[inspect.Signature]:
    if isinstance(target, torch._ops.OpOverload):  # ATen ops (torch.export graphs): names from the schema
        return list(get_signature_for_torch_op(target) or [])
    try:
        sig = inspect.signature(target)
    except (TypeError, ValueError):
        return list(get_signature_for_torch_op(target) or [])
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in sig.parameters.values()):
        # torch's boolean_dispatch wrappers (F.max_pool2d): the wrapped functions have the names
        inner = [c.cell_contents for c in (getattr(target, "__closure__", None) or ())
                 if inspect.isfunction(c.cell_contents)]
        return [inspect.signature(f) for f in inner] or [sig]
    return [sig]


def _positional(args: tuple, kwargs: dict) -> dict:
    return {**{f"arg{i}": a for i, a in enumerate(args)}, **kwargs}


def trace(model: torch.nn.Module, is_leaf: Callable[[torch.nn.Module], bool]) -> fx.GraphModule:
    tracer = _Tracer(is_leaf)
    try:
        graph = tracer.trace(model)
    except Exception as exc:
        raise CaptureError(
            f"torch.fx could not trace {type(model).__name__}: {exc}. "
            "Data-dependent Python control flow in forward() cannot be traced; "
            "move it out of forward or give the submodule a rule so it stays a leaf."
        ) from exc
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


CAPTURE_METHODS = ("auto", "fx", "export")


def capture(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...],
            is_leaf: Callable[[torch.nn.Module], bool], method: str = "auto") -> nx.DiGraph:
    """Capture ``model`` and build the IR graph, shapes recorded from ``inputs``.

    ``method``: "fx" (torch.fx symbolic tracing), "export" (torch.export, ATen level) or "auto":
    fx, and torch.export when fx cannot capture the model. ``graph.graph["capture"]`` records
    which was used and why. Weights computed by parametrizations are baked in either way.

    A sample whose tensors all have batch size 1 cannot tell the batch size from a genuine unit
    axis (``cls.expand(x.shape[0], -1, -1)`` is then a no-op, ``x.view(-1, ...)`` of windows looks
    like a fixed size), so shapes are recorded on a batch-2 copy of it (the sample repeated along
    axis 0), and on the sample itself only when the model fails at batch 2;
    ``graph.graph["capture"]["batch"]`` says which.
    """
    from fixes.parametrizations import bake_parametrizations

    if method not in CAPTURE_METHODS:
        raise InputError(f"capture must be one of {', '.join(CAPTURE_METHODS)}. Received: capture={method!r}")
    # an in-place forward (x.add_(1), relu_(x)) must not change the caller's sample tensors
    inputs = tuple(x.detach().clone() if isinstance(x, torch.Tensor) else x for x in inputs)
    if not _all_batch_one(inputs):
        return bake_parametrizations(_capture_with(model, inputs, is_leaf, method), model)
    doubled = tuple(torch.cat([x, x]) if isinstance(x, torch.Tensor) else x for x in inputs)
    try:
        graph = _capture_with(model, doubled, is_leaf, method)
        note = "recorded at batch 2 (the batch-1 sample repeated), so batch-sized axes are told from unit axes"
    except CaptureError as exc:
        graph = _capture_with(model, inputs, is_leaf, method)
        note = (f"recorded at batch 1: the model failed on the sample repeated to batch 2 ({_first_line(exc)}); "
                "axes of size 1 are taken for the batch where they are sized by it")
    graph.graph["capture"]["batch"] = note
    return bake_parametrizations(graph, model)


def _all_batch_one(inputs: tuple) -> bool:
    tensors = [x for x in inputs if isinstance(x, torch.Tensor)]
    return bool(tensors) and all(x.dim() and x.shape[0] == 1 for x in tensors)


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _capture_with(model: torch.nn.Module, inputs: tuple, is_leaf: Callable[[torch.nn.Module], bool],
                  method: str) -> nx.DiGraph:
    from tracer.capture_export import capture_export, fx_failure

    if method == "export":
        return capture_export(model, inputs, reason="requested with capture='export'")
    try:
        return capture_fx(model, inputs, is_leaf)
    except CaptureError as exc:
        if method == "fx":
            raise
        return capture_export(model, inputs, reason=fx_failure(model, exc), fx_error=exc)


def capture_fx(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...],
               is_leaf: Callable[[torch.nn.Module], bool]) -> nx.DiGraph:
    """Trace ``model`` with torch.fx and build the IR graph."""
    gm = trace(model, is_leaf)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(inputs):
        raise CaptureError(f"{type(model).__name__}.forward takes {len(placeholders)} inputs "
                           f"({', '.join(p.name for p in placeholders)}) but {len(inputs)} were given")
    recorder = _Recorder(gm)
    with torch.no_grad():
        recorder.run(*inputs)
    graph = _build_graph(gm, recorder)
    graph.graph["capture"] = {"method": "fx", "reason": "torch.fx traced the model"}
    return graph


def _build_graph(gm: fx.GraphModule, rec: _Recorder) -> nx.DiGraph:
    graph = nx.DiGraph()
    modules = dict(gm.named_modules())
    folded: dict[str, Any] = {}  # node name -> constant value inlined into consumers
    order: list[str] = []
    for n in gm.graph.nodes:
        result = rec.results.get(n.name)
        is_const = n.op not in ("placeholder", "output") and n.name not in rec.dynamic
        if n.op not in ("placeholder", "output") and not _has_tensor(result):  # sizes, shape arithmetic
            folded[n.name] = result
            continue
        node = _make_node(n, result, is_const, folded, modules)
        graph.add_node(node.name, **{OP: node})
        for src in node.inputs:
            graph.add_edge(src, node.name)
        order.append(node.name)
    graph.graph["order"] = order
    return graph


def _make_node(n: fx.Node, result: Any, is_const: bool, folded: dict, modules: dict) -> OpNode:
    def conv(a: Any) -> Any:
        if isinstance(a, fx.Node):
            return folded[a.name] if a.name in folded else Ref(a.name)
        if isinstance(a, (tuple, list)):
            return type(a)(conv(x) for x in a)
        if isinstance(a, dict):
            return {k: conv(v) for k, v in a.items()}
        if isinstance(a, slice):
            return slice(conv(a.start), conv(a.stop), conv(a.step))
        return a

    args = conv(tuple(n.args))
    kwargs = conv(dict(n.kwargs))
    inputs = tuple(dict.fromkeys(_refs((args, kwargs))))
    common = dict(name=n.name, source=source_of(n), module_path=module_path_of(n))
    if is_const:  # a tensor that does not depend on the inputs: keep its value
        value = result.detach().clone() if isinstance(result, torch.Tensor) else result
        trainable = isinstance(result, torch.nn.Parameter) and result.requires_grad
        return OpNode(kind="constant" if n.op != "get_attr" else "get_attr", target=n.target,
                      value=value, kw={"trainable": trainable}, **_tensor_meta(result), **common)
    if n.op == "output":
        return OpNode(kind="output", target="output", inputs=inputs, args=args, **common)
    kw = normalize(n, args, kwargs) if n.op in ("call_function", "call_method") else kwargs
    module = modules.get(n.target) if n.op == "call_module" else None
    target = type(module) if module is not None else n.target
    return OpNode(kind=n.op, target=target, inputs=inputs, args=args, kw=kw, module=module,
                  **_tensor_meta(result), **common)


def _tensor_meta(result: Any) -> dict:
    if isinstance(result, torch.Tensor):
        return {"shape": tuple(result.shape), "dtype": str(result.dtype).replace("torch.", "")}
    if isinstance(result, (tuple, list)) and _has_tensor(result):
        return {"structure": tuple(tuple(r.shape) if isinstance(r, torch.Tensor) else None for r in result)}
    return {}


def _has_tensor(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, (tuple, list)):
        return any(_has_tensor(v) for v in value)
    if isinstance(value, dict):
        return any(_has_tensor(v) for v in value.values())
    return False


def _refs(value: Any) -> list[str]:
    if isinstance(value, Ref):
        return [value.name]
    if isinstance(value, (tuple, list)):
        return [r for v in value for r in _refs(v)]
    if isinstance(value, dict):
        return [r for v in value.values() for r in _refs(v)]
    if isinstance(value, slice):
        return _refs((value.start, value.stop, value.step))
    return []
