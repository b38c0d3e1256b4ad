"""Kinks: the ops whose derivative jumps, and a PyTorch run that takes the branch Keras took.

Gradient parity compares Keras fp32 against PyTorch float64. At a kink (the ReLU family, clamp
and hardtanh, hardswish/hardsigmoid, abs, elementwise max/min, max-pool argmax) an input within
rounding of the threshold can take the other branch in fp32, and training-mode BatchNorm then
spreads that one element's different gradient over its whole channel upstream: no tolerance
separates that from a bug. So the float64 run reads Keras's decision at every kink (from the
values the Keras model computed there, in PyTorch's axis order) and computes the kink on that
branch: ``relu(x)`` becomes ``x * keras_gate``, a max-pool gathers at Keras's argmax. Everything
else is PyTorch's own arithmetic.

Each place where Keras's branch differs from the one float64 would take is a :class:`Flip`. It
is a *tie* when every flipped element lies within ``TIE`` x max|value| of the threshold (for a
max, of the winner), measured in float64: rounding, noted with its location. Any other flip is a
forward mismatch: Keras computed a different value there.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from tracer.verify.nodes import snapshot

__all__ = ["Flip", "GatedRun", "Kink", "TIE", "decisions", "find_kinks"]

TIE = 1e-4  # a flip is a tie when |float64 margin| <= TIE x max|value| of that tensor


@dataclass(frozen=True)
class Kink:
    """What decides the branch at one fx node. ``kind``: relu (gate x > 0, also leaky with
    ``slope``), prelu (x > 0, per-channel slope), clip (``lo``/``hi``), hardswish, hardsigmoid,
    abs, max / min (elementwise, of two operands), pool (argmax of ``argmax(x) -> indices``)."""

    kind: str
    what: str  # the op, for messages
    lo: float | None = None
    hi: float | None = None
    slope: float = 0.0
    argmax: Callable[[torch.Tensor], torch.Tensor] | None = None


@dataclass(frozen=True)
class Flip:
    node: str
    what: str
    count: int  # elements whose branch differs
    ties: int  # of them, within TIE x max|value| of the threshold
    worst: float  # the largest flipped margin / max|value|

    @property
    def tie(self) -> bool:
        return self.count == self.ties


# ---- which nodes are kinks ----------------------------------------------------------------------
def _arg(n: fx.Node, i: int, name: str, default: Any = None) -> Any:
    return n.args[i] if len(n.args) > i else n.kwargs.get(name, default)


def _scalar(v: Any) -> bool:
    return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))


def _clip(what: str, lo: Any, hi: Any) -> Kink | None:
    if not (_scalar(lo) and _scalar(hi)) or (lo is None and hi is None):
        return None  # tensor bounds: not gated
    return Kink("clip", what, None if lo is None else float(lo), None if hi is None else float(hi))


def _module_kink(m: nn.Module) -> Kink | None:
    if isinstance(m, nn.ReLU6):
        return Kink("clip", "ReLU6", 0.0, 6.0)
    if isinstance(m, nn.Hardtanh):
        return _clip(type(m).__name__, m.min_val, m.max_val)
    if isinstance(m, nn.ReLU):
        return Kink("relu", "ReLU")
    if isinstance(m, nn.LeakyReLU) and m.negative_slope >= 0:
        return Kink("relu", "LeakyReLU", slope=float(m.negative_slope))
    if isinstance(m, nn.PReLU):
        return Kink("prelu", "PReLU")
    if isinstance(m, (nn.Hardswish, nn.Hardsigmoid)):
        return Kink(type(m).__name__.lower(), type(m).__name__)
    if isinstance(m, (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)) and not m.return_indices:
        fn = {nn.MaxPool1d: F.max_pool1d, nn.MaxPool2d: F.max_pool2d, nn.MaxPool3d: F.max_pool3d}[type(m)]
        return Kink("pool", type(m).__name__, argmax=lambda k: fn(k, m.kernel_size, m.stride, m.padding, m.dilation,
                                                                  m.ceil_mode, return_indices=True)[1])
    if isinstance(m, (nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)) and not m.return_indices:
        fn = {1: F.adaptive_max_pool1d, 2: F.adaptive_max_pool2d, 3: F.adaptive_max_pool3d}[int(type(m).__name__[-2])]
        return Kink("pool", type(m).__name__, argmax=lambda k: fn(k, m.output_size, return_indices=True)[1])
    return None


_RELU = {F.relu, torch.relu, torch.relu_, "relu", "relu_"}
_CLAMP = {torch.clamp, torch.clip, "clamp", "clip", "clamp_", "clip_"}
_ABS = {torch.abs, "abs", "abs_"}
_POOL_FN = {F.max_pool1d: 1, F.max_pool2d: 2, F.max_pool3d: 3}


def _function_kink(n: fx.Node) -> Kink | None:
    t = n.target
    try:
        hash(t)
    except TypeError:
        return None
    if t in _RELU:
        return Kink("relu", "relu")
    if t is F.leaky_relu:
        slope = _arg(n, 1, "negative_slope", 0.01)
        return Kink("relu", "leaky_relu", slope=float(slope)) if _scalar(slope) and slope >= 0 else None
    if t is F.relu6:
        return Kink("clip", "relu6", 0.0, 6.0)
    if t is F.hardtanh:
        return _clip("hardtanh", _arg(n, 1, "min_val", -1.0), _arg(n, 2, "max_val", 1.0))
    if t in _CLAMP:
        return _clip("clamp", _arg(n, 1, "min"), _arg(n, 2, "max"))
    if t in (torch.clamp_min, "clamp_min"):
        return _clip("clamp_min", _arg(n, 1, "min"), None)
    if t in (torch.clamp_max, "clamp_max"):
        return _clip("clamp_max", None, _arg(n, 1, "max"))
    if t is F.prelu:
        return Kink("prelu", "prelu")
    if t in (F.hardswish, F.hardsigmoid):
        return Kink(t.__name__, t.__name__)
    if t in _ABS:
        return Kink("abs", "abs")
    if t in (torch.maximum, torch.minimum, "maximum", "minimum") or (
            t in (torch.max, torch.min, "max", "min") and len(n.args) == 2 and isinstance(n.args[1], fx.Node)):
        name = t if isinstance(t, str) else t.__name__
        return Kink("max" if "max" in name else "min", name)
    if t in _POOL_FN and not _arg(n, 6, "return_indices", False):
        fn = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[_POOL_FN[t]]
        params = [_arg(n, i, k, d) for i, (k, d) in enumerate(
            [("kernel_size", None), ("stride", None), ("padding", 0), ("dilation", 1), ("ceil_mode", False)], 1)]
        return Kink("pool", t.__name__, argmax=lambda k: fn(k, *params, return_indices=True)[1])
    return None


def find_kinks(gm: fx.GraphModule) -> dict[str, Kink]:
    """Every kink node of ``gm`` by name (ops with tensor-valued bounds are left out: not gated)."""
    found = {}
    for n in gm.graph.nodes:
        kink = (_module_kink(gm.get_submodule(n.target)) if n.op == "call_module"
                else _function_kink(n) if n.op in ("call_function", "call_method") else None)
        if kink is not None:
            found[n.name] = kink
    return found


# ---- Keras's decisions --------------------------------------------------------------------------
def _operand(n: fx.Node, i: int, keras_values: dict[str, np.ndarray]) -> Any:
    """Keras's value of operand ``i`` (a node: its value, if Keras exposed it; else the constant)."""
    a = _arg(n, i, "other" if i == 1 else "input")
    if isinstance(a, fx.Node):
        return keras_values.get(a.name)
    return None if a is None else np.float32(a)


