"""Gradient parity: the converted model trains like the PyTorch one, judged against float64.

In training mode (BatchNorm on batch statistics, dropout off) the Keras model and the PyTorch
reference see the same batch and the same loss, a fixed random projection of the outputs
``sum_i <out_i, R_i>``. Compared, each by name (:mod:`tracer.verify.gradcheck_compare`):

* the training-mode forward, node by node (the first node whose value differs is named, with its
  rule and source line: a wrong epsilon, a scaled output, moving statistics used in training);
* the loss gradient with respect to every input and every parameter: PyTorch ``backward()``
  against ``tf.GradientTape`` over the Keras model with every node's tensor exposed;
* one SGD step: the change of every weight;
* BatchNorm moving statistics after that step.

The reference is PyTorch in float64: a deep copy of the model, ``.double()``, running the captured
fx graph (the graph the conversion saw, captured in eval mode, so Python branches on
``self.training`` take their inference path) with its modules in training mode and dropout
modules in eval mode; a model captured with torch.export runs as itself in ``train()``. At every
kink (ReLU family, clamp, hardswish, abs, max/min, max-pool) the float64 run takes the branch Keras
took (:mod:`tracer.verify.kinks`): a flip at a tie is a note with its location, any other flip a
forward mismatch. The same run in PyTorch fp32 (same branches) against float64 is the *noise
floor*, reported beside Keras's errors. Each Keras weight is matched to the PyTorch tensor it
holds, as an index map (:mod:`tracer.verify.gradcheck_params`).

The user's model is not touched (both references are copies); the Keras weights and BatchNorm
statistics are restored afterwards.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Sequence

import numpy as np
import torch

from tracer.errors import InputError
from tracer.fixes.parametrizations import parametrized_tensors
from tracer.ir import op, ordered
from tracer.verify.gradcheck_compare import (FLOOR, Mismatch, TensorDiff, compare_bn, compare_grads, compare_step,
                                             diff)
from tracer.verify.gradcheck_params import map_parameters, restore_torch_weights
from tracer.verify.kinks import TIE, Flip, GatedRun, decisions, find_kinks
from tracer.verify.nodes import compare_nodes, compare_value, divergences, keras_probe, to_torch_order, torch_graph_module
from tracer.verify.parity import FP32_NOISE_FACTOR, flatten_outputs, input_batch_axes

__all__ = ["GradReport", "Mismatch", "TensorDiff", "check_gradients", "map_parameters", "restore_torch_weights"]

LR = 0.1
FORWARD_TOL = 1e-5  # training-mode node values: max|keras - float64| <= FORWARD_TOL x max(1, max|float64|)
SHOWN_FLIPS = 3  # non-tie flips named one by one; the rest counted


@dataclass
class GradReport:
    tolerance: float
    batch: int
    torch_runs: str  # what ran on the PyTorch side
    reference: str = "float64"  # the dtype of the reference run
    loss_torch: float = 0.0
    loss_keras: float = 0.0
    noise_floor: float = 0.0  # max error of PyTorch fp32 (same branches) against the reference
    forward_error: float = 0.0  # max training-mode node error, Keras against the reference
    forward_noise: float = 0.0  # the same for PyTorch fp32
    forward_tolerance: float = FORWARD_TOL
    kinks: int = 0  # kinks of the graph
    gated: int = 0  # of them, run on Keras's branch
    inputs: list[TensorDiff] = field(default_factory=list)
    params: list[TensorDiff] = field(default_factory=list)
    steps: list[TensorDiff] = field(default_factory=list)
    bn_stats: list[TensorDiff] = field(default_factory=list)
    mismatches: list[Mismatch] = field(default_factory=list)
    known_differences: list[str] = field(default_factory=list)
    flips: list[dict] = field(default_factory=list)
    ties: list[str] = field(default_factory=list)  # one note per kink that flipped at a tie, with its location
    notes: list[str] = field(default_factory=list)
    mapping: list[dict] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.mismatches

    @property
    def max_error(self) -> float:
        return max((d.error for d in self.inputs + self.params + self.steps), default=0.0)

    def summary(self) -> str:
        lines = [f"gradient parity: {'OK' if self.ok else 'MISMATCH'} ({len(self.params)} parameters, "
                 f"{len(self.inputs)} inputs, batch {self.batch}; max error {self.max_error:.3e}, tolerance "
                 f"{self.tolerance:g}; loss torch {self.loss_torch:.6g} keras {self.loss_keras:.6g})",
                 f"  reference: PyTorch {self.reference}, {self.gated} of {self.kinks} kinks on Keras's branch; "
                 f"noise floor (PyTorch fp32 against it) {self.noise_floor:.1e}; training forward max error "
                 f"Keras {self.forward_error:.1e}, PyTorch fp32 {self.forward_noise:.1e} (tolerance "
                 f"{self.forward_tolerance:g})"]
        lines += [f"  {m.kind}: {m.name}: {m.message}" for m in self.mismatches]
        kinds: dict[str, list[str]] = {}  # one line per kind: the text after the tensor names
        for k in self.known_differences:
            kinds.setdefault(k.partition(": ")[2][:30], []).append(k)
        for same in kinds.values():
            lines.append(f"  known difference: {same[0]}")
            if len(same) > 1:
                lines.append(f"  (the same for {len(same) - 1} more; see report.json)")
        lines += [f"  tie: {t}" for t in self.ties[:SHOWN_FLIPS]]
        if len(self.ties) > SHOWN_FLIPS:
            lines.append(f"  (ties at {len(self.ties) - SHOWN_FLIPS} more kinks; see report.json)")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"ok": self.ok, "tolerance": self.tolerance, "batch": self.batch, "torch_runs": self.torch_runs,
                "reference": self.reference, "loss_torch": self.loss_torch, "loss_keras": self.loss_keras,
                "max_error": self.max_error, "noise_floor": self.noise_floor, "forward_error": self.forward_error,
                "forward_noise": self.forward_noise, "forward_tolerance": self.forward_tolerance,
                "kinks": self.kinks, "gated": self.gated,
                "inputs": [asdict(d) for d in self.inputs], "params": [asdict(d) for d in self.params],
                "steps": [asdict(d) for d in self.steps], "bn_stats": [asdict(d) for d in self.bn_stats],
                "mismatches": [asdict(m) for m in self.mismatches],
                "known_differences": list(self.known_differences), "flips": list(self.flips), "ties": list(self.ties),
                "notes": list(self.notes), "mapping": self.mapping}


# ---- the check ----------------------------------------------------------------------------------
def check_gradients(model: torch.nn.Module, result: Any, sample: Sequence[np.ndarray], *, tol: float = 1e-3,
                    stat_tol: float = 1e-5, forward_tol: float = FORWARD_TOL, batch: int = 4, seed: int = 0,
                    lr: float = LR) -> GradReport:
    """Training-mode forward, gradients, one SGD step and BatchNorm statistics of ``result.keras_model``
    against ``model`` in float64 on Keras's branches.

    ``sample`` gives the input shapes (PyTorch layout); a batch of ``batch`` normal inputs is drawn.
    A tensor's error is ``max|keras - torch| / max(max|torch|, FLOOR * the largest parameter
    gradient)``; the floor keeps analytically-zero gradients (a conv bias before a training-mode
    BatchNorm) from turning rounding noise into a failure. BatchNorm statistics are held to
    ``stat_tol`` and node values to ``forward_tol`` (scaled by max(1, max|value|), like outputs).
    """
    rng = np.random.default_rng(seed)
    axes = input_batch_axes(getattr(result, "input_layouts", None) or [None] * len(sample))  # h0: axis 1
    shapes = [tuple(batch if i == a else n for i, n in enumerate(np.shape(x)))  # ids: the sample's rows, repeated
              for x, a in zip(sample, axes)]
    xs = [rng.standard_normal(shape).astype(np.float32) if np.issubdtype(np.asarray(x).dtype, np.floating)
          else np.resize(np.asarray(x), shape) for x, shape in zip(sample, shapes)]
    keras_model = result.keras_model
    maps, unmatched = map_parameters(model, keras_model)
    before = {k: v.detach().cpu().numpy().copy() for k, v in [*model.named_buffers(), *model.named_parameters()]}
    keras_saved = keras_model.get_weights()
    try:
        keras_run = _keras_side(result, xs, rng)
        fx_graph = result.graph.graph.get("capture", {}).get("method", "fx") == "fx"
        runs = ("captured fx graph, modules in train mode" if fx_graph else "model.train() (captured with torch.export)")
        report = GradReport(tolerance=tol, batch=batch, torch_runs=runs + ", dropout off", forward_tolerance=forward_tol)
        ref, fp32 = _reference_runs(report, model, result, sample, xs, keras_run, fx_graph)
        report.loss_torch, report.loss_keras = ref.loss, keras_run.loss
        _compare_forward(report, result, ref, fp32, keras_run.values, forward_tol)
        _judge_flips(report, result, ref.flips)
        compare_grads(report, model, result, maps, unmatched, ref.in_grads, ref.grads, keras_run.in_grads,
                      keras_run.grads, tol)
        report.noise_floor = _noise_floor(ref, fp32)
        compare_bn(report, ref.model, result, maps, before, stat_tol, batch)
        compare_step(report, ref.model, keras_model, maps, ref.grads, keras_run.grads, lr, tol)
        report.mapping = [{"torch": m.torch_name, "keras": m.keras_path, "how": m.how} for m in maps]
        report.notes += _notes(model, result)
    finally:
        keras_model.set_weights(keras_saved)
    return report
def _notes(model: torch.nn.Module, result: Any) -> list[str]:
    """What makes training differ by design: baked parametrizations, functional dropout."""
    notes = []
    baked = [f"{path}.{t} ({kind})" for path, mod in model.named_modules() for t, kind in parametrized_tensors(mod).items()]
    if baked:
        notes.append(f"parametrized weights {', '.join(baked)} are constants in Keras; in training mode PyTorch "
                     "recomputes them (spectral norm with a power-iteration step), so gradients through these "
                     "layers are not expected to match")
    dropouts = [n.name for n in ordered(result.graph) if "dropout" in str(n.target).lower()
                and n.module is None and n.kind.startswith("call")]
    if dropouts:
        notes.append(f"functional dropout {', '.join(dropouts)}: compared as captured (off)")
    return notes


# ---- the Keras side -----------------------------------------------------------------------------
@dataclass
class _KerasRun:
    values: dict[str, np.ndarray]  # every node's training-mode value, Keras layout
    torch_order: dict[str, np.ndarray]  # the same in PyTorch's axis order, placeholders included
    projections: list[np.ndarray | None]  # PyTorch order
    in_grads: list[np.ndarray | None]
    grads: dict[str, np.ndarray | None]
    loss: float


def _keras_side(result: Any, xs: list, rng: np.random.Generator) -> _KerasRun:
    """One training-mode call of the Keras model with every node's tensor exposed, under a tape."""
    import tensorflow as tf
    probe = keras_probe(result)
    feed = [tf.constant(np.ascontiguousarray(np.transpose(x, p.perm))) for x, p in zip(xs, result.input_layouts)]
    variables = result.keras_model.trainable_variables
    with tf.GradientTape() as tape:
        tape.watch([f for f in feed if f.dtype.is_floating])
        got = probe.model(feed, training=True)
        got = list(got) if isinstance(got, (list, tuple)) else [got]
        finals = got[len(got) - probe.n_outputs:]
        projections = [None if not o.dtype.is_floating else _projection(rng, [o.shape[i] for i in np.argsort(p.perm)])
                       for o, p in zip(finals, result.output_layouts)]
        if all(r is None for r in projections):
            raise InputError("gradient parity needs a floating-point output; this model has none")
        loss = tf.add_n([tf.reduce_sum(o * np.transpose(r, p.perm))
                         for o, r, p in zip(finals, projections, result.output_layouts) if r is not None])
    grads = tape.gradient(loss, feed + list(variables))
    values: dict[str, Any] = {}
    for name, k, i in probe.keys:
        if k is None:
            values[name] = got[i].numpy()
        else:
            values.setdefault(name, {})[k] = got[i].numpy()
    torch_order = {n.name: x for n, x in zip((n for n in ordered(result.graph) if n.kind == "placeholder"), xs)}
    torch_order.update({name: to_torch_order(v, op(result.graph, name).layout)
                        for name, v in values.items() if isinstance(v, np.ndarray)})
    in_grads = [None if g is None else np.transpose(g.numpy(), np.argsort(p.perm))
                for g, p in zip(grads[:len(feed)], result.input_layouts)]
    var_grads = {v.path: (None if g is None else np.asarray(g)) for v, g in zip(variables, grads[len(feed):])}
    return _KerasRun(values, torch_order, projections, in_grads, var_grads, float(loss))


