"""tracer: graph-tracing converter from PyTorch to Keras 3 / TensorFlow / LiteRT.

    from tracer import convert
    keras_model = convert(torch_model, sample_input)
    print(keras_model.tracer_result.report.summary())

``import tracer`` registers tracer's Keras layers, which is all ``keras.models.load_model``
needs to read a converted ``.keras`` file with ``safe_mode=True``. The rest loads lazily.
"""
import importlib as _importlib
import os as _os

_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import emitter.layers  # noqa: E402,F401  (registers our Keras layers for load_model)

__version__ = "0.1.0"

_LAZY = {
    "convert": "tracer.api", "convert_model": "tracer.api", "ConversionResult": "tracer.api",
    "count_transposes": "tracer.api",
    "rule": "op_rules.registry", "register": "op_rules.registry", "unregister": "op_rules.registry",
    "Layout": "op_rules.registry", "OpNode": "tracer.ir",
    "TracerError": "tracer.errors", "InputError": "tracer.errors", "CaptureError": "tracer.errors",
    "ConversionError": "tracer.errors", "UnsupportedOpsError": "tracer.errors", "ParityError": "tracer.errors",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(_importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'tracer' has no attribute {name!r}")