def decisions(gm: fx.GraphModule, kinks: dict[str, Kink], keras_values: dict[str, np.ndarray]) -> dict[str, Any]:
    """Keras's branch at every kink it exposes, from its values in PyTorch's axis order.

    The ReLU family and clip read the kink's output (a ReLU fused into the conv before it exposes
    only that); the others read the kink's inputs. A kink whose values Keras does not expose is
    left out (computed as PyTorch does).
    """
    nodes = {n.name: n for n in gm.graph.nodes}
    out: dict[str, Any] = {}
    for name, k in kinks.items():
        n, y = nodes[name], keras_values.get(name)
        x = _operand(n, 0, keras_values)
        if k.kind == "relu" and y is not None:
            out[name] = y > 0
        elif k.kind == "clip" and y is not None:
            out[name] = (None if k.lo is None else y <= k.lo, None if k.hi is None else y >= k.hi)
        elif k.kind == "prelu" and x is not None:
            out[name] = x > 0
        elif k.kind in ("hardswish", "hardsigmoid") and x is not None:
            out[name] = (x <= -3.0, x >= 3.0)
        elif k.kind == "abs" and x is not None:
            out[name] = np.sign(x)
        elif k.kind in ("max", "min") and y is not None:
            b = _operand(n, 1, keras_values)
            if x is not None and np.ndim(x) <= np.ndim(y):
                out[name] = y == np.broadcast_to(x, y.shape)  # the first operand was taken
            elif b is not None and np.ndim(b) <= np.ndim(y):
                out[name] = y != np.broadcast_to(b, y.shape)
        elif k.kind == "pool" and x is not None:
            out[name] = k.argmax(torch.from_numpy(np.asarray(x, np.float64)))
    return out


