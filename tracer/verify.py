"""Deep differential tester: every intermediate tensor compared, the first wrong node named.

PyTorch runs the captured fx graph node by node (an ``fx.Interpreter`` that keeps a copy of every
node's value); the Keras model runs once with every node's tensor exposed as an extra output.
Each Keras value is brought back to PyTorch's axis order through the node's layout (``Phys.perm``,
and for a flattened NHWC map the flattening order) and compared with the stated tolerance,
``max|keras - torch| <= tol * max(1, max|torch|)``, on every trial input.

The *first divergence* is the first node in execution order whose error exceeds the tolerance
while every input it reads is still within it: the node whose rule computed something else.
Beyond tolerance failures the tester reports NaN/Inf that only one framework produces (in any
output or intermediate) and outputs that do not change when the input does (a graph folded into
constants). With ``gradients`` it also runs :mod:`tracer.gradcheck` (training-mode parity).
"""
from __future__ import annotations

import json
import operator
import re
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import keras
import numpy as np
import torch
import torch.fx as fx

from op_rules.registry import has_module_rule, lookup
from tracer.errors import InputError
from tracer.ir import OpNode, Phys, ordered, target_name
from tracer.parity import DEFAULT_TOL, ParityReport, Trial, compare, flatten_outputs, run_torch

DISTRIBUTIONS = ("normal", "uniform")


@dataclass(frozen=True)
class Stats:
    """Summary of one value: min/max/mean/std of its finite entries, and how many are not finite."""

    min: float
    max: float
    mean: float
    std: float
    nonfinite: int = 0

    @staticmethod
    def of(a: np.ndarray) -> "Stats":
        a = np.asarray(a, dtype=np.float64)
        finite = a[np.isfinite(a)]
        if not finite.size:
            return Stats(float("nan"), float("nan"), float("nan"), float("nan"), int(a.size))
        return Stats(float(finite.min()), float(finite.max()), float(finite.mean()), float(finite.std()),
                     int(a.size - finite.size))

    def __str__(self) -> str:
        bad = f", {self.nonfinite} NaN/Inf" if self.nonfinite else ""
        return f"min {self.min:.4g} max {self.max:.4g} mean {self.mean:.4g} std {self.std:.4g}{bad}"


@dataclass(frozen=True)
class NodeDiff:
    """One node's comparison on the trial where it was worst."""

    name: str
    index: int  # position in execution order
    depth: int  # longest path from an input
    op: str
    rule: str
    module_path: str
    file: str
    line: int
    code: str
    shape: tuple
    max_abs: float
    error: float  # max_abs / max(1, max|torch|): the figure held to the tolerance
    ok: bool
    cause: str  # "" | "tolerance" | "nonfinite" | "shape"
    detail: str
    inputs: tuple[str, ...]
    trial: str
    torch: Stats
    keras: Stats

    @property
    def source(self) -> str:
        return f"{self.file}:{self.line}" if self.file else "<unknown source>"

    def describe(self) -> str:
        where = f" in {self.module_path}" if self.module_path else ""
        return (f"{self.name} ({self.op}, rule {self.rule}){where} at {self.source}"
                + (f"\n      {self.code}" if self.code else ""))


@dataclass(frozen=True)
class Problem:
    kind: str  # tolerance | nonfinite | constant_output | shape | gradient | bn_stats | sgd_step | tflite
    where: str
    message: str


