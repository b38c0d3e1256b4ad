"""tracer: graph-tracing converter from PyTorch to Keras 3 / TensorFlow / LiteRT.

    from tracer import convert
    keras_model = convert(torch_model, sample_input)
    print(keras_model.tracer_result.report.summary())
"""
import os as _os

_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from tracer.api import ConversionResult, convert, convert_model, count_transposes  # noqa: E402
from tracer.errors import (CaptureError, ConversionError, InputError, ParityError,  # noqa: E402
                           TracerError, UnsupportedOpsError)
from op_rules.registry import Layout, register, rule, unregister  # noqa: E402
from tracer.ir import OpNode  # noqa: E402
import emitter.layers  # noqa: E402,F401  (registers our Keras layers for load_model)

__version__ = "0.1.0"
__all__ = ["convert", "convert_model", "ConversionResult", "count_transposes", "rule", "register",
           "unregister", "Layout", "OpNode", "TracerError", "InputError", "CaptureError",
           "ConversionError", "UnsupportedOpsError", "ParityError"]
