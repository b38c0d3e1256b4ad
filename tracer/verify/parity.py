"""Differential tester: PyTorch and the converted Keras model on the same inputs.

Each output of each trial is compared with the stated tolerance:
``max|keras - torch| <= tol * max(1, max|torch|)`` (fp32 default tol = 1e-5).
"""
from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from tracer.errors import ConversionError
from tracer.emitter.save import output_leaves, output_paths
from tracer.ir import Phys, Ref, ordered
from tracer.verify.keras_failure import describe_failure, feed_of

DEFAULT_TOL = 1e-5
# Keras within this factor of PyTorch's own fp32 error (both against float64) is fp32 rounding in
# another summation order. Measured on the installed versions (torch 2.13, TensorFlow 2.21): pure
# rounding (tests/test_parity_fp64.py Cancelling, 60 seeded inputs) gives 0.54x-3.06x, median 1.4x;
# wrong rules give > 10x (GELU tanh for exact: ~1e4x).
FP32_NOISE_FACTOR = 4.0


@dataclass(frozen=True)
class OutputDiff:
    output: int
    shape: tuple
    max_abs: float
    max_rel: float  # max_abs / max(1, max|torch|): the figure held to the tolerance
    max_ref: float
    finite: bool
    ok: bool


@dataclass(frozen=True)
class Exactness:
    """For a failed output: how far PyTorch fp32 and Keras each are from PyTorch in float64."""

    output: int
    torch_fp32: float  # scaled like max_rel
    keras: float

    @property
    def fp32_limited(self) -> bool:
        """Keras is no further from the exact result than :data:`FP32_NOISE_FACTOR` times
        PyTorch's own fp32 error: rounding, not the conversion (the one rule the verdict states)."""
        return self.keras <= FP32_NOISE_FACTOR * self.torch_fp32

    @property
    def ratio(self) -> float:
        return self.keras / self.torch_fp32 if self.torch_fp32 > 0 else float("inf")


@dataclass(frozen=True)
class Trial:
    label: str
    input_shapes: tuple
    outputs: tuple[OutputDiff, ...]
    exactness: tuple[Exactness, ...] = ()

    @property
    def ok(self) -> bool:
        return all(o.ok for o in self.outputs)


@dataclass
class ParityReport:
    tolerance: float
    trials: list[Trial] = field(default_factory=list)
    output_names: list[str] = field(default_factory=list)  # "0", "1" or the model's dict keys ("logits")

    def output_name(self, i: int) -> str:
        return self.output_names[i] if i < len(self.output_names) else str(i)

    @property
    def ok(self) -> bool:
        return bool(self.trials) and all(t.ok for t in self.trials)

    @property
    def max_abs(self) -> float:
        return max((o.max_abs for t in self.trials for o in t.outputs), default=0.0)

    @property
    def max_rel(self) -> float:
        return max((o.max_rel for t in self.trials for o in t.outputs), default=0.0)

    def summary(self) -> str:
        lines = [f"parity: {'OK' if self.ok else 'MISMATCH'} (tolerance: max|diff| <= "
                 f"{self.tolerance:g} x max(1, max|torch|))"]
        for t in self.trials:
            for o in t.outputs:
                flag = "ok  " if o.ok else ("NaN " if not o.finite else "FAIL")
                lines.append(f"  {flag} {t.label:<14} output {self.output_name(o.output)} {str(o.shape):<18} "
                             f"max abs {o.max_abs:.3e}  scaled {o.max_rel:.3e}  (max|y| {o.max_ref:.3g})")
            lines += [_exactness_line(e, self.output_name(e.output)) for e in t.exactness]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"ok": self.ok, "tolerance": self.tolerance, "max_abs": self.max_abs, "max_rel": self.max_rel,
                "output_names": [self.output_name(i) for i in range(len(self.trials[0].outputs) if self.trials else 0)],
                "trials": [{"label": t.label, "input_shapes": t.input_shapes, "ok": t.ok,
                            "outputs": [asdict(o) for o in t.outputs],
                            "fp64_reference": [{**asdict(e), "fp32_limited": e.fp32_limited} for e in t.exactness]}
                           for t in self.trials]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def _exactness_line(e: Exactness, name: str) -> str:
    ratio = f"{e.ratio:.1f}x" if np.isfinite(e.ratio) else "infinitely"
    verdict = (f"Keras's error is {ratio} PyTorch's own fp32 error, within the {FP32_NOISE_FACTOR:g}x that "
               "rounding in another summation order reaches: fp32 limits, not the conversion" if e.fp32_limited else
               f"Keras's error is {ratio} PyTorch's own fp32 error, beyond the {FP32_NOISE_FACTOR:g}x that "
               "rounding in another summation order reaches: a conversion error")
    return (f"       vs PyTorch float64, output {name}: PyTorch fp32 {e.torch_fp32:.3e}, "
            f"Keras {e.keras:.3e} (scaled): {verdict}")


