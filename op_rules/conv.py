"""Convolutions: Conv1d/2d/3d and ConvTranspose1d/2d/3d, modules and functionals.

Padding is always explicit (a padding layer, then a 'valid' convolution): TF's 'same' pads
asymmetrically after a stride and silently differs from PyTorch. Grouped convolutions keep
one layer; depthwise ones become DepthwiseConv layers.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch.nn as nn
import torch.nn.functional as F

from tracer.emitter.context import Emit
from tracer.fixes.grouped_conv_transpose import grouped_conv_transpose
from tracer.fixes.strided_dilated_conv import spread, strided_dilated, subsample
from tracer.op_rules.common import (call_with_weights, crop_spatial, ntuple, pad_spatial, param, spatial_layer,
                             trainable, weight_of)
from tracer.op_rules.registry import Layout, rule
from tracer.ir import OpNode


@dataclass(frozen=True)
class ConvSpec:
    weight: np.ndarray  # torch layout: (out, in/groups, *k) or, transposed, (in, out/groups, *k)
    bias: np.ndarray | None
    stride: tuple
    pads: tuple  # one (before, after) per spatial dim
    dilation: tuple
    groups: int
    padding_mode: str
    output_padding: tuple = ()

    @property
    def n(self) -> int:
        return self.weight.ndim - 2


def conv_pads(padding, kernel: tuple, dilation: tuple) -> tuple[tuple[int, int], ...]:
    """PyTorch's conv ``padding`` ('valid', 'same', an int or a tuple) as (before, after) per spatial dim."""
    n = len(kernel)
    if padding == "valid":
        return ((0, 0),) * n
    if padding == "same":
        total = [d * (k - 1) for d, k in zip(ntuple(dilation, n), kernel)]
        return tuple((t // 2, t - t // 2) for t in total)
    return tuple((p, p) for p in ntuple(padding, n))


def conv_spec(node: OpNode, ctx: Emit, transposed: bool = False) -> ConvSpec:
    weight = weight_of(node, ctx, "weight")
    if weight is None:
        raise ValueError("convolution weight must be a parameter or a constant")
    n = weight.ndim - 2
    kernel = weight.shape[2:]
    stride = ntuple(param(node, "stride", 1), n)
    dilation = ntuple(param(node, "dilation", 1), n)
    pads = conv_pads(param(node, "padding", 0), kernel, dilation)
    return ConvSpec(weight=weight, bias=weight_of(node, ctx, "bias"), stride=stride, pads=pads,
                    dilation=dilation, groups=int(param(node, "groups", 1)),
                    padding_mode=param(node, "padding_mode", "zeros"),
                    output_padding=ntuple(param(node, "output_padding", 0), n) if transposed else ())


@rule(nn.Conv1d, nn.Conv2d, nn.Conv3d, F.conv1d, F.conv2d, F.conv3d, layout=Layout.CHANNELS_LAST)
def conv(node: OpNode, ctx: Emit) -> Any:
    """``node.kw["fused_activation"]`` (set by tracer.passes.optimize.fuse_activations) becomes ``activation=``."""
    s = conv_spec(node, ctx)
    x = pad_spatial(ctx.input(node, 0), s.pads, s.padding_mode, ctx.name(node, "pad"))
    out_ch, in_per_group = s.weight.shape[:2]
    in_ch = in_per_group * s.groups
    split = strided_dilated(s.stride, s.dilation)
    common = dict(strides=(1,) * s.n if split else s.stride, padding="valid", dilation_rate=s.dilation,
                  use_bias=s.bias is not None, activation=node.kw.get("fused_activation"), name=ctx.name(node))
    bias = [] if s.bias is None else [s.bias]
    if s.groups > 1 and s.groups == in_ch and s.n <= 2:
        mult = out_ch // in_ch
        kernel = s.weight.reshape(in_ch, mult, *s.weight.shape[2:])
        kernel = np.transpose(kernel, (*range(2, 2 + s.n), 0, 1))
        layer = spatial_layer("DepthwiseConv", s.n)(s.weight.shape[2:], depth_multiplier=mult, **common)
    else:
        kernel = np.transpose(s.weight, (*range(2, 2 + s.n), 1, 0))
        layer = spatial_layer("Conv", s.n)(out_ch, s.weight.shape[2:], groups=s.groups, **common)
    y = call_with_weights(layer, x, [kernel, *bias])
    layer.trainable = trainable(node)  # frozen torch parameters stay frozen
    return subsample(y, s.stride, ctx.name(node, "stride")) if split else y


@rule(nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
      F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d, layout=Layout.CHANNELS_LAST)
def conv_transpose(node: OpNode, ctx: Emit) -> Any:
    """Transposed convolution as Keras computes it with 'valid' padding, then cropped.

    PyTorch's output is the full transposed convolution with ``padding`` cut from each side
    and ``output_padding`` rows (zeros plus bias) added at the end. Those end rows come from
    Keras's own ``output_padding`` where it allows (< stride), else from zero rows appended to
    the input; the crop removes PyTorch's padding and any surplus rows.
    """
    s = conv_spec(node, ctx, transposed=True)
    if s.padding_mode != "zeros":
        raise ValueError(f"ConvTranspose supports padding_mode='zeros' only (got {s.padding_mode!r})")
    s = replace(s, output_padding=_output_padding(node, ctx, s))
    need = tuple(max(0, op - p) for op, (p, _) in zip(s.output_padding, s.pads))  # rows past the full output
    x = ctx.input(node, 0)
    if strided_dilated(s.stride, s.dilation):  # stride 1 on a spread input: s - 1 extra rows at the end
        x = spread(x, s.stride, ctx.name(node, "spread"))
        tail = tuple(max(0, r - (st - 1)) for r, st in zip(need, s.stride))
        extra = tuple(st - 1 + t for st, t in zip(s.stride, tail))
        s, keras_extra = replace(s, stride=(1,) * s.n), (0,) * s.n
    else:  # each zero row appended to the input adds `stride` rows
        tail = tuple(0 if r < st else -(-r // st) for r, st in zip(need, s.stride))
        keras_extra = tuple(0 if t else r for r, t in zip(need, tail))
        extra = tuple(e + t * st for e, t, st in zip(keras_extra, tail, s.stride))
    x = pad_spatial(x, [(0, t) for t in tail], "zeros", ctx.name(node, "tail"))
    crops = tuple((p, p + e - op) for (p, _), e, op in zip(s.pads, extra, s.output_padding))
    if s.groups > 1:
        y = grouped_conv_transpose(x, s, keras_extra, ctx.name(node), conv_transpose_layer)
    else:
        y = conv_transpose_layer(x, s.weight, s.bias, s, keras_extra, ctx.name(node))
    return crop_spatial(y, crops, ctx.name(node, "crop"))


def _output_padding(node: OpNode, ctx: Emit, s: ConvSpec) -> tuple:
    """Rows PyTorch adds at the end: ``output_padding``, or what ``forward(x, output_size=...)`` implied."""
    size_in = ctx.graph.nodes[node.inputs[0]]["op"].shape[2:]
    full = [(li - 1) * st - p - q + d * (k - 1) + 1
            for li, st, (p, q), d, k in zip(size_in, s.stride, s.pads, s.dilation, s.weight.shape[2:])]
    return tuple(int(o - f) for o, f in zip(node.shape[2:], full))


def conv_transpose_layer(x: Any, weight: np.ndarray, bias: np.ndarray | None, s: ConvSpec,
                         extra: tuple, name: str) -> Any:
    """One ungrouped transposed convolution; torch weight (in, out, *k) -> Keras (*k, out, in)."""
    kernel = np.transpose(weight, (*range(2, 2 + s.n), 1, 0))
    layer = spatial_layer("Conv", s.n, "Transpose")(
        weight.shape[1], weight.shape[2:], strides=s.stride, padding="valid", output_padding=extra,
        dilation_rate=s.dilation, use_bias=bias is not None, name=name)
    return call_with_weights(layer, x, [kernel] + ([] if bias is None else [bias]))
