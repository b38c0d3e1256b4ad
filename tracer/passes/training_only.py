"""Ops that act only while training (torchvision's stochastic depth) are dropped, with a note.

Dropout is removed silently with the other inference identities (tracer/passes/optimize.py);
stochastic depth changes what training the converted model does (whole residual branches are no
longer dropped), so the note on the node that fed it says so, in ``ConversionResult.facts()``.
"""
from __future__ import annotations

from dataclasses import replace

import networkx as nx

from tracer.ir import compact_order, op, ordered, rewire, set_op
from tracer.op_rules.library import stochastic_depth, training_only_note
from tracer.op_rules.registry import lookup


def drop_training_only(graph: nx.DiGraph) -> nx.DiGraph:
    for node in list(ordered(graph)):
        r = lookup(node.target) if node.kind.startswith("call") else None
        if r is None or r.fn is not stochastic_depth or not node.inputs:
            continue
        src = op(graph, node.inputs[0])
        set_op(graph, replace(src, notes=(*src.notes, training_only_note(node))))
        for user in list(graph.successors(node.name)):
            rewire(graph, user, node.name, src.name)
        graph.remove_node(node.name)
    return compact_order(graph)
