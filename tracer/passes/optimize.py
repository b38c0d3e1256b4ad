"""Clean-up passes: identity removal, BatchNorm folding, activation fusion.

Each is a function ``Graph -> Graph`` run from ``tracer.passes.pipeline.passes`` and changes results by
fp32 rounding at most. A node that absorbs its successor keeps the successor's name (it now
computes that value), so per-node comparisons with PyTorch still line up; what was done is
recorded in the node's ``notes`` and shown in ``ConversionResult.facts()["notes"]``.
"""
from __future__ import annotations

import copy
import operator
from dataclasses import replace

import networkx as nx
import torch
import torch.nn as nn
import torch.nn.functional as F

from tracer.op_rules.registry import lookup
from tracer.ir import OpNode, Ref, compact_order, op, ordered, rewire, set_op, sole_user


# ---- graph surgery -------------------------------------------------------------------------

def replace_uses(graph: nx.DiGraph, old: str, new: str) -> None:
    """Every consumer of ``old`` reads ``new`` instead (arguments, inputs and edges)."""
    for user in list(graph.successors(old)):
        rewire(graph, user, old, new)


def absorb(graph: nx.DiGraph, first: OpNode, last: OpNode, merged: OpNode, note: str) -> None:
    """Replace the chain ``first -> last`` (``last`` its only user) by ``merged`` under ``last``'s name."""
    merged = replace(merged, name=last.name, shape=last.shape, dtype=last.dtype,
                     notes=(*first.notes, *last.notes, note))
    for src in merged.inputs:
        graph.add_edge(src, last.name)
    graph.remove_node(first.name)
    set_op(graph, merged)


def builtin_rule(node: OpNode) -> str | None:
    """The built-in rule handling ``node`` ("conv", "linear", ...); None for user or override rules."""
    r = lookup(node.target)
    return r.name if r is not None and r.fn.__module__ == _BUILTIN.get(r.name) else None


_BUILTIN = {"identity": "tracer.op_rules.linear", "linear": "tracer.op_rules.linear", "reshape": "tracer.op_rules.shape",
            "permute": "tracer.op_rules.shape", "conv": "tracer.op_rules.conv", "batch_norm": "tracer.op_rules.norm"}


# ---- identity and no-op removal --------------------------------------------------------------

_ARITH_NOOPS = {operator.mul: 1, torch.mul: 1, "mul": 1, operator.truediv: 1, torch.div: 1, "div": 1,
                operator.add: 0, torch.add: 0, "add": 0, operator.sub: 0, torch.sub: 0, "sub": 0}


def _passes_through(graph: nx.DiGraph, node: OpNode) -> bool:
    """Whether ``node`` returns its first input unchanged (same shape and dtype)."""
    if not node.kind.startswith("call") or not node.inputs or node.shape is None:
        return False
    src = op(graph, node.inputs[0])
    if src.is_constant or src.shape != node.shape or src.dtype != node.dtype:
        return False
    rule = builtin_rule(node)
    if rule == "identity":
        return True
    if rule == "reshape":
        return True  # a reshape to the same shape
    if rule == "permute":
        dims = node.kw.get("dims")
        return dims is not None and tuple(d % node.rank for d in dims) == tuple(range(node.rank))
    if node.kind == "call_module" or len(node.args) != 2 or not isinstance(node.args[0], Ref):
        return False
    try:
        neutral = _ARITH_NOOPS.get(node.target)
    except TypeError:  # unhashable target
        return False
    other = node.args[1]
    return (neutral is not None and node.kw.get("alpha", 1) == 1 and node.kw.get("rounding_mode") is None
            and not isinstance(other, bool)
            and isinstance(other, (int, float)) and other == neutral and node.args[0].name == src.name)


def remove_identities(graph: nx.DiGraph) -> nx.DiGraph:
    """Drop Identity, Dropout (inference), ``contiguous()``, same-shape reshapes, ``x * 1``, ``x + 0``."""
    for name in [n.name for n in ordered(graph)]:
        node = op(graph, name)  # re-read: removing an earlier identity rewrote this node's inputs
        if _passes_through(graph, node):
            replace_uses(graph, node.name, node.inputs[0])
            graph.remove_node(node.name)
    return compact_order(graph)


# ---- BatchNorm folding (inference only) ------------------------------------------------------

def _foldable_producer(graph: nx.DiGraph, bn: OpNode) -> OpNode | None:
    if bn.kind != "call_module" or builtin_rule(bn) != "batch_norm" or not bn.inputs:
        return None
    m = bn.module
    if not m.track_running_stats or m.running_mean is None:
        return None
    prev = op(graph, bn.inputs[0])
    if prev.kind != "call_module" or sole_user(graph, prev.name) != bn.name:
        return None
    if builtin_rule(prev) == "conv" and isinstance(prev.module, nn.modules.conv._ConvNd):
        return prev if not prev.module.transposed and prev.module.out_channels == m.num_features else None
    if builtin_rule(prev) == "linear" and isinstance(prev.module, nn.Linear) and bn.rank == 2:
        return prev if prev.module.out_features == m.num_features else None
    return None


