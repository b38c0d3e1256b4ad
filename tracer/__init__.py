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


def _import_quietly() -> None:
    """Import Keras (and TensorFlow) with fd 2 silenced: TF prints C++ INFO lines before absl
    logging is set up, which no environment variable turns off. TRACER_TF_LOGS=1 shows them."""
    import sys

    if "tensorflow" in sys.modules or _os.environ.get("TRACER_TF_LOGS"):
        import tracer.emitter.batchnorm  # noqa: F401
        import tracer.emitter.layers  # noqa: F401
        return
    sys.stderr.flush()
    saved, devnull = _os.dup(2), _os.open(_os.devnull, _os.O_WRONLY)
    try:
        _os.dup2(devnull, 2)
        import tracer.emitter.batchnorm  # noqa: F401
        import tracer.emitter.layers  # noqa: F401  (registers our Keras layers for load_model)
        import tensorflow as tf

        tf.zeros(())  # starts the eager context (and its CUDA probe) now, so "cuInit failed" stays silent
    finally:
        _os.dup2(saved, 2)
        _os.close(devnull)
        _os.close(saved)


_import_quietly()

__version__ = "0.1.0"

_LAZY = {
    "convert": "tracer.api", "convert_model": "tracer.api", "ConversionResult": "tracer.api",
    "count_transposes": "tracer.api", "deep_verify": "tracer.verify.deep", "VerifyReport": "tracer.verify.deep",
    "rule": "tracer.op_rules.registry", "register": "tracer.op_rules.registry", "unregister": "tracer.op_rules.registry",
    "Layout": "tracer.op_rules.registry", "OpNode": "tracer.ir",
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
