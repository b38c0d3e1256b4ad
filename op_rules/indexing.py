"""Indexing with several constant index tensors that index independent axes (outer indexing).

Hugging Face's mask functions (``transformers/masking_utils.py``) write a padding mask as
``padding_mask[batch_idx, kv_idx]`` with ``batch_idx = arange(B)[:, None, None, None]`` and
``kv_idx = arange(K)[None, None, None, :]``: each index tensor varies along one axis of the
broadcast result, a different one for each. That is a ``take`` per indexed axis, the taken axes
then ordered and reshaped into the broadcast shape. An ``arange`` over the whole axis takes
nothing; on the batch axis it is the only index accepted (it follows the runtime batch, as
PyTorch's ``arange(B)`` does). Called from ``advanced_getitem`` (op_rules/tensor_ops.py) for
``x[i, j]`` (torch.fx) and ``aten.index.Tensor`` (torch.export) when more than one index tensor
is given.
"""
from __future__ import annotations

import re
from typing import Any

import keras
import numpy as np

from tracer.emitter.context import Emit, to_numpy
from tracer.ir import OpNode, Ref


def _varying_axis(idx: np.ndarray, rank: int) -> int | None:
    """The one axis (of the broadcast result, right-aligned) along which ``idx`` has more than one entry."""
    axes = [rank - idx.ndim + a for a, n in enumerate(idx.shape) if n != 1]
    if len(axes) > 1:
        raise NotImplementedError(f"an index tensor of shape {idx.shape} that varies along more than one axis")
    return axes[0] if axes else None


_PASS = {"unsqueeze", "view", "reshape", "_to_copy", "to", "clone", "contiguous", "alias", "lift_fresh_copy"}
_ARANGE = {"arange", "arange.default", "arange.start", "arange.start_step"}


def _short(target: Any) -> str:
    if isinstance(target, str):
        return target
    return getattr(target, "_opname", None) or getattr(target, "__name__", "")


def _is_positions(ctx: Emit, name: str) -> bool:
    """Whether computed index tensor ``name`` is ``arange(T)`` with T a dynamic size (tracer/capture/sizes.py),
    only moved into another shape by unit axes (``kv_idx = arange(T)[None, None, None, :]``): it takes the
    whole axis, as the constant ``arange`` over it does at the sample's size."""
    node = ctx.graph.nodes[name]["op"]
    for _ in range(16):
        kind, kw = _short(node.target), node.kw
        if kind == "arange":
            return isinstance(kw.get("end"), Ref) and kw.get("start", 0) == 0 and kw.get("step", 1) == 1
        src = ctx.graph.nodes[node.inputs[0]]["op"] if node.inputs else None
        if src is None or src.shape is None or node.shape is None:
            return False
        same = [d for d in src.shape if d != 1] == [d for d in node.shape if d != 1]
        full = kind == "slice" and kw.get("start") in (0, None) and kw.get("step", 1) == 1 and (
            kw.get("end") is None or isinstance(kw.get("end"), int) and kw["end"] >= 2 ** 62)
        zero = kind == "add" and kw.get("other") == 0 and kw.get("alpha", 1) == 1
        if not (same and (kind in _PASS or full or zero)):
            return False
        node = src
    return False


def _split(node: OpNode, ctx: Emit, index: tuple, rank: int) -> tuple[int, list[np.ndarray], list[bool]]:
    """(first indexed dim, index arrays, whether each is arange over a dynamic size) for ``full slices,
    index tensors, full slices``; computed ``arange(T)`` index tensors are taken at the sample's size."""
    text = "".join("t" if isinstance(i, Ref) else ("s" if i == slice(None) else "?") for i in index)
    if not re.fullmatch(r"s*t+s*", text):
        raise NotImplementedError(f"indexing {index!r}: several index tensors are converted when they are "
                                  "adjacent and every other entry is a full slice")
    start = text.index("t")
    arrays, dynamic = [], []
    for i in index[start:start + text.count("t")]:
        src = ctx.graph.nodes[i.name]["op"]
        dynamic.append(not src.is_constant and _is_positions(ctx, i.name))
        if dynamic[-1]:
            arrays.append(np.arange(int(np.prod(src.shape))).reshape(src.shape))
            continue
        if not src.is_constant:
            raise NotImplementedError("indexing with several computed index tensors; use torch.gather")
        a = to_numpy(src.value)
        if a.dtype == bool:
            raise NotImplementedError("indexing with several boolean masks")
        arrays.append(a.astype(np.int64))
    return start, arrays, dynamic


def outer_index(node: OpNode, ctx: Emit, x: Any, index: tuple) -> Any:
    """``x[..., i0, i1, ...]`` where each index tensor varies along its own axis of the broadcast shape."""
    in_shape = ctx.graph.nodes[node.inputs[0]]["op"].shape
    start, arrays, dynamic = _split(node, ctx, index, len(in_shape))
    bshape = np.broadcast_shapes(*(a.shape for a in arrays))
    placed = []  # (result axis or None, number of entries) per indexed dim
    for j, a in enumerate(arrays):
        d, p = start + j, _varying_axis(a, len(bshape))
        vals = a.reshape(-1) % in_shape[d]
        if d == 0:
            if p != 0 or not np.array_equal(vals, np.arange(in_shape[0])):
                raise NotImplementedError("indexing the batch axis with a tensor other than arange(batch)")
        elif not np.array_equal(vals, np.arange(in_shape[d])):
            x = keras.ops.take(x, ctx.constant(vals.astype(np.int32), ctx.name(node, f"index{j}")), axis=d)
        if p is not None and any(q == p for q, _ in placed):
            raise NotImplementedError("index tensors that vary along the same axis (pairwise indexing)")
        placed.append((p, vals.size))
    order = sorted(range(len(arrays)), key=lambda j: (placed[j][0] is None, placed[j][0] or 0))
    if order != list(range(len(arrays))):
        perm = list(range(len(x.shape)))
        perm[start:start + len(arrays)] = [start + j for j in order]
        x = keras.ops.transpose(x, perm)
    target = [*in_shape[:start], *bshape, *in_shape[start + len(arrays):]]
    for j in (j for j, dyn in enumerate(dynamic) if dyn):  # its length follows a dynamic axis: Keras infers it
        target[start + len(bshape) - len(arrays[j].shape) + arrays[j].shape.index(max(arrays[j].shape))] = -1
    if target.count(-1) > 1:
        raise NotImplementedError("index tensors along two dynamic axes; Keras infers one size (-1)")
    return keras.layers.Reshape(tuple(target[1:]), name=ctx.name(node, "reshape"))(x)
