"""Graph passes, run in the order of PASSES; each is Graph -> Graph and is checked for integrity."""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import networkx as nx

from op_rules.registry import lookup
from tracer.errors import UnsupportedOpsError
from tracer.ir import OpNode, check_integrity, ordered, target_name
from tracer.layout import assign_layouts


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
        missing[key] = {"op": key, "node": node.name, "source": str(node.source), "count": 1,
                        "module_path": node.module_path, "stub": rule_stub(node)}
    if missing:
        raise UnsupportedOpsError(list(missing.values()))
    return graph


def rule_stub(node: OpNode) -> str:
    t = node.target
    if isinstance(t, str):
        target, fname = repr(t), t
    elif isinstance(t, type):
        target, fname = f"{t.__module__}.{t.__qualname__}", t.__name__.lower()
    else:
        target, fname = target_name(t), getattr(t, "__name__", "op").strip("_")
    return (f"@rule({target}, layout=Layout.ANY)\n"
            f"def {fname}(node: OpNode, ctx: Emit):\n"
            f"    x = ctx.input(node, 0)\n"
            f"    return keras.ops.<your op>(x)  # shape must be {node.shape}\n")


def remove_dead(graph: nx.DiGraph) -> nx.DiGraph:
    """Drop nodes whose result reaches no output (e.g. an unused branch or constant)."""
    outputs = [n.name for n in ordered(graph) if n.kind == "output"]
    live = set(outputs)
    for o in outputs:
        live |= nx.ancestors(graph, o)
    placeholders = {n.name for n in ordered(graph) if n.kind == "placeholder"}
    graph.remove_nodes_from([n for n in list(graph.nodes) if n not in live and n not in placeholders])
    return graph


def passes(channels_last_io: bool) -> list[Callable[[nx.DiGraph], nx.DiGraph]]:
    return [remove_dead, check_supported, lambda g: assign_layouts(g, channels_last_io)]


def run_passes(graph: nx.DiGraph, channels_last_io: bool = False) -> nx.DiGraph:
    for p in passes(channels_last_io):
        graph = p(graph)
        check_integrity(graph)
    return graph
