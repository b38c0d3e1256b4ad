"""Triton's LLVM beside TensorFlow's: load ``libtriton.so`` bound to its own symbols.

Works around a symbol clash between triton 3.8 (shipped with torch 2.14.1's CUDA wheels) and
TensorFlow 2.21 on Linux. TensorFlow puts ``libtensorflow_framework.so.2`` in the process's global
symbol scope, and that library exports its own build of LLVM (``llvm::DebugCounter``,
``llvm::cl::Option`` ...). ``libtriton.so`` exports another LLVM version under the same names,
so when it is loaded after TensorFlow, the dynamic linker binds its static initializers
(``PassBuilder.cpp``) to TensorFlow's LLVM objects, whose layout differs: SIGSEGV in
``free()`` from ``llvm::DenseMap`` while the library loads, i.e. at ``import triton``.

torch imports triton lazily: the first ``torch.fx`` trace with stack traces, or torch.export,
imports ``torch._dynamo``, which probes ``import triton``. A conversion therefore crashed in any
process where TensorFlow (which tracer needs) was imported before triton, whatever the user's
import order. Loading ``libtriton.so`` once with ``RTLD_DEEPBIND`` (its own symbols first) and
``RTLD_LOCAL`` (its symbols stay out of the global scope, so TensorFlow's are untouched) makes the
later ``import triton`` reuse the already initialized library. Nothing is loaded when triton is
not installed (torch's CPU wheels) or already imported. Delete when triton or TensorFlow stop
exporting LLVM symbols (or hide them with version scripts).
"""
from __future__ import annotations

import ctypes
import importlib.util
import os
import sys

_loaded: list[str] = []  # the path loaded, once


def isolate_triton_llvm() -> str | None:
    """Load triton's ``libtriton.so`` bound to its own LLVM, if triton is installed and not yet
    imported; returns the library's path when it was loaded here (or earlier by this function)."""
    if _loaded:
        return _loaded[0]
    if "triton._C.libtriton" in sys.modules or not hasattr(os, "RTLD_DEEPBIND"):
        return None
    try:
        spec = importlib.util.find_spec("triton")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, "_C", "libtriton.so")
        if os.path.exists(path):
            ctypes.CDLL(path, mode=os.RTLD_NOW | os.RTLD_LOCAL | os.RTLD_DEEPBIND)
            _loaded.append(path)
            return path
    return None
