"""Graph passes, run in the order of PASSES; each is Graph -> Graph and is checked for integrity."""
from __future__ import annotations

import operator
from collections import OrderedDict
from typing import Any, Callable

import networkx as nx

from tracer.fixes.inplace_ops import functionalize_inplace
from tracer.op_rules.registry import lookup
from tracer.errors import UnsupportedOpsError, public_target, rule_stub
from tracer.ir import OP, OpNode, Ref, check_integrity, op, ordered, target_name, update
from tracer.passes.layout import assign_layouts
from tracer.passes.optimize import fold_batchnorm, fuse_activations, remove_identities
from tracer.passes.channel_perm import absorb_channel_permutations
from tracer.passes.reparam import merge_parallel_convs
from tracer.passes.training_only import drop_training_only


def check_supported(graph: nx.DiGraph) -> nx.DiGraph:
    """Collect every node without a rule and raise one error listing them all."""
    missing: "OrderedDict[str, dict]" = OrderedDict()
    for node in ordered(graph):
        if node.kind in ("placeholder", "output", "constant", "get_attr") or lookup(node.target) is not None:
            continue
        key = target_name(node.target)
        if key in missing:
            missing[key]["count"] += 1
            continue
        missing[key] = {"op": public_target(node.target), "node": node.name, "source": str(node.source), "count": 1,
                        "module_path": node.module_path, "stub": rule_stub(node)}
    if missing:
        raise UnsupportedOpsError(list(missing.values()))
    return graph


def remove_dead(graph: nx.DiGraph) -> nx.DiGraph:
    """Drop nodes whose result reaches no output (e.g. an unused branch or constant)."""
    outputs = [n.name for n in ordered(graph) if n.kind == "output"]
    live = set(outputs)
    for o in outputs:
        live |= nx.ancestors(graph, o)
    placeholders = {n.name for n in ordered(graph) if n.kind == "placeholder"}
    graph.remove_nodes_from([n for n in list(graph.nodes) if n not in live and n not in placeholders])
    return graph


def expand_tuple_outputs(graph: nx.DiGraph) -> nx.DiGraph:
    """A tuple-valued node returned as is (``return y.chunk(2, 1)``) becomes a tuple of its elements.

    Each element is read by a getitem node, so every model output is one tensor with its own
    layout, like ``a, b = y.chunk(2, 1); return a, b``.
    """
    out = next((n for n in ordered(graph) if n.kind == "output"), None)
    if out is None:
        return graph
    order = graph.graph["order"]

    def expand(v: Any) -> Any:
        if isinstance(v, (tuple, list)):
            return type(v)(expand(x) for x in v)
        if isinstance(v, dict):
            return {k: expand(x) for k, x in v.items()}
        if not isinstance(v, Ref):
            return v
        src = op(graph, v.name)
        if src.shape is not None or not _all_tensors(src.structure):
            return v
        return items(src, src.name)[0]

    def items(src: OpNode, after: str) -> tuple[tuple, str]:
        """getitem nodes for each element, placed after node ``after`` (nested tuples, an LSTM's
        ``(h_n, c_n)``, expanded too); the refs and the last node placed."""
        refs = []
        for k, shape in enumerate(src.structure):
            name = f"{src.name}_item{k}"
            while name in graph:
                name += "_"
            nested = not all(isinstance(d, int) for d in shape)
            graph.add_node(name, **{OP: OpNode(
                name=name, kind="call_function", target=operator.getitem, inputs=(src.name,),
                args=(Ref(src.name), k), kw={"a": Ref(src.name), "b": k}, shape=None if nested else tuple(shape),
                structure=tuple(shape) if nested else None, module_path=src.module_path, source=src.source)})
            graph.add_edge(src.name, name)
            order.insert(order.index(after) + 1, name)
            ref, after = items(op(graph, name), name) if nested else (Ref(name), name)
            refs.append(ref)
        return tuple(refs), after

    args = expand(out.args)
    inputs = tuple(dict.fromkeys(r.name for r in _refs(args)))
    for src in out.inputs:
        if src not in inputs:
            graph.remove_edge(src, out.name)
    for src in inputs:
        graph.add_edge(src, out.name)
    update(graph, out.name, args=args, inputs=inputs)
    return graph


def _all_tensors(structure: Any) -> bool:
    """A (nested) tuple of tensor shapes, no other values in it."""
    return bool(structure) and all(s is not None and (all(isinstance(d, int) for d in s) or _all_tensors(s))
                                   for s in structure)


def _refs(value: Any) -> list[Ref]:
    if isinstance(value, Ref):
        return [value]
    if isinstance(value, (tuple, list)):
        return [r for v in value for r in _refs(v)]
    if isinstance(value, dict):
        return [r for v in value.values() for r in _refs(v)]
    return []


def passes(channels_last_io: bool, fold_bn: bool = False) -> list[Callable[[nx.DiGraph], nx.DiGraph]]:
    """The ordered pass list.

    ``fold_bn`` (inference models only) folds BatchNorm into conv/linear, merges parallel conv
    branches of one input (RepVGG re-parameterization), folds the BatchNorms that followed a
    merged sum, and absorbs channel shuffles that feed a conv through per-channel ops into weights.
    """
    inference = [fold_batchnorm, merge_parallel_convs, fold_batchnorm, absorb_channel_permutations] if fold_bn else []
    return [functionalize_inplace, expand_tuple_outputs, remove_identities, drop_training_only, remove_dead,
            check_supported,
            *inference, fuse_activations,
            lambda g: assign_layouts(g, channels_last_io)]


def run_passes(graph: nx.DiGraph, channels_last_io: bool = False, fold_bn: bool = False) -> nx.DiGraph:
    for p in passes(channels_last_io, fold_bn):
        graph = p(graph)
        check_integrity(graph)
    return graph
