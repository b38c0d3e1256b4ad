"""Axis-moving ops: reshapes, permutes, concatenation, splitting, indexing and channel shuffles.

Most of them move no data in Keras: a permute only changes which torch axis each physical
axis holds, and a reshape runs on the physical tensor whenever the merged or split axes sit
in order there. See tracer/passes/layout.py.
"""
from __future__ import annotations

import operator
from typing import Any

import keras
import torch
import torch.nn as nn

from tracer.emitter import layers as L
from tracer.emitter.context import Emit
from tracer.op_rules.registry import Layout, rule
from tracer.op_rules.dynamic_reshape import gathered_reshape, gathers, needs_gather, unit_axes
from tracer.op_rules.sizes import dynamic_slices, has_dynamic_size, unfold_batch, unfolds_batch
from tracer.ir import OpNode, Phys, Ref, op
from tracer.passes.layout import drop_dims, permute_layout, regrouped_layout, reshape_layout, same_layout


def _reshape_layout(node: OpNode, ins: list, shapes: list) -> tuple[list, Phys]:
    phys = ins[0] if ins[0] is not None else Phys.identity(len(shapes[0]))
    found = reshape_layout(shapes[0], phys, node.shape) or regrouped_layout(shapes[0], phys, node.shape)
    if gathers(node) and phys.flat is None:  # a gather reads any layout and writes any: no transpose
        return [phys], found[1] if found is not None and found[1].flat is None else Phys.identity(node.rank)
    if found is None:
        return [Phys.identity(len(shapes[0]))], Phys.identity(node.rank)
    req, out = found
    return [req], out


@rule(nn.Flatten, nn.Unflatten, torch.flatten, "flatten", torch.unflatten, "unflatten", "view", "reshape",
      torch.reshape, torch.squeeze, "squeeze", torch.unsqueeze, "unsqueeze", "view_as", "reshape_as",
      layout=_reshape_layout)
def reshape(node: OpNode, ctx: Emit) -> Any:
    x = ctx.input(node, 0)
    phys = node.layout
    if phys.flat is not None:
        target = (*[node.shape[p] for p in phys.perm[:-1]], node.shape[-1])
    else:
        target = phys.keras_shape(node.shape)
    in_shape = op(ctx.graph, node.inputs[0]).shape
    size = node.kw.get("size", node.kw.get("shape"))
    if needs_gather(node, ctx) or gathers(node):  # more unknown sizes than a Keras reshape takes
        from tracer.op_rules.tensor_ops import sample_batch
        batch = sample_batch(ctx)
        if unfolds_batch(node, size, in_shape, batch):  # (B * T, ...) -> (B, T, ...): rows gathered
            return unfold_batch(node, ctx, x, tuple(size), in_shape, batch)
        y = unit_axes(node, ctx, x, in_shape, target)  # only unit axes come or go: squeeze / expand_dims
        return y if y is not None else gathered_reshape(node, ctx, x, size, batch)
    if tuple(target) == (1, *node.in_layouts[0].keras_shape(in_shape)):  # x.unsqueeze(0)
        return keras.ops.expand_dims(x, 0)
    if _moves_batch(in_shape, node.shape):
        raise NotImplementedError(f"reshaping {in_shape} to {node.shape} moves the batch axis away from axis 0, "
                                  "which a Keras model keeps as its batch axis")
    if tuple(x.shape[1:]) == tuple(target[1:]):
        return x
    dynamic = _dynamic_keras_axes(node, ctx)  # one axis whose size follows a dynamic input axis (tracer/dynamic.py)
    if dynamic is not None and in_shape[0] == node.shape[0]:
        return keras.layers.Reshape(tuple(-1 if i == dynamic else t for i, t in enumerate(target) if i))(x)
    return keras.ops.reshape(x, (-1, *target[1:]))


def _dynamic_keras_axes(node: OpNode, ctx: Emit) -> int | None:
    """The Keras axis (besides the batch) of the result whose size follows a dynamic axis, or None."""
    axes = set(ctx.graph.graph.get("dynamic_dims", {}).get(node.name, ())) - {0}
    if len(axes) != 1:
        return None
    phys = node.layout
    order = [*phys.perm[:-1], node.rank - 1] if phys.flat is not None else list(phys.perm)
    return order.index(axes.pop())


def _moves_batch(in_shape: tuple, out_shape: tuple) -> bool:
    """Whether the batch axis goes behind a new unit axis 0 (``x.view(1, -1)``).

    Keras reshapes with ``-1`` for axis 0, as torch code writes ``x.view(-1, ...)`` or
    ``x.view(x.size(0), ...)``. Behind a unit axis the batch size would be fixed to the sample's.
    A batch-1 sample is recorded at batch 2 (tracer/capture/fx.py), which tells; recorded at batch 1
    (the model fails at batch 2), it cannot tell, so it is trusted.
    """
    return bool(in_shape) and bool(out_shape) and in_shape[0] != 1 and out_shape[0] == 1


