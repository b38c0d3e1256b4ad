"""Normalization over features: LayerNorm, GroupNorm, InstanceNorm (modules and functionals).

LayerNorm normalizes torch's trailing dims; it runs in whatever layout its input has, over
the physical axes that hold those dims, so a LayerNorm over the channels of an NHWC map
(``x.permute(0, 2, 3, 1)`` then ``nn.LayerNorm(C)``) needs no transpose. GroupNorm and
InstanceNorm normalize per channel group: channels-last, like BatchNorm.
"""
from __future__ import annotations

from typing import Any

import keras
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from tracer.emitter.batchnorm import BatchNormalization, worth_fusing
from tracer.emitter.context import Emit
from tracer.emitter.layers import safe_add
from tracer.op_rules.common import call_with_weights, param, trainable, weight_of
from tracer.op_rules.registry import Layout, rule
from tracer.ir import OpNode, Phys


def _normalized_shape(node: OpNode) -> tuple[int, ...]:
    shape = param(node, "normalized_shape")
    return tuple(shape) if isinstance(shape, (tuple, list)) else (int(shape),)


def _layer_norm_layout(node: OpNode, ins: list, shapes: list) -> tuple[list, Phys]:
    """Any layout but a flattened one: the statistics do not care where the axes sit."""
    rank = len(shapes[0])
    phys = ins[0] if ins[0] is not None and ins[0].flat is None else Phys.identity(rank)
    return [phys] + [Phys.identity(len(s)) for s in shapes[1:]], phys


@rule(nn.LayerNorm, F.layer_norm, layout=_layer_norm_layout)
def layer_norm(node: OpNode, ctx: Emit) -> Any:
    """keras LayerNormalization over the physical axes of the normalized dims, PyTorch's epsilon.

    gamma and beta are laid out like those axes (transposed when the layout reorders them).
    """
    x = ctx.input(node, 0)
    phys = node.in_layouts[0]
    rank = len(phys.perm)
    k = len(_normalized_shape(node))
    dims = range(rank - k, rank)
    axes = sorted(phys.axis(d) for d in dims)
    order = [phys.perm[a] - (rank - k) for a in axes]  # torch dim (within normalized) at each axis
    gamma, beta = weight_of(node, ctx, "weight"), weight_of(node, ctx, "bias")
    layer = keras.layers.LayerNormalization(axis=axes, epsilon=float(param(node, "eps", 1e-5)),
                                            center=beta is not None, scale=gamma is not None,
                                            name=ctx.name(node))
    weights = [np.transpose(np.asarray(w, np.float32), order) for w in (gamma, beta) if w is not None]
    y = call_with_weights(layer, centered(x, axes), weights)
    layer.trainable = trainable(node)
    return y


def centered(x: Any, axes: list[int]) -> Any:
    """``x - mean(x)`` over ``axes``: the input a Keras LayerNormalization needs to match PyTorch.

    Works around Keras 3.15 ``ops.layer_normalization``, which computes ``x * inv + (beta -
    mean * inv)``: on rows with a large mean (rows of 10.0 and up) the two terms cancel and
    lose digits PyTorch keeps by computing ``(x - mean) * inv``. Centered rows have mean ~0, so
    the same formula is then exact to fp32 rounding. Built-in ops only (the model still loads in
    safe mode); LayerNorm is invariant to the shift, gradients included. Delete when Keras
    normalizes ``x - mean``.
    """
    return keras.ops.subtract(x, keras.ops.mean(x, axis=axes, keepdims=True))


def _group_norm_weights(node: OpNode, ctx: Emit) -> tuple[Any, Any]:
    return weight_of(node, ctx, "weight"), weight_of(node, ctx, "bias")


@rule(nn.GroupNorm, F.group_norm, layout=Layout.CHANNELS_LAST)
def group_norm(node: OpNode, ctx: Emit) -> Any:
    """Group statistics on the channels-last axis: torch's groups are contiguous channel runs, as a
    reshape of the last axis into (groups, channels / groups) makes them."""
    groups = int(param(node, "num_groups"))
    gamma, beta = _group_norm_weights(node, ctx)
    return _group_normalization(node, ctx, groups, gamma, beta)


