"""Importing the heavy backends (TensorFlow/Keras, torch) only when a conversion needs them.

``import tracer`` and ``tracer --help`` stay fast (no TensorFlow): the command line reads and
checks its arguments first and calls :func:`import_quietly` only then. Our Keras layers are
registered for ``keras.models.load_model`` whenever Keras is imported in a process that imported
tracer (:func:`register_layers_with_keras`), so ``import tracer`` is still all a ``.keras`` file
with tracer layers needs.
"""
from __future__ import annotations

import contextlib
import gc
import importlib.abc
import importlib.util
import os
import signal
import sys
import tempfile
import threading
from typing import Any, Callable, Iterator


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


@contextlib.contextmanager
def exit_on_interrupt(line: str, code: int, before: Callable[[], None] = lambda: None) -> Iterator[None]:
    """Ctrl-C inside the block ends the process at once: ``before()``, the process's temporary folders
    removed (as the finalizers of a normal exit would), ``line`` on stderr, exit ``code``.

    For blocks that import torch, TensorFlow and their lazy submodules, where a KeyboardInterrupt
    cannot be trusted to unwind: torch._C imports numpy from C and drops an exception raised there
    (the half-imported numpy then recursed, RecursionError), torch swallows one raised while it
    imports sympy or torch._dynamo (the conversion went on, or failed on a half-imported sympy), and
    one that escapes Python code run from C by PyRun_String (pybind11's ``exec``) makes ``python -m``
    end by SIGINT (exit -2) even after it was caught. Use it only where nothing is written yet. Outside the main thread, or when SIGINT
    has a handler of someone else's (or is ignored), the block runs as it is."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return
    terminal = os.dup(2)  # stderr as it is now, also while quiet_stderr points fd 2 at /dev/null

    def stop(signum: int, frame: Any) -> None:
        os.dup2(terminal, 2)
        with contextlib.suppress(BaseException):  # e.g. a progress bar interrupted mid-draw
            before()
        _remove_temporary_directories()
        with contextlib.suppress(BaseException):
            sys.stdout.flush()
            sys.stderr.flush()
        os.write(terminal, f"{line}\n".encode())
        os._exit(code)

    previous = signal.signal(signal.SIGINT, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        os.close(terminal)


def _remove_temporary_directories() -> None:
    """Remove the folders of this process's live ``tempfile.TemporaryDirectory`` objects (the TFLite
    export's SavedModel, ...), which os._exit would leave behind: their finalizers run only at a normal exit."""
    for obj in gc.get_objects():  # ~0.2 s with torch and TensorFlow loaded
        if issubclass(type(obj), tempfile.TemporaryDirectory):  # not isinstance: no obj.__class__ (deprecation shims warn)
            with contextlib.suppress(BaseException):
                obj.cleanup()


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
