"""Python API: ``keras_model = convert(model, sample_input)``."""
from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import networkx as nx
import numpy as np
import torch

import tracer.op_rules  # noqa: F401  (registers the rules)
from tracer.emitter.build import build_model
from tracer.emitter.layers import load_needs
from tracer.op_rules.embedding import tied_weights
from tracer.op_rules.registry import has_module_rule, lookup
from tracer.capture.fx import capture as capture_graph
from tracer.dynamic import check_dynamic, parity_shapes, parse_dynamic_shapes, placeholder_axes, placeholder_multiples
from tracer.errors import InputError, ParityError
from tracer.ir import Phys, ordered, target_name
from tracer.verify.trainable import note_frozen
from tracer.verify.parity import DEFAULT_TOL, ParityReport, check_parity
from tracer.passes.pipeline import run_passes
from tracer.progress import Progress, as_progress

log = logging.getLogger("tracer")
_API_STAGES = ("capture", "passes", "emission", "parity", "tflite")


@dataclass
class ConversionResult:
    """Everything a conversion produced; ``keras_model.tracer_result`` points here."""

    keras_model: Any
    graph: nx.DiGraph
    input_layouts: list[Phys]
    output_layouts: list[Phys]
    seconds: float
    transposes: list[str] = field(default_factory=list)
    report: ParityReport | None = None
    tflite: dict[str, bytes] = field(default_factory=dict)  # kind -> .tflite flatbuffer
    tflite_reports: dict[str, Any] = field(default_factory=dict)  # kind -> litert_check.LiteRTReport
    node_tensors: dict[str, Any] = field(default_factory=dict)  # node name -> Keras tensor in its layout (verify)
    stage_seconds: dict[str, float] = field(default_factory=dict)  # capture, passes, emission, parity, tflite

    @property
    def transpose_count(self) -> int:
        return count_transposes(self.keras_model)

    def facts(self) -> dict:
        nodes = [n for n in ordered(self.graph) if n.kind.startswith("call")]
        rules = Counter(lookup(n.target).name for n in nodes)
        notes = [f"{n.name}: {note}" for n in ordered(self.graph) for note in n.notes]
        return {
            "seconds": round(self.seconds, 3),
            "nodes": len(nodes),
            "ops_by_rule": dict(sorted(rules.items())),
            "transpose_ops": self.transpose_count,
            "layout_conversions": self.transposes,
            "keras_params": int(self.keras_model.count_params()),
            "load_needs": load_needs(self.keras_model),  # classes besides Keras' own that model.keras needs
            "input_layouts": [list(p.perm) for p in self.input_layouts],
            "output_layouts": [list(p.perm) for p in self.output_layouts],
            "notes": notes,
            "capture": dict(self.graph.graph.get("capture", {})),
            # integer inputs: int64 in PyTorch, int32 in Keras (emitter/build.py)
            "input_dtypes": [{"torch": n.dtype, "keras": str(t.dtype)} for n, t in zip(
                (n for n in ordered(self.graph) if n.kind == "placeholder"), self.keras_model.inputs)],
            "tied_weights": tied_weights(self.graph),
        }


def count_transposes(keras_model: Any) -> int:
    """Transpose operations in the Keras functional graph (layout conversions and inherent ones)."""
    return sum(1 for o in keras_model.operations if type(o).__name__ == "Transpose")


def _as_tuple(sample: Any) -> tuple[torch.Tensor, ...]:
    if isinstance(sample, torch.Tensor):
        return (sample,)
    if isinstance(sample, np.ndarray):
        return (torch.from_numpy(sample),)
    if isinstance(sample, (tuple, list)) and sample and all(isinstance(t, (torch.Tensor, np.ndarray)) for t in sample):
        return tuple(t if isinstance(t, torch.Tensor) else torch.from_numpy(t) for t in sample)
    raise InputError("sample_input must be a tensor or a tuple of tensors, "
                     f"got {type(sample).__name__}")


