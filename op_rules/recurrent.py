"""Recurrent layers: nn.LSTM / nn.GRU / nn.RNN as Keras LSTM / GRU / SimpleRNN layers.

The modules stay single nodes at capture (a module rule makes them fx leaves). Inside Keras the
batch is axis 0, so a seq-first (``batch_first=False``) sequence ``(T, B, F)`` is stored as
``(B, T, F)`` and the states ``h_n`` / ``c_n`` ``(num_layers * num_directions, B, H)`` as
``(B, L*D, H)``: the rule declares those layouts (per tuple element, ``Phys.items``), so ``out[-1]``,
``out[:, -1]``, ``out.unbind(0)`` and ``h_n[-1]`` index the time / layer axis, never the batch.

Model inputs read this way enter Keras batch first (tracer/passes/layout.py batch_first_layout): a
state given as an input (a streaming model's ``forward(x, h0)``) is the Keras Input ``(B, L*D, H)``,
a time-major sequence input ``(B, T, F)``; ``ConversionResult.input_layouts`` records it (perm
``(1, 0, 2)``), and the parity tester and LiteRT transpose their arrays by it. Feed such a Keras or
LiteRT model ``h0.transpose(1, 0, 2)``. The outputs ``h_n`` / ``c_n`` keep PyTorch's
``(L*D, B, H)``, like every model output.

Weights: torch's gate order is kept for the LSTM (i, f, g, o = Keras i, f, c, o); the GRU's is
reordered (torch r, z, n -> Keras z, r, h) and ``reset_after=True`` keeps its two biases; the LSTM
and the simple RNN have one bias in Keras, ``b_ih + b_hh``. A zero initial state is Keras' own
(sized by the runtime batch); ``h0`` / ``c0`` given are split per layer and direction. Inter-layer
dropout is inactive at inference and is not converted (a node note says so). An LSTM with
``proj_size`` (no Keras equivalent) is unrolled over the recorded time steps with Dense layers
(op_rules/recurrent_cells.py), which is exact and uses built-in layers only.
"""
from __future__ import annotations

from typing import Any

import keras
import torch.nn as nn

from tracer.emitter.context import Emit
from tracer.ir import OpNode, Phys, update
from tracer.op_rules.recurrent_cells import projected_lstm
from tracer.op_rules.recurrent_io import initial_states, keras_weights
from tracer.op_rules.registry import rule

SEQ_FIRST = Phys((1, 0, 2))  # torch (T, B, F) held as Keras (B, T, F)
STATE = Phys((1, 0, 2))  # torch (L*D, B, H) held as Keras (B, L*D, H)


def _kind(module: nn.Module) -> str:
    if isinstance(module, nn.LSTM):
        return "LSTM"
    return "GRU" if isinstance(module, nn.GRU) else "RNN"


def _rnn_layout(node: OpNode, ins: list, shapes: list) -> tuple[list, Phys]:
    if len(shapes[0]) != 3:  # unbatched: refused by the rule, with the reason
        return [Phys.identity(len(s)) for s in shapes], Phys.identity(len(shapes[0]))
    seq = Phys.identity(3) if node.module.batch_first else SEQ_FIRST
    state = Phys(STATE.perm, items=(STATE, STATE)) if _kind(node.module) == "LSTM" else STATE
    # a state passed as the (h_n, c_n) tuple another LSTM returned keeps that tuple's layout
    req = [p if p is not None and p.items and all(i == STATE for i in p.items) else STATE for p in ins[1:]]
    return [seq] + req, Phys(seq.perm, items=(seq, state))


@rule(nn.LSTM, nn.GRU, nn.RNN, layout=_rnn_layout)
def recurrent(node: OpNode, ctx: Emit) -> Any:
    """``(output, h_n)`` / ``(output, (h_n, c_n))`` from stacked (bi)directional Keras RNN layers."""
    m, kind = node.module, _kind(node.module)
    if len(node.in_layouts[0].perm) != 3:
        raise NotImplementedError(f"{kind} on an unbatched {len(node.in_layouts[0].perm)}-D input: give it a batch "
                                  "axis (x.unsqueeze(1), or x.unsqueeze(0) with batch_first=True)")
    _note_dropout(node, ctx)
    if kind == "LSTM" and m.proj_size:
        return projected_lstm(node, ctx, initial_states(node, ctx))
    x, init = ctx.input(node, 0), initial_states(node, ctx)
    dirs = 2 if m.bidirectional else 1
    finals: list[list[Any]] = []  # per (layer, direction): its final states
    for layer in range(m.num_layers):
        made = [_keras_layer(m, kind, ctx.name(node, f"l{layer}" + ("_reverse" if d else "")), bool(d))
                for d in range(dirs)]
        state = [s for d in range(dirs) for s in init[layer * dirs + d]] if init else None
        weights = [w for d in range(dirs) for w in keras_weights(m, kind, layer, d)]
        if dirs == 1:
            net = made[0]
        else:
            net = keras.layers.Bidirectional(made[0], backward_layer=made[1], merge_mode="concat",
                                             name=ctx.name(node, f"l{layer}"))
        outs = net(x, initial_state=state)
        net.set_weights(weights)
        net.trainable = any(p.requires_grad for p in m.parameters())
        x, states = outs[0], list(outs[1:])
        per = len(states) // dirs
        finals += [states[d * per:(d + 1) * per] for d in range(dirs)]
    h_n = _stack([f[0] for f in finals])
    if kind == "LSTM":
        return x, (h_n, _stack([f[1] for f in finals]))
    return x, h_n


def _keras_layer(m: nn.Module, kind: str, name: str, backwards: bool) -> keras.layers.Layer:
    common = dict(return_sequences=True, return_state=True, use_bias=m.bias, go_backwards=backwards, name=name)
    if kind == "LSTM":
        return keras.layers.LSTM(m.hidden_size, **common)
    if kind == "GRU":
        return keras.layers.GRU(m.hidden_size, reset_after=True, **common)
    return keras.layers.SimpleRNN(m.hidden_size, activation=m.nonlinearity, **common)


def _stack(states: list[Any]) -> Any:
    return keras.ops.stack(states, axis=1) if len(states) > 1 else keras.ops.expand_dims(states[0], 1)


def _note_dropout(node: OpNode, ctx: Emit) -> None:
    m = node.module
    if m.dropout and m.num_layers > 1:
        note = (f"inter-layer dropout p={m.dropout:g} of {type(m).__name__} is inactive at inference and was not "
                "converted: a Keras model trained from this conversion trains without it")
        if note not in node.notes:
            update(ctx.graph, node.name, notes=(*node.notes, note))