def _projection(rng: np.random.Generator, shape: list[int]) -> np.ndarray:
    return rng.standard_normal(tuple(shape)).astype(np.float32) / np.sqrt(max(int(np.prod(shape)), 1))


# ---- the PyTorch references ---------------------------------------------------------------------
@dataclass
class _TorchRun:
    model: torch.nn.Module  # the copy that ran (its BatchNorm statistics updated, its .grad set)
    values: dict[str, Any]
    flips: list[Flip]
    in_grads: list[np.ndarray | None]
    grads: dict[str, np.ndarray | None]
    loss: float


def _reference_runs(report: GradReport, model: torch.nn.Module, result: Any, sample: Sequence[np.ndarray],
                    xs: list, keras_run: _KerasRun, fx_graph: bool) -> tuple[_TorchRun, _TorchRun]:
    """The float64 reference and the fp32 noise-floor run, both on Keras's branches; if the model
    cannot run in float64 (a dtype fixed inside its forward), fp32 is the reference, and that is noted."""
    fp32 = _torch_run(model, result, sample, xs, keras_run, fx_graph, torch.float32)
    report.kinks, report.gated = fp32.kinks, fp32.gated
    try:
        ref = _torch_run(model, result, sample, xs, keras_run, fx_graph, torch.float64)
    except RuntimeError as e:
        report.reference = "float32"
        report.notes.append(f"the model does not run in float64 ({str(e).splitlines()[0][:160]}): the reference "
                            "is PyTorch fp32, so rounding noise is not told from errors")
        return fp32.run, fp32.run
    if not fx_graph:
        report.notes.append("captured with torch.export: the reference runs the model itself, kinks not on "
                            "Keras's branch (a flip at a tie shows as a gradient difference)")
    return ref.run, fp32.run


