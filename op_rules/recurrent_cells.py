"""Recurrent cells: nn.LSTMCell / nn.GRUCell / nn.RNNCell (one time step), and the LSTM with ``proj_size``.

A cell is two Dense layers (``W_ih x + b_ih`` and ``W_hh h + b_hh``, torch's own weights and both
biases, so training matches PyTorch exactly) and the gate arithmetic in ``keras.ops``. A cell
called in a Python loop is traced unrolled by fx, one node per step: every step of one torch
cell uses the same two Keras layers, so the weights stay shared as in PyTorch.

Keras' LSTM has no output projection, so ``nn.LSTM(proj_size=P)`` is unrolled over the recorded
time steps with the same cell arithmetic plus a bias-free Dense ``W_hr`` (built-in layers only;
the Keras model then has a fixed sequence length, as it has anyway).
"""
from __future__ import annotations

import weakref
from typing import Any

import keras
import numpy as np
import torch.nn as nn

from tracer.emitter.context import Emit, to_numpy
from tracer.ir import OpNode
from tracer.op_rules.common import call_with_weights
from tracer.op_rules.recurrent_io import state_inputs, torch_weights
from tracer.op_rules.registry import Layout, rule

# the Keras layers made for each torch cell, per conversion: every call of the cell shares them
_SHARED: "weakref.WeakKeyDictionary[Emit, dict[str, dict]]" = weakref.WeakKeyDictionary()


def _dense(x: Any, w: np.ndarray, b: np.ndarray | None, name: str, trainable: bool) -> tuple[Any, Any]:
    layer = keras.layers.Dense(w.shape[0], use_bias=b is not None, name=name)
    y = call_with_weights(layer, x, [w.T] + ([] if b is None else [b]))
    layer.trainable = trainable
    return layer, y


class _Projections:
    """The Dense layers of one cell (input side ``ih``, state side ``hh``, LSTM projection ``hr``)."""

    def __init__(self, ctx: Emit, base: str, weights: dict, trainable: bool):
        self.ctx, self.base, self.w, self.trainable = ctx, base, weights, trainable
        self.layers: dict[str, Any] = {}

    def __call__(self, side: str, x: Any) -> Any:
        if side in self.layers:
            return self.layers[side](x)
        w, b = self.w[f"w_{side}"], self.w.get(f"b_{side}")
        layer, y = _dense(x, w, b, _unique(self.ctx, f"{self.base}.{side}"), self.trainable)
        self.layers[side] = layer
        return y


def _unique(ctx: Emit, base: str) -> str:
    """A fresh layer name ``base`` (as :meth:`Emit.name` makes them) for a layer not tied to one node."""
    probe = OpNode(name=base, kind="call_function", target=None)
    return ctx.name(probe)


def lstm_step(gx: Any, h: Any, c: Any, proj: _Projections) -> tuple[Any, Any]:
    """torch's LSTM step: gates ``gx + W_hh h + b_hh`` in order i, f, g, o; ``h`` projected if ``W_hr``."""
    i, f, g, o = keras.ops.split(gx + proj("hh", h), 4, axis=-1)
    c = keras.ops.sigmoid(f) * c + keras.ops.sigmoid(i) * keras.ops.tanh(g)
    h = keras.ops.sigmoid(o) * keras.ops.tanh(c)
    return (proj("hr", h) if proj.w.get("w_hr") is not None else h), c


def gru_step(gx: Any, h: Any, proj: _Projections) -> Any:
    """torch's GRU step (gates r, z, n; ``n = tanh(x_n + r * (W_hn h + b_hn))``)."""
    xr, xz, xn = keras.ops.split(gx, 3, axis=-1)
    hr, hz, hn = keras.ops.split(proj("hh", h), 3, axis=-1)
    r, z = keras.ops.sigmoid(xr + hr), keras.ops.sigmoid(xz + hz)
    n = keras.ops.tanh(xn + r * hn)
    return (1.0 - z) * n + z * h


