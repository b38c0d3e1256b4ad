"""LiteRT runtime parity: run ``.tflite`` flatbuffers with the LiteRT interpreter on the inputs of
the differential tester (tracer/verify/parity.py) and compare with PyTorch.

fp32 must match PyTorch within the tester's tolerance; fp16, dynamic-range and int8 models are
reported (max abs diff and, for classifier outputs (2-D), top-1 agreement with PyTorch) but not
held to it. Quantized inputs and outputs are converted with their scale and zero point; the batch
size follows the inputs (resize_tensor_input + allocate_tensors). Inputs are fed in the Keras model's
layouts (``input_layouts``): batch first, also for an input whose batch is another torch axis (an
RNN's ``h0`` ``(L*D, B, H)`` enters as ``(B, L*D, H)``).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

from tracer.emitter.tflite import calibration_samples, check_options, export_tflite, op_counts, quiet_native_logs
from tracer.ir import Phys
from tracer.emitter.save import signature_names
from tracer.verify.parity import DEFAULT_TOL, ParityReport, check_parity, flatten_outputs, input_batch_axes

STRICT_KINDS = ("fp32",)  # held to the tolerance; the others are reported and judged
# error relative to the output's largest value: good up to the first, fair up to the second, else poor
QUALITY = {"fp16": (1e-2, 5e-2), "dynamic": (5e-2, 0.2), "int8": (5e-2, 0.2)}


class LiteRTRunner:
    """A ``.tflite`` model callable like the Keras model: ``runner(x or [x, y], training=False)``.

    Inputs and outputs are in the Keras model's layouts (parity.run_keras permutes them), matched
    to the Keras model by the serving signature's names.
    """

    def __init__(self, model_bytes: bytes, input_names: Sequence[str] | None = None, num_threads: int | None = None,
                 output_names: Sequence[str] | None = None):
        from ai_edge_litert.interpreter import Interpreter

        self.interpreter = Interpreter(model_content=model_bytes, num_threads=num_threads)
        runner = self.interpreter.get_signature_runner()
        ins, outs = runner.get_input_details(), runner.get_output_details()
        names = list(input_names) if input_names else list(ins)
        if sorted(names) != sorted(ins):
            raise ValueError(f"the .tflite signature has inputs {sorted(ins)}, expected {names}")
        self.inputs = [ins[n] for n in names]
        order = list(output_names) if output_names and sorted(output_names) == sorted(outs) else sorted(
            outs, key=_output_position)  # output_names: the Keras model's order (dict outputs by key)
        self.outputs = [outs[n] for n in order]
        self.calls: list[list[np.ndarray]] = []  # float outputs of each call, in Keras layout
        self._shapes: list[tuple] | None = None

    def __call__(self, feed: Any, training: bool = False) -> list[np.ndarray]:
        arrays = list(feed) if isinstance(feed, (list, tuple)) else [feed]
        it = self.interpreter
        shapes = [tuple(a.shape) for a in arrays]
        if shapes != self._shapes:
            for d, shape in zip(self.inputs, shapes):
                it.resize_tensor_input(d["index"], shape)
            with quiet_native_logs():  # "Created TensorFlow Lite XNNPACK delegate for CPU."
                it.allocate_tensors()
            self._shapes = shapes
        for d, a in zip(self.inputs, arrays):
            it.set_tensor(d["index"], quantize(np.asarray(a), d))
        it.invoke()
        out = [dequantize(it.get_tensor(d["index"]), d) for d in self.outputs]
        self.calls.append(out)
        return out


def _output_position(name: str) -> tuple:
    """Signature outputs are output_0, output_1, ...: numeric order, not string order."""
    head, _, tail = name.rpartition("_")
    return (head, int(tail)) if tail.isdigit() else (name, 0)


def quantize(x: np.ndarray, detail: dict) -> np.ndarray:
    dtype = detail["dtype"]
    if np.dtype(dtype).kind == "f" or not np.issubdtype(x.dtype, np.floating):
        return np.ascontiguousarray(x.astype(dtype))
    scale, zero = detail["quantization"]
    if scale == 0:
        return np.ascontiguousarray(x.astype(dtype))
    info = np.iinfo(dtype)
    return np.clip(np.round(x / scale + zero), info.min, info.max).astype(dtype)


def dequantize(y: np.ndarray, detail: dict) -> np.ndarray:
    scale, zero = detail["quantization"]
    if np.dtype(detail["dtype"]).kind in "iu" and scale != 0:
        return ((y.astype(np.float32) - zero) * scale).astype(np.float32)
    return y


class _Recorder(torch.nn.Module):
    """Wraps the PyTorch model to keep its outputs, for top-1 agreement over the tester's trials."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.calls: list[list[np.ndarray]] = []

    def forward(self, *args: Any) -> Any:
        out = self.model(*args)
        self.calls.append([t.detach().cpu().numpy() for t in flatten_outputs(out)])
        return out