@dataclass
class _Ran:
    run: _TorchRun
    kinks: int
    gated: int


def _torch_run(model: torch.nn.Module, result: Any, sample: Sequence[np.ndarray], xs: list, keras_run: _KerasRun,
               fx_graph: bool, dtype: torch.dtype) -> _Ran:
    twin = copy.deepcopy(model).to(dtype)
    for p in twin.parameters():
        p.grad = None
    if fx_graph:
        gm = torch_graph_module(twin, result.graph, sample)
        kinks = find_kinks(gm)
        branches = decisions(gm, kinks, keras_run.torch_order)
        runner = GatedRun(gm, kinks, branches, record=dtype == torch.float64)
        modules, call = gm, runner.run
    else:
        kinks, branches, runner, modules, call = {}, {}, None, twin, twin
    modules.train()
    for m in modules.modules():
        if isinstance(m, torch.nn.modules.dropout._DropoutNd):
            m.eval()
    inputs = [torch.tensor(x, dtype=dtype if np.issubdtype(x.dtype, np.floating) else None,
                           requires_grad=bool(np.issubdtype(x.dtype, np.floating))) for x in xs]
    outs = flatten_outputs(call(*inputs))
    loss = sum((o * torch.from_numpy(r).to(o.dtype)).sum() for o, r in zip(outs, keras_run.projections) if r is not None)
    loss.backward()
    grads = {k: (p.grad.detach().numpy().copy() if p.grad is not None else None) for k, p in twin.named_parameters()}
    in_grads = [x.grad.numpy().copy() if x.grad is not None else None for x in inputs]
    run = _TorchRun(twin, runner.values if runner else {}, runner.flips if runner else [], in_grads, grads,
                    float(loss.item()))
    return _Ran(run, len(kinks), len(branches))