def rnn_step(gx: Any, h: Any, proj: _Projections, nonlinearity: str) -> Any:
    y = gx + proj("hh", h)
    return keras.ops.tanh(y) if nonlinearity == "tanh" else keras.ops.relu(y)


def zeros(like: Any, size: int) -> Any:
    """A zero state ``(B, size)``, ``B`` the runtime batch of ``like`` (B, ...): never a frozen batch."""
    first = like
    while len(first.shape) > 2:
        first = first[:, 0]
    return keras.ops.zeros_like(first[:, :1]) + np.zeros((1, size), np.float32)


def _cell_weights(m: nn.Module) -> dict[str, np.ndarray | None]:
    return {"w_ih": to_numpy(m.weight_ih), "w_hh": to_numpy(m.weight_hh),
            "b_ih": None if m.bias_ih is None else to_numpy(m.bias_ih),
            "b_hh": None if m.bias_hh is None else to_numpy(m.bias_hh)}


def _shared(node: OpNode, ctx: Emit) -> _Projections:
    per_ctx = _SHARED.setdefault(ctx, {})
    key = node.module_path or node.name
    if key not in per_ctx:
        m = node.module
        per_ctx[key] = _Projections(ctx, key, _cell_weights(m), any(p.requires_grad for p in m.parameters()))
    return per_ctx[key]


@rule(nn.LSTMCell, nn.GRUCell, nn.RNNCell, layout=Layout.TORCH)
def recurrent_cell(node: OpNode, ctx: Emit) -> Any:
    """One step: ``(h', c')`` for an LSTMCell, ``h'`` for a GRUCell / RNNCell; a missing state is zero."""
    m = node.module
    x = ctx.input(node, 0)
    if len(x.shape) != 2:
        raise NotImplementedError(f"{type(m).__name__} on an unbatched {len(x.shape)}-D input: give it a batch "
                                  "axis (x.unsqueeze(0))")
    states = state_inputs(node, ctx)
    proj = _shared(node, ctx)
    gx = proj("ih", x)
    h = states[0] if states else zeros(x, m.hidden_size)
    if isinstance(m, nn.LSTMCell):
        c = states[1] if len(states) > 1 else zeros(x, m.hidden_size)
        return lstm_step(gx, h, c, proj)
    if isinstance(m, nn.GRUCell):
        return gru_step(gx, h, proj)
    return rnn_step(gx, h, proj, m.nonlinearity)


def projected_lstm(node: OpNode, ctx: Emit, init: list[list[Any]] | None) -> Any:
    """``nn.LSTM(proj_size=P)`` unrolled over time: ``(output, (h_n, c_n))`` in the layouts of op_rules/recurrent.py."""
    m = node.module
    x = ctx.input(node, 0)  # (B, T, F)
    steps = node.structure[0][1 if m.batch_first else 0]  # as recorded: the unrolled model has this length
    dirs = 2 if m.bidirectional else 1
    trainable = any(p.requires_grad for p in m.parameters())
    hs, cs = [], []
    for layer in range(m.num_layers):
        outs = []
        for d in range(dirs):
            proj = _Projections(ctx, ctx.name(node, f"l{layer}" + ("_reverse" if d else "")),
                                torch_weights(m, layer, d), trainable)
            gx = proj("ih", x)  # (B, T, 4H): the input side of every step at once
            k = layer * dirs + d
            h = init[k][0] if init else zeros(x, m.proj_size)
            c = init[k][1] if init else zeros(x, m.hidden_size)
            seq: list[Any] = [None] * steps
            for t in (reversed(range(steps)) if d else range(steps)):
                h, c = lstm_step(gx[:, t], h, c, proj)
                seq[t] = h
            outs.append(keras.ops.stack(seq, axis=1))
            hs.append(h)
            cs.append(c)
        x = outs[0] if dirs == 1 else keras.ops.concatenate(outs, axis=-1)
    return x, (keras.ops.stack(hs, axis=1), keras.ops.stack(cs, axis=1))

