"""Deep verification, node level: every node's value from PyTorch, Keras and LiteRT, compared.

PyTorch runs the captured fx graph node by node (an ``fx.Interpreter`` that keeps a copy of every
node's value); the Keras model runs once with every node's tensor exposed as an extra output; the
fp32 .tflite model runs in LiteRT with all tensors kept. Each value is brought back to PyTorch's
axis order through the node's layout (``Phys.perm``, and for a flattened NHWC map the flattening
order) and compared: ``error = max|keras - torch| / max(1, max|torch|)``.
"""
from __future__ import annotations

import operator
import re
from dataclasses import dataclass
from typing import Any, Sequence

import keras
import numpy as np
import torch
import torch.fx as fx

from tracer.op_rules.registry import has_module_rule, lookup
from tracer.errors import InputError
from tracer.ir import OpNode, Phys, ordered, target_name
from tracer.emitter.save import output_leaves
from tracer.verify.parity import flatten_outputs
from tracer.verify.report import NodeDiff, Stats


# ---- the PyTorch side ---------------------------------------------------------------------------
class _Keep(fx.Interpreter):
    """Runs the graph keeping a numpy copy of every node's value (copies: in-place ops mutate later)."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm, garbage_collect_values=True)
        self.values: dict[str, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        if n.op not in ("output", "get_attr"):
            self.values[n.name] = snapshot(result)
        return result


def snapshot(v: Any) -> Any:
    """A node's recorded value: a numpy copy of a tensor, a tuple of them, else None."""
    if isinstance(v, torch.Tensor):
        return v.detach().cpu().numpy().copy()
    if isinstance(v, (tuple, list)):
        return tuple(snapshot(x) if isinstance(x, torch.Tensor) else None for x in v)
    return None


def torch_graph_module(model: torch.nn.Module, graph: Any, sample: Sequence[np.ndarray]) -> fx.GraphModule:
    """The fx graph the conversion captured (re-captured the same way; node names match the IR)."""
    method = graph.graph.get("capture", {}).get("method", "fx")
    was = model.training
    model.eval()  # captured in eval mode: `self.training` branches must take the same path
    try:
        if method == "fx":
            from tracer.capture.fx import trace
            return trace(model, has_module_rule)
        from tracer.capture.export import decompose_as_needed, export, lift_state, one_output_forms
        ep, _ = decompose_as_needed(export(model, _at_capture_batch(graph, sample)))
        gm = lift_state(ep)
        one_output_forms(gm.graph)
        gm.recompile()
        return gm
    finally:
        model.train(was)


def _at_capture_batch(graph: Any, sample: Sequence[np.ndarray]) -> tuple[torch.Tensor, ...]:
    """The sample as torch tensors, a batch-1 sample repeated to the batch the graph was recorded at
    (tracer/capture/fx.py records a batch-1 sample at batch 2), so export gives the same graph."""
    holders = [n for n in ordered(graph) if n.kind == "placeholder"]
    out = []
    for x, h in zip(sample, holders):
        x = np.array(x)
        if x.ndim and x.shape[0] == 1 and h.shape and h.shape[0] > 1:
            x = np.concatenate([x] * h.shape[0])
        out.append(torch.from_numpy(x))
    return tuple(out)


def run_torch_nodes(gm: fx.GraphModule, inputs: Sequence[np.ndarray]) -> tuple[dict[str, Any], list[np.ndarray]]:
    keep = _Keep(gm)
    with torch.no_grad():
        out = keep.run(*[torch.from_numpy(np.array(x)) for x in inputs])
    return keep.values, [t.detach().cpu().numpy() for t in flatten_outputs(out)]


# ---- the Keras side -----------------------------------------------------------------------------
@dataclass
class Probe:
    """The Keras model with every node's tensor as an extra output."""

    model: Any
    keys: list[tuple[str, int | None, int]]  # (node name, tuple element or None, output index)
    n_outputs: int


