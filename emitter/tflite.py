"""LiteRT (TFLite) export: fp32, fp16, dynamic-range and full-integer int8 flatbuffers.

The Keras model is exported to a temporary SavedModel with an inference-mode (``training=False``)
endpoint, then converted with ``tf.lite.TFLiteConverter.from_saved_model``. (Converting a
concrete function of a Keras 3 model directly keeps its variables as VAR_HANDLE/READ_VARIABLE
ops that the interpreter never initializes: garbage outputs; ``from_keras_model`` does what we
do here but swallows export errors and prints the export summary.)

Only TFLite builtin ops are allowed unless ``allow_flex=True``; a model that would need Select TF
("Flex") ops is refused with the ops named. Full int8 needs calibration data: given in PyTorch's
layout, it is permuted into the layouts the conversion chose for the Keras inputs
(emitter/tflite_calibration.py). Inputs keep -1 on dynamic axes in the file's shape_signature.
"""
from __future__ import annotations

import contextlib
import itertools
import logging
import os
import re
import sys
import tempfile
import warnings
from collections import Counter
from typing import Any, Callable, Iterator, Sequence

from tracer.emitter.layers import reserve_name
from tracer.emitter.tflite_calibration import (  # noqa: F401  (CalibrationError, calibration_samples: re-exported)
    CALIB_LIMIT, CalibrationError, calibration_dataset, calibration_samples, check_calibration)
from tracer.fixes.tflite_axis_linear_map import axis_linear_map_matmul
from tracer.fixes.tflite_conv3d import conv3d_for_litert
from tracer.fixes.tflite_dilated_conv_transpose import dilated_conv_transpose_as_conv
from tracer.fixes.tflite_erf import erf_builtin
from tracer.fixes.tflite_high_rank_pad import high_rank_pad_as_3d
from tracer.fixes.tflite_rnn_unroll import rnn_unrolled
from tracer.fixes.tflite_rnn_while import rnn_while_loop, rnn_while_loop_int8
from tracer.errors import ConversionError, InputError, TracerError
from tracer.ir import Phys

log = logging.getLogger("tracer")

KINDS = ("fp32", "fp16", "dynamic", "int8")

# Export fixes, tried in order on every operation of the Keras graph: each returns a replacement
# callable for the ops LiteRT lacks or gets wrong, or None. They change the exported copy only.
EXPORT_FIXES: tuple[Callable[[Any], Callable | None], ...] = (
    erf_builtin, axis_linear_map_matmul, dilated_conv_transpose_as_conv, conv3d_for_litert,
    high_rank_pad_as_3d, rnn_while_loop, rnn_unrolled)


class TFLiteExportError(ConversionError):
    """The converter refused the model (unsupported or non-builtin ops, int8 kernels missing)."""