@dataclass
class LiteRTReport:
    """One ``.tflite`` variant against PyTorch on the tester's inputs."""

    kind: str
    parity: ParityReport
    strict: bool  # held to the tolerance (fp32)
    top1_agreement: list[float | None] = field(default_factory=list)  # per output, all trials; None if not 2-D
    top1_by_trial: dict[str, list[float | None]] = field(default_factory=dict)  # trial label -> per output
    calib_trial: str | None = None  # label of the trial made of calibration samples (real data)
    size_bytes: int = 0
    ops: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.parity.ok if self.strict else True

    def judgement(self) -> tuple[str, float, str]:
        """(good | fair | poor, the relative error judged, what it was judged on) for the quantized
        kinds: the error relative to each output's largest value, on the calibration samples
        (real data) when there are some, else on all inputs; top-1 agreement under 90% is poor."""
        trials = [t for t in self.parity.trials if t.label == self.calib_trial] or self.parity.trials
        on = "the calibration samples" if self.calib_trial and trials[0].label == self.calib_trial else "all inputs"
        rel = max((o.max_abs / max(o.max_ref, 1e-12) for t in trials for o in t.outputs), default=0.0)
        good, fair = QUALITY.get(self.kind, (self.parity.tolerance, self.parity.tolerance))
        agree = self.top1_by_trial.get(self.calib_trial or "") or self.top1_agreement
        verdict = "good" if rel <= good else "fair" if rel <= fair else "poor"
        if any(a is not None and a < 0.9 for a in agree):
            verdict = "poor"
        return verdict, rel, on

    def advice(self) -> str:
        """What to do about a poor quantized result ("" otherwise)."""
        verdict, rel, on = self.judgement()
        if self.kind == "int8" and not self.calib_trial:  # judged on noise it was calibrated on: says little
            return (f"  int8 was calibrated on random inputs (--random-calibration) and judged on random inputs "
                    f"only ({100 * rel:.2g}% of the output's range): real data has other ranges; pass --calib "
                    "with real samples to know its accuracy")
        if verdict != "poor":
            return ""
        if self.kind == "int8":
            return (f"  int8 is off by {100 * rel:.0f}% of the output's range on {on}: check that --calib holds real "
                    "inputs preprocessed exactly as the model's (PyTorch layout, same scaling and normalization) and "
                    "enough of them (a few hundred); int8 I/O or layers that quantize badly (softmax, layer norm) "
                    "can also cost accuracy: try --tflite dynamic or fp16")
        return f"  {self.kind} is off by {100 * rel:.0f}% of the output's range on {on}"

    def summary(self) -> str:
        agree = ", ".join("-" if a is None else f"{100 * a:.1f}%" for a in self.top1_agreement)
        if self.strict:
            head = f"tflite {self.kind}: {'OK' if self.parity.ok else 'MISMATCH'}"
        else:
            verdict, rel, on = self.judgement()
            head = f"tflite {self.kind}: {verdict.upper() if verdict == 'poor' else verdict} ({100 * rel:.2g}% of range)"
        line = f"{head}  max abs {self.parity.max_abs:.3e}  scaled {self.parity.max_rel:.3e}"
        if any(a is not None for a in self.top1_agreement):
            line += f"  top-1 agreement {agree}"
            calib = self.top1_by_trial.get(self.calib_trial or "")
            if calib and any(a is not None for a in calib):
                line += " (on calibration samples: " + ", ".join(
                    "-" if a is None else f"{100 * a:.1f}%" for a in calib) + ")"
        line += f"  ({self.size_bytes:,} bytes)"
        by_size = self.errors_by_size()
        if len(by_size) > 1:
            line += "\n  per size: " + ", ".join(f"{label} max abs {err:.3e}" for label, err in by_size.items())
        if not self.strict and self.advice():
            line += "\n" + self.advice()
        return line if self.ok else line + "\n" + self.parity.summary()

    def errors_by_size(self) -> dict[str, float]:
        """Max abs error at the sample's size and at each other size of a dynamic axis ({} without any):
        {"sample": ..., "time=200": ...}; the sample's size holds every trial not at another size."""
        sized = {t.label: max((o.max_abs for o in t.outputs), default=0.0) for t in self.parity.trials
                 if "=" in t.label}
        if not sized:
            return {}
        rest = max((o.max_abs for t in self.parity.trials if "=" not in t.label for o in t.outputs), default=0.0)
        return {"sample": rest, **sized}

    def to_dict(self) -> dict:
        judged = {} if self.strict else dict(zip(("judgement", "relative_error", "judged_on"), self.judgement()),
                                               advice=self.advice().strip())
        return {"kind": self.kind, "strict": self.strict, "ok": self.ok, **judged, "max_abs": self.parity.max_abs,
                "max_rel": self.parity.max_rel, "top1_agreement": self.top1_agreement,
                "top1_by_trial": self.top1_by_trial, "calib_trial": self.calib_trial,
                "size_bytes": self.size_bytes, "ops": self.ops, "errors_by_size": self.errors_by_size(),
                "parity": self.parity.to_dict()}


