"""Embedding lookups: ``nn.Embedding``, ``F.embedding`` and ``aten.embedding`` (torch.export).

A lookup in a constant table (a parameter) becomes Keras' built-in ``Embedding`` layer holding
the table, trainable when the parameter is. Index tensors are int64 in PyTorch and int32 in
Keras (model inputs included; see emitter/build.py). ``padding_idx`` only matters for training:
PyTorch never updates that row (its gradient is zero), so the Keras layer gets a
:class:`KeepRow` constraint that puts the row back after every optimizer step; the lookup itself
is the same. ``max_norm`` renormalizes the looked-up rows of the weight *in place* on every
forward call, which a converted model cannot reproduce, and is refused with an error that says
so. A lookup in a table computed from the inputs is refused (its rows would be the batch axis).

A Linear tied to the table (GPT-2's ``lm_head.weight is wte.weight``) is converted as its own
Dense layer holding a copy: two weights, equal at conversion, trained separately afterwards.
"""
from __future__ import annotations

from typing import Any

import keras
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from tracer.emitter.context import Emit, to_numpy
from tracer.op_rules.common import call_with_weights, trainable
from tracer.op_rules.registry import Layout, rule
from tracer.ir import OpNode, Ref

aten = torch.ops.aten


@keras.saving.register_keras_serializable(package="tracer")
class KeepRow(keras.constraints.Constraint):
    """Keeps row ``index`` of a weight at ``row`` (PyTorch's ``padding_idx``: never updated)."""

    def __init__(self, index: int, row: Any):
        self.index = int(index)
        self.row = [float(v) for v in np.asarray(row, np.float32).reshape(-1)]

    def __call__(self, w: Any) -> Any:
        rows = keras.ops.expand_dims(keras.ops.arange(keras.ops.shape(w)[0]), 1)
        row = keras.ops.cast(keras.ops.convert_to_tensor(self.row), w.dtype)
        return keras.ops.where(keras.ops.equal(rows, self.index), row[None, :], w)

    def get_config(self) -> dict:
        return {"index": self.index, "row": self.row}


def _refuse_max_norm(node: OpNode, max_norm: Any) -> None:
    if max_norm is not None:
        raise NotImplementedError(
            f"embedding with max_norm={max_norm}: PyTorch renormalizes the looked-up rows of the weight in "
            "place on every call, which a converted model cannot do. Renormalize the weight once "
            "(torch.embedding_renorm_) and set max_norm=None before converting")


def lookup_layer(node: OpNode, ctx: Emit, ids: Any, weight: np.ndarray, padding_idx: int | None,
                 train: bool) -> Any:
    """``weight[ids]`` as a Keras Embedding layer holding ``weight``."""
    num, dim = weight.shape
    constraint = None if padding_idx is None else KeepRow(padding_idx, weight[padding_idx])
    layer = keras.layers.Embedding(num, dim, embeddings_constraint=constraint, name=ctx.name(node))
    y = call_with_weights(layer, ids, [weight])
    layer.trainable = train
    return y


@rule(nn.Embedding, layout=Layout.TORCH)
def embedding_module(node: OpNode, ctx: Emit) -> Any:
    m = node.module
    _refuse_max_norm(node, m.max_norm)
    weight = to_numpy(m.weight)
    pad = None if m.padding_idx is None else int(m.padding_idx) % weight.shape[0]
    return lookup_layer(node, ctx, ctx.input(node, 0), weight, pad, trainable(node))


@rule(F.embedding, aten.embedding.default, layout=Layout.TORCH)
def embedding(node: OpNode, ctx: Emit) -> Any:
    """``F.embedding(input, weight, padding_idx, max_norm, ...)``; ``aten.embedding(weight, indices,
    padding_idx)`` (-1: none)."""
    _refuse_max_norm(node, node.kw.get("max_norm"))
    ids_ref = node.kw.get("input", node.kw.get("indices"))
    ids = ctx.tensor_input(node, ctx.index_of(node, ids_ref))
    w_ref = node.kw["weight"]
    src = ctx.graph.nodes[w_ref.name]["op"] if isinstance(w_ref, Ref) else None
    if src is None or not src.is_constant:
        raise NotImplementedError("embedding with a table computed from the inputs: its rows would be the Keras "
                                  "batch axis; look up in a parameter, or use torch.index_select on another axis")
    weight = to_numpy(src.value)
    if weight.dtype == np.float64:
        weight = weight.astype(np.float32)
    pad = node.kw.get("padding_idx")
    if node.target is aten.embedding.default and pad == -1:
        pad = None
    pad = None if pad is None else int(pad) % weight.shape[0]
    return lookup_layer(node, ctx, ids, weight, pad, bool(src.kw.get("trainable")))


@rule(*(getattr(getattr(aten, p, None), "default", None) for p in ("embedding_renorm", "embedding_renorm_")
        if hasattr(aten, p)), layout=Layout.TORCH)
def embedding_renorm(node: OpNode, ctx: Emit) -> Any:
    """torch.export writes ``nn.Embedding(max_norm=...)`` as an in-place renorm before the lookup."""
    _refuse_max_norm(node, node.kw.get("max_norm", "set"))
    return ctx.input(node, 0)


def tied_weights(graph: Any) -> list[str]:
    """Parameters that several converted layers read (an LM head tied to the token embedding), each
    with what the Keras model holds: one copy per layer, equal at conversion, trained separately."""
    users: dict[int, list[str]] = {}
    for name in graph.graph.get("order", graph.nodes):
        node = graph.nodes[name]["op"]
        if node.kind == "call_module" and node.module is not None:
            for pname, p in node.module.named_parameters(recurse=False):
                users.setdefault(id(p), []).append(f"{node.module_path}.{pname}")
        elif node.kind == "get_attr" and len(list(graph.successors(name))) > 1 and any(
                graph.nodes[u]["op"].target in (F.embedding, aten.embedding.default) for u in graph.successors(name)):
            users[id(node)] = [f"{graph.nodes[u]['op'].module_path or u}" for u in graph.successors(name)]
    return [f"{' = '.join(names)}: tied in PyTorch; one Keras weight per layer, equal at conversion, trained "
            "separately" for names in users.values() if len(names) > 1]