def export_tflite(keras_model: Any, kind: str, calib: Any = None, int8_io: bool = False,
                  allow_flex: bool = False, *, random_calibration: bool = False,
                  input_layouts: Sequence[Phys] | None = None, calib_limit: int = CALIB_LIMIT,
                  fixes: Sequence[Callable[[Any], Callable | None]] = EXPORT_FIXES,
                  sample_shapes: Sequence[tuple] | None = None) -> bytes:
    """Convert ``keras_model`` to a ``.tflite`` flatbuffer and return its bytes.

    Args:
        kind: "fp32", "fp16" (fp16 weights, fp32 compute where the runtime dequantizes),
            "dynamic" (int8 weights, activations quantized on the fly) or "int8" (full integer).
        calib: int8 only. A numpy array of samples (N, *input shape without batch) for a
            one-input model, a list of such arrays (one per input), a folder of ``.npy`` files
            or images, or a callable returning an iterable of input lists. Always in PyTorch's
            layout (NCHW for images); images are scaled to [0, 1].
        int8_io: int8 only: int8 model inputs and outputs (scale and zero point in the
            interpreter's tensor details) instead of float ones.
        allow_flex: allow Select TF ops (needs the Flex delegate at runtime).
        random_calibration: int8 without ``calib``: calibrate on random normal inputs. The
            model's accuracy is then meaningless; a warning says so.
        input_layouts: the ConversionResult's input layouts (default: read from
            ``keras_model.tracer_result``, else PyTorch's layout).
        fixes: export fixes (see :data:`EXPORT_FIXES`); they rewrite a weight-sharing copy of
            the model, never the model itself.
        sample_shapes: int8 only: the sample's input shapes (PyTorch layout): the sizes of dynamic
            axes for random calibration and images (real ``.npy`` samples may have any size there).
    """
    import tensorflow as tf

    check_options([kind], calib, int8_io, random_calibration)
    layouts = list(input_layouts if input_layouts is not None else _layouts_of(keras_model))
    exported, applied = with_export_fixes(keras_model, _for_kind(kind, fixes))
    if applied:
        log.info("TFLite export fixes: %s", "; ".join(applied))
    representative = None
    if kind == "int8":
        representative = calibration_dataset(keras_model, calib, layouts, random_calibration, calib_limit,
                                             sample_shapes)
    with tempfile.TemporaryDirectory(prefix="tracer-tflite-") as tmp:
        _export_inference(exported, tmp)
        converter = tf.lite.TFLiteConverter.from_saved_model(tmp)
        _configure(converter, kind, representative, int8_io, allow_flex)
        try:
            with quiet_native_logs():
                return bytes(converter.convert())
        except TracerError:  # raised by our calibration generator: already says what is wrong
            raise
        except Exception as exc:  # the converter raises ConverterError with MLIR diagnostics
            raise TFLiteExportError(_explain(exc, kind, allow_flex)) from exc


def _for_kind(kind: str, fixes: Sequence[Callable[[Any], Callable | None]]) -> tuple:
    """The export fixes for ``kind``: int8 takes the WHILE loop its calibrator can run (rnn_while_loop_int8)."""
    return tuple(rnn_while_loop_int8 if kind == "int8" and fix is rnn_while_loop else fix for fix in fixes)


@contextlib.contextmanager
def quiet_native_logs() -> Iterator[None]:
    """Silence what the converter and the interpreter print: C++ lines on fd 2 (converter errors
    also reach the exception we raise), TF's retracing warnings and the calibrator's
    tf.lite.Interpreter deprecation notice. TRACER_TF_LOGS=1 shows them."""
    import tensorflow as tf

    if os.environ.get("TRACER_TF_LOGS"):
        yield
        return
    tf_logger, level = tf.get_logger(), tf.get_logger().level
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        tf_logger.setLevel(logging.ERROR)
        os.dup2(devnull, 2)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"(?s).*tf\.lite\.Interpreter is deprecated")
            yield
    finally:
        os.dup2(saved, 2)
        os.close(devnull)
        os.close(saved)
        tf_logger.setLevel(level)


def with_export_fixes(keras_model: Any, fixes: Sequence[Callable[[Any], Callable | None]] = EXPORT_FIXES
                      ) -> tuple[Any, list[str]]:
    """The model to export and the fixes applied ("<op name>: <fix>"): ``keras_model`` itself when
    no fix applies, else a clone that shares every other layer (and so its weights)."""
    import keras

    def replacement(op: Any) -> tuple[Callable | None, str]:
        for fix in fixes:
            new = fix(op)
            if new is not None:
                return new, f"{op.name}: {fix.__name__}"
        return None, ""

    applied = [note for op in keras_model.operations for new, note in [replacement(op)] if new is not None]
    if not applied:
        return keras_model, []

    def swap(op: Any) -> Any:
        new, _ = replacement(op)
        return op if new is None else new

    for op in keras_model.operations:  # a reloaded model's names are unknown to Keras' auto-naming
        reserve_name(op.name)
    return keras.models.clone_model(keras_model, clone_function=swap), applied


def _configure(converter: Any, kind: str, representative: Callable | None, int8_io: bool, allow_flex: bool) -> None:
    import tensorflow as tf

    builtins = tf.lite.OpsSet.TFLITE_BUILTINS_INT8 if kind == "int8" else tf.lite.OpsSet.TFLITE_BUILTINS
    converter.target_spec.supported_ops = [builtins] + ([tf.lite.OpsSet.SELECT_TF_OPS] if allow_flex else [])
    if kind == "fp32":
        return
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if kind == "fp16":
        converter.target_spec.supported_types = [tf.float16]
    elif kind == "int8":
        converter.representative_dataset = representative
        if int8_io:
            converter.inference_input_type = tf.int8
            converter.inference_output_type = tf.int8


