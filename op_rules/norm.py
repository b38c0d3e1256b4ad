"""Normalization: BatchNorm1d/2d/3d (modules and F.batch_norm)."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch.nn as nn
import torch.nn.functional as F

from tracer.emitter.batchnorm import BatchNormalization, worth_fusing
from tracer.emitter.context import Emit
from tracer.op_rules.common import call_with_weights, param, trainable, weight_of
from tracer.op_rules.registry import Layout, rule
from tracer.ir import OpNode, sole_user


@rule(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, F.batch_norm, layout=Layout.CHANNELS_LAST)
def batch_norm(node: OpNode, ctx: Emit) -> Any:
    """BatchNormalization over the channel (last) axis with PyTorch's epsilon and statistics.

    Keras' momentum is the weight of the old running value, PyTorch's the weight of the new
    one: keras momentum = 1 - torch momentum (torch's cumulative average, momentum=None,
    has no Keras equivalent: 0.9 is used for training and noted). The layer is Keras' with
    TensorFlow's fused kernel at inference (emitter/batchnorm.py), which grappler fuses into the conv.
    """
    if node.module is not None and not node.module.track_running_stats:
        raise ValueError("BatchNorm with track_running_stats=False normalizes with batch statistics "
                         "even in eval mode; Keras cannot reproduce that at inference")
    if node.module is None and ctx.value(node, "training", False):
        raise ValueError("F.batch_norm(training=True) uses batch statistics; not supported at inference")
    mean = weight_of(node, ctx, "running_mean")
    var = weight_of(node, ctx, "running_var")
    gamma, beta = weight_of(node, ctx, "weight"), weight_of(node, ctx, "bias")
    momentum = param(node, "momentum", 0.1)
    layer = BatchNormalization(
        axis=-1, epsilon=float(param(node, "eps", 1e-5)),
        momentum=1.0 - float(momentum) if momentum is not None else 0.9,
        center=beta is not None, scale=gamma is not None, name=ctx.name(node),
        fused=worth_fusing(_after_conv(node, ctx), tuple(node.shape[1:])))
    weights = [w for w in (gamma, beta) if w is not None] + [mean, var]
    y = call_with_weights(layer, ctx.input(node, 0), [np.asarray(w, np.float32) for w in weights])
    layer.trainable = trainable(node)
    return y


def _after_conv(node: OpNode, ctx: Emit) -> bool:
    """Whether ``node`` follows a plain 2-D conv it alone reads: grappler fuses those two."""
    prev = ctx.graph.nodes[node.inputs[0]]["op"]
    m = prev.module
    if not isinstance(m, nn.Conv2d) or sole_user(ctx.graph, prev.name) != node.name:
        return False
    return not (m.groups > 1 and m.groups == m.in_channels)