def convert_model(model: torch.nn.Module, sample_input: Any, *, channels_last_io: bool = False, fold_bn: bool = False,
                  check: bool = True, n_random: int = 3, extra_inputs: Sequence[Sequence[np.ndarray]] = (),
                  tol: float = DEFAULT_TOL, raise_on_mismatch: bool = True, capture: str = "auto",
                  progress: Callable[[str], None] | Progress | None = None, tflite: Sequence[str] = (), calib: Any = None,
                  int8_io: bool = False, random_calibration: bool = False,
                  allow_flex: bool = False, dynamic_shapes: Any = None) -> ConversionResult:
    """Convert and (by default) prove parity. See :func:`convert` for the arguments."""
    if not isinstance(model, torch.nn.Module):
        raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    say = as_progress(progress or (lambda msg: log.info(msg)))
    inputs = _as_tuple(sample_input)
    dims = parse_dynamic_shapes(dynamic_shapes, inputs)  # before any work
    if tflite:
        from tracer.emitter.tflite import check_options
        check_options(tflite, calib, int8_io, random_calibration)  # before any work
    was_training = model.training
    model.eval()
    try:
        start = time.perf_counter()
        with say.stage("capture", "with torch.export" if capture == "export" else "with torch.fx"):
            graph = capture_graph(model, inputs, has_module_rule, method=capture, dims=dims)
        how = graph.graph.get("capture", {"method": capture})
        if how["method"] != "fx" and capture != "export":
            say(f"captured with {how['method']} instead: {how['reason']}")
        dynamic_dims = {}
        if dims:
            with say.stage("capture", "again at other sizes of " + ", ".join(d.name for d in dims)):
                again = "export" if how["method"] == "torch.export" else how["method"]
                dynamic_dims = check_dynamic(graph, dims, lambda xs: capture_graph(
                    model, xs, has_module_rule, method=again, dims=dims), inputs)
        with say.stage("passes"):
            graph = run_passes(graph, channels_last_io, fold_bn)
        _refuse_dynamic_batch(graph, dims)
        graph.graph.update(dynamic_axes=placeholder_axes(graph, dims), dynamic_dims=dynamic_dims,
                           dynamic_multiples=placeholder_multiples(graph, dims))
        n_nodes = sum(1 for n in ordered(graph) if n.kind.startswith("call"))
        with say.stage("emission", f"Keras for {n_nodes} operations"):
            keras_model, ctx = build_model(graph, name=type(model).__name__, progress=say.advance)
        if not fold_bn:  # an inference model by request; otherwise a learnable parameter must not freeze silently
            note_frozen(graph, keras_model)
        seconds = time.perf_counter() - start
        out_node = next(n for n in ordered(graph) if n.kind == "output")
        result = ConversionResult(
            keras_model=keras_model, graph=graph,
            input_layouts=[n.layout for n in ordered(graph) if n.kind == "placeholder"],
            output_layouts=_output_layouts(out_node), seconds=seconds, transposes=ctx.transposes,
            node_tensors=dict(ctx.tensors))
        if check:
            sample = [t.detach().cpu().numpy() for t in inputs]
            with say.stage("parity", f"checking on {1 + n_random + len(extra_inputs)} inputs"):
                result.report = check_parity(model, keras_model, sample, result.input_layouts,
                                             result.output_layouts, n_random=n_random, extra=extra_inputs, tol=tol,
                                             graph=graph, node_tensors=result.node_tensors,
                                             sizes=parity_shapes([tuple(x.shape) for x in sample], dims))
            if raise_on_mismatch and not result.report.ok:
                raise ParityError(result.report)
        if tflite:
            with say.stage("tflite", ", ".join(tflite)):
                _export_tflite(result, model, inputs, tflite, check=check, n_random=n_random, extra=extra_inputs,
                               tol=tol, raise_on_mismatch=raise_on_mismatch, say=say, calib=calib, int8_io=int8_io,
                               random_calibration=random_calibration, allow_flex=allow_flex,
                               sizes=parity_shapes([tuple(x.shape) for x in inputs], dims))
    finally:
        model.train(was_training)
    result.stage_seconds = {k: round(v, 3) for k, v in say.times.items() if k in _API_STAGES}
    keras_model.tracer_result = result
    return result


def _refuse_dynamic_batch(graph: nx.DiGraph, dims: Sequence[Any]) -> None:
    """A dynamic axis may be torch axis 0 only where that input's batch is elsewhere (a time-major RNN's
    ``(T, B, F)`` enters Keras as ``(B, T, F)``, tracer/passes/layout.py batch_first_layout); the axis an
    input's Keras batch comes from is always dynamic and is not named. Checked once the layout is known."""
    layouts = [n.layout for n in ordered(graph) if n.kind == "placeholder"]
    for d in dims:
        for i, axis in d.places:
            batch = layouts[i].perm[0] if i < len(layouts) and layouts[i] is not None and layouts[i].perm else 0
            if axis == batch:
                raise InputError(f"dynamic_shapes[{i}]: axis {axis} ({d.name!r}) is input {i}'s batch axis, which is "
                                 "always dynamic; name only other axes (torch axis 0 may be named where the batch is "
                                 "elsewhere, as in a time-major RNN's (T, B, F) input)")