def check_litert(model: torch.nn.Module, model_bytes: bytes, kind: str, sample: Sequence[np.ndarray],
                 in_layouts: Sequence[Phys], out_layouts: Sequence[Phys], input_names: Sequence[str] | None = None,
                 n_random: int = 3, extra: Sequence[Sequence[np.ndarray]] = (), tol: float = DEFAULT_TOL,
                 seed: int = 0, output_names: Sequence[str] | None = None,
                 sizes: Sequence[tuple[str, Sequence[tuple]]] = ()) -> LiteRTReport:
    """Run ``model_bytes`` and PyTorch on the differential tester's inputs (parity.check_parity), ``sizes``
    being other sizes of dynamic axes (the interpreter's inputs resized to each)."""
    runner = LiteRTRunner(model_bytes, input_names, output_names=output_names)
    recorder = _Recorder(model).eval()
    parity = check_parity(recorder, runner, sample, in_layouts, out_layouts, n_random=n_random, extra=extra,
                          tol=tol, seed=seed, sizes=sizes)
    by_trial = {t.label: top1_agreement([e], [g], out_layouts)
                for t, e, g in zip(parity.trials, recorder.calls, runner.calls)}
    return LiteRTReport(kind=kind, parity=parity, strict=kind in STRICT_KINDS,
                        top1_agreement=top1_agreement(recorder.calls, runner.calls, out_layouts),
                        top1_by_trial=by_trial, size_bytes=len(model_bytes), ops=op_counts(model_bytes))


def top1_agreement(expected_calls: list[list[np.ndarray]], got_calls: list[list[np.ndarray]],
                   out_layouts: Sequence[Phys]) -> list[float | None]:
    """Per output: the fraction of rows whose argmax agrees (2-D outputs of 2+ classes, else None)."""
    result: list[float | None] = []
    for i, phys in enumerate(out_layouts):
        first = expected_calls[0][i] if expected_calls else None
        if first is None or first.ndim != 2 or first.shape[-1] < 2 or not phys.is_identity:
            result.append(None)
            continue
        e = np.concatenate([c[i].argmax(-1) for c in expected_calls])
        g = np.concatenate([c[i].argmax(-1) for c in got_calls])
        result.append(float(np.mean(e == g)))
    return result


def keras_input_names(keras_model: Any) -> list[str]:
    """Signature input names of an exported Keras model, in the Keras model's input order."""
    return [t.name for t in keras_model.inputs]


CALIB_TRIAL = 8  # calibration samples added to the tester's inputs as one batch


def export_and_check(model: torch.nn.Module, keras_model: Any, kinds: Sequence[str], sample: Sequence[np.ndarray],
                     in_layouts: Sequence[Phys], out_layouts: Sequence[Phys], *, calib: Any = None,
                     int8_io: bool = False, random_calibration: bool = False, allow_flex: bool = False,
                     check: bool = True, n_random: int = 3, extra: Sequence[Sequence[np.ndarray]] = (),
                     tol: float = DEFAULT_TOL, say: Callable[[str], None] = lambda m: None,
                     sizes: Sequence[tuple[str, Sequence[tuple]]] = (),
                     ) -> tuple[dict[str, bytes], dict[str, LiteRTReport]]:
    """Export each TFLite kind and (``check``) run it against PyTorch on the tester's inputs, plus
    one batch of calibration samples when calibration data is given (``report.calib_trial``)."""
    check_options(kinds, calib, int8_io, random_calibration)
    trials = list(extra)
    if calib is not None and check:
        axes = input_batch_axes(in_layouts)  # one batch, on each input's own batch axis
        first = list(itertools.islice(calibration_samples(calib, [x.shape for x in sample], batch_axes=axes),
                                      CALIB_TRIAL))
        trials.append([np.concatenate(arrays, axis=ax) for arrays, ax in zip(zip(*first), axes)])
    files: dict[str, bytes] = {}
    reports: dict[str, LiteRTReport] = {}
    for kind in dict.fromkeys(kinds):
        say(f"exporting TFLite {kind}")
        files[kind] = export_tflite(keras_model, kind, calib if kind == "int8" else None, int8_io and kind == "int8",
                                    allow_flex, random_calibration=random_calibration, input_layouts=in_layouts,
                                    sample_shapes=[tuple(x.shape) for x in sample])
        flex = [op for op in op_counts(files[kind]) if op.startswith("Flex")]
        if not check or flex:
            if flex:
                say(f"not running TFLite {kind} in LiteRT: it uses Select TF ops ({', '.join(flex)})")
            continue
        report = check_litert(model, files[kind], kind, sample, in_layouts, out_layouts,
                              keras_input_names(keras_model), n_random=n_random, extra=trials, tol=tol,
                              output_names=signature_names(keras_model.output), sizes=sizes)
        if len(trials) > len(extra):
            report.calib_trial = report.parity.trials[-1].label
        reports[kind] = report
    return files, reports