def keras_probe(result: Any) -> Probe:
    if not result.node_tensors:
        raise InputError("this ConversionResult has no node_tensors; convert with tracer.convert_model")
    outs: list[Any] = []
    seen: dict[int, int] = {}
    keys = []
    for node in ordered(result.graph):
        if node.kind in ("placeholder", "output") or node.is_constant:
            continue
        value = result.node_tensors.get(node.name)
        items = list(enumerate(value)) if isinstance(value, (tuple, list)) else [(None, value)]
        for k, t in items:
            if not isinstance(t, keras.KerasTensor):
                continue
            if id(t) not in seen:
                seen[id(t)] = len(outs)
                outs.append(t)
            keys.append((node.name, k, seen[id(t)]))
    finals = output_leaves(result.keras_model.output)  # in forward's order (Keras' .outputs sorts dict keys)
    model = keras.Model(inputs=result.keras_model.inputs, outputs=outs + finals, name="tracer_probe")
    return Probe(model, keys, len(finals))


def run_probe(probe: Probe, result: Any, inputs: Sequence[np.ndarray]) -> tuple[dict[str, Any], list[np.ndarray]]:
    feed = [np.ascontiguousarray(np.transpose(x, p.perm)) for x, p in zip(inputs, result.input_layouts)]
    got = probe.model(feed, training=False)
    got = [keras.ops.convert_to_numpy(g) for g in (got if isinstance(got, (list, tuple)) else [got])]
    values: dict[str, Any] = {}
    for name, k, i in probe.keys:
        if k is None:
            values[name] = got[i]
        else:
            values.setdefault(name, {})[k] = got[i]
    finals = got[len(got) - probe.n_outputs:]
    outs = [np.transpose(y, np.argsort(p.perm)) for y, p in zip(finals, result.output_layouts)]
    return values, outs


def to_torch_order(value: np.ndarray, phys: Phys | None) -> np.ndarray:
    """A Keras value of layout ``phys`` in PyTorch's axis order (undoing a flattening order too)."""
    if phys is None:
        return value
    if phys.flat is not None:
        tshape, order = phys.flat
        idx = np.arange(int(np.prod(tshape))).reshape(tshape).transpose(order).ravel()
        value = value[..., np.argsort(idx)]
    if value.ndim != len(phys.perm):
        return value
    return np.transpose(value, np.argsort(phys.perm))


# ---- the LiteRT side ----------------------------------------------------------------------------
def run_litert(interpreter: Any, result: Any, feed: list[np.ndarray]) -> dict[str, np.ndarray]:
    """One LiteRT run; the kept tensor that carries each observable node, by node name."""
    ins = sorted(interpreter.get_input_details(), key=lambda d: d["index"])
    names = [t.name for t in result.keras_model.inputs]
    by_name = {d["name"]: d for d in ins}
    order = [next((d for n, d in by_name.items() if name in n), ins[k]) for k, name in enumerate(names)]
    for d, a in zip(order, feed):
        interpreter.resize_tensor_input(d["index"], a.shape)
    interpreter.allocate_tensors()
    for d, a in zip(order, feed):
        interpreter.set_tensor(d["index"], a)
    interpreter.invoke()
    tensors = [d for d in interpreter.get_tensor_details() if d["dtype"] == np.float32]
    values: dict[str, np.ndarray] = {}
    for node in ordered(result.graph):
        t = result.node_tensors.get(node.name)
        layer = getattr(getattr(t, "_keras_history", None), "operation", None)
        if not isinstance(layer, keras.layers.Layer) or isinstance(layer, keras.layers.InputLayer):
            continue
        scope = re.compile(rf"(^|/){re.escape(layer.name)}(_\d+)?/")
        hits = [d for d in tensors if scope.search(d["name"].split(";")[0])
                and tuple(d["shape"][1:]) == tuple(t.shape[1:])]
        if hits:
            values[node.name] = interpreter.get_tensor(max(hits, key=lambda d: d["index"])["index"])
    return values



# ---- comparison ---------------------------------------------------------------------------------
def compare_value(t: np.ndarray, k: np.ndarray) -> tuple[float, float, str, str]:
    """(max_abs, scaled error, cause, detail) of Keras value ``k`` against PyTorch value ``t``."""
    if tuple(t.shape) != tuple(k.shape):
        return float("inf"), float("inf"), "shape", f"shape {tuple(k.shape)} in Keras, {tuple(t.shape)} in PyTorch"
    t64, k64 = t.astype(np.float64), k.astype(np.float64)
    ft, fk = np.isfinite(t64), np.isfinite(k64)
    both = ft & fk
    max_ref = float(np.max(np.abs(t64[both]), initial=0.0))
    max_abs = float(np.max(np.abs(t64[both] - k64[both]), initial=0.0))
    if not np.array_equal(ft, fk) or not np.array_equal(t64[~both], k64[~both], equal_nan=True):
        only_k, only_t = int(np.sum(ft & ~fk)), int(np.sum(fk & ~ft))
        parts = ([f"Keras has NaN/Inf at {only_k} positions where PyTorch is finite"] if only_k else []) + \
                ([f"PyTorch has NaN/Inf at {only_t} positions where Keras is finite"] if only_t else [])
        return float("inf"), float("inf"), "nonfinite", "; ".join(parts) or "NaN/Inf of different signs"
    return max_abs, max_abs / max(1.0, max_ref), "", ""


