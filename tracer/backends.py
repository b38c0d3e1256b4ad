"""Importing the heavy backends (TensorFlow/Keras, torch) only when a conversion needs them.

``import tracer`` and ``tracer --help`` stay fast (no TensorFlow): the command line reads and
checks its arguments first and calls :func:`import_quietly` only then. Our Keras layers are
registered for ``keras.models.load_model`` whenever Keras is imported in a process that imported
tracer (:func:`register_layers_with_keras`), so ``import tracer`` is still all a ``.keras`` file
with tracer layers needs.
"""
from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import os
import sys
from typing import Any, Iterator


def register_layers() -> None:
    """Register tracer's Keras layers (``tracer>...``) for ``keras.models.load_model``."""
    import tracer.emitter.batchnorm  # noqa: F401
    import tracer.emitter.layers  # noqa: F401


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    """fd 2 silenced while TensorFlow loads: it prints C++ INFO lines before absl logging is set
    up, which no environment variable turns off. TRACER_TF_LOGS=1 shows them."""
    if os.environ.get("TRACER_TF_LOGS"):
        yield
        return
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(devnull)
        os.close(saved)


def import_quietly() -> None:
    """Import Keras and TensorFlow (start the eager context too) quietly, and register our layers."""
    if "tensorflow" in sys.modules:
        register_layers()
        return
    with quiet_stderr():
        register_layers()
        import tensorflow as tf

        tf.zeros(())  # starts the eager context (and its CUDA probe) now, so "cuInit failed" stays silent


class _AfterKerasImport(importlib.abc.MetaPathFinder):
    """Finds ``keras`` with the other finders and registers our layers once it has loaded."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name != "keras":
            return None
        sys.meta_path.remove(self)  # one shot; also keeps find_spec below from coming back here
        spec = importlib.util.find_spec("keras")
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_keras = spec.loader.exec_module

        def exec_module(module: Any) -> None:
            with quiet_stderr():
                exec_keras(module)
                register_layers()

        spec.loader.exec_module = exec_module  # this spec's own loader instance only
        return spec


def register_layers_with_keras() -> None:
    """Register our layers now if Keras is loaded, else right after Keras is first imported."""
    if "keras" in sys.modules:
        register_layers()
    elif not any(isinstance(f, _AfterKerasImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterKerasImport())