# ---- forward and flips --------------------------------------------------------------------------
def _compare_forward(report: GradReport, result: Any, ref: _TorchRun, fp32: _TorchRun, keras_values: dict,
                     tol: float) -> None:
    """Training-mode node values against the reference; the first nodes that differ are mismatches.

    A node over ``tol`` where Keras is within FP32_NOISE_FACTOR of PyTorch fp32's own error there
    (both against float64) is fp32 rounding (tracer.verify.parity's rule): BatchNorm on a few values
    per channel amplifies it (RepVGG-A0 at batch 2: 2 x 2 x 2 values, PyTorch fp32 itself 1.2e-5).
    """
    if not ref.values:
        return
    diffs = compare_nodes(result, ref.values, keras_values, "training", tol)
    noise = {name: compare_value(ref.values[name], fp32.values[name])[1] for name in diffs
             if isinstance(ref.values.get(name), np.ndarray) and isinstance(fp32.values.get(name), np.ndarray)}
    report.forward_error = max((d.error for d in diffs.values()), default=0.0)
    report.forward_noise = max(noise.values(), default=0.0)
    judged = [replace(d, ok=True) if not d.ok and d.cause == "tolerance" and ref is not fp32
              and d.error <= FP32_NOISE_FACTOR * noise.get(d.name, 0.0) else d for d in diffs.values()]
    for d in divergences(sorted(judged, key=lambda d: d.index))[:SHOWN_FLIPS]:
        where = f"{d.op} (rule {d.rule}{', module ' + d.module_path if d.module_path else ''}) at {d.source}"
        report.mismatches.append(Mismatch(
            "forward", d.name, f"the training-mode forward differs first here: {where}: {d.detail}; PyTorch fp32's "
            f"own error here {noise.get(d.name, float('nan')):.1e} (more than {FP32_NOISE_FACTOR:g}x that is not "
            "rounding)"))


