"""Gradient parity: the converted model trains like the PyTorch one.

In training mode (BatchNorm on batch statistics, dropout off) both models see the same batch
and the same loss, a fixed random projection of the outputs ``sum_i <out_i, R_i>``. Compared,
each by name:

* the loss gradient with respect to every input and every parameter: PyTorch ``backward()``
  against ``tf.GradientTape`` over ``keras_model(x, training=True)``;
* one SGD step: the change of every weight;
* BatchNorm moving statistics after that step.

PyTorch runs the captured fx graph (the same graph the conversion saw, captured in eval mode, so
Python branches on ``self.training`` take their inference path) with its modules in training
mode and dropout modules in eval mode; a model captured with torch.export runs as itself in
``model.train()``. Each Keras weight is matched to the PyTorch tensor it holds, as an index map
(:mod:`tracer.verify.gradcheck_params`); that map carries Keras gradients back into PyTorch's shape, so
a PyTorch parameter used by several Keras layers gets their sum. A trainable Keras weight that
holds no PyTorch tensor, or a PyTorch parameter no trainable Keras weight holds, is a mismatch.

Both models are restored afterwards (weights, BatchNorm statistics, ``.grad``, train/eval flags).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import keras
import numpy as np
import torch

from tracer.fixes.parametrizations import parametrized_tensors
from tracer.op_rules.registry import lookup
from tracer.errors import InputError
from tracer.verify.gradcheck_params import ParamMap, map_parameters, restore_torch_weights
from tracer.ir import ordered
from tracer.verify.parity import flatten_outputs
from tracer.verify.nodes import torch_graph_module

__all__ = ["GradReport", "Mismatch", "TensorDiff", "check_gradients", "map_parameters", "restore_torch_weights"]

LR = 0.1
FLOOR = 1e-2  # errors are relative to max(max|tensor|, FLOOR * the largest gradient of any parameter)


@dataclass(frozen=True)
class TensorDiff:
    name: str
    shape: tuple
    max_abs: float
    error: float  # max_abs / the tensor's scale (see check_gradients)
    ok: bool
    keras: str = ""  # the Keras variable(s) it was compared with


@dataclass(frozen=True)
class Mismatch:
    kind: str  # gradient | sgd_step | bn_stats | unmapped
    name: str
    message: str


@dataclass
class GradReport:
    tolerance: float
    batch: int
    torch_runs: str  # what ran on the PyTorch side
    loss_torch: float = 0.0
    loss_keras: float = 0.0
    inputs: list[TensorDiff] = field(default_factory=list)
    params: list[TensorDiff] = field(default_factory=list)
    steps: list[TensorDiff] = field(default_factory=list)
    bn_stats: list[TensorDiff] = field(default_factory=list)
    mismatches: list[Mismatch] = field(default_factory=list)
    known_differences: list[str] = field(default_factory=list)
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
                 f"{self.tolerance:g}; loss torch {self.loss_torch:.6g} keras {self.loss_keras:.6g})"]
        lines += [f"  {m.kind}: {m.name}: {m.message}" for m in self.mismatches]
        lines += [f"  known difference: {k}" for k in self.known_differences[:1]]
        if len(self.known_differences) > 1:
            lines.append(f"  (the same for {len(self.known_differences) - 1} more BatchNorm layers; see report.json)")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"ok": self.ok, "tolerance": self.tolerance, "batch": self.batch, "torch_runs": self.torch_runs,
                "loss_torch": self.loss_torch, "loss_keras": self.loss_keras, "max_error": self.max_error,
                "inputs": [asdict(d) for d in self.inputs], "params": [asdict(d) for d in self.params],
                "steps": [asdict(d) for d in self.steps], "bn_stats": [asdict(d) for d in self.bn_stats],
                "mismatches": [asdict(m) for m in self.mismatches],
                "known_differences": list(self.known_differences), "notes": list(self.notes),
                "mapping": self.mapping}



# ---- the check ----------------------------------------------------------------------------------
def check_gradients(model: torch.nn.Module, result: Any, sample: Sequence[np.ndarray], *, tol: float = 1e-3,
                    stat_tol: float = 1e-5, batch: int = 4, seed: int = 0, lr: float = LR) -> GradReport:
    """Gradients, one SGD step and BatchNorm statistics of ``model`` vs ``result.keras_model``.

    ``sample`` gives the input shapes (PyTorch layout); a batch of ``batch`` normal inputs is drawn.
    A tensor's error is ``max|keras - torch| / max(max|torch|, FLOOR * the largest parameter
    gradient)``; the floor keeps analytically-zero gradients (a conv bias before a training-mode
    BatchNorm) from turning rounding noise into a failure. BatchNorm statistics are held to
    ``stat_tol`` (scaled by max(1, max|value|), like outputs).
    """
    rng = np.random.default_rng(seed)
    shapes = [(batch, *np.shape(x)[1:]) for x in sample]  # non-float inputs (ids): the sample's rows, repeated
    xs = [rng.standard_normal(shape).astype(np.float32) if np.issubdtype(np.asarray(x).dtype, np.floating)
          else np.resize(np.asarray(x), shape) for x, shape in zip(sample, shapes)]
    keras_model = result.keras_model
    maps, unmatched = map_parameters(model, keras_model)
    saved = _TorchState(model)
    keras_saved = keras_model.get_weights()
    try:
        if result.graph.graph.get("capture", {}).get("method", "fx") == "fx":
            runner, runs = torch_graph_module(model, result.graph, sample), "captured fx graph, modules in train mode"
        else:
            runner, runs = model, "model.train() (captured with torch.export)"
        report = GradReport(tolerance=tol, batch=batch, torch_runs=runs + ", dropout off")
        t_in, t_grads, t_loss, projections = _torch_side(model, runner, xs, rng)
        k_in, k_grads, k_loss = _keras_side(keras_model, result, xs, projections)
        report.loss_torch, report.loss_keras = t_loss, k_loss
        stats_before = {m.torch_name: saved.tensors[m.torch_name].numpy().copy() for m in maps}
        _compare_grads(report, model, result, maps, unmatched, t_in, t_grads, k_in, k_grads, tol)
        _compare_bn(report, model, result, maps, stats_before, stat_tol, batch)
        _compare_step(report, model, keras_model, maps, t_grads, k_grads, lr, tol)
        report.mapping = [{"torch": m.torch_name, "keras": m.keras_path, "how": m.how} for m in maps]
        report.notes += _notes(model, result)
    finally:
        saved.restore(model)
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


class _TorchState:
    """Parameters, buffers, .grad and train flags, to put back after the check."""

    def __init__(self, model: torch.nn.Module):
        self.state = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
        self.tensors = {**{k: v.detach().clone() for k, v in model.named_buffers()},
                        **{k: v.detach().clone() for k, v in model.named_parameters()}}
        self.grads = {k: (p.grad.clone() if p.grad is not None else None) for k, p in model.named_parameters()}
        self.flags = {k: m.training for k, m in model.named_modules()}

    def restore(self, model: torch.nn.Module) -> None:
        model.load_state_dict(self.state)
        for k, p in model.named_parameters():
            p.grad = self.grads[k]
        for k, m in model.named_modules():
            m.training = self.flags[k]


def _torch_side(model: torch.nn.Module, runner: Any, xs: list, rng: np.random.Generator) -> tuple:
    for p in model.parameters():
        p.grad = None
    runner.train()
    for m in runner.modules():
        if isinstance(m, torch.nn.modules.dropout._DropoutNd):
            m.eval()
    inputs = [torch.tensor(x, requires_grad=bool(np.issubdtype(x.dtype, np.floating))) for x in xs]
    outs = flatten_outputs(runner(*inputs))
    projections = [rng.standard_normal(tuple(o.shape)).astype(np.float32) / np.sqrt(max(o.numel(), 1))
                   if o.is_floating_point() else None for o in outs]
    if all(r is None for r in projections):
        raise InputError("gradient parity needs a floating-point output; this model has none")
    loss = sum((o * torch.from_numpy(r)).sum() for o, r in zip(outs, projections) if r is not None)
    loss.backward()
    grads = {k: (p.grad.detach().numpy().copy() if p.grad is not None else None) for k, p in model.named_parameters()}
    in_grads = [x.grad.numpy().copy() if x.grad is not None else None for x in inputs]
    return in_grads, grads, float(loss.item()), projections


def _keras_side(keras_model: Any, result: Any, xs: list, projections: list) -> tuple:
    import tensorflow as tf
    feed = [tf.constant(np.ascontiguousarray(np.transpose(x, p.perm))) for x, p in zip(xs, result.input_layouts)]
    variables = keras_model.trainable_variables
    with tf.GradientTape() as tape:
        tape.watch([f for f in feed if f.dtype.is_floating])
        outs = keras_model(feed if len(feed) > 1 else feed[0], training=True)
        outs = outs if isinstance(outs, (list, tuple)) else [outs]
        loss = tf.add_n([tf.reduce_sum(o * np.transpose(r, p.perm))
                         for o, r, p in zip(outs, projections, result.output_layouts) if r is not None])
    grads = tape.gradient(loss, feed + list(variables))
    in_grads = [None if g is None else np.transpose(g.numpy(), np.argsort(p.perm))
                for g, p in zip(grads[:len(feed)], result.input_layouts)]
    var_grads = {v.path: (None if g is None else np.asarray(g)) for v, g in zip(variables, grads[len(feed):])}
    return in_grads, var_grads, float(loss)


def _diff(name: str, t: np.ndarray, k: np.ndarray, floor: float, tol: float, keras_names: str = "") -> TensorDiff:
    max_abs = float(np.max(np.abs(t.astype(np.float64) - k), initial=0.0)) if t.size else 0.0
    scale = max(float(np.max(np.abs(t), initial=0.0)), floor, 1e-30)
    finite = bool(np.all(np.isfinite(k))) and bool(np.all(np.isfinite(t)))
    err = max_abs / scale if finite else float("inf")
    return TensorDiff(name, tuple(t.shape), max_abs, err, finite and err <= tol, keras_names)


def _gather(maps: list[ParamMap], shape: tuple, values: dict[str, np.ndarray | None]) -> np.ndarray:
    """Keras per-variable values scattered back into one PyTorch-shaped array (summed where shared)."""
    out = np.zeros(int(np.prod(shape)), np.float64)
    for m in maps:
        v = values.get(m.keras_path)
        if v is not None:
            np.add.at(out, m.index.ravel(), np.asarray(v, np.float64).ravel())
    return out.reshape(shape)


def _compare_grads(report: GradReport, model: torch.nn.Module, result: Any, maps: list[ParamMap],
                   unmatched: list[str], t_in: list, t_grads: dict, k_in: list, k_grads: dict, tol: float) -> None:
    """Input gradients, every PyTorch parameter's gradient, and trainable Keras weights PyTorch lacks."""
    for i, (t, k) in enumerate(zip(t_in, k_in)):
        if t is None:
            continue
        if k is None:
            report.mismatches.append(Mismatch("gradient", f"input {i}", "Keras gives no gradient for this input"))
            continue
        d = _diff(f"input {i}", t, k, 0.0, tol)
        report.inputs.append(d)
        if not d.ok:
            report.mismatches.append(Mismatch("gradient", d.name, f"input gradient differs: max|diff| "
                                              f"{d.max_abs:.3e}, error {d.error:.3e} > {tol:g}"))
    floor = FLOOR * max((float(np.max(np.abs(g), initial=0.0)) for g in t_grads.values() if g is not None), default=0.0)
    by_torch: dict[str, list[ParamMap]] = {}
    for m in maps:
        by_torch.setdefault(m.torch_name, []).append(m)
    nodes = {}  # module path -> the node whose rule read that module's parameters
    for node in ordered(result.graph):
        if node.kind == "call_module":
            nodes.setdefault(node.module_path, node)
    for name, p in model.named_parameters():
        if by_torch.get(name) or not p.requires_grad or t_grads.get(name) is None or not np.any(t_grads[name]):
            _compare_param(report, name, p, by_torch.get(name, []), t_grads.get(name), k_grads, floor, tol)
        else:
            report.mismatches.append(Mismatch("gradient", name, "PyTorch trains it, Keras cannot: "
                                              + _why_unheld(model, name, nodes.get(name.rpartition(".")[0]))))
    for path in unmatched:
        if path in k_grads:  # trainable in Keras
            report.mismatches.append(Mismatch("unmapped", path, "Keras trains this weight, but it holds no PyTorch "
                                              "parameter or buffer (no exact rearrangement of one): nothing in "
                                              "PyTorch trains like it"))


