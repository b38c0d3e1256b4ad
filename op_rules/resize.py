"""Resizing and padding: Upsample/interpolate (nearest, bilinear/linear and bicubic both align_corners),
PixelShuffle/PixelUnshuffle, F.pad and the padding modules.

Interpolation is reproduced with PyTorch's own source-index formulas: nearest as an index
gather (or UpSampling where each source row repeats), (bi)linear and bicubic as one interpolation
matrix per axis. An axis whose size follows a dynamic axis (tracer/dynamic.py) gets its indices and
weights computed at runtime from size witnesses (op_rules/sizes.py) instead: integer scale factors,
fixed sizes and ``size=`` from another tensor's shape; other factors are refused naming the axis.
"""
from __future__ import annotations

from typing import Any

import keras
import numpy as np
import torch.nn as nn
import torch.nn.functional as F

from tracer.emitter import layers as L
from tracer.emitter.context import Emit
from tracer.op_rules.common import ntuple, param, spatial_layer
from tracer.op_rules.registry import Layout, rule
from tracer.ir import OpNode, Ref
from tracer.op_rules.sizes import witness


def _factors(node: OpNode, n: int) -> list[float | None]:
    """The scale factor PyTorch's kernel receives per axis (None: it divides the sizes instead)."""
    factor = param(node, "scale_factor", None)
    if factor is None or param(node, "recompute_scale_factor", False):
        return [None] * n
    return [float(f) for f in ntuple(factor, n)]


def _nearest_index(li: int, o: int, factor: float | None, exact: bool, n: int) -> np.ndarray:
    """PyTorch's CPU source index for nearest / nearest-exact, in float32 like its kernels (torch 2.13).

    Maps of rank 4 (2-D) go through ``nearest_idx`` / ``nearest_exact_idx`` (ATen UpSample.h): an
    equal or doubled size is copied / halved whatever the scale, the exact index is
    floorf((d + 0.5) * scale). Rank 3 and 5 go through the generic kernel (HelperInterpNearest*):
    no such shortcuts, the exact index is floorf(fma(scale, d + 0.5, -0.5) + 0.5).
    """
    d = np.arange(o)
    if n == 2 and not exact and o in (li, 2 * li):
        return d * li // o
    scale = np.float32(1.0 / factor) if factor else np.float32(li) / np.float32(o)
    if not exact:
        src = d.astype(np.float32) * scale
    elif n == 2:
        src = ((d + 0.5) * np.float64(scale)).astype(np.float32)
    else:
        src = np.maximum((np.float64(scale) * (d + 0.5) - 0.5).astype(np.float32), np.float32(0))
        src = (src.astype(np.float64) + 0.5).astype(np.float32)
    return np.minimum(np.floor(src).astype(np.int64), li - 1)


def _linear_matrix(li: int, o: int, factor: float | None, align_corners: bool) -> np.ndarray:
    """(o, li) interpolation weights along one axis, as PyTorch's (bi/tri)linear kernels compute them."""
    dst = np.arange(o, dtype=np.float64)
    if align_corners:
        src = dst * ((li - 1) / (o - 1)) if o > 1 else np.zeros(o)
    else:
        scale = 1.0 / factor if factor else li / o
        src = np.maximum((dst + 0.5) * scale - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), li - 1)
    i1 = np.minimum(i0 + 1, li - 1)
    w1 = (src - i0).astype(np.float64)
    m = np.zeros((o, li), np.float64)
    np.add.at(m, (np.arange(o), i0), 1.0 - w1)
    np.add.at(m, (np.arange(o), i1), w1)
    return m.astype(np.float32)


