"""Pooling: max/avg with padding, ceil_mode and count_include_pad; max pooling with dilation; adaptive
pooling of any size.

Windows that PyTorch clips at the border are reproduced exactly, at every size of a dynamic axis: max
pooling pads with copies of the border values (-inf with dilation), average pooling pads with zeros and
rescales each output by window size / PyTorch's divisor (counted at runtime over dynamic axes).
"""
from __future__ import annotations

import itertools
from typing import Any

import keras
import numpy as np
import torch.nn as nn
import torch.nn.functional as F

from tracer.emitter import layers as L
from tracer.emitter.context import Emit
from tracer.op_rules.common import ntuple, pad_spatial, param, spatial_layer
from tracer.op_rules.registry import Layout, rule
from tracer.ir import OpNode


def _window(node: OpNode, n: int):
    k = ntuple(param(node, "kernel_size"), n)
    stride = param(node, "stride", None)
    s = ntuple(stride if stride not in (None, (), []) else k, n)
    p = ntuple(param(node, "padding", 0), n)
    return k, s, p


def _spatial_in(ctx: Emit, node: OpNode) -> tuple[int, ...]:
    x_shape = ctx.graph.nodes[node.inputs[0]]["op"].shape
    return tuple(x_shape[2:])


def _dynamic(ctx: Emit, node: OpNode) -> bool:
    """Whether a spatial size of the pooling's input or result follows a dynamic axis (also when the model
    has dynamic axes but neither node was seen by that check, e.g. one a pass added)."""
    dims = ctx.graph.graph.get("dynamic_dims", {})
    if ctx.graph.graph.get("dynamic_axes") and node.name not in dims and node.inputs[0] not in dims:
        return True
    axes = set(dims.get(node.name, ())) | set(dims.get(node.inputs[0], ()))
    return any(a >= 2 for a in axes)


def _pads(s: tuple, p: tuple, reach: tuple, ceil_mode: bool) -> list[tuple[int, int]]:
    """(left, right) padding after which VALID pooling gives PyTorch's windows at every input size.

    Floor mode: (p, p). Ceil mode: PyTorch's last window start is ceil((L + 2p - r) / s) * s in the padded
    axis, dropped when it starts at or past L + p; both bounds are L plus a constant, so a right padding of
    min(p + s - 1, r - 1) lets VALID pooling stop at the smaller one, whatever L is."""
    return [(pi, min(pi + si - 1, ri - 1) if ceil_mode else pi) for si, pi, ri in zip(s, p, reach)]


@rule(nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, F.max_pool1d, F.max_pool2d, F.max_pool3d,
      layout=Layout.CHANNELS_LAST)
def max_pool(node: OpNode, ctx: Emit) -> Any:
    n = node.rank - 2
    k, s, p = _window(node, n)
    d = ntuple(param(node, "dilation", 1), n)
    if param(node, "return_indices", False):
        raise NotImplementedError("max pooling with return_indices=True is not supported")
    reach = tuple((ki - 1) * di + 1 for ki, di in zip(k, d))  # the dilated window's extent
    pads = _pads(s, p, reach, bool(param(node, "ceil_mode", False)))
    if any(di != 1 for di, ki in zip(d, k) if ki > 1):  # taps may skip the border: -inf padding
        x = pad_spatial(ctx.input(node, 0), pads, "constant", ctx.name(node, "pad"), value=-np.inf)
        return _dilated_max(x, k, s, d, reach)
    x = _edge_pad(ctx.input(node, 0), pads)
    return spatial_layer("MaxPooling", n)(k, s, padding="valid", name=ctx.name(node))(x)


def _edge_pad(x: Any, pads: list[tuple[int, int]]) -> Any:
    """Padding by copies of the border values, at any size. A window that reaches into the padding also holds
    the border value it copies (windows are contiguous, start inside the input or its left padding and
    p <= k / 2), so its maximum is PyTorch's; unlike -inf it leaves int8 quantization ranges finite."""
    for axis, (left, right) in enumerate(pads, start=1):
        if not (left or right):
            continue
        spec = [[None, None, None]] * len(x.shape)
        first = L.strided_slice(x, spec[:axis] + [[0, 1, None]] + spec[axis + 1:])
        last = L.strided_slice(x, spec[:axis] + [[-1, None, None]] + spec[axis + 1:])
        x = keras.ops.concatenate([first] * left + [x] + [last] * right, axis=axis)
    return x


def _dilated_max(x: Any, k: tuple, s: tuple, d: tuple, reach: tuple) -> Any:
    """Keras pooling has no dilation: the maximum of one strided slice per window tap (prod(k) slices).
    Tap ``o`` of a window reaching ``r`` takes ``x[o : len - (r - 1 - o) : s]``, as many as VALID pooling
    has windows, at every length."""
    y = None
    for offsets in itertools.product(*[range(0, ki * di, di) for ki, di in zip(k, d)]):
        spec = [[None, None, None], *[[o, (o - ri + 1) or None, si] for o, ri, si in zip(offsets, reach, s)],
                [None, None, None]]
        tap = L.strided_slice(x, spec)
        y = tap if y is None else keras.ops.maximum(y, tap)
    return y