def permute_dims(node: OpNode, rank: int) -> tuple[int, ...]:
    if node.target in ("transpose", torch.transpose, "swapaxes", torch.swapaxes):
        a = node.kw.get("dim0", node.kw.get("axis0", node.args[1] if len(node.args) > 1 else None))
        b = node.kw.get("dim1", node.kw.get("axis1", node.args[2] if len(node.args) > 2 else None))
        dims = list(range(rank))
        dims[a % rank], dims[b % rank] = dims[b % rank], dims[a % rank]
        return tuple(dims)
    return tuple(d % rank for d in node.kw["dims"])


def _permute_layout(node: OpNode, ins: list, shapes: list) -> tuple[list, Phys]:
    rank = len(shapes[0])
    phys = ins[0] if ins[0] is not None and ins[0].flat is None else Phys.identity(rank)
    return [phys], permute_layout(phys, permute_dims(node, rank))


@rule("permute", torch.permute, "transpose", torch.transpose, "swapaxes", torch.swapaxes, layout=_permute_layout)
def permute(node: OpNode, ctx: Emit) -> Any:
    """No data moves: the output is the same physical tensor with a different layout record."""
    return ctx.input(node, 0)


def _along_layout(node: OpNode, ins: list, shapes: list) -> tuple[list, Phys]:
    """cat/split: elementwise layouts, but not along a flattened axis (its ``flat`` record
    describes the whole axis, not pieces or concatenations of it)."""
    rank = len(node.shape) if node.shape is not None else len(shapes[0])  # not an empty 1-D operand's
    req, out = same_layout(ins, [len(s) for s in shapes], rank)
    if out.flat is not None and node.kw.get("dim", 0) % rank == rank - 1:
        return [Phys.identity(len(s)) for s in shapes], Phys.identity(rank)
    return req, out


@rule(torch.cat, torch.concat, torch.concatenate, layout=_along_layout)
def cat(node: OpNode, ctx: Emit) -> Any:
    refs = node.kw.get("tensors", node.args[0])
    # an empty constant adds nothing (GPT-2's empty key/value cache; torch also skips 1-D empty tensors)
    idx = [i for i in (ctx.index_of(node, r) for r in refs if isinstance(r, Ref)) if not _empty_constant(ctx, node, i)]
    parts = [ctx.tensor_input(node, i) for i in idx]
    if len(parts) == 1:
        return parts[0]
    dim = node.kw.get("dim", 0)
    return keras.layers.Concatenate(axis=ctx.axis(node, dim), name=ctx.name(node))(parts)


def _empty_constant(ctx: Emit, node: OpNode, i: int) -> bool:
    src = op(ctx.graph, node.inputs[i])
    return src.is_constant and isinstance(src.value, torch.Tensor) and src.value.numel() == 0


@rule(torch.stack, layout=Layout.TORCH)
def stack(node: OpNode, ctx: Emit) -> Any:
    refs = node.kw.get("tensors", node.args[0])
    parts = [ctx.tensor_input(node, ctx.index_of(node, r)) for r in refs]
    return keras.ops.stack(parts, axis=node.kw.get("dim", 0) % node.rank)


@rule(torch.chunk, "chunk", torch.split, "split", torch.tensor_split, layout=_along_layout)
def split(node: OpNode, ctx: Emit) -> Any:
    """Pieces along one axis; their sizes come from the shapes PyTorch produced."""
    x = ctx.input(node, 0)
    dim = node.kw.get("dim", 0)
    rank = len(node.structure[0])
    if dim % rank == 0:
        raise NotImplementedError("splitting the batch axis (dim=0) makes pieces whose sizes depend on the batch "
                                  "size; a Keras model's batch axis is not fixed")
    axis = ctx.axis(node, dim % rank)
    outs, start = [], 0
    for k, shape in enumerate(node.structure):
        size = shape[dim % rank]
        sl = [[None, None, None] for _ in range(rank)]
        sl[axis] = [start, start + size, None]
        outs.append(L.strided_slice(x, sl))
        start += size
    return tuple(outs)


def _index(node: OpNode, rank: int) -> list | None:
    """The index of x[...] as one entry per torch axis (slice, int or None), or None if advanced."""
    idx = node.args[1]
    idx = idx if isinstance(idx, tuple) else (idx,)
    if any(not (isinstance(i, (slice, int)) or i is None or i is Ellipsis) for i in idx):
        return None
    n_real = sum(1 for i in idx if i is not None and i is not Ellipsis)
    out: list = []
    for i in idx:
        if i is Ellipsis:
            out += [slice(None)] * (rank - n_real)
        else:
            out.append(i)
    real = sum(1 for i in out if i is not None)
    return out + [slice(None)] * (rank - real)


def _is_element(node: OpNode, shapes: list) -> bool:
    """Whether ``node`` takes an element of a tuple of tensors (``y.chunk(2, 1)[0]``).

    For a tuple, ``shapes[0]`` is its first element's shape. An int index on a tensor drops
    exactly the first axis, so an int index whose result is not ``shapes[0][1:]`` is a tuple's.
    """
    idx = node.args[1]
    return node.shape is None or (isinstance(idx, int) and tuple(node.shape) != tuple(shapes[0][1:]))


