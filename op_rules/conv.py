"""Convolutions: Conv1d/2d/3d and ConvTranspose1d/2d/3d, modules and functionals.

Padding is always explicit (a padding layer, then a 'valid' convolution): TF's 'same' pads
asymmetrically after a stride and silently differs from PyTorch. Grouped convolutions keep
one layer; depthwise ones become DepthwiseConv layers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
import torch.nn as nn
import torch.nn.functional as F

from emitter.context import Emit
from fixes.grouped_conv_transpose import grouped_conv_transpose
from op_rules.common import call_with_weights, crop_spatial, ntuple, pad_spatial, param, spatial_layer, weight_of
from op_rules.registry import Layout, rule
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


def conv_spec(node: OpNode, ctx: Emit, transposed: bool = False) -> ConvSpec:
    weight = weight_of(node, ctx, "weight")
    if weight is None:
        raise ValueError("convolution weight must be a parameter or a constant")
    n = weight.ndim - 2
    kernel = weight.shape[2:]
    stride = ntuple(param(node, "stride", 1), n)
    dilation = ntuple(param(node, "dilation", 1), n)
    padding = param(node, "padding", 0)
    if padding == "valid":
        pads = ((0, 0),) * n
    elif padding == "same":
        total = [d * (k - 1) for d, k in zip(dilation, kernel)]
        pads = tuple((t // 2, t - t // 2) for t in total)
    else:
        pads = tuple((p, p) for p in ntuple(padding, n))
    return ConvSpec(weight=weight, bias=weight_of(node, ctx, "bias"), stride=stride, pads=pads,
                    dilation=dilation, groups=int(param(node, "groups", 1)),
                    padding_mode=param(node, "padding_mode", "zeros"),
                    output_padding=ntuple(param(node, "output_padding", 0), n) if transposed else ())


@rule(nn.Conv1d, nn.Conv2d, nn.Conv3d, F.conv1d, F.conv2d, F.conv3d, layout=Layout.CHANNELS_LAST)
def conv(node: OpNode, ctx: Emit) -> Any:
    s = conv_spec(node, ctx)
    x = pad_spatial(ctx.input(node, 0), s.pads, s.padding_mode, ctx.name(node, "pad"))
    out_ch, in_per_group = s.weight.shape[:2]
    in_ch = in_per_group * s.groups
    common = dict(strides=s.stride, padding="valid", dilation_rate=s.dilation,
                  use_bias=s.bias is not None, name=ctx.name(node))
    bias = [] if s.bias is None else [s.bias]
    if s.groups > 1 and s.groups == in_ch and s.n <= 2:
        mult = out_ch // in_ch
        kernel = s.weight.reshape(in_ch, mult, *s.weight.shape[2:])
        kernel = np.transpose(kernel, (*range(2, 2 + s.n), 0, 1))
        layer = spatial_layer("DepthwiseConv", s.n)(s.weight.shape[2:], depth_multiplier=mult, **common)
        return call_with_weights(layer, x, [kernel, *bias])
    kernel = np.transpose(s.weight, (*range(2, 2 + s.n), 1, 0))
    layer = spatial_layer("Conv", s.n)(out_ch, s.weight.shape[2:], groups=s.groups, **common)
    return call_with_weights(layer, x, [kernel, *bias])


@rule(nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
      F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d, layout=Layout.CHANNELS_LAST)
def conv_transpose(node: OpNode, ctx: Emit) -> Any:
    """Transposed convolution as Keras computes it with 'valid' padding, then cropped.

    PyTorch's output is the full transposed convolution with ``padding`` cut from each side
    and ``output_padding`` rows added at the end; Keras adds those end rows through its own
    ``output_padding`` (zeros plus bias), the crop removes PyTorch's padding.
    """
    s = conv_spec(node, ctx, transposed=True)
    if s.padding_mode != "zeros":
        raise ValueError(f"ConvTranspose supports padding_mode='zeros' only (got {s.padding_mode!r})")
    x = ctx.input(node, 0)
    extra = tuple(max(0, op - p) for op, (p, _) in zip(s.output_padding, s.pads))
    crops = tuple((p, p + e - op) for (p, _), e, op in zip(s.pads, extra, s.output_padding))
    if s.groups > 1:
        y = grouped_conv_transpose(x, s, extra, ctx.name(node), conv_transpose_layer)
    else:
        y = conv_transpose_layer(x, s.weight, s.bias, s, extra, ctx.name(node))
    return crop_spatial(y, crops, ctx.name(node, "crop"))


def conv_transpose_layer(x: Any, weight: np.ndarray, bias: np.ndarray | None, s: ConvSpec,
                         extra: tuple, name: str) -> Any:
    """One ungrouped transposed convolution; torch weight (in, out, *k) -> Keras (*k, out, in)."""
    kernel = np.transpose(weight, (*range(2, 2 + s.n), 1, 0))
    layer = spatial_layer("Conv", s.n, "Transpose")(
        weight.shape[1], weight.shape[2:], strides=s.stride, padding="valid", output_padding=extra,
        dilation_rate=s.dilation, use_bias=bias is not None, name=name)
    return call_with_weights(layer, x, [kernel] + ([] if bias is None else [bias]))