def _export_tflite(result: ConversionResult, model: torch.nn.Module, inputs: tuple, kinds: Sequence[str], *,
                   raise_on_mismatch: bool, say: Callable[[str], None], **options: Any) -> None:
    """TFLite files and their LiteRT parity reports onto ``result`` (fp32 is held to ``tol``)."""
    from tracer.verify.litert import export_and_check
    sample = [t.detach().cpu().numpy() for t in inputs]
    result.tflite, result.tflite_reports = export_and_check(
        model, result.keras_model, kinds, sample, result.input_layouts, result.output_layouts, say=say, **options)
    for report in result.tflite_reports.values():
        if raise_on_mismatch and not report.ok:
            raise ParityError(report)


def _output_layouts(out_node) -> list[Phys]:
    layouts = dict(zip(out_node.inputs, out_node.in_layouts))
    order: list[Phys] = []

    def walk(v: Any) -> None:
        from tracer.ir import Ref
        if isinstance(v, Ref):
            order.append(layouts[v.name])
        elif isinstance(v, (tuple, list)):
            for x in v:
                walk(x)
        elif isinstance(v, dict):
            for x in v.values():
                walk(x)

    walk(out_node.args[0])
    return order


def convert(model: torch.nn.Module, sample_input: Any, **options: Any) -> Any:
    """Convert a PyTorch model to a Keras 3 functional model and prove both compute the same.

    Args:
        model: the ``torch.nn.Module`` (put in eval mode for the conversion, then restored).
        sample_input: a tensor or a tuple of tensors; shapes and dtypes are taken from it.
        channels_last_io: inputs/outputs of image maps in NHWC instead of PyTorch's NCHW.
        fold_bn: an inference model: eval-mode BatchNorm folded into the conv/linear before it,
            parallel conv branches of one input summed into one conv (RepVGG-style blocks), the
            BatchNorm after such a sum folded too, channel shuffles absorbed into the weights
            (by default every layer stays trainable).
        check: run the differential tester (default True).
        n_random: random inputs besides the sample (the last one with another batch size).
        extra_inputs: more input tuples (numpy) to compare on.
        tol: fp32 tolerance, max|diff| <= tol * max(1, max|y|).
        raise_on_mismatch: raise ParityError when parity fails (default True).
        capture: "auto" (torch.fx; torch.export when fx cannot trace the model), "fx" or "export".
            ``tracer_result.facts()["capture"]`` says which was used and why.
        tflite: TFLite kinds to export, any of "fp32", "fp16", "dynamic", "int8"
            (``tracer_result.tflite[kind]`` holds the bytes). With ``check``, each runs in LiteRT
            on the tester's inputs (``tracer_result.tflite_reports[kind]``); fp32 is held to ``tol``,
            the others are reported (max abs diff, top-1 agreement for 2-D outputs).
        calib: int8 calibration data in PyTorch layout: an array of samples, a list of arrays (one
            per input), a folder of .npy/.npz/image files or a callable yielding input lists.
        int8_io: int8 model with int8 inputs/outputs instead of float ones.
        random_calibration: allow int8 without ``calib`` (calibrates on noise; warns).
        allow_flex: allow Select TF (Flex) ops in the TFLite files.
        dynamic_shapes: axes besides the batch whose size may change, one dict per input mapping a
            torch axis to a name (or a ``torch.export.Dim`` with min/max), e.g. ``({2: "h", 3: "w"},)``;
            axes sharing a name are one size. The Keras inputs get ``None`` there, parity is checked at
            two other sizes per name; sizes computed from such an axis (``x.shape[1] // 2``, ``arange(T)``,
            ``zeros(B, T)``, ``buf[:, :T]``) are computed at runtime (tracer/capture/sizes.py), and ops
            that would still fix such a size are refused (tracer/dynamic.py).

    Returns the Keras model; ``keras_model.tracer_result`` holds the ConversionResult with
    the parity report (``.report``), the graph and conversion facts.
    """
    return convert_model(model, sample_input, **options).keras_model


__all__ = ["convert", "convert_model", "ConversionResult", "count_transposes", "target_name"]