def _why_unheld(model: torch.nn.Module, name: str, node: Any) -> str:
    """Why no Keras weight holds PyTorch parameter ``name`` (``node``: the node of its module, if any)."""
    if _parametrized(model, name):
        return ("it is a parametrization's source: the conversion baked the weight computed from it "
                "(fixes/parametrizations.py), Keras trains that weight instead")
    if node is not None:
        r = lookup(node.target)
        where = f"{node.source.file}:{node.source.line}" if node.source.file else "unknown source"
        return (f"no Keras weight holds it: rule {r.name if r else '?'} of node {node.name} ({where}) made "
                "it a constant (to keep it trainable, the rule must give it to a Keras layer as a weight)")
    return "no Keras weight holds it (a value computed from it at conversion, or folded)"


def _compare_param(report: GradReport, name: str, p: torch.nn.Parameter, held: list[ParamMap],
                   g: np.ndarray | None, k_grads: dict, floor: float, tol: float) -> None:
    """One PyTorch parameter's gradient against the sum over the trainable Keras weights that hold it."""
    mine = [m for m in held if m.trainable]
    if not p.requires_grad:
        if mine:
            report.mismatches.append(Mismatch("gradient", name, f"frozen in PyTorch (requires_grad=False) "
                                              f"but trainable in Keras ({mine[0].keras_path})"))
        return
    if not mine:
        if g is not None and np.any(g):
            report.mismatches.append(Mismatch("gradient", name, "PyTorch trains it, Keras cannot: the Keras copy "
                                              f"{', '.join(m.keras_path for m in held)} is not trainable"))
        return
    covered = np.zeros(p.numel(), bool)
    for m in mine:
        covered[m.index.ravel()] = True
    k = _gather(mine, tuple(p.shape), k_grads)
    t = g if g is not None else np.zeros(tuple(p.shape), np.float32)
    d = _diff(name, t, k, floor, tol, ", ".join(m.keras_path for m in mine))
    report.params.append(d)
    if not covered.all():
        report.mismatches.append(Mismatch("gradient", name, f"only {int(covered.sum())} of {p.numel()} entries "
                                          "are held by trainable Keras weights"))
    elif not d.ok:
        report.mismatches.append(Mismatch("gradient", name, f"gradient differs: max|diff| {d.max_abs:.3e}, "
                                          f"error {d.error:.3e} > {tol:g} (Keras {d.keras})"))