# ---- the gated run ------------------------------------------------------------------------------
def _t(mask: Any, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(np.ascontiguousarray(mask), device=like.device)


def _flip(name: str, k: Kink, differs: torch.Tensor, margin: torch.Tensor, scale: torch.Tensor) -> Flip | None:
    count = int(differs.sum())
    if not count:
        return None
    scale = max(float(scale.detach().abs().max()), 1e-300)
    ratio = margin.detach().abs()[differs] / scale
    return Flip(name, k.what, count, int((ratio <= TIE).sum()), float(ratio.max()))


def _gated_pointwise(name: str, k: Kink, x: torch.Tensor, d: Any, weight: Any) -> tuple[torch.Tensor, Flip | None]:
    if k.kind in ("relu", "prelu"):
        gate = _t(d, x)
        if k.kind == "prelu":
            slope = -F.prelu(-torch.ones_like(x), weight)  # the slope broadcast as F.prelu does
        else:
            slope = torch.full_like(x, k.slope)
        return torch.where(gate, x, slope * x), _flip(name, k, gate != (x > 0), x, x)
    if k.kind == "abs":
        sign = _t(d, x).to(x.dtype)
        return x * sign, _flip(name, k, (sign != torch.sign(x)) & (x != 0), x, x)
    if k.kind == "clip":
        low, high, lo, hi = d[0], d[1], k.lo, k.hi
    else:  # hardswish, hardsigmoid: pieces below -3, above 3
        (low, high), lo, hi = d, -3.0, 3.0
    low = None if low is None else _t(low, x)
    high = None if high is None else _t(high, x)
    pieces = {"clip": (lo, x, hi), "hardswish": (0.0, x * (x + 3) / 6, x), "hardsigmoid": (0.0, x / 6 + 0.5, 1.0)}
    below, mid, above = pieces[k.kind]
    y = mid
    differs = torch.zeros_like(x, dtype=torch.bool)
    margin = torch.full_like(x, float("inf"))
    if low is not None:
        y = torch.where(low, torch.as_tensor(below, dtype=x.dtype) * torch.ones_like(x), y)
        differs |= low != (x <= lo)
        margin = torch.minimum(margin, (x - lo).abs())
    if high is not None:
        y = torch.where(high, above * torch.ones_like(x) if not torch.is_tensor(above) else above, y)
        differs |= high != (x >= hi)
        margin = torch.minimum(margin, (x - hi).abs())
    return y, _flip(name, k, differs, margin, x)


def _gated_select(name: str, k: Kink, a: Any, b: Any, d: Any) -> tuple[torch.Tensor, Flip | None]:
    like = a if torch.is_tensor(a) else b
    a, b = torch.as_tensor(a, dtype=like.dtype), torch.as_tensor(b, dtype=like.dtype)
    first = _t(d, like)
    natural = (a >= b) if k.kind == "max" else (a <= b)
    diff = a - b
    scale = torch.maximum(a.detach().abs().max(), b.detach().abs().max())
    return torch.where(first, a, b), _flip(name, k, (first != natural) & (diff != 0), diff.expand(first.shape), scale)


def _gated_pool(name: str, k: Kink, x: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, Flip | None]:
    flat = x.flatten(2)
    y = flat.gather(2, index.flatten(2)).reshape(index.shape)
    natural = k.argmax(x.detach())
    best = flat.detach().gather(2, natural.flatten(2)).reshape(index.shape)
    margin = best - y.detach()
    return y, _flip(name, k, (natural != index) & (margin != 0), margin, x)


class GatedRun(fx.Interpreter):
    """Runs ``gm`` with autograd, every kink in ``branches`` on Keras's branch; keeps a numpy copy of
    every node's value (``values``) and, with ``record``, every :class:`Flip` (``flips``)."""

    def __init__(self, gm: fx.GraphModule, kinks: dict[str, Kink], branches: dict[str, Any], record: bool = True):
        super().__init__(gm, garbage_collect_values=True)
        self.kinks, self.branches, self.record = kinks, branches, record
        self.values: dict[str, Any] = {}
        self.flips: list[Flip] = []

    def run_node(self, n: fx.Node) -> Any:
        k, d = self.kinks.get(n.name), self.branches.get(n.name)
        if k is None or d is None:
            result = super().run_node(n)
        else:
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            x = args[0] if args else kwargs.get("input")
            if k.kind in ("max", "min"):
                result, flip = _gated_select(n.name, k, x, args[1] if len(args) > 1 else kwargs["other"], d)
            elif k.kind == "pool":
                result, flip = _gated_pool(n.name, k, x, d)
            else:
                weight = None if k.kind != "prelu" else (
                    self.module.get_submodule(n.target).weight if n.op == "call_module"
                    else args[1] if len(args) > 1 else kwargs.get("weight"))
                result, flip = _gated_pointwise(n.name, k, x, d, weight)
            if flip is not None and self.record:
                self.flips.append(flip)
        if n.op not in ("output", "get_attr"):
            self.values[n.name] = snapshot(result)
        return result