def _cubic_matrix(li: int, o: int, factor: float | None, align_corners: bool, a: float = -0.75) -> np.ndarray:
    """(o, li) bicubic weights along one axis, as PyTorch's kernel (HelperInterpCubic) computes them:
    Keys' cubic convolution with A = -0.75 over taps ``i-1 .. i+2``, clamped to the border."""
    dst = np.arange(o, dtype=np.float64)
    if align_corners:
        src = dst * ((li - 1) / (o - 1)) if o > 1 else np.zeros(o)
    else:
        scale = 1.0 / factor if factor else li / o
        src = (dst + 0.5) * scale - 0.5  # not clamped at 0 for cubic
    i0 = np.minimum(np.floor(src).astype(np.int64), li - 1)
    t = np.clip(src - i0, 0.0, 1.0)

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    weights = (far(t + 1), near(t), near(1 - t), far(2 - t))
    m = np.zeros((o, li), np.float64)
    for j, w in enumerate(weights):
        np.add.at(m, (np.arange(o), np.clip(i0 - 1 + j, 0, li - 1)), w)
    return m.astype(np.float32)


_NEAREST = ("nearest", "nearest-exact")
_LINEAR = ("linear", "bilinear", "trilinear", "bicubic")


@rule(nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d, F.interpolate, F.upsample,
      layout=Layout.CHANNELS_LAST)
def interpolate(node: OpNode, ctx: Emit) -> Any:
    mode = param(node, "mode", "nearest")
    if mode not in _NEAREST + _LINEAR:
        raise NotImplementedError(f"interpolation mode {mode!r} is not supported (nearest, "
                                  "nearest-exact, linear, bilinear, bicubic, trilinear are)")
    if param(node, "antialias", False):
        raise NotImplementedError("interpolation with antialias=True is not supported")
    x = ctx.input(node, 0)
    n = node.rank - 2
    size_in = tuple(ctx.graph.nodes[node.inputs[0]]["op"].shape[2:])
    size_out = tuple(node.shape[2:])
    sizes = list(zip(range(1, n + 1), size_in, size_out, _factors(node, n)))
    targets = ntuple(param(node, "size", None), n)
    dynamic = [x.shape[axis] is None or isinstance(size, Ref) for (axis, *_), size in zip(sizes, targets)]
    if mode in _NEAREST:
        return _nearest(node, ctx, x, sizes, targets, dynamic, mode == "nearest-exact")
    align = bool(param(node, "align_corners", False)) or isinstance(node.module, nn.UpsamplingBilinear2d)
    for (axis, li, o, f), size, dyn in zip(sizes, targets, dynamic):
        if dyn:  # follows a dynamic axis: positions and weights computed from the runtime size
            x = _runtime_axis(node, ctx, x, axis, size, f, align, mode)
        elif li != o:  # PyTorch copies an axis whose size does not change, whatever the scale factor
            matrix = (_cubic_matrix if mode == "bicubic" else _linear_matrix)(li, o, f, align)  # (out, in)
            x = L.axis_map(x, axis, np.asarray(matrix).T, ctx.name(node, f"axis{axis}"))
    return x


def _dynamic_refusal(ctx: Emit, node: OpNode, axis: int, why: str) -> NotImplementedError:
    names = sorted({v for axes in ctx.graph.graph.get("dynamic_axes", {}).values() for v in axes.values()})
    return NotImplementedError(
        f"{param(node, 'mode', 'nearest')} interpolation of torch axis {axis + 1}, whose size follows a dynamic "
        f"axis (the model's: {', '.join(names)}), {why}; use an integer scale_factor, or size= (fixed or another "
        "tensor's shape), or keep that axis static (leave it out of dynamic_shapes / --dynamic-axis)")