def _parametrized(model: torch.nn.Module, name: str) -> bool:
    if ".parametrizations." in f".{name}":
        return True
    path, _, tensor = name.rpartition(".")
    module = dict(model.named_modules()).get(path)
    return module is not None and any(tensor.startswith(t) for t in parametrized_tensors(module))


def _compare_step(report: GradReport, model: torch.nn.Module, keras_model: Any, maps: list[ParamMap],
                  t_grads: dict, k_grads: dict, lr: float, tol: float) -> None:
    """One SGD step in each framework; every weight must move the same way."""
    params = dict(model.named_parameters())
    trainable = [p for p in params.values() if p.grad is not None]
    before_t = {k: p.detach().numpy().copy() for k, p in params.items()}
    torch.optim.SGD(trainable, lr=lr).step()
    variables = keras_model.trainable_variables
    before_k = {v.path: keras.ops.convert_to_numpy(v.value).copy() for v in variables}
    pairs = [(k_grads[v.path], v) for v in variables if k_grads.get(v.path) is not None]
    keras.optimizers.SGD(learning_rate=lr).apply([g for g, _ in pairs], [v for _, v in pairs])
    moved_k = {v.path: keras.ops.convert_to_numpy(v.value) - before_k[v.path] for v in variables}
    floor = FLOOR * lr * max((float(np.max(np.abs(g), initial=0.0)) for g in t_grads.values() if g is not None),
                            default=0.0)
    by_torch: dict[str, list[ParamMap]] = {}
    for m in maps:
        if m.trainable and m.torch_name in params:
            by_torch.setdefault(m.torch_name, []).append(m)
    for name, mine in by_torch.items():
        moved_t = (params[name].detach().numpy() - before_t[name]).ravel()
        for m in mine:
            d = _diff(f"{name} -> {m.keras_path}", moved_t[m.index], moved_k[m.keras_path], floor, tol, m.keras_path)
            report.steps.append(d)
            if d.ok:
                continue
            if len(mine) > 1:
                msg = (f"PyTorch shares it between {len(mine)} calls, the Keras model holds {len(mine)} copies "
                       f"({', '.join(x.keras_path for x in mine)}): each copy moves by its own gradient only")
            else:
                msg = f"one SGD step (lr {lr:g}) moves it differently: error {d.error:.3e} > {tol:g}"
            report.mismatches.append(Mismatch("sgd_step", name, msg))


