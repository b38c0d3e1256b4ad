"""Reductions over named dims: mean, sum, amax, amin (with keepdim); vector norms (torch.norm, Tensor.norm,
torch.linalg.vector_norm); max/min over everything or along a dim (values and indices) and elementwise."""
from __future__ import annotations

from typing import Any

import keras
import torch

from tracer.emitter.context import Emit
from tracer.op_rules.registry import register
from tracer.ir import OpNode, Phys, Ref
from tracer.passes.layout import drop_dims


def _dims(node: OpNode, rank: int) -> tuple[int, ...]:
    dim = node.kw.get("dim", node.kw.get("axis"))
    if dim is None:
        return tuple(range(rank))
    dims = dim if isinstance(dim, (tuple, list)) else (dim,)
    return tuple(sorted(d % rank for d in dims))


def _reduce_layout(node: OpNode, ins: list, shapes: list) -> tuple[list, Phys]:
    rank = len(shapes[0])
    phys = ins[0] if ins[0] is not None and ins[0].flat is None else Phys.identity(rank)
    if node.kw.get("keepdim", False):
        return [phys], phys
    return [phys], drop_dims(phys, set(_dims(node, rank)))


def _reduction(kname: str):
    def fn(node: OpNode, ctx: Emit) -> Any:
        x = ctx.input(node, 0)
        phys = node.in_layouts[0]
        axes = tuple(sorted(phys.axis(d) for d in _dims(node, len(phys.perm))))
        return getattr(keras.ops, kname)(x, axis=axes, keepdims=bool(node.kw.get("keepdim", False)))

    fn.__name__ = f"reduce_{kname}"
    return fn


for _kname, _targets in {
    "mean": (torch.mean, "mean"), "sum": (torch.sum, "sum"),
    "max": (torch.amax, "amax"), "min": (torch.amin, "amin"),
}.items():
    register(_targets, _reduction(_kname), _reduce_layout)


# ---- norms: torch.norm, Tensor.norm, torch.linalg.vector_norm / norm --------------------------

def _norm_order(node: OpNode) -> float:
    """The vector norm's p: ``p`` of torch.norm, ``ord`` of linalg (``'fro'`` and None are 2)."""
    p = node.kw.get("p", node.kw.get("ord", "fro"))
    if p is None or p == "fro":
        return 2.0
    if isinstance(p, str):
        raise NotImplementedError(f"norm with p={p!r} (a matrix norm) is not converted; p may be a number or 'fro'")
    return float(p)


def vector_norm(x: Any, p: float, axes: tuple, keepdims: bool) -> Any:
    """``(sum |x|^p)^(1/p)`` over ``axes``, with PyTorch's special cases p = inf, -inf and 0."""
    ops = keras.ops
    if p == float("inf"):
        return ops.max(ops.abs(x), axis=axes, keepdims=keepdims)
    if p == float("-inf"):
        return ops.min(ops.abs(x), axis=axes, keepdims=keepdims)
    if p == 0:
        return ops.sum(ops.cast(ops.not_equal(x, 0), x.dtype), axis=axes, keepdims=keepdims)
    if p == 1:
        return ops.sum(ops.abs(x), axis=axes, keepdims=keepdims)
    if p == 2:
        return ops.sqrt(ops.sum(ops.square(x), axis=axes, keepdims=keepdims))
    return ops.power(ops.sum(ops.power(ops.abs(x), p), axis=axes, keepdims=keepdims), 1.0 / p)


def _linalg_norm_check(node: OpNode) -> None:
    """torch.linalg.norm with an ``ord`` over two dims (or on a matrix without dims) is a matrix norm."""
    dim, rank = node.kw.get("dim"), len(node.in_layouts[0].perm)
    two = (dim is None and rank == 2) or (isinstance(dim, (tuple, list)) and len(dim) == 2)
    if node.kw.get("ord") not in (None, "fro") and two:
        raise NotImplementedError(f"torch.linalg.norm with ord={node.kw['ord']!r} over two dims is a matrix norm, "
                                  "which is not converted; use torch.linalg.vector_norm for a vector norm")


def norm(node: OpNode, ctx: Emit) -> Any:
    if node.kw.get("dtype") is not None:
        raise NotImplementedError("norm with dtype= is not converted; cast the input first")
    if node.target is torch.linalg.norm:
        _linalg_norm_check(node)
    phys = node.in_layouts[0]
    axes = tuple(sorted(phys.axis(d) for d in _dims(node, len(phys.perm))))
    return vector_norm(ctx.input(node, 0), _norm_order(node), axes, bool(node.kw.get("keepdim", False)))


register((torch.norm, "norm", torch.linalg.vector_norm, torch.linalg.norm, torch.ops.aten.linalg_vector_norm.default),
         norm, _reduce_layout)


# ---- max / min: over everything, along a dim (values and indices), or elementwise -------------

def _minmax_dim(node: OpNode) -> int | None:
    """The dim of ``x.max(dim)``; ``x.min(1)`` binds 1 to torch.min's ``other``, which is a tensor otherwise."""
    other = node.kw.get("other")
    if isinstance(other, int) and not isinstance(other, bool):
        return other
    return node.kw.get("dim")


def _minmax_layout(node: OpNode, ins: list, shapes: list) -> tuple[list, Phys]:
    if isinstance(node.kw.get("other"), Ref):  # torch.max(a, b): elementwise, PyTorch's axis order
        return [Phys.identity(len(s)) for s in shapes], Phys.identity(node.rank)
    rank = len(shapes[0])
    phys = ins[0] if ins[0] is not None and ins[0].flat is None else Phys.identity(rank)
    dim = _minmax_dim(node)
    if node.kw.get("keepdim", False):
        return [phys], phys
    return [phys], drop_dims(phys, set(range(rank)) if dim is None else {dim % rank})


def _minmax(kind: str):
    def fn(node: OpNode, ctx: Emit) -> Any:
        x = ctx.input(node, 0)
        if isinstance(node.kw.get("other"), Ref):
            return getattr(keras.ops, f"{kind}imum")(x, ctx.input(node, 1))
        dim = _minmax_dim(node)
        if dim is None:
            return getattr(keras.ops, kind)(x)
        axis, keep = node.in_layouts[0].axis(dim), bool(node.kw.get("keepdim", False))
        values = getattr(keras.ops, kind)(x, axis=axis, keepdims=keep)
        indices = getattr(keras.ops, f"arg{kind}")(x, axis=axis, keepdims=keep)
        return values, keras.ops.cast(indices, "int32")

    fn.__name__ = f"{kind}_along"
    return fn


aten = torch.ops.aten
register((torch.max, "max", aten.max.dim, aten.max.default), _minmax("max"), _minmax_layout)
register((torch.min, "min", aten.min.dim, aten.min.default), _minmax("min"), _minmax_layout)


def _field_layout(node: OpNode, ins: list, shapes: list) -> tuple[list, Phys]:
    return [ins[0]], ins[0] if ins[0] is not None else Phys.identity(node.rank)


def named_field(node: OpNode, ctx: Emit) -> Any:
    """``x.max(1).values`` / ``.indices``: a field of torch's (values, indices) result."""
    field = node.args[1]
    pair = ctx.input(node, 0)
    if field not in ("values", "indices") or not isinstance(pair, (tuple, list)):
        raise NotImplementedError(f"attribute {field!r} of a tensor result is not converted "
                                  "(only .values and .indices of max/min/sort results are)")
    return pair[0 if field == "values" else 1]


register((getattr,), named_field, _field_layout)
