"""Pooling: max/avg with padding, ceil_mode and count_include_pad; max pooling with dilation; adaptive
pooling of any size.

Windows that PyTorch clips at the border are reproduced exactly: max pooling pads with -inf,
average pooling pads with zeros and rescales each output by window size / PyTorch's divisor.
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


@rule(nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, F.max_pool1d, F.max_pool2d, F.max_pool3d,
      layout=Layout.CHANNELS_LAST)
def max_pool(node: OpNode, ctx: Emit) -> Any:
    n = node.rank - 2
    k, s, p = _window(node, n)
    d = ntuple(param(node, "dilation", 1), n)
    if param(node, "return_indices", False):
        raise NotImplementedError("max pooling with return_indices=True is not supported")
    size_in, size_out = _spatial_in(ctx, node), node.shape[2:]
    reach = [(ki - 1) * di + 1 for ki, di in zip(k, d)]  # the dilated window's extent
    pads = [(pi, max(0, (o - 1) * si + ri - li - pi)) for li, o, ri, si, pi in zip(size_in, size_out, reach, s, p)]
    x = pad_spatial(ctx.input(node, 0), pads, "constant", ctx.name(node, "pad"), value=-np.inf)
    if any(di != 1 for di, ki in zip(d, k) if ki > 1):
        return _dilated_max(node, ctx, x, k, s, d, size_out)
    return spatial_layer("MaxPooling", n)(k, s, padding="valid", name=ctx.name(node))(x)


def _dilated_max(node: OpNode, ctx: Emit, x: Any, k: tuple, s: tuple, d: tuple, size_out: tuple) -> Any:
    """Keras pooling has no dilation: the maximum of one strided slice per window tap (prod(k) slices)."""
    y = None
    for k_tap, offsets in enumerate(itertools.product(*[range(0, ki * di, di) for ki, di in zip(k, d)])):
        spec = [[None, None, None], *[[o, o + (n_out - 1) * si + 1, si] for o, n_out, si in zip(offsets, size_out, s)],
                [None, None, None]]
        tap = L.strided_slice(x, spec)
        y = tap if y is None else keras.ops.maximum(y, tap)
    return y


@rule(nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
      layout=Layout.CHANNELS_LAST)
def avg_pool(node: OpNode, ctx: Emit) -> Any:
    n = node.rank - 2
    k, s, p = _window(node, n)
    size_in, size_out = _spatial_in(ctx, node), node.shape[2:]
    pads = [(pi, max(0, (o - 1) * si + ki - li - pi)) for li, o, ki, si, pi in zip(size_in, size_out, k, s, p)]
    x = pad_spatial(ctx.input(node, 0), pads, "zeros", ctx.name(node, "pad"))
    y = spatial_layer("AveragePooling", n)(k, s, padding="valid", name=ctx.name(node))(x)
    include_pad = bool(param(node, "count_include_pad", True))
    override = param(node, "divisor_override", None)
    scale = _avg_rescale(size_in, size_out, k, s, p, include_pad, override)
    if np.all(scale == 1.0):
        return y
    return keras.ops.multiply(y, ctx.constant(scale, ctx.name(node, "divisor")))


def _avg_rescale(size_in, size_out, k, s, p, include_pad, override) -> np.ndarray:
    """window size / PyTorch's divisor at each output position, shaped (1, *out, 1)."""
    area = float(np.prod(k))
    if override:
        return np.full((1, *size_out, 1), area / float(override), np.float32)
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
