"""tracer: graph-tracing converter from PyTorch to Keras 3 / TensorFlow / LiteRT.

    from tracer import convert
    keras_model = convert(torch_model, sample_input)
    print(keras_model.tracer_result.report.summary())

``import tracer`` is quick: it imports neither torch nor TensorFlow. Names load on first use
(``tracer.convert`` imports the converter), and tracer's Keras layers are registered as soon as
Keras is imported, which is all ``keras.models.load_model`` needs to read a converted ``.keras``
file with ``safe_mode=True``.
"""
import importlib as _importlib
import os as _os

from tracer import backends as _backends
from tracer.fixes.triton_llvm import isolate_triton_llvm as _isolate_triton_llvm

_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
_isolate_triton_llvm()  # torch's CUDA wheels: triton must not bind to TensorFlow's LLVM (fixes/triton_llvm.py)
_backends.register_layers_with_keras()

__version__ = "0.1.0"

_LAZY = {
    "convert": "tracer.api", "convert_model": "tracer.api", "ConversionResult": "tracer.api",
    "count_transposes": "tracer.api", "deep_verify": "tracer.verify.deep", "VerifyReport": "tracer.verify.deep",
    "rule": "tracer.op_rules.registry", "register": "tracer.op_rules.registry", "unregister": "tracer.op_rules.registry",
    "Layout": "tracer.op_rules.registry", "Qualname": "tracer.op_rules.registry",
    "OpNode": "tracer.ir", "Ref": "tracer.ir", "Emit": "tracer.emitter.context", "KerasTensor": "keras",
    "TracerError": "tracer.errors", "InputError": "tracer.errors", "CaptureError": "tracer.errors",
    "ConversionError": "tracer.errors", "UnsupportedOpsError": "tracer.errors", "ParityError": "tracer.errors",
}
__all__ = sorted(_LAZY)
_LIGHT = {"tracer.errors", "tracer.ir"}  # import without TensorFlow


def __getattr__(name: str):
    if name in _LAZY:
        if _LAZY[name] not in _LIGHT:
            _backends.import_quietly()
        value = getattr(_importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'tracer' has no attribute {name!r}")