@dataclass
class VerifyReport:
    tolerance: float
    node_tolerance: float
    inputs: dict
    outputs: ParityReport
    nodes: list[NodeDiff] = field(default_factory=list)
    divergences: list[NodeDiff] = field(default_factory=list)  # failing nodes whose inputs were fine
    problems: list[Problem] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    gradients: Any = None  # gradcheck.GradReport
    tflite_nodes: list[NodeDiff] | None = None
    facts: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems and self.outputs.ok

    @property
    def exit_code(self) -> int:
        return 0 if self.ok else 1

    @property
    def first_divergence(self) -> NodeDiff | None:
        return self.divergences[0] if self.divergences else None

    @property
    def max_node_error(self) -> float:
        return max((n.error for n in self.nodes), default=0.0)

    def summary(self) -> str:
        lines = [f"deep verify: {'OK' if self.ok else 'FAILED'} ({len(self.nodes)} nodes compared on "
                 f"{len(self.outputs.trials)} inputs; max node error {self.max_node_error:.3e}, "
                 f"tolerance {self.node_tolerance:g})"]
        first = self.first_divergence
        if first is not None:
            lines += [f"  first divergence: {first.describe()}",
                      f"    {first.detail}",
                      f"    torch: {first.torch}", f"    keras: {first.keras}"]
        lines += [f"  {p.kind}: {p.where}: {p.message}" for p in self.problems if p.kind != "tolerance"]
        if self.tflite_nodes is not None:
            worst = max((n.error for n in self.tflite_nodes), default=0.0)
            lines.append(f"  fp32 TFLite: {len(self.tflite_nodes)} of {len(self.nodes)} nodes observable in LiteRT, "
                         f"max error {worst:.3e}")
        lines += [f"  warning: {w}" for w in self.warnings]
        if self.gradients is not None:
            lines.append(self.gradients.summary())
        return "\n".join(lines)

    def to_dict(self) -> dict:
        def node(n: NodeDiff) -> dict:
            return {**asdict(n), "source": n.source}
        return {"ok": self.ok, "verdict": "parity" if self.ok else "parity failed",
                "tolerance": self.tolerance, "node_tolerance": self.node_tolerance, "inputs": self.inputs,
                "max_node_error": self.max_node_error,
                "first_divergence": node(self.first_divergence) if self.first_divergence else None,
                "divergences": [node(n) for n in self.divergences],
                "problems": [asdict(p) for p in self.problems], "warnings": list(self.warnings),
                "outputs": self.outputs.to_dict(), "nodes": [node(n) for n in self.nodes],
                "gradients": self.gradients.to_dict() if self.gradients is not None else None,
                "tflite_nodes": [node(n) for n in self.tflite_nodes] if self.tflite_nodes is not None else None,
                "facts": self.facts}

    def to_json(self) -> str:
        """Strict JSON: infinite and NaN errors are written as the strings "inf" and "nan"."""
        return json.dumps(_strict(self.to_dict()), indent=2, default=str)


