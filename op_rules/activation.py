"""Activations and softmax. Elementwise ones run in any layout."""
from __future__ import annotations

from typing import Any, Callable

import keras
import torch
import torch.nn as nn
import torch.nn.functional as F

from tracer.emitter.context import Emit
from tracer.op_rules.common import call_with_weights, param, weight_of
from tracer.op_rules.elementwise import scale
from tracer.op_rules.registry import Layout, register, rule
from tracer.ir import OpNode


def _unary(targets: tuple, make: Callable[[OpNode, str], Any]) -> None:
    def fn(node: OpNode, ctx: Emit) -> Any:
        return make(node, ctx.name(node))(ctx.input(node, 0))

    fn.__name__ = f"activation_{getattr(targets[0], '__name__', targets[0])}"
    register(targets, fn, Layout.ANY)


def _act(name: str) -> Callable[[OpNode, str], Any]:
    return lambda node, lname: keras.layers.Activation(name, name=lname)


_unary((nn.ReLU, F.relu, torch.relu, "relu", F.relu_, torch.relu_, "relu_"),
       lambda node, n: keras.layers.ReLU(name=n))
_unary((nn.ReLU6, F.relu6), lambda node, n: keras.layers.ReLU(max_value=6.0, name=n))
_unary((nn.LeakyReLU, F.leaky_relu),
       lambda node, n: keras.layers.LeakyReLU(negative_slope=float(param(node, "negative_slope", 0.01)), name=n))
_unary((nn.ELU, F.elu), lambda node, n: keras.layers.ELU(alpha=float(param(node, "alpha", 1.0)), name=n))
_unary((nn.SiLU, F.silu), _act("silu"))
_unary((nn.Sigmoid, torch.sigmoid, F.sigmoid, "sigmoid"), _act("sigmoid"))
_unary((nn.Tanh, torch.tanh, F.tanh, "tanh"), _act("tanh"))
_unary((nn.Mish, F.mish), _act("mish"))
_unary((nn.Hardsigmoid, F.hardsigmoid), _act("hard_sigmoid"))
_unary((nn.Hardswish, F.hardswish), _act("hard_silu"))
_unary((nn.SELU, F.selu, torch.selu), _act("selu"))
_unary((nn.Softsign, F.softsign), _act("softsign"))
_unary((nn.LogSigmoid, F.logsigmoid), _act("log_sigmoid"))


@rule(nn.GELU, F.gelu, layout=Layout.ANY)
def gelu(node: OpNode, ctx: Emit) -> Any:
    approximate = param(node, "approximate", "none")
    if approximate not in ("none", "tanh"):
        raise ValueError(f"GELU approximate must be 'none' or 'tanh'. Received: {approximate!r}")
    return keras.ops.gelu(ctx.input(node, 0), approximate=approximate == "tanh")


@rule(nn.Softplus, F.softplus, layout=Layout.ANY)
def softplus(node: OpNode, ctx: Emit) -> Any:
    """PyTorch: softplus(beta*x)/beta, and x itself where beta*x > threshold."""
    beta, threshold = float(param(node, "beta", 1.0)), float(param(node, "threshold", 20.0))
    x = ctx.input(node, 0)
    bx = x if beta == 1.0 else scale(x, beta, ctx.name(node, "beta"))
    soft = keras.ops.softplus(bx)
    soft = soft if beta == 1.0 else keras.ops.divide(soft, beta)
    return keras.ops.where(keras.ops.greater(bx, threshold), x, soft)


@rule(nn.Hardtanh, F.hardtanh, layout=Layout.ANY)
def hardtanh(node: OpNode, ctx: Emit) -> Any:
    lo, hi = float(param(node, "min_val", -1.0)), float(param(node, "max_val", 1.0))
    return keras.ops.clip(ctx.input(node, 0), lo, hi)


@rule(nn.PReLU, F.prelu, layout=Layout.CHANNELS_LAST)
def prelu(node: OpNode, ctx: Emit) -> Any:
    """One slope shared by all axes, or one per channel (channels-last: the last axis)."""
    alpha = weight_of(node, ctx, "weight").reshape(-1)
    x = ctx.input(node, 0)
    rank = len(x.shape)
    shared = list(range(1, rank)) if alpha.size == 1 else list(range(1, rank - 1))
    layer = keras.layers.PReLU(shared_axes=shared or None, name=ctx.name(node))
    shape = [1 if a in shared else x.shape[a] for a in range(1, rank)]
    return call_with_weights(layer, x, [alpha.reshape(shape)])


def _dim(node: OpNode) -> int:
    dim = param(node, "dim", None)
    if dim is None:
        raise ValueError("softmax without dim (legacy implicit dim) is not supported; pass dim=")
    return int(dim)


@rule(nn.Softmax, F.softmax, torch.softmax, "softmax", layout=Layout.ANY)
def softmax(node: OpNode, ctx: Emit) -> Any:
    return keras.layers.Softmax(axis=ctx.axis(node, _dim(node)), name=ctx.name(node))(ctx.input(node, 0))


@rule(nn.LogSoftmax, F.log_softmax, torch.log_softmax, "log_softmax", layout=Layout.ANY)
def log_softmax(node: OpNode, ctx: Emit) -> Any:
    return keras.ops.log_softmax(ctx.input(node, 0), axis=ctx.axis(node, _dim(node)))