def _group_normalization(node: OpNode, ctx: Emit, groups: int, gamma: Any, beta: Any) -> Any:
    """PyTorch's ``(x - mean) * rsqrt(var + eps) * gamma + beta`` per sample and channel group, in
    keras.ops on the channels-last tensor, statistics reduced one axis at a time (:func:`group_mean`).

    Not keras GroupNormalization, whose statistics are off by up to 1.5e-5 relative (TensorFlow
    sums the group's axes, which are not contiguous in channels-last, one element after another:
    fuzzer graph 1683, an InstanceNorm after a GroupNorm, 1.1e-5 off float64 where PyTorch fp32 is
    1.9e-7, now 3e-7) and which computes ``x * inv + (beta - mean * inv)``,
    losing digits on groups whose mean is large next to their spread. gamma and beta are trainable
    weights of their own (``<name>.weight`` / ``<name>.bias``)."""
    x = ctx.input(node, 0)
    eps = float(param(node, "eps", 1e-5))
    centered_x = keras.ops.subtract(x, group_mean(x, groups))
    inv = keras.ops.rsqrt(keras.ops.add(group_mean(keras.ops.square(centered_x), groups), eps))
    y = keras.ops.multiply(centered_x, inv)
    train = trainable(node)
    if gamma is not None:
        y = keras.ops.multiply(y, ctx.constant(np.asarray(gamma, np.float32).reshape(-1), ctx.name(node, "weight"),
                                               trainable=train))
    if beta is not None:
        y = safe_add(y, ctx.constant(np.asarray(beta, np.float32).reshape(-1), ctx.name(node, "bias"),
                                     trainable=train))
    return y


def group_mean(x: Any, groups: int) -> Any:
    """Per sample, the mean of each group of channels of channels-last ``x``, shaped to broadcast
    against it: (B, 1, ..., 1, C), each channel holding its group's mean.

    Spatial axes are reduced one at a time (each a short sum, so rounding stays at PyTorch's
    level; one reduction over all of them is a long sequential sum in TensorFlow), then the channel
    means of a group averaged (equal counts) and tiled back over its channels: static shapes but
    the batch, built-in ops only."""
    rank, channels = len(x.shape), int(x.shape[-1])
    m = x
    for axis in range(rank - 2, 0, -1):
        m = keras.ops.mean(m, axis=axis, keepdims=True)
    if groups == channels:
        return m
    ones, k = (1,) * (rank - 2), channels // groups
    grouped = keras.ops.mean(keras.ops.reshape(m, (-1, *ones, groups, k)), axis=-1, keepdims=True)
    return keras.ops.reshape(keras.ops.tile(grouped, (1, *ones, 1, k)), (-1, *ones, channels))


@rule(nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, F.instance_norm, torch.ops.aten.instance_norm.default,
      layout=Layout.CHANNELS_LAST)
def instance_norm(node: OpNode, ctx: Emit) -> Any:
    """Per-sample, per-channel statistics (group normalization with one group per channel); with
    tracked running statistics in eval mode, those (BatchNormalization).

    ``aten.instance_norm`` (torch.export's capture) has F.instance_norm's argument names; kept as
    one op here, since torch's decomposition of it (a batch norm over a (1, B*C, ...) view) has
    no Keras equivalent."""
    channels = node.shape[1]
    if node.module is not None:
        running = node.module.track_running_stats
    else:
        running = not ctx.value(node, "use_input_stats", True)
    gamma, beta = weight_of(node, ctx, "weight"), weight_of(node, ctx, "bias")
    if not running:
        return _group_normalization(node, ctx, channels, gamma, beta)
    mean, var = weight_of(node, ctx, "running_mean"), weight_of(node, ctx, "running_var")
    if mean is None or var is None:
        raise ValueError("instance_norm(use_input_stats=False) needs running_mean and running_var")
    layer = BatchNormalization(axis=-1, epsilon=float(param(node, "eps", 1e-5)),
                               center=beta is not None, scale=gamma is not None, name=ctx.name(node),
                               fused=worth_fusing(False, tuple(node.shape[1:])))
    weights = [w for w in (gamma, beta) if w is not None] + [mean, var]
    y = call_with_weights(layer, ctx.input(node, 0), [np.asarray(w, np.float32) for w in weights])
    layer.trainable = trainable(node)
    return y


def layer_norm_module(ctx: Emit, x: Any, m: nn.LayerNorm, name: str, train: bool = True) -> Any:
    """An ``nn.LayerNorm`` inside a composite rule (Transformer layers), on PyTorch's axis order."""
    k = len(m.normalized_shape)
    rank = len(x.shape)
    gamma = None if m.weight is None else m.weight.detach().cpu().numpy()
    beta = None if m.bias is None else m.bias.detach().cpu().numpy()
    layer = keras.layers.LayerNormalization(axis=list(range(rank - k, rank)), epsilon=float(m.eps),
                                            center=beta is not None, scale=gamma is not None, name=name)
    axes = list(range(rank - k, rank))
    y = call_with_weights(layer, centered(x, axes), [np.asarray(w, np.float32) for w in (gamma, beta) if w is not None])
    layer.trainable = train
    return y