def _judge_flips(report: GradReport, result: Any, flips: list[Flip]) -> None:
    """Ties are notes (listed in ``flips``); any other flip is a forward mismatch."""
    wrong = []
    for f in flips:
        where = str(op(result.graph, f.node).source) if f.node in result.graph else "?"
        report.flips.append({"node": f.node, "op": f.what, "source": where, "count": f.count, "ties": f.ties,
                             "worst": f.worst, "tie": f.tie})
        if f.tie:
            report.ties.append(f"{f.what} {f.node} at {where}: {f.count} element(s) take the other branch in Keras "
                               f"fp32 at a tie (within {f.worst:.1e} x max|value| of the threshold, <= {TIE:g}); "
                               "compared on Keras's branch")
        else:
            wrong.append((f, where))
    for f, where in wrong[:SHOWN_FLIPS]:
        report.mismatches.append(Mismatch(
            "forward", f.node, f"{f.what} at {where}: {f.count - f.ties} of {f.count} element(s) take another branch "
            f"in Keras than in float64, up to {f.worst:.2e} x max|value| from the threshold: not a tie (<= {TIE:g})"))
    if len(wrong) > SHOWN_FLIPS:
        report.mismatches.append(Mismatch("forward", f"{len(wrong) - SHOWN_FLIPS} more kinks",
                                          "take other branches in Keras too (see flips in report.json)"))


def _noise_floor(ref: _TorchRun, fp32: _TorchRun) -> float:
    """The largest error of PyTorch fp32's gradients against the reference (same scale as Keras's)."""
    if ref is fp32:
        return 0.0
    floor = FLOOR * max((float(np.max(np.abs(g), initial=0.0)) for g in ref.grads.values() if g is not None),
                        default=0.0)
    errors = [diff(k, g, fp32.grads[k], floor, np.inf).error for k, g in ref.grads.items()
              if g is not None and fp32.grads.get(k) is not None]
    errors += [diff("input", g, h, 0.0, np.inf).error for g, h in zip(ref.in_grads, fp32.in_grads)
               if g is not None and h is not None]
    return max(errors, default=0.0)
