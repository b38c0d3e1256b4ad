"""Tensor ops of transformer and generative nets: expand/repeat/tile, masking and selection
(masked_fill, where, gather, index_select, indexing with constant index tensors), roll, flip,
cumsum, triu/tril, ``*_like`` creation, dtype casts, and F.unfold / F.fold.

Creation ops whose sizes come from ``x.shape`` (``torch.arange(x.shape[-1])``) are constants
already at capture (tracer/capture/fx.py). A constant expanded to the sample's batch size (a class
token ``cls.expand(x.shape[0], -1, -1)``) is multiplied by ones of the model's batch size at
runtime (a batch-1 sample is recorded at batch 2, tracer/capture/fx.py; recorded at batch 1, an expand
to batch 1 is taken for that too). ``torch.zeros(x.shape[0], ...)``, captured by fx or torch.export,
becomes zeros of the runtime batch size the same way.
"""
from __future__ import annotations

import math
from typing import Any

import keras
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from tracer.emitter import layers as L
from tracer.emitter.context import Emit, to_numpy
from tracer.op_rules.common import call_with_weights, ntuple, pad_spatial, param
from tracer.op_rules.indexing import outer_index
from tracer.op_rules.registry import Layout, rule
from tracer.op_rules.sizes import expanded, filled, has_dynamic_size, witness
from tracer.ir import OpNode, Phys, Ref, ordered

_KERAS_DTYPE = {"float64": "float32", "int64": "int32"}
aten = torch.ops.aten


def _keep_layout(node: OpNode, ins: list, shapes: list) -> tuple[list, Phys]:
    """Same rank in and out, one axis named by torch dim: any layout but a flattened one."""
    rank = len(shapes[0])
    phys = ins[0] if ins[0] is not None and ins[0].flat is None else Phys.identity(rank)
    return [phys] + [Phys.identity(len(s)) for s in shapes[1:]], phys


def _dims(node: OpNode, key: str, rank: int) -> list[int]:
    d = node.kw.get(key)
    return [int(v) % rank for v in (d if isinstance(d, (tuple, list)) else (d,))]


def batch_ones(ctx: Emit, rank: int, name: str) -> Any:
    """Ones of shape (B, 1, ..., 1), B the model's batch size at runtime."""
    a = ctx.anchor
    if any(d is None for d in a.shape[1:]):  # a dynamic axis (tracer/dynamic.py): no static size to flatten
        return keras.ops.reshape(witness(a, 0), (-1, *([1] * (rank - 1))))
    flat = keras.ops.reshape(a, (-1, math.prod(a.shape[1:]))) if len(a.shape) != 2 else a
    first = L.strided_slice(flat, [[None, None, None], [0, 1, None]])
    ones = keras.ops.ones_like(keras.ops.cast(first, "float32"))
    return keras.ops.reshape(ones, (-1, *([1] * (rank - 1))))


def _batched_constant(node: OpNode, ctx: Emit, value: np.ndarray) -> Any:
    """A constant whose axis 0 becomes the batch: ``value`` (1, ...) times batch ones."""
    const = ctx.constant(value.astype(np.float32) if value.dtype == np.float64 else value, ctx.name(node, "value"))
    return keras.ops.multiply(batch_ones(ctx, value.ndim, ctx.name(node, "batch")), const)


def sample_batch(ctx: Emit) -> int:
    """The batch size of the sample input (axis 0 of the first input)."""
    first = next(n for n in ordered(ctx.graph) if n.kind == "placeholder")
    return first.shape[0] if first.shape else 1


# ---- expand / repeat / tile ----------------------------------------------------------------

def _grow_layout(node: OpNode, ins: list, shapes: list) -> tuple[list, Phys]:
    if len(shapes[0]) == node.rank:
        return _keep_layout(node, ins, shapes)
    return [Phys.identity(len(s)) for s in shapes], Phys.identity(node.rank)