def _nearest(node: OpNode, ctx: Emit, x: Any, sizes: list, targets: tuple, dynamic: list, exact: bool) -> Any:
    """An index gather per axis, or UpSampling where each source row repeats (at any size when the axis
    follows a dynamic one only through an integer scale factor)."""
    n = len(sizes)
    index = [_nearest_index(li, o, f, exact, n) for _, li, o, f in sizes]
    reps = [o // li if o % li == 0 else 0 for _, li, o, _ in sizes]
    by_factor = all(not d or size is None for d, size in zip(dynamic, targets))
    if by_factor and all(r and np.array_equal(ix, np.arange(len(ix)) // r) for ix, r in zip(index, reps)):
        return spatial_layer("UpSampling", n)(tuple(reps) if n > 1 else reps[0], name=ctx.name(node))(x)
    for (axis, li, o, f), ix, size, dyn in zip(sizes, index, targets, dynamic):
        if dyn:
            x = _runtime_nearest(node, ctx, x, axis, size, f, exact)
        elif li != o or not np.array_equal(ix, np.arange(o)):
            x = L.axis_gather(x, axis, ix.tolist())
    return x


def _runtime_nearest(node: OpNode, ctx: Emit, x: Any, axis: int, size: Any, factor: float | None,
                     exact: bool) -> Any:
    """Nearest source indices from the runtime sizes, in float32 as _nearest_index: ``floor(d * scale)``, or
    ``floor((d + 0.5) * scale)`` for nearest-exact on 2-D maps (a float32 product is the float rounding of
    ATen's exact double product). The 1-D/3-D nearest-exact kernel rounds a fused multiply-add, refused."""
    if exact and len(x.shape) != 4:
        raise _dynamic_refusal(ctx, node, axis, f"in {len(x.shape) - 2}-D nearest-exact mode is not converted")
    w_in = witness(x, axis)
    w_out = _out_witness(node, ctx, w_in, axis, size)
    li = keras.ops.sum(w_in)
    scale = np.float32(1.0 / factor) if factor else li / keras.ops.sum(w_out)
    src = (keras.ops.cumsum(w_out) - (0.5 if exact else 1.0)) * scale
    index = keras.ops.minimum(keras.ops.cast(keras.ops.floor(src), "int32"), keras.ops.cast(li, "int32") - 1)
    return keras.ops.take(x, index, axis=axis)


def _out_witness(node: OpNode, ctx: Emit, w_in: Any, axis: int, size: Any) -> Any:
    """Ones as long as the output axis: ``size=`` from another tensor's dynamic shape (its witness), a fixed
    size, or the input's length times an integer scale factor."""
    if isinstance(size, Ref):
        return ctx.tensor_input(node, ctx.index_of(node, size))
    if isinstance(size, int):
        return keras.ops.ones((size,), dtype="float32")
    f = float(ntuple(param(node, "scale_factor"), node.rank - 2)[axis - 1])  # also under recompute_scale_factor
    if f.is_integer() and f >= 1:
        return keras.ops.tile(w_in, (int(f),))
    raise _dynamic_refusal(ctx, node, axis, f"by the scale factor {f:g}, whose output size floor(size * {f:g}) "
                                            "Keras cannot follow, is not converted")


def _runtime_axis(node: OpNode, ctx: Emit, x: Any, axis: int, size: Any, factor: float | None, align: bool,
                  mode: str) -> Any:
    """(Bi/tri)linear or bicubic resizing of Keras axis ``axis`` of ``x`` with source positions and weights
    computed from the runtime lengths by PyTorch's formulas (ATen UpSample.h, in float32), the output length
    from :func:`_out_witness`; one gather per tap. TFLite: CUMSUM, SUM, FLOOR, MINIMUM/MAXIMUM, CAST,
    SELECT, GATHER, MUL, ADD (builtins)."""
    w_in = witness(x, axis)
    w_out = _out_witness(node, ctx, w_in, axis, size)
    li, lo = keras.ops.sum(w_in), keras.ops.sum(w_out)
    dst = keras.ops.cumsum(w_out) - 1.0
    cubic = mode == "bicubic"
    if align:
        src = dst * keras.ops.where(lo > 1.0, (li - 1.0) / keras.ops.maximum(lo - 1.0, 1.0), 0.0)
    else:
        scale = np.float32(1.0 / factor) if factor else li / lo
        src = (dst + 0.5) * scale - 0.5
        src = src if cubic else keras.ops.maximum(src, 0.0)
    last = keras.ops.cast(li, "int32") - 1
    i0 = keras.ops.minimum(keras.ops.cast(keras.ops.floor(src), "int32"), last)
    t = src - keras.ops.cast(i0, "float32")
    if cubic:
        t = keras.ops.minimum(keras.ops.maximum(t, 0.0), 1.0)
        taps = list(zip(range(-1, 3), _cubic_weights(t)))
    else:
        taps = [(0, 1.0 - t), (1, t)]
    shape = [1] * len(x.shape)
    shape[axis] = -1
    y = None
    for k, w in taps:
        at = keras.ops.minimum(keras.ops.maximum(i0 + k, 0), last)
        part = keras.ops.take(x, at, axis=axis) * keras.ops.reshape(w, shape)
        y = part if y is None else y + part
    return y


def _cubic_weights(t: Any, a: float = -0.75) -> tuple:
    """Keys' cubic convolution weights of taps ``i-1 .. i+2`` for fractions ``t`` (as _cubic_matrix)."""
    def near(v):
        return ((a + 2) * v - (a + 3)) * v * v + 1

    def far(v):
        return ((a * v - 5 * a) * v + 8 * a) * v - 4 * a

    return far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t)


@rule(nn.PixelShuffle, F.pixel_shuffle, layout=Layout.CHANNELS_LAST)
def pixel_shuffle(node: OpNode, ctx: Emit) -> Any:
    """(B,H,W,C*r*r) -> (B,H*r,W*r,C) with PyTorch's channel order c*r*r + i*r + j."""
    r = int(param(node, "upscale_factor"))
    _require_4d(node, "pixel_shuffle")
    x = ctx.input(node, 0)
    _, h, w, crr = x.shape
    c = crr // (r * r)
    x = keras.ops.reshape(x, (-1, h, w, c, r, r))
    x = keras.ops.transpose(x, (0, 1, 4, 2, 5, 3))
    return keras.ops.reshape(x, (-1, h * r, w * r, c))


@rule(nn.PixelUnshuffle, F.pixel_unshuffle, layout=Layout.CHANNELS_LAST)
def pixel_unshuffle(node: OpNode, ctx: Emit) -> Any:
    r = int(param(node, "downscale_factor"))
    _require_4d(node, "pixel_unshuffle")
    x = ctx.input(node, 0)
    _, h, w, c = x.shape
    x = keras.ops.reshape(x, (-1, h // r, r, w // r, r, c))
    x = keras.ops.transpose(x, (0, 1, 3, 5, 2, 4))
    return keras.ops.reshape(x, (-1, h // r, w // r, c * r * r))


def _require_4d(node: OpNode, what: str) -> None:
    if node.rank != 4:
        raise NotImplementedError(f"{what} is supported on 4-D (N, C, H, W) inputs only, got rank {node.rank}")


_PAD_MODULES = {
    nn.ZeroPad1d: "constant", nn.ZeroPad2d: "constant", nn.ZeroPad3d: "constant",
    nn.ConstantPad1d: "constant", nn.ConstantPad2d: "constant", nn.ConstantPad3d: "constant",
    nn.ReflectionPad1d: "reflect", nn.ReflectionPad2d: "reflect", nn.ReflectionPad3d: "reflect",
    nn.ReplicationPad1d: "replicate", nn.ReplicationPad2d: "replicate", nn.ReplicationPad3d: "replicate",
    nn.CircularPad1d: "circular", nn.CircularPad2d: "circular", nn.CircularPad3d: "circular",
}


@rule(F.pad, *_PAD_MODULES, layout=Layout.ANY)
def pad(node: OpNode, ctx: Emit) -> Any:
    """F.pad lists (before, after) pairs from the last torch axis backwards.

    Negative pads crop: after padding in constant/reflect/replicate mode, before it in circular
    mode (as PyTorch does).
    """
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
    grow = [(max(a, 0), max(b, 0)) for a, b in pads]
    crop = [(max(-a, 0), max(-b, 0)) for a, b in pads]
    x = ctx.input(node, 0)
    if mode == "circular":  # negative pads crop first, the wrap then reads the cropped tensor
        x = _crop(x, crop)
    if any(a or b for a, b in grow):
        x = L.pad(x, grow, mode=mode, value=float(value))
    return x if mode == "circular" else _crop(x, crop)


def _crop(x: Any, crops: list[tuple[int, int]]) -> Any:
    """Negative pads: drop (before, after) positions of each axis."""
    if not any(a or b for a, b in crops):
        return x
    return L.strided_slice(x, [[a or None, -b if b else None, None] for a, b in crops])
