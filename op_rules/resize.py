"""Resizing and padding: Upsample/interpolate (nearest, bilinear/linear both align_corners),
PixelShuffle/PixelUnshuffle, F.pad and the padding modules.

Interpolation is reproduced with PyTorch's own source-index formulas: nearest as an index
gather (or UpSampling for integer factors), (bi)linear as one interpolation matrix per axis.
"""
from __future__ import annotations

import math
from typing import Any

import keras
import numpy as np
import torch.nn as nn
import torch.nn.functional as F

from emitter import layers as L
from emitter.context import Emit
from op_rules.common import ntuple, param, spatial_layer
from op_rules.registry import Layout, rule
from tracer.ir import OpNode


def _scales(node: OpNode, n: int, size_in, size_out) -> list[float]:
    """Source step per output step, as PyTorch computes it."""
    factor = param(node, "scale_factor", None)
    if factor is not None and not param(node, "recompute_scale_factor", False):
        return [1.0 / float(f) for f in ntuple(factor, n)]
    return [li / o for li, o in zip(size_in, size_out)]


def _linear_matrix(li: int, o: int, scale: float, align_corners: bool) -> np.ndarray:
    dst = np.arange(o, dtype=np.float64)
    if align_corners:
        src = dst * ((li - 1) / (o - 1)) if o > 1 else np.zeros(o)
    else:
        src = np.maximum((dst + 0.5) * scale - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), li - 1)
    i1 = np.minimum(i0 + 1, li - 1)
    w1 = (src - i0).astype(np.float64)
    m = np.zeros((o, li), np.float64)
    np.add.at(m, (np.arange(o), i0), 1.0 - w1)
    np.add.at(m, (np.arange(o), i1), w1)
    return m.astype(np.float32)


@rule(nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d, F.interpolate, F.upsample,
      layout=Layout.CHANNELS_LAST)
def interpolate(node: OpNode, ctx: Emit) -> Any:
    x = ctx.input(node, 0)
    n = node.rank - 2
    size_in = tuple(ctx.graph.nodes[node.inputs[0]]["op"].shape[2:])
    size_out = tuple(node.shape[2:])
    mode = param(node, "mode", "nearest")
    align = bool(param(node, "align_corners", False))
    if isinstance(node.module, nn.UpsamplingBilinear2d):
        align = True
    scales = _scales(node, n, size_in, size_out)
    if mode == "nearest" and all(o % li == 0 and math.isclose(s, li / o) for li, o, s in zip(size_in, size_out, scales)):
        factors = tuple(o // li for li, o in zip(size_in, size_out))
        return spatial_layer("UpSampling", n)(factors if n > 1 else factors[0], name=ctx.name(node))(x)
    for axis, (li, o, s) in enumerate(zip(size_in, size_out, scales), start=1):
        if li == o and s == 1.0:
            continue
        name = ctx.name(node, f"axis{axis}")
        if mode in ("nearest", "nearest-exact"):
            offset = 0.5 if mode == "nearest-exact" else 0.0
            idx = np.minimum(np.floor((np.arange(o) + offset) * s).astype(np.int64), li - 1)
            x = L.AxisGather(axis, idx.tolist(), name=name)(x)
        elif mode in ("linear", "bilinear", "trilinear"):
            layer = L.AxisLinearMap(axis, li, o, name=name)
            y = layer(x)
            L.set_value(layer, "matrix", _linear_matrix(li, o, s, align))
            x = y
        else:
            raise NotImplementedError(f"interpolation mode {mode!r} is not supported (nearest, "
                                      "nearest-exact, linear, bilinear, trilinear are)")
    return x


@rule(nn.PixelShuffle, F.pixel_shuffle, layout=Layout.CHANNELS_LAST)
def pixel_shuffle(node: OpNode, ctx: Emit) -> Any:
    """(B,H,W,C*r*r) -> (B,H*r,W*r,C) with PyTorch's channel order c*r*r + i*r + j."""
    r = int(param(node, "upscale_factor"))
    x = ctx.input(node, 0)
    _, h, w, crr = x.shape
    c = crr // (r * r)
    x = keras.ops.reshape(x, (-1, h, w, c, r, r))
    x = keras.ops.transpose(x, (0, 1, 4, 2, 5, 3))
    return keras.ops.reshape(x, (-1, h * r, w * r, c))


@rule(nn.PixelUnshuffle, F.pixel_unshuffle, layout=Layout.CHANNELS_LAST)
def pixel_unshuffle(node: OpNode, ctx: Emit) -> Any:
    r = int(param(node, "downscale_factor"))
    x = ctx.input(node, 0)
    _, h, w, c = x.shape
    x = keras.ops.reshape(x, (-1, h // r, r, w // r, r, c))
    x = keras.ops.transpose(x, (0, 1, 3, 5, 2, 4))
    return keras.ops.reshape(x, (-1, h // r, w // r, c * r * r))


_PAD_MODULES = {
    nn.ZeroPad1d: "constant", nn.ZeroPad2d: "constant", nn.ZeroPad3d: "constant",
    nn.ConstantPad1d: "constant", nn.ConstantPad2d: "constant", nn.ConstantPad3d: "constant",
    nn.ReflectionPad1d: "reflect", nn.ReflectionPad2d: "reflect", nn.ReflectionPad3d: "reflect",
    nn.ReplicationPad1d: "replicate", nn.ReplicationPad2d: "replicate", nn.ReplicationPad3d: "replicate",
    nn.CircularPad1d: "circular", nn.CircularPad2d: "circular", nn.CircularPad3d: "circular",
}


@rule(F.pad, *_PAD_MODULES, layout=Layout.ANY)
def pad(node: OpNode, ctx: Emit) -> Any:
    """F.pad lists (before, after) pairs from the last torch axis backwards."""
    if node.module is not None:
        flat, mode, value = node.module.padding, _PAD_MODULES[type(node.module)], getattr(node.module, "value", 0.0)
    else:
        flat, mode, value = node.kw["pad"], node.kw.get("mode", "constant"), node.kw.get("value", None) or 0.0
    phys = node.in_layouts[0]
    rank = len(phys.perm)
    torch_pads = [(0, 0)] * rank
    for k in range(len(flat) // 2):
        torch_pads[rank - 1 - k] = (int(flat[2 * k]), int(flat[2 * k + 1]))
    pads = [torch_pads[d] for d in phys.perm]
    return L.TorchPad(pads, mode=mode, value=float(value), name=ctx.name(node))(ctx.input(node, 0))