def _reps(node: OpNode, in_shape: tuple) -> list[int]:
    out = node.shape
    in_shape = (1,) * (len(out) - len(in_shape)) + tuple(in_shape)
    if node.target in ("expand", "expand_as"):
        return [o if i == 1 else 1 for i, o in zip(in_shape, out)]
    return [o // i for i, o in zip(in_shape, out)]


@rule("expand", "expand_as", "repeat", torch.tile, "tile", layout=_grow_layout)
def expand(node: OpNode, ctx: Emit) -> Any:
    """expand broadcasts unit axes, repeat/tile repeat whole axes: both a tile in Keras."""
    src = ctx.graph.nodes[node.inputs[0]]["op"]
    if node.target == "expand" and has_dynamic_size(node.kw.get("size")):  # tracer/capture/sizes.py
        return expanded(node, ctx, ctx.tensor_input(node, 0), src.shape, sample_batch(ctx))
    reps = _reps(node, src.shape)
    x = ctx.input(node, 0)
    if isinstance(x, np.ndarray):  # a constant (a token, a table): tiled here, batch at runtime
        value = to_numpy(src.value).reshape((1,) * (node.rank - src.rank) + tuple(src.shape))
        value = np.tile(value, [1] + reps[1:])
        if value.shape[0] == 1 and node.shape[0] == sample_batch(ctx):  # sized by x.shape[0]: the batch
            return _batched_constant(node, ctx, value)
        if reps[0] != 1:
            raise NotImplementedError(f"repeating a constant of batch size {value.shape[0]} along the batch axis")
        return ctx.constant(value, ctx.name(node))
    if src.rank != node.rank:
        raise NotImplementedError(f"{node.target} of {src.shape} to {node.shape} adds axes in front of the batch "
                                  "axis, which a Keras model keeps as axis 0")
    phys = node.layout
    physical = [reps[p] for p in phys.perm]
    # a unit axis 0 repeated to the batch size (XCiT: pos.repeat(B, 1, 1, 1)): ones of the runtime batch
    batched = src.shape[0] == 1 and reps[0] > 1 and reps[0] == sample_batch(ctx) and phys.perm[0] == 0
    physical[0] = 1 if batched else physical[0]
    y = x if all(r == 1 for r in physical) else keras.ops.tile(x, physical)
    if batched:
        ones = keras.ops.cast(batch_ones(ctx, node.rank, ctx.name(node, "batch")), y.dtype)
        y = keras.ops.logical_and(ones, y) if y.dtype == "bool" else keras.ops.multiply(ones, y)
    return y


# ---- casts and creation like a tensor ------------------------------------------------------

@rule("float", "double", "half", "int", "long", "bool", "to", "type", "type_as", layout=Layout.ANY)
def cast(node: OpNode, ctx: Emit) -> Any:
    """A cast to the dtype PyTorch produced; nothing when it does not change (``.to(device)``)."""
    x = ctx.input(node, 0)
    src = ctx.graph.nodes[node.inputs[0]]["op"]
    if node.dtype is None or node.dtype == src.dtype:
        return x
    return keras.ops.cast(x, _KERAS_DTYPE.get(node.dtype, node.dtype))


_FILLS = {torch.zeros_like: 0.0, torch.empty_like: 0.0, torch.ones_like: 1.0,
          aten.zeros_like.default: 0.0, aten.empty_like.default: 0.0, aten.ones_like.default: 1.0}


@rule(*_FILLS, torch.full_like, aten.full_like.default, layout=Layout.ANY)
def like(node: OpNode, ctx: Emit) -> Any:
    x = ctx.input(node, 0)
    fill = _FILLS.get(node.target)
    fill = float(node.kw["fill_value"]) if fill is None else fill
    dtype = _KERAS_DTYPE.get(node.dtype, node.dtype)
    zeros = keras.ops.zeros_like(keras.ops.cast(x, dtype) if dtype != x.dtype else x)
    if fill == 0.0:
        return zeros
    const = ctx.constant(np.full((1,) * len(x.shape), fill, dtype=dtype), ctx.name(node, "fill"))
    return keras.ops.add(zeros, const)


_FULL = {torch.zeros: 0.0, torch.ones: 1.0, torch.empty: 0.0, "new_zeros": 0.0, "new_ones": 1.0, "new_empty": 0.0,
         aten.zeros.default: 0.0, aten.ones.default: 1.0, aten.empty.memory_format: 0.0}


@rule(*_FULL, torch.full, "new_full", aten.full.default, layout=Layout.TORCH)
def batch_sized_full(node: OpNode, ctx: Emit) -> Any:
    """``torch.zeros(x.shape[0], ...)`` and the like: constants whose axis 0 is the batch size
    (capture keeps only those as operations)."""
    fill = _FULL.get(node.target)
    fill = float(node.kw.get("fill_value", node.args[-1] if node.args else 0.0)) if fill is None else fill
    size = node.kw.get("size")
    if has_dynamic_size(size):  # sizes that follow a dynamic axis (tracer/capture/sizes.py)
        return filled(node, ctx, tuple(size), fill, sample_batch(ctx))
    dtype = _KERAS_DTYPE.get(node.dtype, node.dtype)
    return _batched_constant(node, ctx, np.full((1, *node.shape[1:]), fill, dtype=dtype))


# ---- masking and selection -----------------------------------------------------------------

def _operand(node: OpNode, ctx: Emit, v: Any, rank: int, dtype: str, name: str) -> Any:
    """A Ref as a Keras tensor in its required layout, a number as a broadcastable constant."""
    if isinstance(v, Ref):
        return ctx.tensor_input(node, ctx.index_of(node, v))
    return ctx.constant(np.full((1,) * rank, v, dtype=dtype), ctx.name(node, name))


@rule(torch.masked_fill, "masked_fill", "masked_fill_", layout=Layout.ANY)
def masked_fill(node: OpNode, ctx: Emit) -> Any:
    x = ctx.input(node, 0)
    mask = ctx.tensor_input(node, ctx.index_of(node, node.kw["mask"]))
    mask = mask if mask.dtype == "bool" else keras.ops.cast(mask, "bool")
    value = node.kw["value"]
    if isinstance(value, Ref):
        value = float(to_numpy(ctx.graph.nodes[value.name]["op"].value).reshape(()))
    fill = _operand(node, ctx, float(value), len(x.shape), "float32" if "float" in str(x.dtype) else x.dtype, "value")
    return keras.ops.where(mask, fill, x)


@rule(torch.where, layout=Layout.ANY)
def where(node: OpNode, ctx: Emit) -> Any:
    if "input" not in node.kw:
        raise NotImplementedError("torch.where(condition) (indices of nonzero elements) is not supported")
    rank = node.rank
    cond = _operand(node, ctx, node.kw["condition"], rank, "bool", "condition")
    cond = cond if cond.dtype == "bool" else keras.ops.cast(cond, "bool")
    dtype = _KERAS_DTYPE.get(node.dtype, node.dtype)
    a = _operand(node, ctx, node.kw["input"], rank, dtype, "input")
    b = _operand(node, ctx, node.kw["other"], rank, dtype, "other")
    return keras.ops.where(cond, a, b)


@rule(torch.roll, "roll", layout=_keep_layout)
def roll(node: OpNode, ctx: Emit) -> Any:
    x = ctx.input(node, 0)
    rank = len(node.in_layouts[0].perm)
    if node.kw.get("dims") in (None, (), []):
        raise NotImplementedError("roll without dims (over the flattened tensor, batch included)")
    shifts = node.kw["shifts"]
    shifts = shifts if isinstance(shifts, (tuple, list)) else (shifts,)
    for s, d in zip(shifts, _dims(node, "dims", rank)):
        x = _roll_axis(x, int(s), node.shape[d], ctx.axis(node, d), rank)
    return x


def _roll_axis(x: Any, shift: int, n: int, axis: int, rank: int) -> Any:
    """Roll as two slices and a concatenation: ``tf.roll`` is no TFLite builtin op (Flex only). The
    slice bounds count from the end for a positive shift and from the start for a negative one, so they
    hold at every size of a dynamic axis longer than the shift (Swin's cyclic shift)."""
    if not -n < shift < n:
        shift %= n
    if shift == 0:
        return x
    axis %= rank
    if axis == 0:
        raise NotImplementedError("roll over the batch axis")
    head, tail = [slice(None)] * rank, [slice(None)] * rank
    k = shift if shift > 0 else -shift  # right by k: x[-k:] then x[:-k]; left by k: x[k:] then x[:k]
    head[axis], tail[axis] = (slice(-k, None), slice(0, -k)) if shift > 0 else (slice(k, None), slice(0, k))
    return keras.ops.concatenate([x[tuple(head)], x[tuple(tail)]], axis=axis)


@rule(torch.flip, "flip", layout=_keep_layout)
def flip(node: OpNode, ctx: Emit) -> Any:
    x = ctx.input(node, 0)
    for d in _dims(node, "dims", len(node.in_layouts[0].perm)):
        x = keras.ops.flip(x, axis=ctx.axis(node, d))
    return x


@rule(torch.cumsum, "cumsum", layout=_keep_layout)
def cumsum(node: OpNode, ctx: Emit) -> Any:
    x = ctx.input(node, 0)
    dim = _dims(node, "dim", len(node.in_layouts[0].perm))[0]
    y = keras.ops.cumsum(x, axis=ctx.axis(node, dim))
    return y if node.dtype is None else keras.ops.cast(y, _KERAS_DTYPE.get(node.dtype, node.dtype))


@rule(torch.triu, "triu", aten.triu.default, torch.tril, "tril", aten.tril.default, layout=Layout.TORCH)
def triangle(node: OpNode, ctx: Emit) -> Any:
    fn = keras.ops.triu if node.target in (torch.triu, "triu", aten.triu.default) else keras.ops.tril
    return fn(ctx.input(node, 0), k=int(node.kw.get("diagonal", 0)))


def _index(ctx: Emit, node: OpNode, key: str) -> np.ndarray | Any:
    """A constant index as int32 numpy, or a computed one as an int32 Keras tensor."""
    ref = node.kw[key]
    src = ctx.graph.nodes[ref.name]["op"]
    if src.is_constant:
        return to_numpy(src.value).astype(np.int64)
    return keras.ops.cast(ctx.tensor_input(node, ctx.index_of(node, ref)), "int32")


@rule(torch.index_select, "index_select", layout=_keep_layout)
def index_select(node: OpNode, ctx: Emit) -> Any:
    x = ctx.input(node, 0)
    dim = _dims(node, "dim", len(node.in_layouts[0].perm))[0]
    if dim == 0:
        raise NotImplementedError("index_select on the batch axis (dim=0)")
    return take(node, ctx, x, _index(ctx, node, "index"), ctx.axis(node, dim))


def take(node: OpNode, ctx: Emit, x: Any, idx: Any, axis: int) -> Any:
    if isinstance(idx, np.ndarray):
        size = x.shape[axis]
        idx = np.where(idx < 0, idx + size, idx)
        if idx.ndim == 1:
            return L.axis_gather(x, axis, idx.tolist())
        idx = ctx.constant(idx.astype(np.int32), ctx.name(node, "index"))
    return keras.ops.take(x, idx, axis=axis)


@rule(torch.gather, "gather", layout=Layout.TORCH)
def gather(node: OpNode, ctx: Emit) -> Any:
    """take_along_axis, after cutting the other axes of ``input`` to the index's sizes."""
    x = ctx.input(node, 0)
    dim = _dims(node, "dim", node.rank)[0]
    if dim == 0:
        raise NotImplementedError("gather along the batch axis (dim=0)")
    idx = _index(ctx, node, "index")
    in_shape = ctx.graph.nodes[node.inputs[0]]["op"].shape
    if isinstance(idx, np.ndarray):
        if idx.shape[0] > 1 and not (idx == idx[:1]).all():
            raise NotImplementedError("gather with a constant index that differs per batch item")
        idx = ctx.constant(np.where(idx < 0, idx + in_shape[dim], idx)[:1].astype(np.int32), ctx.name(node, "index"))
    cut = [[None, None, None]] + [[None, n, None] if d != dim and n < s else [None, None, None]
                                  for d, (n, s) in enumerate(zip(node.shape, in_shape)) if d > 0]
    if any(c != [None, None, None] for c in cut):
        x = L.strided_slice(x, cut)
    return keras.ops.take_along_axis(x, idx, axis=dim)


def _advanced_dim(index: tuple, rank: int) -> int | None:
    """The dim of the one index tensor in ``index`` when every other entry is a full slice."""
    tensors = [k for k, i in enumerate(index) if isinstance(i, Ref)]
    if len(tensors) != 1 or any(i != slice(None) and i is not Ellipsis for k, i in enumerate(index)
                                if k != tensors[0]):
        return None
    k = tensors[0]
    return k if Ellipsis not in index[:k] else rank - (len(index) - k)


def _index_tuple(node: OpNode) -> tuple:
    if node.target is aten.index.Tensor:
        return tuple(slice(None) if i is None else i for i in node.kw["indices"])
    idx = node.args[1]
    return idx if isinstance(idx, tuple) else (idx,)


def advanced_layout(node: OpNode, ins: list, shapes: list) -> tuple[list, Phys]:
    """x[:, idx] with a 1-D index keeps the rank: it runs in the input's layout."""
    rank = len(shapes[0])
    phys = ins[0]
    rest = [Phys.identity(len(s)) for s in shapes[1:]]
    if (phys is not None and phys.flat is None and node.rank == rank
            and _advanced_dim(_index_tuple(node), rank) is not None):
        return [phys, *rest], phys
    return [Phys.identity(rank), *rest], Phys.identity(node.rank)


def advanced_getitem(node: OpNode, ctx: Emit, x: Any, index: tuple) -> Any:
    """``x[..., idx]`` / ``x[:, idx]``: one constant integer (or boolean) tensor index, the other
    entries full slices. Called by the getitem rule (op_rules/shape.py)."""
    rank = len(node.in_layouts[0].perm)
    dim = _advanced_dim(index, rank)
    if dim is None:
        return outer_index(node, ctx, x, index)  # several index tensors (op_rules/indexing.py)
    src = ctx.graph.nodes[index[[k for k, i in enumerate(index) if isinstance(i, Ref)][0]].name]["op"]
    if not src.is_constant:
        raise NotImplementedError("indexing with a computed index tensor; use torch.gather or index_select")
    idx = to_numpy(src.value)
    idx = np.nonzero(idx)[0] if idx.dtype == bool else idx.astype(np.int64)
    if dim == 0:
        raise NotImplementedError("indexing the batch axis with a tensor")
    return take(node, ctx, x, idx, ctx.axis(node, dim))


@rule(aten.index.Tensor, layout=advanced_layout)
def aten_index(node: OpNode, ctx: Emit) -> Any:
    """``aten.index.Tensor(input, indices)``: ``None`` entries are full slices."""
    return advanced_getitem(node, ctx, ctx.input(node, 0), _index_tuple(node))


# ---- unfold / fold (im2col and back) -------------------------------------------------------

def _patch_args(node: OpNode, n: int = 2) -> tuple:
    return tuple(ntuple(param(node, k, d), n) for k, d in
                 (("kernel_size", 1), ("dilation", 1), ("padding", 0), ("stride", 1)))


def _one_hot_kernel(channels: int, kernel: tuple) -> np.ndarray:
    """(kh, kw, C, C*kh*kw): output channel c*kh*kw + i*kw + j copies input channel c at (i, j)."""
    kh, kw = kernel
    k = np.zeros((kh, kw, channels, channels * kh * kw), np.float32)
    for c in range(channels):
        for i in range(kh):
            for j in range(kw):
                k[i, j, c, c * kh * kw + i * kw + j] = 1.0
    return k


def _unfold_layout(node: OpNode, ins: list, shapes: list) -> tuple[list, Phys]:
    return [Phys.channels_last(len(shapes[0]))], Phys((0, 2, 1))


@rule(nn.Unfold, F.unfold, aten.im2col.default, layout=_unfold_layout)
def unfold(node: OpNode, ctx: Emit) -> Any:
    """A convolution with a one-hot kernel copies each patch into the channels (exactly): NHWC
    (B, oh, ow, C*kh*kw) reshaped to (B, L, C*kh*kw) is torch's (B, C*kh*kw, L) channels-last."""
    kernel, dilation, padding, stride = _patch_args(node)
    x = pad_spatial(ctx.input(node, 0), [(p, p) for p in padding], "zeros", ctx.name(node, "pad"))
    channels = x.shape[-1]
    layer = keras.layers.Conv2D(channels * kernel[0] * kernel[1], kernel, strides=stride, dilation_rate=dilation,
                                padding="valid", use_bias=False, name=ctx.name(node))
    y = call_with_weights(layer, x, [_one_hot_kernel(channels, kernel)])
    layer.trainable = False
    return keras.ops.reshape(y, (-1, y.shape[1] * y.shape[2], y.shape[3]))


def _fold_layout(node: OpNode, ins: list, shapes: list) -> tuple[list, Phys]:
    return [Phys((0, 2, 1))], Phys.channels_last(node.rank)


@rule(nn.Fold, F.fold, aten.col2im.default, layout=_fold_layout)
def fold(node: OpNode, ctx: Emit) -> Any:
    """The transposed convolution of the same one-hot kernel sums the patches back, then the
    padding is cropped."""
    kernel, dilation, padding, stride = _patch_args(node)
    if dilation != (1, 1):
        raise NotImplementedError("fold with dilation")
    out = ntuple(param(node, "output_size"), 2)
    channels = node.shape[1]
    grid = [(o + 2 * p - (k - 1) - 1) // s + 1 for o, p, k, s in zip(out, padding, kernel, stride)]
    x = keras.ops.reshape(ctx.input(node, 0), (-1, grid[0], grid[1], channels * kernel[0] * kernel[1]))
    extra = [o + 2 * p - ((g - 1) * s + k) for o, p, g, s, k in zip(out, padding, grid, stride, kernel)]
    layer = keras.layers.Conv2DTranspose(channels, kernel, strides=stride, padding="valid", use_bias=False,
                                         output_padding=tuple(extra) if any(extra) else None, name=ctx.name(node))
    if any(e >= s for e, s in zip(extra, stride)):
        raise NotImplementedError(f"fold with output_size {out} larger than the patches cover")
    y = call_with_weights(layer, x, [_one_hot_kernel(channels, kernel)])
    layer.trainable = False
    if any(padding):
        y = L.strided_slice(y, [[None, None, None], *[[p, p + o, None] for p, o in zip(padding, out)],
                                [None, None, None]])
    return y
