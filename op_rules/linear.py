"""Linear layers and the identities of inference (Identity, Dropout, contiguous)."""
from __future__ import annotations

from typing import Any

import keras
import torch
import torch.nn as nn
import torch.nn.functional as F

from tracer.emitter.context import Emit, fold_flat
from tracer.emitter import layers as L
from tracer.op_rules.common import call_with_weights, trainable, weight_of
from tracer.op_rules.registry import Layout, rule
from tracer.ir import OpNode, Phys


def _linear_layout(node: OpNode, ins: list, shapes: list) -> tuple[list, Phys]:
    """Dense works on the last axis: keep any layout that has torch's last axis last.

    A flattened NHWC map stays as it is; the Linear absorbs the order into its weights. A
    layout with torch's last axis second-to-last (a token-mixing Linear on ``x.transpose(1, 2)``)
    is kept too: the Linear multiplies that axis there (an ``EinsumDense``, emitter/layers.py axis_map).
    """
    x = ins[0]
    rank = len(shapes[0])
    if x is not None and x.flat is not None and x.perm == tuple(range(rank)):
        keep = x
    elif x is not None and x.perm and x.flat is None and (
            x.perm[-1] == rank - 1 or (rank >= 3 and x.perm[-2] == rank - 1)):
        keep = x
    else:
        keep = Phys.identity(rank)
    req = [keep] + [Phys.identity(len(s)) for s in shapes[1:]]
    return req, Phys(keep.perm)


@rule(nn.Linear, F.linear, layout=_linear_layout)
def linear(node: OpNode, ctx: Emit) -> Any:
    """``node.kw["fused_activation"]`` (set by tracer.passes.optimize.fuse_activations) becomes ``activation=``."""
    weight = weight_of(node, ctx, "weight")
    bias = weight_of(node, ctx, "bias")
    phys = node.in_layouts[0]
    activation = node.kw.get("fused_activation")
    if phys.perm[-1] != len(phys.perm) - 1:  # torch's last axis is second-to-last here
        return L.axis_map(ctx.input(node, 0), -2, weight.T, ctx.name(node), bias=bias, activation=activation,
                          trainable=trainable(node))
    layer = keras.layers.Dense(weight.shape[0], use_bias=bias is not None, activation=activation, name=ctx.name(node))
    weights = [fold_flat(weight, phys).T] + ([] if bias is None else [bias])
    y = call_with_weights(layer, ctx.input(node, 0), weights)
    layer.trainable = trainable(node)
    return y


@rule(nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
      F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, torch.dropout,
      "contiguous", "clone", "detach", torch.clone, layout=Layout.ANY)
def identity(node: OpNode, ctx: Emit) -> Any:
    """No-ops at inference: the input passes through unchanged (no layer is emitted)."""
    return ctx.input(node, 0)
