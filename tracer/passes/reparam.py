"""Structural re-parameterization for inference models (``fold_bn``): parallel branches summed -> one conv.

RepVGG-style blocks compute ``conv3x3(x) + conv1x1(x) + bn(x)`` (after BatchNorm folding, each
term a linear map of the same ``x``). Their sum is one convolution whose kernel is the sum of
the branch kernels, each zero-padded to the largest size around its centre; the identity and
a bare BatchNorm are 1x1 kernels with one non-zero per output channel. The pass merges any
``a + b`` whose operands are such branches of one input, with matching stride, dilation and
groups and aligned padding, so RepVGG, RepViT's RepVGG-DW mixer and similar training-time
blocks run as one conv, as their authors' ``switch_to_deploy`` does by hand. It changes results
by fp32 rounding only (kernels are summed in float64). The merged node keeps the sum's name and
value, so per-node comparisons still line up; the model's modules are not changed.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, replace

import networkx as nx
import torch
import torch.nn as nn

from tracer.ir import OpNode, Ref, compact_order, op, ordered, set_op, sole_user
from tracer.op_rules.conv import conv_pads
from tracer.passes.optimize import bn_affine, builtin_rule, module_copy

_ADD = {operator.add, torch.add, "add"}


@dataclass(frozen=True)
class Branch:
    """One summand as a convolution of ``source``: ``None`` geometry fields adapt to the other branches."""

    node: str | None  # the producer to remove (conv or BatchNorm); None for the identity branch
    source: str  # the shared input
    weight: torch.Tensor  # float64, (out, in/groups, *k) for a conv, (out,) diagonal otherwise
    bias: torch.Tensor  # float64, (out,)
    stride: tuple | None = None
    dilation: tuple | None = None
    groups: int | None = None
    offset: tuple | None = None  # padding minus the kernel's half-extent, per spatial dim
    host: OpNode | None = None  # the conv node whose module the merged conv copies

    @property
    def is_conv(self) -> bool:
        return self.host is not None


def _is_add(node: OpNode) -> bool:
    try:
        if node.target not in _ADD:
            return False
    except TypeError:  # unhashable target
        return False
    return (node.kind.startswith("call") and len(node.args) == 2 and all(isinstance(a, Ref) for a in node.args)
            and node.kw.get("alpha", 1) == 1 and node.shape is not None)


def _conv_branch(node: OpNode) -> Branch | None:
    m = node.module
    if (node.kind != "call_module" or builtin_rule(node) != "conv" or not isinstance(m, nn.modules.conv._ConvNd)
            or m.transposed or m.padding_mode != "zeros" or len(node.inputs) != 1):
        return None
    pads = conv_pads(m.padding, m.kernel_size, m.dilation)
    halves = [d * (k - 1) for d, k in zip(m.dilation, m.kernel_size)]
    if any(p != q for p, q in pads) or any(h % 2 for h in halves):
        return None
    pads = tuple(p for p, _ in pads)
    w = m.weight.detach().double()
    b = m.bias.detach().double() if m.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
    return Branch(node.name, node.inputs[0], w, b, tuple(m.stride), tuple(m.dilation), int(m.groups),
                  tuple(p - h // 2 for p, h in zip(pads, halves)), host=node)


def _bn_branch(node: OpNode) -> Branch | None:
    m = node.module
    if (node.kind != "call_module" or builtin_rule(node) != "batch_norm" or len(node.inputs) != 1
            or not m.track_running_stats or m.running_mean is None):
        return None
    return Branch(node.name, node.inputs[0], *bn_affine(m))


def branches_of(graph: nx.DiGraph, name: str, add: str) -> list[Branch]:
    """Every way ``name`` (an operand of ``add``) is a linear branch: a conv or BN used only by ``add``, or itself."""
    node = op(graph, name)
    channels = node.shape[1] if node.rank >= 2 else None
    found = [Branch(None, name, torch.ones(channels, dtype=torch.float64), torch.zeros(channels, dtype=torch.float64))
             ] if channels else []
    if sole_user(graph, name) == add:
        b = _conv_branch(node) or _bn_branch(node)
        found += [b] if b is not None else []
    return found


def _agree(values: list) -> tuple[bool, object]:
    given = {v for v in values if v is not None}
    return len(given) <= 1, next(iter(given), None)


def _kernel(b: Branch, size: tuple, groups: int, in_ch: int) -> torch.Tensor:
    """``b`` as a (out, in/groups, *size) kernel centred in ``size``."""
    out = b.weight.shape[0]
    k = torch.zeros(out, in_ch // groups, *size, dtype=torch.float64)
    if b.is_conv:
        lo = [(s - ks) // 2 for s, ks in zip(size, b.weight.shape[2:])]
        k[(slice(None), slice(None), *(slice(a, a + ks) for a, ks in zip(lo, b.weight.shape[2:])))] = b.weight
        return k
    centre = tuple(s // 2 for s in size)
    per = in_ch // groups
    for o in range(out):
        k[(o, o % per, *centre)] = b.weight[o]
    return k


def merged_module(a: Branch, b: Branch) -> nn.Module | None:
    """One conv computing ``a + b``, or None when the branches cannot share a kernel."""
    host = a.host if a.is_conv else b.host
    m = host.module
    n = len(m.kernel_size)
    ok_s, stride = _agree([a.stride, b.stride])
    ok_d, dilation = _agree([a.dilation, b.dilation])
    ok_g, groups = _agree([a.groups, b.groups])
    ok_o, offset = _agree([a.offset, b.offset])
    if not (ok_s and ok_d and ok_g and ok_o):
        return None
    diag = [x for x in (a, b) if not x.is_conv]
    if diag and (any(s != 1 for s in stride) or any(o != 0 for o in offset) or m.in_channels != m.out_channels):
        return None
    sizes = [x.weight.shape[2:] if x.is_conv else (1,) * n for x in (a, b)]
    size = tuple(max(s[i] for s in sizes) for i in range(n))
    if any((size[i] - s[i]) % 2 for s in sizes for i in range(n)):
        return None
    weight = _kernel(a, size, groups, m.in_channels) + _kernel(b, size, groups, m.in_channels)
    padding = tuple(o + d * (k - 1) // 2 for o, d, k in zip(offset, dilation, size))
    return module_copy(m, {"weight": weight, "bias": a.bias + b.bias}, trainable=m.weight.requires_grad,
                       kernel_size=size, padding=padding,
                       _reversed_padding_repeated_twice=[p for p in reversed(padding) for _ in range(2)])


def _merge(graph: nx.DiGraph, add: OpNode) -> bool:
    x, y = (r.name for r in add.args)
    if x == y or not op(graph, x).shape == op(graph, y).shape == add.shape:
        return False
    for a in branches_of(graph, x, add.name):
        for b in branches_of(graph, y, add.name):
            if a.source != b.source or not (a.is_conv or b.is_conv):
                continue
            module = merged_module(a, b)
            if module is not None:
                _rewrite(graph, add, a, b, module)
                return True
    return False


def _rewrite(graph: nx.DiGraph, add: OpNode, a: Branch, b: Branch, module: nn.Module) -> None:
    host = a.host if a.is_conv else b.host
    parts = ", ".join(n for n in (a.node, b.node) if n) + (" and the identity" if None in (a.node, b.node) else "")
    merged = replace(host, name=add.name, shape=add.shape, dtype=add.dtype, module=module, inputs=(a.source,),
                     notes=(*host.notes, *add.notes, f"branches {parts} summed into one conv (fold_bn)"))
    for src in add.inputs:
        graph.remove_edge(src, add.name)
    graph.remove_nodes_from([n for n in (a.node, b.node) if n])
    graph.add_edge(a.source, add.name)
    set_op(graph, merged)


def merge_parallel_convs(graph: nx.DiGraph) -> nx.DiGraph:
    """Merge ``conv(x) + conv(x)``, ``conv(x) + x`` and ``conv(x) + bn(x)`` into one conv (inference only)."""
    for name in [n.name for n in ordered(graph)]:
        if name in graph and _is_add(op(graph, name)):
            _merge(graph, op(graph, name))
    return compact_order(graph)