def _compare_bn(report: GradReport, model: torch.nn.Module, result: Any, maps: list[ParamMap],
                before: dict, tol: float, batch: int) -> None:
    """Moving statistics after the training forward; the unbiased-variance difference is named."""
    tensors = dict(model.named_buffers())
    modules = dict(model.named_modules())
    variables = {v.path: v for v in result.keras_model.non_trainable_variables}
    for m in maps:
        short = m.keras_path.rpartition("/")[2]
        if short not in ("moving_mean", "moving_variance") or m.torch_name not in tensors or m.keras_path not in variables:
            continue
        t_after = tensors[m.torch_name].detach().numpy().ravel()[m.index]
        k_after = keras.ops.convert_to_numpy(variables[m.keras_path].value)
        t_before = before[m.torch_name].ravel()[m.index]
        d = _diff(f"{m.torch_name} -> {m.keras_path}", t_after, k_after, 1.0, tol, m.keras_path)
        report.bn_stats.append(d)
        if d.ok:
            continue
        bn = modules.get(m.torch_name.rpartition(".")[0])
        momentum = getattr(bn, "momentum", 0.1)
        if momentum is None:
            report.mismatches.append(Mismatch("bn_stats", m.torch_name, "momentum=None (PyTorch's cumulative "
                                              "average) has no Keras equivalent; Keras uses momentum 0.9"))
            continue
        if short == "moving_variance":
            n = _bn_count(result, m.torch_name.rpartition(".")[0], batch)
            var_b = (k_after - (1 - momentum) * t_before) / momentum  # the batch variance Keras used
            predicted = (1 - momentum) * t_before + momentum * var_b * n / max(n - 1, 1)
            if n and np.max(np.abs(predicted - t_after)) <= tol * max(1.0, float(np.max(np.abs(t_after)))):
                report.known_differences.append(
                    f"{m.torch_name}: PyTorch updates running_var with the unbiased batch variance "
                    f"(x n/(n-1) = {n}/{n - 1} = {n / (n - 1):.5f}, n = {n} values per channel), Keras's "
                    f"BatchNormalization ({m.keras_path}) with the biased one: after one step they differ by up "
                    f"to {d.max_abs:.3e}, exactly that factor on the batch-variance term")
                continue
        report.mismatches.append(Mismatch("bn_stats", m.torch_name, f"after one training step the moving "
                                          f"statistic differs by {d.max_abs:.3e} (Keras {m.keras_path})"))


def _bn_count(result: Any, module_path: str, batch: int) -> int:
    """Values per channel in the batch statistics of the BatchNorm at ``module_path``."""
    for node in ordered(result.graph):
        if node.kind.startswith("call") and node.module_path == module_path and node.shape and len(node.shape) >= 2:
            return int(np.prod(node.shape) // node.shape[1] // max(node.shape[0], 1) * batch)
    return 0