@rule(nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
      layout=Layout.CHANNELS_LAST)
def avg_pool(node: OpNode, ctx: Emit) -> Any:
    n = node.rank - 2
    k, s, p = _window(node, n)
    ceil_mode = bool(param(node, "ceil_mode", False))
    pads = _pads(s, p, k, ceil_mode)
    x_in = ctx.input(node, 0)
    x = pad_spatial(x_in, pads, "zeros", ctx.name(node, "pad"))
    pool = spatial_layer("AveragePooling", n)
    y = pool(k, s, padding="valid", name=ctx.name(node))(x)
    include_pad = bool(param(node, "count_include_pad", True))
    override = param(node, "divisor_override", None)
    if override:
        scale = float(np.prod(k)) / float(override)
        return y if scale == 1.0 else keras.ops.multiply(y, ctx.constant(np.full((1,) * (n + 2), scale, np.float32),
                                                                          ctx.name(node, "divisor")))
    if include_pad and not ceil_mode:
        return y  # every window lies inside the padded input: PyTorch divides by the window size too
    if _dynamic(ctx, node):  # the divisor at each position depends on the size: counted at runtime
        return keras.ops.divide(y, _window_share(ctx, node, x_in, pool, k, s, p, pads, include_pad))
    scale = _avg_rescale(_spatial_in(ctx, node), node.shape[2:], k, s, p, include_pad)
    if np.all(scale == 1.0):
        return y
    return keras.ops.multiply(y, ctx.constant(scale, ctx.name(node, "divisor")))


def _window_share(ctx: Emit, node: OpNode, x: Any, pool: Any, k: tuple, s: tuple, p: tuple,
                  pads: list[tuple[int, int]], include_pad: bool) -> Any:
    """PyTorch's divisor / window size at each output position, from the input's size at runtime: average
    pooling of ones over what PyTorch counts (the input, with its padding when ``count_include_pad``)."""
    ones = keras.ops.ones_like(L.strided_slice(x, [[None, None, None]] * (len(k) + 1) + [[0, 1, None]]))
    if include_pad:
        ones = pad_spatial(ones, [(pi, pi) for pi in p], "constant", ctx.name(node, "count_pad"), value=1.0)
        pads = [(0, right - pi) for (_, right), pi in zip(pads, p)]
    ones = pad_spatial(ones, pads, "zeros", ctx.name(node, "count_zeros"))
    return pool(k, s, padding="valid", name=ctx.name(node, "count"))(ones)


def _avg_rescale(size_in, size_out, k, s, p, include_pad) -> np.ndarray:
    """window size / PyTorch's divisor at each output position, shaped (1, *out, 1)."""
    area = float(np.prod(k))
    divisor = np.ones(size_out, np.float64)
    for axis, (li, o, ki, si, pi) in enumerate(zip(size_in, size_out, k, s, p)):
        start = np.arange(o) * si - pi
        end = np.minimum(start + ki, li + pi)
        if not include_pad:
            start, end = np.maximum(start, 0), np.minimum(end, li)
        shape = [1] * len(size_out)
        shape[axis] = o
        divisor = divisor * (end - start).reshape(shape)
    return (area / divisor).reshape(1, *size_out, 1).astype(np.float32)


def _adaptive(node: OpNode, ctx: Emit, mode: str) -> Any:
    x = ctx.input(node, 0)
    n = node.rank - 2
    size_in, size_out = _spatial_in(ctx, node), node.shape[2:]
    if all(o == 1 for o in size_out):
        reduce = keras.ops.max if mode == "max" else keras.ops.mean
        return reduce(x, axis=tuple(range(1, n + 1)), keepdims=True)
    if all(li % o == 0 for li, o in zip(size_in, size_out)):
        k = tuple(li // o for li, o in zip(size_in, size_out))
        kind = "MaxPooling" if mode == "max" else "AveragePooling"
        return spatial_layer(kind, n)(k, k, padding="valid", name=ctx.name(node))(x)
    for axis, (li, o) in enumerate(zip(size_in, size_out), start=1):
        if li == o:
            continue
        starts = [(i * li) // o for i in range(o)]
        ends = [-((-(i + 1) * li) // o) for i in range(o)]
        x = L.binned_reduce(x, axis, starts, ends, mode=mode)
    return x


@rule(nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, F.adaptive_avg_pool1d,
      F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, layout=Layout.CHANNELS_LAST)
def adaptive_avg_pool(node: OpNode, ctx: Emit) -> Any:
    return _adaptive(node, ctx, "mean")


@rule(nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, F.adaptive_max_pool1d,
      F.adaptive_max_pool2d, F.adaptive_max_pool3d, layout=Layout.CHANNELS_LAST)
def adaptive_max_pool(node: OpNode, ctx: Emit) -> Any:
    if param(node, "return_indices", False):
        raise NotImplementedError("adaptive max pooling with return_indices=True is not supported")
    return _adaptive(node, ctx, "max")