def bn_affine(bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode ``bn`` as ``scale * x + shift`` per channel, in float64."""
    with torch.no_grad():
        scale = (bn.running_var.double() + bn.eps).rsqrt()
        if bn.weight is not None:
            scale = scale * bn.weight.detach().double()
        shift = -bn.running_mean.double() * scale
        if bn.bias is not None:
            shift = shift + bn.bias.detach().double()
    return scale, shift


def module_copy(m: nn.Module, params: dict, buffers: dict | None = None, trainable: bool | None = None,
                **attrs) -> nn.Module:
    """A shallow copy of ``m`` with ``params`` (each cast to the dtype of the one it replaces, else of the
    weight; trainable like it, or as ``trainable`` says), ``buffers`` and ``attrs`` replaced. ``m`` is untouched."""
    new = copy.copy(m)
    new._parameters, new._buffers = dict(m._parameters), dict(m._buffers)
    for k, v in params.items():
        old = m._parameters.get(k)
        like = old if old is not None else m.weight
        grad = like.requires_grad if trainable is None else trainable
        new._parameters[k] = nn.Parameter(v.detach().to(like.dtype), requires_grad=grad)
    new._buffers.update(buffers or {})
    for k, v in attrs.items():
        setattr(new, k, v)
    return new


def folded_module(layer: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> nn.Module:
    """A copy of ``layer`` (conv or linear) computing ``bn(layer(x))`` in eval mode; ``layer`` is untouched."""
    scale, shift = bn_affine(bn)
    with torch.no_grad():
        w = layer.weight.detach().double()
        b = layer.bias.detach().double() if layer.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
        dtype = layer.weight.dtype
        new_w = (w * scale.reshape(-1, *[1] * (w.ndim - 1))).to(dtype)
        new_b = (b * scale + shift).to(dtype)
    return module_copy(layer, {"weight": new_w, "bias": new_b}, trainable=layer.weight.requires_grad)


def fold_batchnorm(graph: nx.DiGraph) -> nx.DiGraph:
    """Fold eval-mode BatchNorm into the conv or linear before it (``--fold-bn``, inference only).

    ``bn(conv(x)) = (s * W) x + s * (b - mean) + beta`` with ``s = gamma / sqrt(var + eps)``, per
    output channel. The model's own modules are not changed; the folded node gets a copy.
    """
    for bn in ordered(graph):  # a fold rewrites only the two nodes it merges
        prev = _foldable_producer(graph, bn) if bn.kind == "call_module" else None
        if prev is None:
            continue
        merged = replace(prev, module=folded_module(prev.module, bn.module))
        absorb(graph, prev, bn, merged, f"BatchNorm {bn.module_path or bn.name} folded into this layer (fold_bn)")
    return compact_order(graph)


# ---- activation fusion ----------------------------------------------------------------------

_FUSABLE = {nn.ReLU: "relu", F.relu: "relu", torch.relu: "relu", "relu": "relu",
            nn.ReLU6: "relu6", F.relu6: "relu6",
            nn.Sigmoid: "sigmoid", F.sigmoid: "sigmoid", torch.sigmoid: "sigmoid", "sigmoid": "sigmoid",
            nn.Tanh: "tanh", F.tanh: "tanh", torch.tanh: "tanh", "tanh": "tanh",
            nn.SiLU: "silu", F.silu: "silu", nn.GELU: "gelu", F.gelu: "gelu"}


def keras_activation(node: OpNode) -> str | None:
    """The Keras activation name computing ``node`` exactly, if it is one a Conv/Dense can take."""
    r = lookup(node.target)
    if r is None or r.fn.__module__ != "tracer.op_rules.activation" or len(node.inputs) != 1:
        return None
    try:
        name = _FUSABLE.get(node.target)
    except TypeError:  # unhashable target
        return None
    if name == "gelu":
        approximate = node.module.approximate if node.module is not None else node.kw.get("approximate", "none")
        return name if approximate == "none" else None
    return name


def fuse_activations(graph: nx.DiGraph) -> nx.DiGraph:
    """A Conv or Dense whose only user is relu/relu6/sigmoid/tanh/silu/exact gelu takes it as ``activation=``.

    The rules read it from ``node.kw["fused_activation"]``.
    """
    for act in ordered(graph):  # a fusion rewrites only the two nodes it merges
        name = keras_activation(act) if act.kind.startswith("call") else None
        if name is None:
            continue
        prev = op(graph, act.inputs[0])
        if (builtin_rule(prev) not in ("conv", "linear") or prev.kw.get("fused_activation")
                or sole_user(graph, prev.name) != act.name):
            continue
        merged = replace(prev, kw={**prev.kw, "fused_activation": name})
        absorb(graph, prev, act, merged, f"activation {name} ({act.name}) fused into this layer")
    return compact_order(graph)