def _strict(v: Any) -> Any:
    if isinstance(v, float) and not np.isfinite(v):
        return str(v)
    if isinstance(v, dict):
        return {k: _strict(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_strict(x) for x in v]
    return v


# ---- the PyTorch side ---------------------------------------------------------------------------
class _Keep(fx.Interpreter):
    """Runs the graph keeping a numpy copy of every node's value (copies: in-place ops mutate later)."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm, garbage_collect_values=True)
        self.values: dict[str, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        if n.op not in ("output", "get_attr"):
            self.values[n.name] = _snapshot(result)
        return result


def _snapshot(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.detach().cpu().numpy().copy()
    if isinstance(v, (tuple, list)):
        return tuple(_snapshot(x) if isinstance(x, torch.Tensor) else None for x in v)
    return None


def torch_graph_module(model: torch.nn.Module, graph: Any, sample: Sequence[np.ndarray]) -> fx.GraphModule:
    """The fx graph the conversion captured (re-captured the same way; node names match the IR)."""
    method = graph.graph.get("capture", {}).get("method", "fx")
    was = model.training
    model.eval()  # captured in eval mode: `self.training` branches must take the same path
    try:
        if method == "fx":
            from tracer.capture import trace
            return trace(model, has_module_rule)
        from tracer.capture_export import decompose_as_needed, export, lift_state, one_output_forms
        ep, _ = decompose_as_needed(export(model, tuple(torch.from_numpy(np.array(x)) for x in sample)))
        gm = lift_state(ep)
        one_output_forms(gm.graph)
        gm.recompile()
        return gm
    finally:
        model.train(was)


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
    finals = list(result.keras_model.outputs)
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
        pairs = ([(t, k)] if not isinstance(t, tuple) else
                 [(t[i], k[i]) for i in range(len(t)) if t[i] is not None and isinstance(k, dict) and i in k])
        if not pairs:
            continue
        worst = None
        for tv, kv in pairs:
            kv = to_torch_order(kv, node.layout)
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


# ---- inputs -------------------------------------------------------------------------------------
def make_inputs(shapes: Sequence[tuple], dtypes: Sequence[str], n: int, distribution: str = "normal",
                seed: int = 0) -> list[tuple[str, list[np.ndarray]]]:
    """``n`` random input tuples; the last has another batch size (batch-size bugs show there)."""
    if distribution not in DISTRIBUTIONS:
        raise InputError(f"distribution must be one of {', '.join(DISTRIBUTIONS)}. Received: {distribution!r}")
    trials = []
    for k in range(n):
        rng = np.random.default_rng(seed + k)
        batch = (shapes[0][0] % 3) + 2 if k == n - 1 and n > 1 and shapes and shapes[0] else None
        arrays = []
        for shape, dt in zip(shapes, dtypes):
            shape = (batch, *shape[1:]) if batch is not None and len(shape) else tuple(shape)
            if dt.startswith("int") or dt == "bool":
                arrays.append(rng.integers(0, 2, size=shape).astype(dt))
            elif distribution == "uniform":
                arrays.append(rng.uniform(0.0, 1.0, size=shape).astype(np.float32))
            else:
                arrays.append(rng.standard_normal(shape).astype(np.float32))
        trials.append((f"{distribution}{k}" + (f" (batch {batch})" if batch else ""), arrays))
    return trials


def _placeholders(result: Any) -> list[OpNode]:
    return [n for n in ordered(result.graph) if n.kind == "placeholder"]


# ---- the whole check ----------------------------------------------------------------------------
def deep_verify(model: torch.nn.Module, result: Any, sample: Any = None, *, n_inputs: int = 3,
                distribution: str = "normal", inputs: Sequence[Sequence[np.ndarray]] = (),
                tol: float = DEFAULT_TOL, node_tol: float | None = None, gradients: bool = True,
                grad_tol: float = 1e-3, grad_batch: int = 4, tflite: bool = True, seed: int = 0) -> VerifyReport:
    """Compare ``model`` and ``result`` (a ConversionResult) node by node, and in training mode.

    Args:
        sample: an input tuple (numpy or torch) compared first; default: only random inputs.
        n_inputs: random input tuples (the last with another batch size).
        distribution: "normal" (standard normal) or "uniform" (in [0, 1)) for the random inputs.
        inputs: user input tuples (numpy, PyTorch layout), e.g. loaded from .npy files.
        tol: output tolerance; node_tol: per-node tolerance (default ``tol``).
        gradients: run the training-mode check (tracer.gradcheck) on the first float input.
        tflite: also compare the fp32 TFLite model node by node when ``result.tflite`` has one.
    """
    node_tol = tol if node_tol is None else node_tol
    holders = _placeholders(result)
    trials: list[tuple[str, list[np.ndarray]]] = []
    if sample is not None:
        trials.append(("sample", [np.asarray(x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x)
                                   for x in (sample if isinstance(sample, (tuple, list)) else (sample,))]))
    trials += make_inputs([n.shape for n in holders], [n.dtype or "float32" for n in holders], n_inputs,
                          distribution, seed)
    trials += [(f"user{k}", [np.asarray(a) for a in x]) for k, x in enumerate(inputs)]
    if not trials:
        raise InputError("nothing to verify on: n_inputs=0 and no sample or user inputs")
    was = model.training
    model.eval()
    try:
        report = _compare_all(model, result, trials, tol, node_tol)
        report.inputs = {"distribution": distribution, "n_random": n_inputs, "user": len(inputs),
                         "sample": sample is not None, "trials": [label for label, _ in trials]}
        if tflite and "fp32" in (getattr(result, "tflite", None) or {}):
            _tflite_nodes(report, model, result, trials, node_tol)
        if gradients:
            _gradients(report, model, result, trials[0][1], grad_tol, grad_batch, seed)
    finally:
        model.train(was)
    report.facts = {**result.facts(), "torch_params": int(sum(p.numel() for p in model.parameters()))}
    return report


def _compare_all(model: torch.nn.Module, result: Any, trials: list, tol: float, node_tol: float) -> VerifyReport:
    gm = torch_graph_module(model, result.graph, trials[0][1])
    probe = keras_probe(result)
    parity = ParityReport(tolerance=tol)
    per_trial, outs_by_shape, capture_gaps = [], {}, []
    for label, arrays in trials:
        tvals, traced = run_torch_nodes(gm, arrays)
        touts = run_torch(model, arrays)  # the model itself is the reference, not only its captured graph
        if not all(d.ok for d in compare(touts, traced, tol)):
            capture_gaps.append(label)
        kvals, kouts = run_probe(probe, result, arrays)
        per_trial.append(compare_nodes(result, tvals, kvals, label, node_tol))
        parity.trials.append(Trial(label, tuple(tuple(x.shape) for x in arrays), compare(touts, kouts, tol)))
        outs_by_shape.setdefault(tuple(tuple(x.shape) for x in arrays), []).append((label, arrays, touts, kouts))
    nodes = worst_of(per_trial)
    report = VerifyReport(tolerance=tol, node_tolerance=node_tol, inputs={}, outputs=parity, nodes=nodes,
                          divergences=divergences(nodes))
    _bad_numbers(report, outs_by_shape)
    if capture_gaps:
        report.problems.append(Problem("capture", "captured graph", "the captured graph computes other outputs than "
                                       f"the model itself on {', '.join(capture_gaps)} (Python control flow or "
                                       "values frozen at capture?): node-by-node results describe the graph"))
    return report


def _bad_numbers(report: VerifyReport, outs_by_shape: dict) -> None:
    """Each failure with its cause: divergent nodes, NaN/Inf, outputs that ignore the input."""
    for d in report.divergences:
        report.problems.append(Problem(d.cause, f"{d.name} at {d.source}",
                                       f"{d.detail} (op {d.op}, rule {d.rule}, trial {d.trial})"))
    for t in report.outputs.trials:
        for o in t.outputs:
            if not o.ok and not o.finite:
                report.problems.append(Problem("nonfinite", f"output {o.output}",
                                               f"NaN/Inf in the Keras output on {t.label} where PyTorch differs"))
            elif not o.ok and not report.divergences:
                report.problems.append(Problem("tolerance", f"output {o.output}",
                                               f"scaled error {o.max_rel:.3e} on {t.label}"))
    both = next((n for n in report.nodes if n.ok and n.torch.nonfinite), None)
    if both is not None:
        report.warnings.append(f"PyTorch itself produces NaN/Inf at {both.name} ({both.source}); "
                               "Keras matches it there")
    _constant_outputs(report, [t for group in outs_by_shape.values() for t in group])
    for group in outs_by_shape.values():
        for (la, xa, ta, ka), (lb, xb, tb, kb) in zip(group, group[1:]):
            if not all(np.array_equal(a, b) for a, b in zip(xa, xb)):
                _same_outputs(report, f"inputs {la} and {lb}", ta, tb, ka, kb)


def _constant_outputs(report: VerifyReport, trials: list) -> None:
    """Within one batch: different samples, identical Keras rows (and PyTorch rows that differ)."""
    for label, xs, touts, kouts in trials:
        if not xs or np.ndim(xs[0]) == 0 or len(xs[0]) < 2 or all(np.array_equal(x[0], x[1]) for x in xs):
            continue
        _same_outputs(report, f"the samples of {label}", touts, _first_rows(touts, len(xs[0])), kouts,
                      _first_rows(kouts, len(xs[0])))


def _first_rows(ys: list, batch: int) -> list:
    """Each batch-major output with its first sample repeated over the batch."""
    return [y[:1].repeat(batch, 0) if np.ndim(y) and len(y) == batch else y for y in ys]


def _same_outputs(report: VerifyReport, what: str, ta: list, tb: list, ka: list, kb: list) -> None:
    for i, (ya, yb) in enumerate(zip(ka, kb)):
        if not np.array_equal(ya, yb) or any(p.kind == "constant_output" and p.where == f"output {i}"
                                             for p in report.problems):
            continue
        if np.array_equal(ta[i], tb[i]):
            note = f"output {i} is the same for {what} in PyTorch too: it does not depend on the input"
            if note not in report.warnings:
                report.warnings.append(note)
        else:
            report.problems.append(Problem(
                "constant_output", f"output {i}",
                f"the Keras output is identical for {what} while PyTorch's differ: the converted graph does "
                "not depend on its input (folded into constants?)"))


def _gradients(report: VerifyReport, model: torch.nn.Module, result: Any, first: list, grad_tol: float,
               batch: int, seed: int) -> None:
    from tracer.gradcheck import check_gradients
    if not all(np.issubdtype(np.asarray(x).dtype, np.floating) for x in first):
        report.warnings.append("gradient check covers parameters only: some inputs are not floating point")
    grads = check_gradients(model, result, first, tol=grad_tol, batch=batch, seed=seed)
    report.gradients = grads
    for m in grads.mismatches:
        report.problems.append(Problem(m.kind, m.name, m.message))
    report.warnings += grads.notes


def _tflite_nodes(report: VerifyReport, model: torch.nn.Module, result: Any, trials: list, node_tol: float) -> None:
    """The fp32 .tflite run in LiteRT with every tensor kept, compared node by node where it can be.

    A node is observable when its Keras tensor comes from a layer and a LiteRT tensor's name
    starts with that layer's scope (``Model_1/bn_1/...``; fused ops are ``;``-joined, the first
    name being the op whose value the tensor holds) with the node's shape. Nodes fused into a
    later op (a conv before its BatchNorm) have no tensor of their own and are skipped.
    """
    from ai_edge_litert.interpreter import Interpreter
    with warnings.catch_warnings():  # "intended for debugging purposes only": that is what this is
        warnings.simplefilter("ignore", UserWarning)
        interpreter = Interpreter(model_content=result.tflite["fp32"], experimental_preserve_all_tensors=True)
    gm = torch_graph_module(model, result.graph, trials[0][1])
    per_trial = []
    for label, arrays in trials:
        feed = [np.ascontiguousarray(np.transpose(x, p.perm)) for x, p in zip(arrays, result.input_layouts)]
        values = _run_litert(interpreter, result, feed)
        tvals, _ = run_torch_nodes(gm, arrays)
        per_trial.append(compare_nodes(result, tvals, values, label, node_tol))
    nodes = worst_of(per_trial)
    report.tflite_nodes = nodes
    for d in divergences(nodes)[:1]:
        report.problems.append(Problem("tflite", f"{d.name} at {d.source}",
                                       f"fp32 TFLite: {d.detail} (op {d.op}, rule {d.rule}, trial {d.trial})"))


def _run_litert(interpreter: Any, result: Any, feed: list[np.ndarray]) -> dict[str, np.ndarray]:
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


# ---- command line (tracer verify OUTDIR, tracer convert --verify deep) ----------------------------
def invocation(args: Any, shapes: list, dtypes: list) -> dict:
    """What ``tracer convert`` was given, stored in report.json so ``tracer verify`` can rebuild the model."""
    from pathlib import Path
    return {"target": str(Path(args.target.rpartition(":")[0]).resolve()) + ":" + args.target.rpartition(":")[2],
            "init_args": args.init_args, "weights": str(Path(args.weights).resolve()) if args.weights else None,
            "input_shapes": shapes, "input_dtypes": dtypes, "channels_last_io": bool(args.channels_last_io),
            "inputs": [str(Path(f).resolve()) for f in args.inputs],
            "capture": getattr(args, "capture", "auto")}


def verify_for_convert(model: torch.nn.Module, result: Any, sample: tuple, extra: list, args: Any,
                       report: dict, say: Any) -> bool:
    """``tracer convert --verify deep``: the deep check into ``report["verify"]``; True on parity."""
    say("deep verification: every node, gradients")
    rep = deep_verify(model, result, sample, n_inputs=args.random_inputs, inputs=extra, tol=args.tol)
    report["verify"] = json.loads(rep.to_json())
    print(rep.summary())
    return rep.ok


def write_html(outdir: Any, report: dict) -> None:
    from pathlib import Path
    from tracer.report_html import write
    write(Path(outdir) / "report.html", report["verify"], title=f"tracer: {report.get('target', 'model')}")


def verify_outdir(args: Any, say: Any) -> int:
    """``tracer verify OUTDIR``: rebuild the PyTorch model from report.json, re-check, rewrite the reports."""
    from pathlib import Path
    from tracer.api import convert_model
    from tracer.cli import load_inputs, load_model, load_weights, make_sample
    from tracer.parity import check_parity
    outdir = Path(args.outdir)
    path = outdir / "report.json"
    if not path.is_file():
        raise InputError(f"{path} not found: OUTDIR must be a folder written by tracer convert")
    report = json.loads(path.read_text())
    inv = report.get("invocation")
    if not inv:
        raise InputError(f"{path} does not record how the model was built (written by an older tracer); "
                         "convert again with this version")
    shapes, dtypes = inv["input_shapes"], inv["input_dtypes"]
    say(f"rebuilding {inv['target']}")
    model = load_model(inv["target"], inv["init_args"])
    if inv.get("weights"):
        load_weights(model, inv["weights"])
    model.eval()  # as tracer convert compares it
    sample = make_sample(shapes, dtypes, inv.get("inputs") or [])
    user = [load_inputs(f, len(shapes)) for f in args.inputs]
    options = dict(channels_last_io=inv.get("channels_last_io", False), check=False, capture=inv.get("capture") or "auto")
    say("converting again to map every node to its Keras tensor")
    result = convert_model(model, sample, progress=say, **options)
    saved = outdir / "model.keras"
    keras_saved = keras.saving.load_model(saved) if saved.is_file() else None
    notes = []
    if not inv.get("weights"):  # the model was converted with its initial (random) weights: take them back
        if keras_saved is None:
            notes.append(f"no --weights recorded and no {saved}: PyTorch model rebuilt with fresh random weights")
        else:
            from tracer.gradcheck import restore_torch_weights
            done, missing = restore_torch_weights(model, result.keras_model, keras_saved)
            notes.append(f"no --weights recorded: {len(done)} PyTorch tensors restored from {saved}"
                         + (f"; not restorable (fresh values): {', '.join(missing)}" if missing else ""))
            result = convert_model(model, sample, **options)
    say("deep verification: every node, gradients")
    rep = deep_verify(model, result, sample, n_inputs=args.random_inputs, distribution=args.distribution,
                      inputs=user, tol=args.tol, node_tol=args.node_tol, gradients=not args.no_gradients,
                      grad_tol=args.grad_tol)
    rep.warnings += notes
    if keras_saved is not None:  # the file itself must match PyTorch too
        arrays = [t.detach().cpu().numpy() for t in sample]
        parity = check_parity(model, keras_saved, arrays, result.input_layouts, result.output_layouts,
                              n_random=max(args.random_inputs, 1), extra=user, tol=args.tol)
        rep.facts["saved_model_parity"] = parity.to_dict()
        if not parity.ok:
            rep.problems.append(Problem("saved_model", str(saved), "model.keras does not match PyTorch:\n"
                                        + parity.summary()))
    else:
        rep.warnings.append(f"{saved} not found (parity failed at conversion?): only a fresh conversion was checked")
    report["verify"] = json.loads(rep.to_json())
    tmp = path.with_suffix(".json.partial")
    tmp.write_text(json.dumps(report, indent=2, default=str))
    tmp.replace(path)
    write_html(outdir, report)
    print(rep.summary())
    print(f"wrote {outdir / 'report.html'} and {path}")
    return rep.exit_code
