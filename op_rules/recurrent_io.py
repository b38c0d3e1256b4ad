"""What both recurrent rule files (op_rules/recurrent.py, op_rules/recurrent_cells.py) read from torch:
one layer and direction's weights (and them laid out for a Keras LSTM / GRU / SimpleRNN layer), and the
state argument ``hx`` as Keras tensors. Kept apart so neither rule file imports the other's helpers.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch.nn as nn

from tracer.emitter.context import Emit, to_numpy
from tracer.ir import OpNode, Ref


def torch_weights(m: nn.Module, layer: int, direction: int) -> dict[str, np.ndarray | None]:
    """``w_ih``, ``w_hh``, ``b_ih``, ``b_hh`` (and ``w_hr``) of one layer and direction, as numpy."""
    sfx = f"_l{layer}" + ("_reverse" if direction else "")
    return {k: (None if getattr(m, f"{name}{sfx}", None) is None else to_numpy(getattr(m, f"{name}{sfx}")))
            for k, name in (("w_ih", "weight_ih"), ("w_hh", "weight_hh"), ("b_ih", "bias_ih"),
                            ("b_hh", "bias_hh"), ("w_hr", "weight_hr"))}


def gru_order(w: np.ndarray) -> np.ndarray:
    """torch's GRU gate blocks (r, z, n) along axis 0 in Keras' order (z, r, h)."""
    r, z, n = np.split(w, 3, axis=0)
    return np.concatenate([z, r, n], axis=0)


def keras_weights(m: nn.Module, kind: str, layer: int, direction: int) -> list[np.ndarray]:
    """The Keras layer's ``[kernel, recurrent_kernel, (bias)]`` for one torch layer and direction."""
    t = torch_weights(m, layer, direction)
    w_ih, w_hh, b_ih, b_hh = t["w_ih"], t["w_hh"], t["b_ih"], t["b_hh"]
    if kind == "GRU":
        out = [gru_order(w_ih).T, gru_order(w_hh).T]
        return out + ([np.stack([gru_order(b_ih), gru_order(b_hh)])] if m.bias else [])
    return [w_ih.T, w_hh.T] + ([b_ih + b_hh] if m.bias else [])


def initial_states(node: OpNode, ctx: Emit) -> list[list[Any]] | None:
    """``h0`` (and ``c0``) split per layer and direction, as Keras ``(B, H)`` tensors; None for zeros."""
    tensors = state_inputs(node, ctx)  # each (B, L*D, H)
    if not tensors:
        return None
    m = node.module  # L*D from the module: a state that is a model input has no static Keras size there
    count = m.num_layers * (2 if m.bidirectional else 1)
    return [[t[:, k] for t in tensors] for k in range(count)]


def state_inputs(node: OpNode, ctx: Emit) -> list[Any]:
    """The state argument ``hx`` as a list of Keras tensors: ``h`` or ``(h, c)``, given as tensors or as
    the tuple another RNN / cell returned; empty when it is not given (zeros)."""
    hx = node.args[1] if len(node.args) > 1 else node.kw.get("hx")
    refs = [] if hx is None else (list(hx) if isinstance(hx, (tuple, list)) else [hx])
    if not all(isinstance(r, Ref) for r in refs):
        raise NotImplementedError("a recurrent state must be tensors (h, or (h, c) for an LSTM)")
    out: list[Any] = []
    for r in refs:
        t = ctx.tensor_input(node, ctx.index_of(node, r))
        out += list(t) if isinstance(t, (tuple, list)) else [t]
    return out