def exactness(model: torch.nn.Module, inputs: Sequence[np.ndarray], expected: Sequence[np.ndarray],
              got: Sequence[np.ndarray], diffs: Sequence[OutputDiff]) -> tuple[Exactness, ...]:
    """For failed finite float outputs: PyTorch fp32 and Keras each against PyTorch run in float64
    (a copy of the model). Empty when the model does not run in float64."""
    failed = [d.output for d in diffs if not d.ok and d.finite and np.isfinite(d.max_abs)]
    if not failed or not all(np.issubdtype(expected[i].dtype, np.floating) for i in failed):
        return ()
    try:
        model64 = copy.deepcopy(model).double()
        with torch.no_grad():
            out = model64(*[torch.from_numpy(np.array(x, np.float64 if np.issubdtype(x.dtype, np.floating)
                                                      else x.dtype)) for x in inputs])
        exact = [t.detach().cpu().numpy() for t in flatten_outputs(out)]
    except Exception:  # noqa: BLE001  (ops with hard-coded float32 tensors, out of memory)
        return ()
    result = []
    for i in failed:
        scale = max(1.0, float(np.max(np.abs(exact[i]), initial=0.0)))
        result.append(Exactness(i, float(np.max(np.abs(expected[i] - exact[i]), initial=0.0)) / scale,
                                float(np.max(np.abs(got[i] - exact[i]), initial=0.0)) / scale))
    return tuple(result)


def flatten_outputs(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in flatten_outputs(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in flatten_outputs(v)]
    return []


def graph_output_names(graph: Any) -> list[str]:
    """Names of the outputs as forward returned them: "0", "1", ... or the dict keys ("aux.0" nested)."""
    out = next((n for n in ordered(graph) if n.kind == "output"), None) if graph is not None else None
    return [] if out is None else output_paths(_tensor_refs(out.args[0]))


def _tensor_refs(value: Any) -> Any:
    """The output structure with only its graph references (what the Keras model outputs)."""
    if isinstance(value, dict):
        return {str(k): v for k, v in ((k, _tensor_refs(x)) for k, x in value.items()) if v is not None}
    if isinstance(value, (tuple, list)):
        return [v for v in (_tensor_refs(x) for x in value) if v is not None]
    return value if isinstance(value, Ref) else None


def input_batch_axes(in_layouts: Sequence[Phys]) -> list[int]:
    """Each input's batch axis in PyTorch's layout: the torch axis its Keras input holds first (0,
    except for an input consumed with the batch elsewhere: an RNN's ``h0`` ``(L*D, B, H)`` -> 1)."""
    return [p.perm[0] if p is not None and p.perm else 0 for p in in_layouts]


def _torch_trial(model: torch.nn.Module, inputs: Sequence[np.ndarray], label: str,
                 sample: Sequence[np.ndarray], axis: int = 0) -> list[np.ndarray]:
    """PyTorch's outputs for one trial; a model that PyTorch runs only at the sample's batch size
    (``x.view(2, -1)``, a parameter the size of the batch) is refused in one error naming the line.
    ``axis``: the first input's batch axis."""
    try:
        return run_torch(model, inputs)
    except Exception as exc:  # noqa: BLE001  (any error of the user's forward)
        if not sample:
            raise
        if "=" in label:  # another size of a dynamic axis (tracer/dynamic.py): "h=13"
            name = label.split("=")[0]
            raise ConversionError(
                f"dynamic axis {name!r}: PyTorch itself fails at {label}{_user_frame(exc)}: "
                f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}. If the model needs sizes that are "
                f"multiples of a number (windows, strides), declare it: dynamic_shapes={{axis: '{name}*K'}} / "
                f"--dynamic-axis INPUT:AXIS={name}*K; else give the axis a range it runs in "
                "(torch.export.Dim(name, min=.., max=..)) or keep it static") from exc
        b, n = (x.shape[axis] if getattr(x, "ndim", 0) > axis else None for x in (sample[0], inputs[0]))
        if b == n:
            raise
        raise ConversionError(
            f"the model runs in PyTorch only at the sample's batch size {b}: at batch {n} (the {label} input) "
            f"PyTorch fails{_user_frame(exc)}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}. "
            f"The converted Keras model has a variable batch axis; make the forward batch-independent "
            f"(x.reshape(x.size(0), -1) instead of a fixed size)") from exc