def _export_inference(keras_model: Any, path: str) -> None:
    """A SavedModel whose 'serving_default' calls the model with training=False (emitter/save.py)."""
    from tracer.emitter.save import export_saved_model

    export_saved_model(keras_model, path)


def _layouts_of(keras_model: Any) -> list[Phys]:
    result = getattr(keras_model, "tracer_result", None)
    if result is not None:
        return list(result.input_layouts)
    return [Phys.identity(len(t.shape)) for t in keras_model.inputs]


_FLEX = re.compile(r"(?:TF Select|Flex) ops:\s*([^\n]+)", re.I)
_TF_OP = re.compile(r"'(tf\.\w+)' op")


def _explain(exc: Exception, kind: str, allow_flex: bool) -> str:
    """The converter's failure in one paragraph: which ops, why, what to do."""
    text = str(exc)
    flex = sorted({op.strip() for m in _FLEX.finditer(text) for op in m.group(1).split(",") if op.strip()})
    ops = sorted(set(_TF_OP.findall(text)))
    if flex or ("ERROR_NEEDS_FLEX_OPS" in text and not allow_flex):
        names = ", ".join(flex or ops) or "(see the converter's details below)"
        return (f"TFLite {kind} conversion needs Select TF (Flex) ops: {names}. They are not TFLite builtins, "
                "so LiteRT cannot run them without the Flex delegate. Add an export fix in fixes/ that "
                "rewrites them with builtin ops, or pass allow_flex=True (--allow-flex) and ship the Flex "
                f"delegate with the model.\n{_details(text)}")
    if kind == "int8" and ops:
        return (f"TFLite int8 conversion failed: no int8 kernel for {', '.join(ops)}. Full-integer models "
                f"need every op quantizable; try kind='dynamic' or 'fp16'.\n{_details(text)}")
    return f"TFLite {kind} conversion failed: {type(exc).__name__}: {_details(text)}"


def _details(text: str, n: int = 8) -> str:
    """The converter's 'Details:' lines (one per offending op) if it gave them, else its first lines."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if "Details:" in lines:
        rest = lines[lines.index("Details:") + 1:]
        lines = list(itertools.takewhile(lambda ln: ln.startswith("tf."), rest))
        head = "converter details:\n  "
    else:
        head = "converter: "
    more = f"\n  ... ({len(lines) - n} more lines)" if len(lines) > n else ""
    return head + "\n  ".join(ln[:300] for ln in lines[:n]) + more


def check_options(kinds: Sequence[str], calib: Any = None, int8_io: bool = False,
                  random_calibration: bool = False) -> None:
    """Refuse bad TFLite options before any work is done (unknown kinds, int8 without data)."""
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise InputError(f"unknown TFLite kind(s) {', '.join(map(repr, unknown))}; choose from {', '.join(KINDS)}")
    if int8_io and "int8" not in kinds:
        raise InputError("int8 I/O applies to the int8 model only; add 'int8' to the TFLite kinds")
    if "int8" in kinds:
        check_calibration(calib, random_calibration)


def op_counts(model_bytes: bytes) -> dict[str, int]:
    """Operators in a flatbuffer by name, over every subgraph (a WHILE's cond and body too), e.g.
    {"CONV_2D": 3, "FlexErf": 1}: builtins by their schema name, custom ops by their code."""
    from ai_edge_litert import schema_py_generated as schema

    model = schema.Model.GetRootAsModel(model_bytes, 0)
    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    codes = []
    for i in range(model.OperatorCodesLength()):
        code = model.OperatorCodes(i)
        builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())  # small codes live in the old field
        custom = code.CustomCode()
        codes.append(custom.decode() if builtin == schema.BuiltinOperator.CUSTOM and custom else
                     names.get(builtin, str(builtin)))
    counts = Counter(codes[graph.Operators(j).OpcodeIndex()] for g in range(model.SubgraphsLength())
                     for graph in [model.Subgraphs(g)] for j in range(graph.OperatorsLength()))
    return dict(sorted(counts.items()))
