"""When the converted Keras model raises while it runs (a TensorFlow ``InvalidArgumentError`` in a
Concatenate of mismatched batch sizes, a reshape of the wrong size), say which Keras layer failed
and which torch node it was emitted for, instead of a raw TensorFlow traceback.

The failing node is found by bisection over the graph order: a model whose outputs are the Keras
tensors of the first ``k`` nodes runs iff none of them (and so none of their ancestors) fails.
"""
from __future__ import annotations

import re
from typing import Any, Sequence

import keras
import networkx as nx
import numpy as np

from tracer.ir import OpNode, ordered

_TF_DETAIL = re.compile(r"\}\}\s*(.+?)(?:\s*\[Op:\w+\].*)?$")
_KERAS_CALL = re.compile(r"calling (\w+)\.call\(\)")


def error_detail(exc: BaseException) -> str:
    """The line of a TensorFlow/Keras error that says what went wrong (TF puts it after ``}}``)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for ln in lines:
        found = _TF_DETAIL.search(ln)
        if found:
            return re.sub(r"\x1b\[[0-9;]*m", "", found.group(1)).strip()
    return re.sub(r"\x1b\[[0-9;]*m", "", lines[0]) if lines else type(exc).__name__


def _fails(keras_model: Any, tensors: list, feed: Any) -> bool:
    try:
        inputs = keras_model.inputs if len(keras_model.inputs) > 1 else keras_model.inputs[0]
        keras.Model(inputs, tensors)(feed, training=False)
    except Exception:  # noqa: BLE001  (any runtime failure of the sub-model counts)
        return True
    return False


def first_failing_node(keras_model: Any, graph: nx.DiGraph, node_tensors: dict, feed: Any) -> OpNode | None:
    """The first node in graph order whose Keras tensor cannot be computed on ``feed``; None if all can."""
    nodes = [n for n in ordered(graph) if n.kind.startswith("call")
             and isinstance(node_tensors.get(n.name), keras.KerasTensor)]
    if not nodes or not _fails(keras_model, [node_tensors[n.name] for n in nodes], feed):
        return None
    lo, hi = 0, len(nodes) - 1  # invariant: the prefix up to hi fails
    while lo < hi:
        mid = (lo + hi) // 2
        if _fails(keras_model, [node_tensors[n.name] for n in nodes[:mid + 1]], feed):
            hi = mid
        else:
            lo = mid + 1
    return nodes[hi]


def describe_failure(exc: BaseException, keras_model: Any, graph: nx.DiGraph | None, node_tensors: dict,
                     feed: Any) -> str:
    """``Keras Concatenate 'cat' (for torch node cat (torch.cat) at model.py:12: ...) failed: <detail>``."""
    called = _KERAS_CALL.search(str(exc))
    layer = f"Keras {called.group(1)}" if called else "a Keras layer"
    node = None
    if graph is not None and node_tensors:
        try:
            node = first_failing_node(keras_model, graph, node_tensors, feed)
        except Exception:  # noqa: BLE001  (locating is best effort: the error itself is still reported)
            node = None
    if node is None:
        return f"{layer} failed: {error_detail(exc)}"
    op = getattr(getattr(node_tensors[node.name], "_keras_history", None), "operation", None)
    if op is not None and not called:
        layer = f"Keras {type(op).__name__}"
    named = f" '{op.name}'" if op is not None else ""
    return f"{layer}{named} emitted for torch node {node.describe()} failed: {error_detail(exc)}"


def feed_of(inputs: Sequence[np.ndarray], in_layouts: Sequence[Any]) -> Any:
    """The Keras model's input: each array in its physical layout; one array for one input."""
    feed = [np.ascontiguousarray(np.transpose(x, p.perm)) for x, p in zip(inputs, in_layouts)]
    return feed if len(feed) > 1 else feed[0]
