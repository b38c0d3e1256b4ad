"""Deep differential tester: every intermediate tensor compared, the first wrong node named.

:func:`deep_verify` runs PyTorch and the converted Keras model (and the fp32 .tflite model, when
the conversion produced one) on the sample, random and user inputs, compares every node's value
(:mod:`tracer.verify.nodes`) with ``max|keras - torch| <= tol * max(1, max|torch|)``, and
returns a :class:`~tracer.verify.report.VerifyReport`.

The *first divergence* is the first node in execution order whose error exceeds the tolerance
while every input it reads is still within it: the node whose rule computed something else.
Beyond tolerance failures the tester reports NaN/Inf that only one framework produces (in any
output or intermediate) and outputs that do not change when the input does (a graph folded into
constants). With ``gradients`` it also runs :mod:`tracer.verify.gradcheck` (training-mode parity).
"""
from __future__ import annotations

import warnings
from typing import Any, Sequence

import numpy as np
import torch

from tracer.errors import InputError
from tracer.ir import OpNode, ordered
from tracer.verify.parity import DEFAULT_TOL, ParityReport, Trial, compare, run_torch
from tracer.verify.nodes import (compare_nodes, compare_value, divergences, keras_probe, run_litert, run_probe,
                                 run_torch_nodes, to_torch_order, torch_graph_module, worst_of)
from tracer.verify.report import NodeDiff, Problem, Stats, VerifyReport

__all__ = ["DISTRIBUTIONS", "NodeDiff", "Problem", "Stats", "VerifyReport", "compare_value", "deep_verify",
           "make_inputs", "to_torch_order"]

DISTRIBUTIONS = ("normal", "uniform")


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
        gradients: run the training-mode check (tracer.verify.gradcheck) on the first float input.
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
    roots = {d.name for diffs in per_trial for d in divergences(sorted(diffs.values(), key=lambda d: d.index))}
    report = VerifyReport(tolerance=tol, node_tolerance=node_tol, inputs={}, outputs=parity, nodes=nodes,
                          divergences=[n for n in nodes if n.name in roots])  # per trial: inputs fine on that one
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
    from tracer.verify.gradcheck import check_gradients
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
        values = run_litert(interpreter, result, feed)
        tvals, _ = run_torch_nodes(gm, arrays)
        per_trial.append(compare_nodes(result, tvals, values, label, node_tol))
    nodes = worst_of(per_trial)
    report.tflite_nodes = nodes
    for d in divergences(nodes)[:1]:
        report.problems.append(Problem("tflite", f"{d.name} at {d.source}",
                                       f"fp32 TFLite: {d.detail} (op {d.op}, rule {d.rule}, trial {d.trial})"))

