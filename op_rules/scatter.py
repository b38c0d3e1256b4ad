"""Writes into slices, as torch.export records ``mask[a:b, c:d] = k``: ``aten.copy`` (the value broadcast to
the slice) and ``aten.slice_scatter`` (the slice written back into the whole).

With static sizes such a tensor is built from constants and folded at capture; these rules matter when its
size follows a dynamic axis (Swin's shifted-window mask, ``x.new_zeros((H, W))`` filled region by region,
issue 14). ``slice_scatter`` selects the written positions along the axis with a mask computed at runtime
(bounds counted from the end hold at every size) and gathers the source there; in LiteRT it is CUMSUM,
GATHER, comparisons and SELECT_V2.
"""
from __future__ import annotations

from typing import Any

import keras
import torch

from tracer.emitter.context import Emit
from tracer.errors import ConversionError
from tracer.ir import OpNode, Ref
from tracer.op_rules.registry import Layout, rule
from tracer.op_rules.sizes import positions, witness

aten = torch.ops.aten
_BIG = 2 ** 62  # ATen writes sys.maxsize for "to the end"


@rule(aten.copy.default, layout=Layout.TORCH)
def copy(node: OpNode, ctx: Emit) -> Any:
    """``self.copy_(src)`` out of place: ``src`` in ``self``'s dtype, broadcast to ``self``'s shape."""
    target, src = ctx.tensor_input(node, 0), ctx.tensor_input(node, 1)
    src = keras.ops.cast(src, target.dtype)
    return keras.ops.where(keras.ops.ones_like(target, dtype="bool"), src, target)


@rule(aten.slice_scatter.default, layout=Layout.TORCH)
def slice_scatter(node: OpNode, ctx: Emit) -> Any:
    """``out = self.clone(); out[..., start:end:step, ...] = src`` along torch axis ``dim``."""
    x, src = ctx.tensor_input(node, 0), ctx.tensor_input(node, 1)
    rank = len(x.shape)
    axis = int(node.kw.get("dim", 0)) % rank
    step = node.kw.get("step", 1)
    if not isinstance(step, int) or step < 1:
        raise ConversionError(f"{node.describe()}: a write into a slice with step {step!r}; only a whole-number "
                              "step >= 1 is converted")
    pos = positions(witness(x, axis))
    n = keras.ops.cast(keras.ops.sum(witness(x, axis)), "int32")
    start = _bound(node, ctx, node.kw.get("start"), n, 0)
    end = _bound(node, ctx, node.kw.get("end"), n, None)
    rel = pos - start
    inside = keras.ops.logical_and(keras.ops.greater_equal(rel, 0), keras.ops.less(pos, end))
    if step > 1:
        inside = keras.ops.logical_and(inside, keras.ops.equal(keras.ops.mod(rel, step), 0))
    count = keras.ops.cast(keras.ops.sum(witness(src, axis)), "int32")
    idx = keras.ops.maximum(keras.ops.minimum(keras.ops.floor_divide(rel, step), count - 1), 0)
    placed = keras.ops.take(keras.ops.cast(src, x.dtype), idx, axis=axis)
    mask = keras.ops.reshape(inside, [1] * axis + [-1] + [1] * (rank - axis - 1))
    return keras.ops.where(mask, placed, x)


def _bound(node: OpNode, ctx: Emit, value: Any, n: Any, default: Any) -> Any:
    """A slice bound as an int32 scalar in [0, n]: a number (negative counts from the end), a size that
    follows a dynamic axis (a witness), or None."""
    if value is None or (isinstance(value, int) and value >= _BIG):
        return n if default is None else default
    if isinstance(value, Ref):
        return keras.ops.minimum(keras.ops.cast(keras.ops.sum(ctx.tensor_input(node, ctx.index_of(node, value))),
                                                "int32"), n)
    if isinstance(value, int):
        return keras.ops.maximum(n + value, 0) if value < 0 else keras.ops.minimum(value, n)
    raise ConversionError(f"{node.describe()}: a slice bound {value!r} that is neither a number nor a size")
