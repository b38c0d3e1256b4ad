"""Dynamic axes (first version): which torch axes of which inputs may change size, and whether the
captured graph is the same at other sizes.

``dynamic_shapes=({2: "h", 3: "w"},)`` names, per input, the axes whose size may change; axes that
share a name have the same size. Sizes computed from a dynamic axis (``x.shape[1] // 2``,
``torch.arange(T)``, ``zeros(B, T)``, a slice bound ``buf[:, :T]``) stay runtime computation: capture
finds them by running the model at another size (tracer/capture/sizes.py) and op_rules/sizes.py emits
them. The model is then captured a second time per name, its inputs resized along that name's axes,
and the two IR graphs are compared node by node. A node whose folded arguments still differ (a size
computed in a way capture cannot follow) would bake the sample's size into the Keras model: it is
refused in one error that names the dynamic axis, the op, the user's line and what to do. So are rules that read a size along a
dynamic axis from the recorded shape (a reshape whose result changes size beyond the batch axis,
adaptive pooling to a fixed size that is not global). Nodes whose shapes change but whose arguments
do not (convolutions, elementwise ops, pooling with fixed kernels, RNN layers, reductions) are fine.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import networkx as nx
import numpy as np
import torch

from tracer.errors import CaptureError, ConversionError, InputError
from tracer.ir import OpNode, Ref, ordered, target_name

_RESHAPES = {"view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as", "reshape_as",
             torch.reshape, torch.flatten, torch.unflatten, torch.squeeze, torch.unsqueeze,
             torch.nn.Flatten, torch.nn.Unflatten}
_ADAPTIVE = {torch.nn.AdaptiveAvgPool1d, torch.nn.AdaptiveAvgPool2d, torch.nn.AdaptiveAvgPool3d,
             torch.nn.AdaptiveMaxPool1d, torch.nn.AdaptiveMaxPool2d, torch.nn.AdaptiveMaxPool3d,
             torch.nn.functional.adaptive_avg_pool1d, torch.nn.functional.adaptive_avg_pool2d,
             torch.nn.functional.adaptive_avg_pool3d, torch.nn.functional.adaptive_max_pool1d,
             torch.nn.functional.adaptive_max_pool2d, torch.nn.functional.adaptive_max_pool3d}


@dataclass(frozen=True)
class DynamicAxis:
    """One named dynamic size: where it sits (input, torch axis), the range it may take and the number its
    size is always a multiple of (a window or a total stride; 1 for any size)."""

    name: str
    places: tuple[tuple[int, int], ...]  # (input index, torch axis)
    size: int  # the sample's size
    low: int = 1
    high: int | None = None
    multiple: int = 1

    def others(self) -> list[int]:
        """Two sizes besides the sample's, within [low, high]: 2x, then 1.5x rounded up to an odd size, so that
        one of them is odd (strided windows and padding that depend on the size's parity show up only there);
        then sizes nearer the sample's where the range is narrow, still one odd if the range holds one.
        With a ``multiple`` the same is done on the number of multiples (sizes stay multiples of it, and the
        second one is an odd number of windows)."""
        m = self.multiple
        high = None if self.high is None else self.high // m
        return [q * m for q in _other_sizes(self.size // m, -(-max(1, self.low) // m), high)]


def _other_sizes(s: int, low: int, high: int | None) -> list[int]:
    """:meth:`DynamicAxis.others` for a size ``s`` that may take any value in [low, high]."""
    mid = s + max(1, s // 2)
    found: list[int] = []
    for c in (2 * s, mid | 1, (mid - 1) | 1, mid, s + 1, s - 1, s // 2, (s // 2) | 1, s + 2, s - 2):
        if c >= max(1, low) and (high is None or c <= high) and c != s and c not in found:
            found.append(c)
    if len(found) < 2 or found[0] % 2:
        return found[:2]
    return [found[0], next((c for c in found[1:] if c % 2), found[1])]


def parse_dynamic_shapes(dynamic_shapes: Any, inputs: Sequence[torch.Tensor]) -> list[DynamicAxis]:
    """The user's ``dynamic_shapes`` (one dict per input: torch axis -> name or ``torch.export.Dim``)
    checked against the sample; [] for None. An axis whose size is always a multiple of a number (windowed
    attention, a CNN with a total stride of 32) is ``"name*N"`` or a derived Dim ``Dim("hb", max=32) * N``
    (named ``N*hb`` as torch names it, range [max(1, min) * N, max * N]): the sample's size must be a multiple
    of N, and the other sizes tried are too."""
    if dynamic_shapes is None:
        return []
    if isinstance(dynamic_shapes, dict):
        dynamic_shapes = (dynamic_shapes,)
    if not isinstance(dynamic_shapes, (tuple, list)) or len(dynamic_shapes) > len(inputs):
        raise InputError(f"dynamic_shapes must be a tuple with one dict per input ({len(inputs)} inputs), "
                         f"e.g. ({{2: 'h', 3: 'w'}},). Received: {dynamic_shapes!r}")
    found: dict[str, DynamicAxis] = {}
    for i, spec in enumerate(dynamic_shapes):
        if spec is None:
            continue
        if not isinstance(spec, dict):
            raise InputError(f"dynamic_shapes[{i}] must be a dict axis -> name, got {type(spec).__name__}")
        for axis, dim in spec.items():
            found = _add_axis(found, i, axis, dim, inputs[i])
    return list(found.values())


def _add_axis(found: dict, i: int, axis: Any, dim: Any, x: torch.Tensor) -> dict:
    rank = x.dim()
    if not isinstance(axis, int) or not -rank <= axis < rank:
        raise InputError(f"dynamic_shapes[{i}]: axis {axis!r} is not an axis of input {i} (shape {tuple(x.shape)})")
    axis %= rank
    name, low, high, multiple = _dim_parts(dim, i, axis)
    size = int(x.shape[axis])
    if size % multiple:
        raise InputError(f"dynamic axis {name!r} must be a multiple of {multiple}, but the sample's size at input "
                         f"{i} axis {axis} is {size}; give a sample whose size is a multiple of {multiple} "
                         f"(e.g. {max(1, round(size / multiple)) * multiple}) or change the multiple")
    if not low <= size <= (high if high is not None else size):
        raise InputError(f"dynamic axis {name!r}: the sample's size {size} (input {i}, axis {axis}) is outside "
                         f"its range [{low}, {high}]")
    old = found.get(name)
    if old is not None and old.size != size:
        raise InputError(f"dynamic axis {name!r} has size {old.size} at input {old.places[0][0]} axis "
                         f"{old.places[0][1]} but {size} at input {i} axis {axis}; axes sharing a name are one size")
    if old is not None and old.multiple != multiple:
        raise InputError(f"dynamic axis {name!r} is a multiple of {old.multiple} at input {old.places[0][0]} axis "
                         f"{old.places[0][1]} but of {multiple} at input {i} axis {axis}; axes sharing a name are "
                         "one size: give them the same multiple")
    places = (old.places if old else ()) + ((i, axis),)
    lo = max(low, old.low) if old else low
    hi = high if old is None or old.high is None else (old.high if high is None else min(high, old.high))
    return {**found, name: DynamicAxis(name, places, size, lo, hi, multiple)}


def _dim_parts(dim: Any, i: int, axis: int) -> tuple[str, int, int | None, int]:
    """(name, low, high, multiple) of one axis's spec: a name, ``"name*8"``, a ``torch.export.Dim`` or a
    multiple of one (``Dim("hb", max=32) * 8``: named ``8*hb`` as torch names it, sizes 8 to 256)."""
    if isinstance(dim, str) and dim.isidentifier():
        return dim, 1, None, 1
    if dim is None:
        return f"input{i}_axis{axis}", 1, None, 1
    multiple = _multiple_of(dim, i, axis)
    if multiple is not None:
        return multiple
    name = getattr(dim, "__name__", None)
    if name is not None and hasattr(dim, "min"):  # torch.export.Dim("t", min=.., max=..)
        low, high = _dim_range(dim)
        return str(name), low, high, 1
    raise InputError(f"dynamic_shapes[{i}][{axis}] must be a name (an identifier such as 'time'), a name and a "
                     f"multiple ('h*8'), a torch.export.Dim or a multiple of one (Dim('hb', max=32) * 8), got {dim!r}")


def _dim_range(dim: Any) -> tuple[int, int | None]:
    low = int(getattr(dim, "min", 1) or 1)
    high = getattr(dim, "max", None)
    return low, (int(high) if high is not None and high < 2 ** 62 else None)


def _multiple_of(dim: Any, i: int, axis: int) -> tuple[str, int, int | None, int] | None:
    """The parts of ``"h*8"`` or of a torch.export derived Dim (``root * 8``); None for other specs."""
    if isinstance(dim, str):
        name, star, times = dim.partition("*")
        if star and name.strip().isidentifier() and times.strip().isdigit() and int(times) >= 1:
            return name.strip(), int(times), None, int(times)
        return None
    root, fn = getattr(dim, "root", None), getattr(dim, "fn", None)
    if root is None or not callable(fn):
        return None
    m = fn(1)
    if not isinstance(m, int) or m < 1 or any(fn(k) != k * m for k in (0, 2, 3)) or not hasattr(root, "min"):
        raise InputError(f"dynamic_shapes[{i}][{axis}]: the derived torch.export.Dim {dim.__name__!r} is not a "
                         "multiple of its root; tracer takes Dim(name, ...) * N (a size that is a multiple of N)")
    low, high = _dim_range(root)
    return str(dim.__name__), low * m, None if high is None else high * m, m


def resized(inputs: Sequence[torch.Tensor], dim: DynamicAxis, size: int) -> tuple[torch.Tensor, ...]:
    """The inputs with ``dim``'s axes at ``size`` (values repeated cyclically, so token ids stay valid)."""
    out = list(inputs)
    for i, axis in dim.places:
        x = out[i]
        idx = torch.arange(size) % x.shape[axis]
        out[i] = x.index_select(axis, idx)
    return tuple(out)


def resized_shapes(shapes: Sequence[tuple], dim: DynamicAxis, size: int) -> list[tuple]:
    out = [list(s) for s in shapes]
    for i, axis in dim.places:
        out[i][axis] = size
    return [tuple(s) for s in out]


def parity_shapes(shapes: Sequence[tuple], dims: Sequence[DynamicAxis]) -> list[tuple[str, list[tuple]]]:
    """(label, input shapes) for the tester: every dynamic size at each of its other sizes, the rest as sampled."""
    return [(f"{d.name}={size}", resized_shapes(shapes, d, size)) for d in dims for size in d.others()]


def placeholder_axes(graph: nx.DiGraph, dims: Sequence[DynamicAxis]) -> dict[str, dict[int, str]]:
    """Placeholder node name -> {torch axis: dynamic name}."""
    names = [n.name for n in ordered(graph) if n.kind == "placeholder"]
    out: dict[str, dict[int, str]] = {}
    for d in dims:
        for i, axis in d.places:
            out.setdefault(names[i], {})[axis] = d.name
    return out


def placeholder_multiples(graph: nx.DiGraph, dims: Sequence[DynamicAxis]) -> dict[str, dict[int, int]]:
    """Placeholder node name -> {torch axis: the multiple its size must be}, for axes declared ``"h*32"``."""
    names = [n.name for n in ordered(graph) if n.kind == "placeholder"]
    out: dict[str, dict[int, int]] = {}
    for d in dims:
        for i, axis in d.places if d.multiple > 1 else ():
            out.setdefault(names[i], {})[axis] = d.multiple
    return out


def check_dynamic(graph: nx.DiGraph, dims: Sequence[DynamicAxis], recapture: Callable[[tuple], nx.DiGraph],
                  inputs: Sequence[torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """Capture again per dynamic name at another size and refuse (one error) what would bake the sample's size.
    Returns node name -> the torch axes of its result whose size follows a dynamic axis (``dynamic_dims``)."""
    problems: list[str] = []
    changed: dict[str, set[int]] = {}
    for d in dims:
        others = d.others()
        if not others:
            raise InputError(f"dynamic axis {d.name!r}: its range [{d.low}, {d.high}] holds no size besides "
                             f"the sample's {d.size}")
        try:
            other = recapture(resized(inputs, d, others[0]))
        except CaptureError as exc:
            raise ConversionError(f"dynamic axis {d.name!r}: the model fails in PyTorch at {d.name}={others[0]} "
                                  f"(sample {d.size}): {str(exc).splitlines()[0]}. Give the axis a range it runs in "
                                  "(torch.export.Dim(name, min=.., max=..)) or keep it static") from exc
        problems += compare_graphs(graph, other, d, others[0], changed)
    if problems:
        lines = "\n".join(f"  {k}. {p}" for k, p in enumerate(dict.fromkeys(problems), 1))
        raise ConversionError(f"{len(problems)} operation(s) would fix a dynamic size to the sample's; nothing "
                              f"was converted:\n{lines}\nKeep those axes static (leave them out of dynamic_shapes / "
                              "--dynamic-axis), or compute the size from the tensor in a way tracer follows (x.shape[1], "
                              "x.size(1) and + - * // with numbers on them, -1 in view, x.flatten(1) after a global "
                              "pool, a fixed-size pool)")
    return {name: tuple(sorted(axes)) for name, axes in changed.items()}


def compare_graphs(graph: nx.DiGraph, other: nx.DiGraph, d: DynamicAxis, size: int,
                   changed: dict[str, set[int]]) -> list[str]:
    """What in ``graph`` (at the sample's size) differs from ``other`` (at ``size``) other than shapes;
    ``changed`` gets the result axes of each node whose size differs."""
    at = f"dynamic axis {d.name!r} (sample {d.size}, tried {size})"
    a, b = ordered(graph), {n.name: n for n in ordered(other)}
    if [n.name for n in a] != [n.name for n in ordered(other)]:
        first = next((n for n in a if n.name not in b), a[-1])
        return [f"{at}: the model runs other operations at another size (control flow on the size), first "
                f"near {first.describe()}"]
    problems = []
    for n in a:
        m = b[n.name]
        if n.shape is not None and m.shape is not None and len(n.shape) == len(m.shape):
            axes = {i for i, (p, q) in enumerate(zip(n.shape, m.shape)) if p != q}
            if axes:
                changed.setdefault(n.name, set()).update(axes)
        why = _difference(graph, other, n, m)
        if why:
            problems.append(f"{at}: {n.describe()}: {why}")
    return problems


def _difference(graph: nx.DiGraph, other: nx.DiGraph, n: OpNode, m: OpNode) -> str | None:
    if n.is_constant:
        if _key(n.value) != _key(m.value):
            return ("a constant computed from the size (torch.arange(T), a mask or position ids built from "
                    f"x.shape) has shape {_shape(n.value)} at the sample's size and {_shape(m.value)} at the other")
        return None
    if n.target in _RESHAPES:  # the rule reads the recorded shape, with the dynamic axis as -1
        return _reshape_difference(graph, other, n, m)
    if _key(n.args) != _key(m.args) or _key(n.kw) != _key(m.kw):
        return (f"its arguments hold the size: {_show(n)} at the sample's size, {_show(m)} at the other; "
                "the Keras rule would keep the sample's numbers")
    if n.target in _ADAPTIVE and n.inputs and n.shape and any(s != 1 for s in n.shape[2:]):
        src_n, src_m = graph.nodes[n.inputs[0]]["op"], other.nodes[n.inputs[0]]["op"]
        if src_n.shape != src_m.shape:
            return (f"adaptive pooling to the fixed size {n.shape[2:]} from a dynamic input is not exact in "
                    "Keras (its windows depend on the input size); only output size 1 (global pooling) is")
    return None


def _reshape_difference(graph: nx.DiGraph, other: nx.DiGraph, n: OpNode, m: OpNode) -> str | None:
    if not (n.shape and m.shape and n.inputs) or n.shape[1:] == m.shape[1:]:
        return None
    src_n, src_m = graph.nodes[n.inputs[0]]["op"], other.nodes[n.inputs[0]]["op"]
    if n.shape == (1, *(src_n.shape or ())) and m.shape == (1, *(src_m.shape or ())):
        return None  # x.unsqueeze(0) of a tensor without a batch axis (arange(T) positions): a new unit axis 0
    if len(n.shape) != len(m.shape) or not src_n.shape:
        return (f"a reshape whose result has another rank at another size ({n.shape} -> {m.shape}); "
                "its rule sets the sample's sizes")
    return None  # several dynamic result axes, or one moved into the batch: op_rules/dynamic_reshape.py


def _key(value: Any) -> Any:
    if isinstance(value, Ref):
        return ("ref", value.name)
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), str(value.dtype),
                value.detach().cpu().numpy().tobytes() if value.numel() < 100000 else None)
    if isinstance(value, np.ndarray):
        return ("array", value.shape, value.tobytes())
    if isinstance(value, (tuple, list)):
        return tuple(_key(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((str(k), _key(v)) for k, v in value.items()))
    if isinstance(value, slice):
        return ("slice", _key(value.start), _key(value.stop), _key(value.step))
    if isinstance(value, (int, float, str, bool, type(None))):
        return value
    return repr(value) if not hasattr(value, "__dict__") else (type(value).__name__, id(value))


def _shape(value: Any) -> Any:
    return tuple(value.shape) if isinstance(value, torch.Tensor) else value


def _show(n: OpNode) -> str:
    items = {k: v for k, v in n.kw.items() if not isinstance(v, Ref)} if n.kw else {
        f"arg{i}": v for i, v in enumerate(n.args) if not isinstance(v, Ref)}
    text = ", ".join(f"{k}={v!r}" for k, v in items.items())
    return f"{target_name(n.target)}({text[:160]})"
