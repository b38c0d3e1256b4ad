"""torch's CUDA wheels ship triton, whose libtriton.so crashed (SIGSEGV) when loaded after TensorFlow
(fixes/triton_llvm.py). Each import order a user may have runs in a fresh process: the conversion
must finish with parity, through torch.fx and torch.export, and TFLite export (TensorFlow's own
LLVM, in MLIR) must still work beside triton's. These run where triton is installed (.venv-zoo,
`bash dev.sh test-cuda`); without triton there is nothing to clash and they skip."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

from tracer.fixes.triton_llvm import isolate_triton_llvm

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (torch CPU wheel)")

CONVERT = """
m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU())
r = tracer.convert_model(m, torch.randn(1, 3, generator=torch.Generator().manual_seed(0)), capture={capture!r},
                         tflite={tflite!r})
assert r.report.ok, r.report.summary()
assert all(rep.ok for rep in r.tflite_reports.values())
import sys
print("converted", r.graph.graph["capture"]["method"], "triton" in sys.modules, sorted(r.tflite))
"""

ORDERS = {
    "tracer-then-torch": "import tracer, torch",
    "tensorflow-first": "import tensorflow; import tracer; import torch",
    "keras-torch-tracer": "import keras; import torch; import tracer",
}


def _run(prelude: str, capture: str = "auto", tflite: tuple = ()) -> subprocess.CompletedProcess:
    code = prelude + "\n" + CONVERT.format(capture=capture, tflite=tflite)
    env = {**os.environ, "PYTHONFAULTHANDLER": "1"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)


@needs_triton
@pytest.mark.parametrize("prelude", list(ORDERS.values()), ids=list(ORDERS))
def test_conversion_in_every_import_order(prelude):
    proc = _run(prelude)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stderr[-3000:]}"
    assert "converted fx" in proc.stdout


@needs_triton
@pytest.mark.skipif(importlib.util.find_spec("torchvision") is None, reason="torchvision is not installed")
def test_torchvision_imported_after_tracer():
    """torchvision.ops imports torch._dynamo (and triton) at import: after ``import tracer``, which
    may already have loaded TensorFlow, and before any conversion."""
    proc = _run("import tracer, tracer.api, torch, torchvision")
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stderr[-3000:]}"


@needs_triton
def test_torch_export_and_tflite_beside_triton():
    """torch.export imports torch._dynamo (and so triton) outright; TFLite conversion runs TF's MLIR."""
    proc = _run(ORDERS["tensorflow-first"], capture="export", tflite=("fp32",))
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stderr[-3000:]}"
    assert "converted torch.export True ['fp32']" in proc.stdout


def test_isolation_loads_only_an_installed_triton():
    path = isolate_triton_llvm()
    if not HAS_TRITON:
        assert path is None
    elif path is not None:  # None: triton was imported before (its library is loaded already)
        assert path.endswith(os.path.join("triton", "_C", "libtriton.so"))
        assert isolate_triton_llvm() == path  # once
