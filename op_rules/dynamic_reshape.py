"""Reshapes whose result has several axes that follow dynamic sizes (issue 14, item 3).

Keras reshapes to static sizes with one ``-1``; the batch axis is one unknown already, so
``x.view(B, H // 7, 7, W // 7, 7, C)`` (Swin's window partition) or ``x.view(B, g, C // g, H, W)``
(a channel shuffle) with both H and W dynamic cannot be a Keras reshape. Such a reshape is a gather
instead: the result's flat positions ``sum_t pos_t * stride_t`` are computed at runtime from the sizes
of its axes (witnesses of op_rules/sizes.py for sizes that follow a dynamic axis, the runtime batch for
an axis 0 as long as the sample's batch, numbers for the rest), then unravelled into the input's
physical layout when that is not PyTorch's order, and ``take`` reads the flattened input there. Exact
(a copy); in LiteRT it is GATHER with CUMSUM, MUL, ADD, FLOOR_DIV and FLOOR_MOD on int32 indices.
"""
from __future__ import annotations

from typing import Any

import keras
import numpy as np

from tracer.emitter import layers as L
from tracer.emitter.context import Emit
from tracer.errors import ConversionError
from tracer.ir import OpNode, Ref, op
from tracer.op_rules.sizes import positions, witness


def needs_gather(node: OpNode, ctx: Emit) -> bool:
    """Whether the result has more unknown sizes than a Keras reshape takes: two dynamic axes besides
    the batch, or one when the batch axis itself changes size."""
    dynamic = set(ctx.graph.graph.get("dynamic_dims", {}).get(node.name, ())) - {0}
    in_shape = op(ctx.graph, node.inputs[0]).shape
    return len(dynamic) >= 2 or (len(dynamic) == 1 and in_shape[0] != node.shape[0])


def gathers(node: OpNode) -> bool:
    """Whether the reshape's sizes hold two or more sizes that follow dynamic axes besides axis 0
    (``view(b, c, h, w)`` with h and w dynamic): known from the node alone, so the layout pass lets the
    gather read its input in the layout it has."""
    size = node.kw.get("size", node.kw.get("shape"))
    return isinstance(size, (tuple, list)) and sum(isinstance(s, Ref) for s in size[1:]) >= 2


def unit_axes(node: OpNode, ctx: Emit, x: Any, in_shape: tuple, target: tuple) -> Any:
    """The reshape as squeeze / expand_dims when it only removes or inserts unit axes (``mask.unsqueeze(0)``
    of a tensor whose axes follow dynamic sizes), else None. Keras shapes, physical order."""
    have = node.in_layouts[0].keras_shape(in_shape) if node.in_layouts[0].flat is None else None
    dynamic = set(ctx.graph.graph.get("dynamic_dims", {}).get(node.name, ()))
    if have is None or node.layout.flat is not None or any(node.shape[t] == 1 for t in dynamic):
        return None
    if [s for s in have if s != 1] != [s for s in target if s != 1]:
        return None
    y = keras.ops.squeeze(x, axis=tuple(a for a, s in enumerate(have) if s == 1)) if 1 in have else x
    for a, s in enumerate(target):
        if s == 1:
            y = keras.ops.expand_dims(y, a)
    return y


def gathered_reshape(node: OpNode, ctx: Emit, x: Any, size: Any, batch: int) -> Any:
    """``x`` (in ``node.in_layouts[0]``) reshaped to ``node.shape`` in ``node.layout`` by a gather."""
    src = op(ctx.graph, node.inputs[0])
    have, want = node.in_layouts[0], node.layout
    if have.flat is not None or want.flat is not None:
        raise _refuse(node, "its input or result is stored with flattened trailing axes")
    out = _out_sizes(node, ctx, size, batch)
    flat = _flat_index(node, ctx, out, want.perm)
    if not have.is_identity:
        flat = _unravel(node, ctx, flat, x, src.shape, have.perm)
    return keras.ops.take(keras.ops.reshape(x, (-1,)), flat)


def _out_sizes(node: OpNode, ctx: Emit, size: Any, batch: int) -> list[tuple[Any, Any]]:
    """(positions, size) per torch axis of the result; size an int or an int32 scalar tensor."""
    dynamic = set(ctx.graph.graph.get("dynamic_dims", {}).get(node.name, ()))
    size = tuple(size) if isinstance(size, (tuple, list)) and len(size) == node.rank else (None,) * node.rank
    out = []
    for t, (s, recorded) in enumerate(zip(size, node.shape)):
        if isinstance(s, Ref):
            w = ctx.tensor_input(node, ctx.index_of(node, s))
        elif t == 0 and recorded == batch and 0 not in dynamic:
            w = witness(ctx.anchor, 0)  # the model's runtime batch
        elif t not in dynamic:
            out.append((ctx.constant(np.arange(recorded, dtype=np.int32), ctx.name(node, f"pos{t}")), int(recorded)))
            continue
        else:
            raise _refuse(node, f"the size of its result axis {t} follows a dynamic axis but is not given as a "
                                "size tracer follows (write it as x.shape[..] arithmetic instead of -1)")
        out.append((positions(w), keras.ops.cast(keras.ops.sum(w), "int32")))
    return out


def _flat_index(node: OpNode, ctx: Emit, out: list, perm: tuple) -> Any:
    """PyTorch's flat position of every element of the result, in the result's physical layout."""
    rank = len(out)
    stride: Any = 1
    strides = [None] * rank
    for t in reversed(range(rank)):
        strides[t] = stride
        stride = stride * out[t][1]
    total = None
    for p, t in enumerate(perm):
        term = keras.ops.reshape(out[t][0], [1] * p + [-1] + [1] * (rank - p - 1)) * strides[t]
        total = term if total is None else L.safe_add(total, term)
    return total


def _unravel(node: OpNode, ctx: Emit, flat: Any, x: Any, shape: tuple, perm: tuple) -> Any:
    """Flat positions in PyTorch's order of the input -> flat positions in its physical layout ``perm``."""
    dynamic = set(ctx.graph.graph.get("dynamic_dims", {}).get(node.inputs[0], ()))
    sizes = [keras.ops.cast(keras.ops.sum(witness(x, perm.index(t))), "int32") if t in dynamic or t == 0
             else int(shape[t]) for t in range(len(shape))]
    torch_stride: Any = 1
    phys_stride: dict[int, Any] = {}
    acc: Any = 1
    for t in reversed(perm):
        phys_stride[t] = acc
        acc = acc * sizes[t]
    index = None
    for t in reversed(range(len(shape))):
        coord = keras.ops.mod(keras.ops.floor_divide(flat, torch_stride), sizes[t])
        torch_stride = torch_stride * sizes[t]
        term = coord * phys_stride[t]
        index = term if index is None else L.safe_add(index, term)
    return index


def _refuse(node: OpNode, why: str) -> ConversionError:
    return ConversionError(f"{node.describe()}: a reshape to {node.shape} with several axes that follow dynamic "
                           f"sizes, and {why}. Keep one of those axes static (leave it out of dynamic_shapes / "
                           "--dynamic-axis) or reshape one dynamic axis at a time")