def node_depths(result: Any) -> dict[str, int]:
    depth: dict[str, int] = {}
    for node in ordered(result.graph):
        if node.is_constant:
            continue
        depth[node.name] = 0 if node.kind == "placeholder" else 1 + max(
            (depth[i] for i in node.inputs if i in depth), default=0)
    return depth


def _torch_value(node: OpNode, values: dict[str, Any]) -> Any:
    if node.name in values:
        return values[node.name]
    if node.target is operator.getitem and node.inputs and node.inputs[0] in values:  # expanded tuple outputs
        src, k = values[node.inputs[0]], node.kw.get("b", node.args[1] if len(node.args) > 1 else None)
        if isinstance(src, tuple) and isinstance(k, int):
            return src[k]
    return None


def compare_nodes(result: Any, torch_values: dict[str, Any], keras_values: dict[str, Any], label: str,
                  tol: float) -> dict[str, NodeDiff]:
    """One trial: a NodeDiff for every node that both sides computed."""
    depth = node_depths(result)
    diffs: dict[str, NodeDiff] = {}
    for index, node in enumerate(n for n in ordered(result.graph) if not n.is_constant and n.kind != "output"):
        if node.kind == "placeholder":
            continue
        t, k = _torch_value(node, torch_values), keras_values.get(node.name)
        if t is None or k is None:
            continue
        items = node.layout.items if node.layout is not None and node.layout.items else None
        pairs = ([(t, k, node.layout)] if not isinstance(t, tuple) else
                 [(t[i], k[i], items[i] if items else node.layout) for i in range(len(t))
                  if t[i] is not None and isinstance(k, dict) and i in k])
        if not pairs:
            continue
        worst = None
        for tv, kv, phys in pairs:  # a tuple's elements may each have their own layout (Phys.items)
            kv = to_torch_order(kv, phys)
            max_abs, err, cause, detail = compare_value(tv, kv)
            if worst is None or err > worst[1]:
                worst = (max_abs, err, cause, detail, tv, kv)
        max_abs, err, cause, detail, tv, kv = worst
        ok = not cause and err <= tol
        if not cause and not ok:
            cause, detail = "tolerance", f"max|diff| {max_abs:.3e}, scaled {err:.3e} > tolerance {tol:g}"
        diffs[node.name] = NodeDiff(
            name=node.name, index=index, depth=depth.get(node.name, 0), op=target_name(node.target),
            rule=_rule_name(node), module_path=node.module_path, file=node.source.file, line=node.source.line,
            code=node.source.code, shape=tuple(tv.shape), max_abs=max_abs, error=err, ok=ok, cause=cause,
            detail=detail, inputs=tuple(i for i in node.inputs), trial=label, torch=Stats.of(tv), keras=Stats.of(kv))
    return diffs


def _rule_name(node: OpNode) -> str:
    r = lookup(node.target)
    return r.name if r is not None else "<no rule>"


def worst_of(per_trial: Sequence[dict[str, NodeDiff]]) -> list[NodeDiff]:
    """Each node's worst trial (non-finite and shape failures first), in execution order."""
    def badness(d: NodeDiff) -> tuple:
        return (not d.ok, d.cause in ("nonfinite", "shape"), d.error)
    worst: dict[str, NodeDiff] = {}
    for diffs in per_trial:
        for name, d in diffs.items():
            if name not in worst or badness(d) > badness(worst[name]):
                worst[name] = d
    return sorted(worst.values(), key=lambda d: d.index)


def divergences(nodes: Sequence[NodeDiff]) -> list[NodeDiff]:
    """Failing nodes all of whose compared inputs are within tolerance, in execution order."""
    by_name = {n.name: n for n in nodes}
    return [n for n in nodes if not n.ok and all(by_name[i].ok for i in n.inputs if i in by_name)]

