"""Learnable parameters that the Keras model would hold frozen, said out loud.

A ``nn.Parameter`` used in the forward of a module that has no rule of its own (``x * self.gamma``)
is captured as a constant. Where a rule stores it as a trainable Keras weight it stays learnable;
where the value is folded or stored frozen, training the Keras model would leave it fixed while
PyTorch trains it. :func:`frozen_parameters` finds those by value (a trainable Keras weight holding
the same numbers, in any layout, keeps the parameter learnable), and :func:`note_frozen` puts a
note on the node (report.json ``conversion.notes``) and a warning on the console.
"""
from __future__ import annotations

import warnings
from typing import Any

import networkx as nx
import numpy as np

from tracer.ir import op, ordered, update


def frozen_parameters(graph: nx.DiGraph, keras_model: Any) -> dict[str, tuple[str, ...]]:
    """Constant nodes made from trainable torch parameters that no trainable Keras weight holds:
    node name -> the parameters' names."""
    wanted = {node.name: np.sort(node.value.detach().cpu().numpy().astype(np.float32).ravel())
              for node in ordered(graph) if node.is_constant and node.kw.get("parameters")
              and hasattr(node.value, "detach")}
    if not wanted:
        return {}
    sizes = {v.size for v in wanted.values()}
    kept = [np.sort(np.asarray(w.numpy(), dtype=np.float32).ravel()) for w in keras_model.trainable_weights
            if int(np.prod(w.shape)) in sizes]
    return {name: tuple(op(graph, name).kw["parameters"]) for name, values in wanted.items()
            if not any(k.size == values.size and np.array_equal(k, values) for k in kept)}


def note_frozen(graph: nx.DiGraph, keras_model: Any) -> list[str]:
    """Note and warn about each frozen parameter (where it is used: its first consumer's source
    line); returns the messages."""
    messages = []
    for name, params in frozen_parameters(graph, keras_model).items():
        users = [op(graph, u) for u in graph.successors(name)]
        where = next((u for u in users if u.source.file), op(graph, name))
        module = f" in {where.module_path}" if where.module_path else ""
        line = f"{where.source.file}:{where.source.line}" if where.source.file else "<unknown source>"
        message = (f"trainable parameter {', '.join(params)} (used{module} at {line}) is a frozen constant in the "
                   "Keras model: training the Keras model leaves it fixed; a rule for that module keeps it "
                   "a trainable weight")
        update(graph, name, notes=(*op(graph, name).notes, message))
        warnings.warn(message, stacklevel=2)
        messages.append(message)
    return messages
