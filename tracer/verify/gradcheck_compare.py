"""Gradient parity, the comparisons: each tensor by name against the PyTorch reference.

Input and parameter gradients (a PyTorch parameter used by several Keras layers gets the sum of
their gradients, through the index maps of :mod:`tracer.verify.gradcheck_params`), one SGD step
(every weight must move the same way), and BatchNorm moving statistics (PyTorch's unbiased
running variance named as a known difference with its exact factor). The reference and the
report are :mod:`tracer.verify.gradcheck`'s.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
import torch

from tracer.fixes.parametrizations import parametrized_tensors
from tracer.ir import ordered
from tracer.op_rules.registry import lookup
from tracer.verify.gradcheck_params import ParamMap

__all__ = ["FLOOR", "Mismatch", "TensorDiff", "compare_bn", "compare_grads", "compare_step", "diff", "parametrized"]

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
    kind: str  # forward | gradient | sgd_step | bn_stats | unmapped
    name: str
    message: str


def diff(name: str, t: np.ndarray, k: np.ndarray, floor: float, tol: float, keras_names: str = "") -> TensorDiff:
    max_abs = float(np.max(np.abs(t.astype(np.float64) - k), initial=0.0)) if t.size else 0.0
    scale = max(float(np.max(np.abs(t), initial=0.0)), floor, 1e-30)
    finite = bool(np.all(np.isfinite(k))) and bool(np.all(np.isfinite(t)))
    err = max_abs / scale if finite else float("inf")
    return TensorDiff(name, tuple(t.shape), max_abs, err, finite and err <= tol, keras_names)


def gather(maps: list[ParamMap], shape: tuple, values: dict[str, np.ndarray | None]) -> np.ndarray:
    """Keras per-variable values scattered back into one PyTorch-shaped array (summed where shared)."""
    out = np.zeros(int(np.prod(shape)), np.float64)
    for m in maps:
        v = values.get(m.keras_path)
        if v is not None:
            held = m.held.ravel()
            np.add.at(out, m.index.ravel()[held], np.asarray(v, np.float64).ravel()[held])
    return out.reshape(shape)


def compare_grads(report: Any, model: torch.nn.Module, result: Any, maps: list[ParamMap],
                  unmatched: list[str], t_in: list, t_grads: dict, k_in: list, k_grads: dict, tol: float) -> None:
    """Input gradients, every PyTorch parameter's gradient, and trainable Keras weights PyTorch lacks."""
    for i, (t, k) in enumerate(zip(t_in, k_in)):
        if t is None:
            continue
        if k is None:
            report.mismatches.append(Mismatch("gradient", f"input {i}", "Keras gives no gradient for this input"))
            continue
        d = diff(f"input {i}", t, k, 0.0, tol)
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
            compare_param(report, name, p, by_torch.get(name, []), t_grads.get(name), k_grads, floor, tol)
        else:
            report.mismatches.append(Mismatch("gradient", name, "PyTorch trains it, Keras cannot: "
                                              + why_unheld(model, name, nodes.get(name.rpartition(".")[0]))))
    for path in unmatched:
        if path in k_grads:  # trainable in Keras
            report.mismatches.append(Mismatch("unmapped", path, "Keras trains this weight, but it holds no PyTorch "
                                              "parameter or buffer (no exact rearrangement of one): nothing in "
                                              "PyTorch trains like it"))


def why_unheld(model: torch.nn.Module, name: str, node: Any) -> str:
    """Why no Keras weight holds PyTorch parameter ``name`` (``node``: the node of its module, if any)."""
    if parametrized(model, name):
        return ("it is a parametrization's source: the conversion baked the weight computed from it "
                "(fixes/parametrizations.py), Keras trains that weight instead")
    if node is not None:
        r = lookup(node.target)
        where = f"{node.source.file}:{node.source.line}" if node.source.file else "unknown source"
        return (f"no Keras weight holds it: rule {r.name if r else '?'} of node {node.name} ({where}) made "
                "it a constant (to keep it trainable, the rule must give it to a Keras layer as a weight)")
    return "no Keras weight holds it (a value computed from it at conversion, or folded)"


