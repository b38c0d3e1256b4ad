"""Channel permutations absorbed into weights, for inference models (``fold_bn``).

ShuffleNet's channel shuffle (``view -> permute -> view``) is a permutation of the channels. On
an NHWC tensor it is a transpose of the last two axes of (N, H, W, g, C/g), the only Transpose
left in FBNet-A with channels-last I/O. When the shuffled tensor flows only through per-channel
ops (depthwise conv, BatchNorm, parameter-free activations) into a convolution, the permutation
can instead relabel those per-channel ops' parameters and the convolution's input channels, and
no data moves. A grouped convolution there becomes dense (its kernel zero outside the groups,
``groups`` times the multiply-adds): fine for inference, wrong for training, hence fold_bn only.
Results change by fp32 rounding at most; the model's modules are not changed.
"""
from __future__ import annotations

from dataclasses import replace

import networkx as nx
import torch
import torch.nn as nn

from tracer.op_rules.shape import permute_dims
from tracer.ir import OpNode, compact_order, op, ordered, set_op, sole_user
from tracer.passes.optimize import builtin_rule, keras_activation, module_copy, replace_uses

_MOVES = ("reshape", "permute")


def _chain_back(graph: nx.DiGraph, end: OpNode) -> list[OpNode] | None:
    """The reshape/permute nodes ending at ``end``, each read only by the next, from a tensor of ``end``'s shape."""
    chain = [end]
    while True:
        src = op(graph, chain[0].inputs[0]) if len(chain[0].inputs) == 1 else None
        if src is None:
            return None
        if builtin_rule(src) in _MOVES and sole_user(graph, src.name) == chain[0].name:
            chain.insert(0, src)
            continue
        return chain if src.shape == end.shape and len(chain) >= 2 else None


def channel_permutation(graph: nx.DiGraph, chain: list[OpNode]) -> torch.Tensor | None:
    """``sigma`` with ``out[:, p] = in[:, sigma[p]]`` if ``chain`` only permutes channels (dim 1), else None."""
    src = op(graph, chain[0].inputs[0])
    if src.rank < 3:
        return None
    shape = src.shape
    start = torch.arange(int(torch.Size(shape).numel())).reshape(shape)  # every element its own number
    t = start
    for node in chain:
        t = t.reshape(node.shape) if builtin_rule(node) == "reshape" else t.permute(*permute_dims(node, t.dim()))
    if tuple(t.shape) != tuple(shape):
        return None
    sigma = t[(0, slice(None), *[0] * (len(shape) - 2))] // int(torch.Size(shape[2:]).numel())
    if sorted(sigma.tolist()) != list(range(shape[1])) or not torch.equal(t, start[:, sigma]):
        return None
    return sigma


def _per_channel(node: OpNode, channels: int) -> bool:
    m = node.module
    if builtin_rule(node) == "conv" and isinstance(m, nn.modules.conv._ConvNd) and not m.transposed:
        return m.groups == m.in_channels == m.out_channels == channels
    if builtin_rule(node) == "batch_norm":
        return m is not None and m.num_features == channels and m.running_mean is not None
    return node.kind.startswith("call") and keras_activation(node) is not None


def _plain_conv(node: OpNode) -> bool:
    m = node.module
    return (builtin_rule(node) == "conv" and isinstance(m, nn.modules.conv._ConvNd) and not m.transposed
            and m.padding_mode == "zeros" and len(node.inputs) == 1)


def _chain_forward(graph: nx.DiGraph, end: OpNode) -> tuple[list[OpNode], OpNode] | None:
    """Per-channel nodes after ``end`` (each the sole reader of the one before) and the conv they feed."""
    channels, ops, cur = end.shape[1], [], end
    while True:
        user = sole_user(graph, cur.name)
        if user is None:
            return None
        node = op(graph, user)
        if len(node.inputs) == 1 and node.shape == end.shape and _per_channel(node, channels):
            ops.append(node)
            cur = node
            continue
        return (ops, node) if _plain_conv(node) else None


def _relabelled(node: OpNode, inv: torch.Tensor) -> OpNode:
    """``node`` computing channel ``c`` as it computed channel ``inv[c]``."""
    m = node.module
    if m is None or builtin_rule(node) not in ("conv", "batch_norm"):
        return node  # a parameter-free activation
    def per_channel(store: dict) -> dict:
        return {k: v.detach()[inv].clone() for k, v in store.items()
                if v is not None and v.dim() >= 1 and v.shape[0] == inv.numel()}
    return replace(node, module=module_copy(m, per_channel(m._parameters), per_channel(m._buffers)))


def _densified(conv: nn.modules.conv._ConvNd, sigma: torch.Tensor) -> nn.Module:
    """``conv`` reading channel ``c`` where it read channel ``p`` with ``sigma[p] = c``: dense, groups=1."""
    w = conv.weight.detach()
    out_per, in_per = conv.out_channels // conv.groups, conv.in_channels // conv.groups
    dense = torch.zeros(conv.out_channels, conv.in_channels, *w.shape[2:], dtype=w.dtype)
    for g in range(conv.groups):
        dense[g * out_per:(g + 1) * out_per, g * in_per:(g + 1) * in_per] = w[g * out_per:(g + 1) * out_per]
    moved = torch.empty_like(dense)
    moved[:, sigma] = dense
    return module_copy(conv, {"weight": moved}, groups=1)


def absorb_channel_permutations(graph: nx.DiGraph) -> nx.DiGraph:
    """Channel shuffles whose channels reach a conv through per-channel ops move no data (inference only)."""
    for name in [n.name for n in ordered(graph)]:
        end = op(graph, name) if name in graph else None
        if end is None or builtin_rule(end) != "reshape" or end.rank < 3:
            continue
        chain = _chain_back(graph, end)
        sigma = channel_permutation(graph, chain) if chain else None
        found = _chain_forward(graph, end) if sigma is not None else None
        if found is None:
            continue
        ops, conv = found
        inv = torch.empty_like(sigma)
        inv[sigma] = torch.arange(sigma.numel())
        for node in ops:
            set_op(graph, _relabelled(node, inv))
        note = f"channel permutation ({', '.join(n.name for n in chain)}) absorbed into its weights (fold_bn)"
        set_op(graph, replace(conv, module=_densified(conv.module, sigma), notes=(*conv.notes, note)))
        replace_uses(graph, end.name, chain[0].inputs[0])
        graph.remove_nodes_from([n.name for n in chain])
    return compact_order(graph)