def _user_frame(exc: BaseException) -> str:
    """" at FILE:LINE (code)" for the innermost frame outside torch and tracer, or ""."""
    import traceback

    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if "/torch/" not in f.filename and "/tracer/" not in f.filename and "site-packages" not in f.filename]
    return f" at {frames[-1].filename}:{frames[-1].lineno} ({(frames[-1].line or '').strip()})" if frames else ""


def run_torch(model: torch.nn.Module, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
    with torch.no_grad():
        out = model(*[torch.from_numpy(np.array(x)) for x in inputs])  # a copy: forward may modify it in place
    return [t.detach().cpu().numpy() for t in flatten_outputs(out)]


def run_keras(keras_model: Any, inputs: Sequence[np.ndarray], in_layouts: Sequence[Phys],
              out_layouts: Sequence[Phys]) -> list[np.ndarray]:
    outs = output_leaves(keras_model(feed_of(inputs, in_layouts), training=False))  # dict outputs: by key
    return [np.transpose(np.asarray(y), np.argsort(p.perm)) for y, p in zip(outs, out_layouts)]


def compare(expected: Sequence[np.ndarray], got: Sequence[np.ndarray], tol: float) -> tuple[OutputDiff, ...]:
    diffs = []
    for i, (e, g) in enumerate(zip(expected, got)):
        if e.shape != g.shape:
            diffs.append(OutputDiff(i, tuple(e.shape), float("inf"), float("inf"), 0.0, False, False))
            continue
        e64, g64 = e.astype(np.float64), g.astype(np.float64)
        both = np.isfinite(e64) & np.isfinite(g64)
        same_nonfinite = bool(np.array_equal(np.isfinite(e64), np.isfinite(g64))
                              and np.array_equal(e64[~both], g64[~both], equal_nan=True))
        max_abs = float(np.max(np.abs(e64[both] - g64[both]), initial=0.0)) if same_nonfinite else float("inf")
        finite = bool(np.all(np.isfinite(g64)))
        max_ref = float(np.max(np.abs(e64[both]), initial=0.0))
        max_rel = max_abs / max(1.0, max_ref)
        diffs.append(OutputDiff(i, tuple(e.shape), max_abs, max_rel, max_ref, finite, same_nonfinite and max_rel <= tol))
    return tuple(diffs)


def random_like(shapes: Sequence[tuple], dtypes: Sequence[str], seed: int, batch: int | None = None,
                int_ranges: Sequence[tuple[int, int] | None] = (), batch_axes: Sequence[int] = ()) -> list[np.ndarray]:
    """Standard normal floats; bools and integers in ``int_ranges[i]`` = [low, high) (default 0/1).
    ``batch`` (if given) is the size of each input's batch axis, ``batch_axes[i]`` (default 0)."""
    rng = np.random.default_rng(seed)
    out = []
    for i, (shape, dt) in enumerate(zip(shapes, dtypes)):
        shape = list(shape)
        if batch is not None and shape:
            shape[batch_axes[i] if i < len(batch_axes) else 0] = batch
        shape = tuple(shape)
        if dt.startswith("int") or dt.startswith("uint") or dt == "bool":
            low, high = (int_ranges[i] if i < len(int_ranges) and int_ranges[i] and dt != "bool" else (0, 2))
            out.append(rng.integers(low, high, size=shape).astype(dt))
        else:
            out.append(rng.standard_normal(shape).astype(np.float32))
    return out


def int_ranges(sample: Sequence[np.ndarray], graph: Any = None) -> list[tuple[int, int] | None]:
    """[low, high) for random integer inputs: the sample's range, widened to hold 0 and 1 (so a mask
    of ones also gets zeros); for an input read directly as embedding indices, [0, num_embeddings)."""
    bounds = _index_bounds(graph) if graph is not None else {}
    out: list[tuple[int, int] | None] = []
    for i, x in enumerate(sample):
        if not np.issubdtype(x.dtype, np.integer) or x.size == 0:
            out.append(None)
        elif i in bounds:
            out.append((0, bounds[i]))
        else:
            out.append((min(0, int(x.min())), max(2, int(x.max()) + 1)))
    return out


def _index_bounds(graph: Any) -> dict[int, int]:
    """Input position -> number of rows of the embedding table it indexes directly."""
    names = [n.name for n in ordered(graph) if n.kind == "placeholder"]
    found: dict[int, int] = {}
    for i, name in enumerate(names):
        for user in graph.successors(name):
            u = graph.nodes[user]["op"]
            rows = _embedding_rows(graph, u, name)
            if rows is not None:
                found[i] = min(rows, found.get(i, rows))
    return found


def _embedding_rows(graph: Any, u: Any, name: str) -> int | None:
    if isinstance(u.module, torch.nn.Embedding) and u.inputs[:1] == (name,):
        return int(u.module.num_embeddings)
    if u.target in (torch.nn.functional.embedding, torch.ops.aten.embedding.default):
        w, ids = u.kw.get("weight"), u.kw.get("input", u.kw.get("indices"))
        src = graph.nodes[w.name]["op"] if hasattr(w, "name") and w.name in graph.nodes else None
        if getattr(ids, "name", None) == name and src is not None and src.shape:
            return int(src.shape[0])
    return None


def check_parity(model: torch.nn.Module, keras_model: Any, sample: Sequence[np.ndarray], in_layouts: Sequence[Phys],
                 out_layouts: Sequence[Phys], n_random: int = 3, extra: Sequence[Sequence[np.ndarray]] = (),
                 tol: float = DEFAULT_TOL, seed: int = 0, graph: Any = None,
                 node_tensors: dict | None = None, sizes: Sequence[tuple[str, Sequence[tuple]]] = ()) -> ParityReport:
    """Compare on the sample input, ``n_random`` random inputs (one with another batch size), ``extra``
    and one random input per entry of ``sizes`` ((label, input shapes): other sizes of dynamic axes).

    When the Keras model raises on an input that PyTorch runs, a ConversionError names the input
    and, given the ``graph`` and the ``node_tensors`` of the conversion, the Keras layer that failed
    and the torch node (and source line) it was emitted for.
    """
    shapes = [tuple(x.shape) for x in sample]
    dtypes = [str(x.dtype) for x in sample]
    trials: list[tuple[str, list[np.ndarray]]] = [("sample", list(sample))]
    ranges, axes = int_ranges(sample, graph), input_batch_axes(in_layouts) or [0]
    for k in range(n_random):  # the last at another batch size, on each input's own batch axis
        batch = (shapes[0][axes[0]] % 3) + 2 if k == n_random - 1 and len(shapes[0]) > axes[0] else None
        trials.append((f"random{k}" + (f" (batch {batch})" if batch else ""),
                       random_like(shapes, dtypes, seed + k, batch, ranges, axes)))
    trials += [(f"user{k}", list(x)) for k, x in enumerate(extra)]
    trials += [(label, random_like(other, dtypes, seed + 100 + k, None, ranges))
               for k, (label, other) in enumerate(sizes)]
    report = ParityReport(tolerance=tol, output_names=graph_output_names(graph))
    for label, inputs in trials:
        expected = _torch_trial(model, inputs, label, sample, axes[0])
        try:
            got = run_keras(keras_model, inputs, in_layouts, out_layouts)
        except Exception as exc:  # noqa: BLE001  (TensorFlow's InvalidArgumentError and the like)
            where = describe_failure(exc, keras_model, graph, node_tensors or {}, feed_of(inputs, in_layouts))
            given = ", ".join(str(tuple(x.shape)) for x in inputs)
            raise ConversionError(f"the converted Keras model fails on the {label} input ({given}), which "
                                  f"PyTorch runs: {where}") from exc
        diffs = compare(expected, got, tol)
        report.trials.append(Trial(label, tuple(tuple(x.shape) for x in inputs), diffs,
                                   exactness(model, inputs, expected, got, diffs)))
    return report