def compare_param(report: Any, name: str, p: torch.nn.Parameter, held: list[ParamMap],
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
        covered[m.index[m.held]] = True
    k = gather(mine, tuple(p.shape), k_grads)
    t = g if g is not None else np.zeros(tuple(p.shape), np.float32)
    d = diff(name, t, k, floor, tol, ", ".join(m.keras_path for m in mine))
    report.params.append(d)
    if not covered.all():
        report.mismatches.append(Mismatch("gradient", name, f"only {int(covered.sum())} of {p.numel()} entries "
                                          "are held by trainable Keras weights"))
    elif not d.ok:
        report.mismatches.append(Mismatch("gradient", name, f"gradient differs: max|diff| {d.max_abs:.3e}, "
                                          f"error {d.error:.3e} > {tol:g} (Keras {d.keras})"))


def parametrized(model: torch.nn.Module, name: str) -> bool:
    if ".parametrizations." in f".{name}":
        return True
    path, _, tensor = name.rpartition(".")
    module = dict(model.named_modules()).get(path)
    return module is not None and any(tensor.startswith(t) for t in parametrized_tensors(module))


def compare_step(report: Any, model: torch.nn.Module, keras_model: Any, maps: list[ParamMap],
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
    moved = {name: (params[name].detach().numpy() - before_t[name]).ravel() for name in by_torch}
    for name, mine in by_torch.items():
        moved_t = moved[name]
        for m in mine:
            d = diff(f"{name} -> {m.keras_path}", moved_t[m.index[m.held]], moved_k[m.keras_path][m.held], floor,
                     tol, m.keras_path)
            report.steps.append(d)
            if d.ok:
                continue
            if len(mine) > 1:
                msg = (f"PyTorch shares it between {len(mine)} calls, the Keras model holds {len(mine)} copies "
                       f"({', '.join(x.keras_path for x in mine)}): each copy moves by its own gradient only")
            else:
                msg = f"one SGD step (lr {lr:g}) moves it differently: error {d.error:.3e} > {tol:g}"
            report.mismatches.append(Mismatch("sgd_step", name, msg))
    _summed_steps(report, [m for ms in by_torch.values() for m in ms if m.summed_with], maps, moved, moved_k,
                  lr, floor, tol)


def _summed_steps(report: Any, summed: list[ParamMap], maps: list[ParamMap], moved_t: dict, moved_k: dict,
                  lr: float, floor: float, tol: float) -> None:
    """A Keras bias holding ``bias_ih + bias_hh`` gets each one's gradient (compared above), so one SGD step
    moves the sum by ``lr * g`` in Keras and by ``2 * lr * g`` in PyTorch, where both biases take it:
    a known difference when the sum moved exactly twice as far, a mismatch otherwise."""
    for m in summed:
        other = next((o for o in maps if o.torch_name == m.summed_with and o.keras_path == m.keras_path), None)
        if other is None or m.summed_with not in moved_t:
            continue
        total = moved_t[m.torch_name][m.index] + moved_t[m.summed_with][other.index]
        d = diff(f"{m.torch_name} + {m.summed_with} -> {m.keras_path}", total, 2 * moved_k[m.keras_path],
                 2 * floor, tol, m.keras_path)
        if d.ok:
            report.known_differences.append(
                f"{m.torch_name} + {m.summed_with}: Keras holds their sum as one bias ({m.keras_path}), whose "
                f"gradient is each one's gradient (compared); one SGD step (lr {lr:g}) moves the sum twice as far "
                "in PyTorch (both biases take the step) as in Keras (checked: exactly twice), so a Keras model "
                "trained from this conversion learns this bias at half PyTorch's rate")
        else:
            report.mismatches.append(Mismatch("sgd_step", m.torch_name, f"the summed bias {m.keras_path} "
                                              f"moved unlike half of {m.torch_name} + {m.summed_with}'s step: "
                                              f"error {d.error:.3e} > {tol:g}"))


def compare_bn(report: Any, model: torch.nn.Module, result: Any, maps: list[ParamMap],
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
        d = diff(f"{m.torch_name} -> {m.keras_path}", t_after, k_after, 1.0, tol, m.keras_path)
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
            n = bn_count(result, m.torch_name.rpartition(".")[0], batch)
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


def bn_count(result: Any, module_path: str, batch: int) -> int:
    """Values per channel in the batch statistics of the BatchNorm at ``module_path``."""
    for node in ordered(result.graph):
        if node.kind.startswith("call") and node.module_path == module_path and node.shape and len(node.shape) >= 2:
            return int(np.prod(node.shape) // node.shape[1] // max(node.shape[0], 1) * batch)
    return 0