def _getitem_layout(node: OpNode, ins: list, shapes: list) -> tuple[list, Phys]:
    if ins and ins[0] is None and has_dynamic_size(node.args[1:]):  # a constant sliced to a dynamic size
        ins = [Phys.identity(len(shapes[0])), *ins[1:]]
    req, out = _getitem_layouts(node, ins, shapes)
    # dynamic slice bounds (1-D sizes, op_rules/sizes.py) are read as they are
    return list(req) + [Phys.identity(len(s)) for s in shapes[len(req):]], out


def _getitem_layouts(node: OpNode, ins: list, shapes: list) -> tuple[list, Phys]:
    phys = ins[0]
    if phys is not None and phys.items is not None and isinstance(node.args[1], int):
        return [phys], phys.items[node.args[1]]  # an element of a tuple whose elements differ in layout
    if phys is None or _is_element(node, shapes):  # element of a tuple: the tuple's layout
        same_rank = phys is None or node.shape is None or len(phys.perm) == node.rank
        return [phys], phys if same_rank else Phys.identity(node.rank)  # (MHA weights: other rank)
    rank = len(shapes[0])
    index = _index(node, rank)
    if index is None:  # an index tensor: op_rules/tensor_ops.py
        from tracer.op_rules.tensor_ops import advanced_layout
        return advanced_layout(node, [phys, *ins[1:]], shapes)
    if phys.flat is not None or any(i is None for i in index):
        return [Phys.identity(rank)], Phys.identity(node.rank)
    dropped = {d for d, i in enumerate(index) if isinstance(i, int)}
    return [phys], drop_dims(phys, dropped)


@rule(operator.getitem, layout=_getitem_layout)
def getitem(node: OpNode, ctx: Emit) -> Any:
    x = ctx.input(node, 0)
    if isinstance(x, (tuple, list)):
        return x[node.args[1]]
    rank = len(node.in_layouts[0].perm)
    index = _index(node, rank)
    if index is None:  # an index tensor: op_rules/tensor_ops.py
        from tracer.op_rules.tensor_ops import advanced_getitem
        idx = node.args[1]
        return advanced_getitem(node, ctx, x, idx if isinstance(idx, tuple) else (idx,))
    if has_dynamic_size(index):  # a bound that follows a dynamic axis (tracer/capture/sizes.py)
        x, index = dynamic_slices(node, ctx, ctx.tensor_input(node, 0), index)
    torch_dims = [i for i in index if i is not None]
    per_axis = [torch_dims[d] for d in node.in_layouts[0].perm]
    if isinstance(per_axis[0], int):  # Keras axis 0 (torch's after a permute: qkv[0] of (3, B, ...) is not)
        raise NotImplementedError(f"index {node.args[1]!r} takes one element of the batch axis, which removes "
                                  "it; a Keras model keeps axis 0 as its batch axis: slice it instead (x[0:1])")
    spec = [[i, i + 1 if i != -1 else None, None] if isinstance(i, int) else [i.start, i.stop, i.step]
            for i in per_axis]
    y = L.strided_slice(x, spec) if any(s != [None, None, None] for s in spec) else x
    drop = [a for a, i in enumerate(per_axis) if isinstance(i, int)]
    if drop and any(y.shape[a] is None for a in drop):  # a dynamic axis (tracer/dynamic.py): index it directly
        y = x[tuple(i if isinstance(i, int) else slice(i.start, i.stop, i.step) for i in per_axis)]
    elif drop:
        y = keras.ops.squeeze(y, axis=tuple(drop))
    for axis in _new_axes(index):  # ascending, so each lands at its final position
        y = keras.ops.expand_dims(y, axis)
    return y


def _new_axes(index: list) -> list[int]:
    """Output positions of the unit axes that ``None`` entries of an index insert."""
    axes, pos = [], 0
    for i in index:
        if i is None:
            axes.append(pos)
        if not isinstance(i, int):
            pos += 1
    return axes


def _channel_layout(node: OpNode, ins: list, shapes: list) -> tuple[list, Phys]:
    """Any layout in which torch's channel axis 1 is one Keras axis (not a flattened one)."""
    rank = len(shapes[0])
    phys = ins[0] if ins[0] is not None and ins[0].flat is None else Phys.identity(rank)
    return [phys], phys


@rule(nn.ChannelShuffle, torch.channel_shuffle, torch.native_channel_shuffle, torch.nn.functional.channel_shuffle,
      torch.ops.aten.channel_shuffle.default, torch.ops.aten.native_channel_shuffle.default, layout=_channel_layout)
def channel_shuffle(node: OpNode, ctx: Emit) -> Any:
    """ShuffleNet's ``(B, g, C/g, ...) -> (B, C/g, g, ...)`` on channels: one gather with the permutation."""
    groups = int(node.module.groups if node.module is not None else node.kw.get("groups", node.kw.get("arg1")))
    channels = node.shape[1]
    if channels % groups:
        raise ValueError(f"channel_shuffle: {channels} channels do not split into groups={groups}")
    perm = [g * (channels // groups) + c for c in range(channels // groups) for g in range(groups)]
    return keras.ops.take(ctx.input(node, 0), perm, axis=node.in_layouts[0].axis(1))
