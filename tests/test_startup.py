"""Start-up: ``import tracer``, ``tracer --help`` and every bad-input error import neither torch nor
TensorFlow (so they answer in well under a second), and Ctrl-C while TensorFlow loads is one line."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

PROBE = textwrap.dedent("""
    import json, sys, time
    start = time.perf_counter()
    {body}
    print(json.dumps({{"rc": rc, "torch": "torch" in sys.modules, "tensorflow": "tensorflow" in sys.modules,
                      "keras": "keras" in sys.modules, "seconds": time.perf_counter() - start}}))
""")


def _probe(body: str, cwd: Path) -> tuple[dict, str]:
    proc = subprocess.run([sys.executable, "-c", PROBE.format(body=body)], capture_output=True, text=True,
                          cwd=cwd, timeout=120)
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def _cli(argv: list[str]) -> str:
    return (f"from tracer.cli import main\n"
            f"try:\n    rc = main({argv!r})\nexcept SystemExit as e:\n    rc = e.code")


def test_import_tracer_loads_no_backend(tmp_path):
    facts, _ = _probe("import tracer\nrc = 0\nassert callable(tracer.__getattr__)", tmp_path)
    assert not facts["torch"] and not facts["tensorflow"] and not facts["keras"]


def test_help_imports_no_backend(tmp_path):
    facts, _ = _probe(_cli(["convert", "--help"]), tmp_path)
    assert facts["rc"] == 0
    assert not facts["torch"] and not facts["tensorflow"]


@pytest.fixture()
def files(tmp_path: Path) -> dict:
    model = tmp_path / "m.py"
    model.write_text("import torch\nclass Net(torch.nn.Module):\n    def forward(self, x):\n        return x\n")
    (tmp_path / "file").write_text("x")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    return {"model": f"{model}:Net", "file": str(tmp_path / "file"), "junk": str(tmp_path / "junk.pt")}


@pytest.mark.parametrize("case, extra, message", [
    ("missing model file", ["target=nowhere.py:Net"], "no such file"),
    ("bad target", ["target=nocolon.py"], "path/to/module.py:Name"),
    ("bad shape", ["--input-shape", "1,three"], "not a comma-separated list"),
    ("bad dtype", ["--input-dtype", "f32"], "is not one of"),
    ("bad json", ["--init-args", "[oops"], "not valid JSON"),
    ("missing weights", ["--weights", "none.pt"], "no such weights file"),
    ("junk weights", ["--weights", "{junk}"], "is not a PyTorch checkpoint"),
    ("missing inputs", ["--inputs", "none.npy"], "no such inputs file"),
    ("missing calibration", ["--tflite", "int8", "--calib", "none.npy"], "does not exist"),
    ("output is a file", ["-o", "{file}"], "is an existing file"),
])
def test_bad_input_answers_before_torch_and_tensorflow(case, extra, message, files, tmp_path):
    target = next((e.split("=", 1)[1] for e in extra if e.startswith("target=")), files["model"])
    extra = [files[e[1:-1]] if e.startswith("{") else e for e in extra if not e.startswith("target=")]
    argv = ["convert", target, "--input-shape", "1,3,8,8", "-o", str(tmp_path / "out"), *extra]
    facts, err = _probe(_cli(argv), tmp_path)
    assert facts["rc"] == 2, err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not facts["torch"] and not facts["tensorflow"], f"{case}: imported a backend before refusing"


@pytest.mark.parametrize("argv, message", [
    (["verify", "nowhere"], "report.json not found"),
    (["verify", ".", "--inputs", "none.npy"], "no such inputs file"),
])
def test_verify_bad_input_answers_before_torch_and_tensorflow(argv, message, tmp_path):
    (tmp_path / "report.json").write_text("{}")
    facts, err = _probe(_cli(argv), tmp_path)
    assert facts["rc"] == 2 and message in err, err
    assert not facts["torch"] and not facts["tensorflow"]


@pytest.mark.parametrize("target, extra, message", [
    ("Nope", [], "has no 'Nope'"),
    ("Net", ["--init-args", '{"depth": 3}'], "failed: TypeError"),
    ("Conv", ["--input-shape", "1,4,8,8"], "fails on input shape (1, 4, 8, 8)"),
    ("Conv", ["--weights", "{other}"], "missing keys: conv.weight, conv.bias"),
])
def test_model_errors_answer_before_tensorflow(target, extra, message, tmp_path):
    """Errors that need the model (its name, constructor, shapes, weights) need torch, not TensorFlow."""
    model = tmp_path / "m.py"
    model.write_text("import torch\nclass Net(torch.nn.Module):\n    def forward(self, x):\n        return x\n"
                     "class Conv(torch.nn.Module):\n    def __init__(self):\n        super().__init__()\n"
                     "        self.conv = torch.nn.Conv2d(3, 2, 1)\n    def forward(self, x):\n"
                     "        return self.conv(x)\n")
    other = tmp_path / "other.pt"
    import torch
    torch.save({"fc.weight": torch.zeros(2, 2)}, other)
    extra = [str(other) if e == "{other}" else e for e in extra]
    shape = [] if "--input-shape" in extra else ["--input-shape", "1,3,8,8"]
    argv = ["convert", f"{model}:{target}", *shape, "-o", str(tmp_path / "out"), *extra]
    facts, err = _probe(_cli(argv), tmp_path)
    assert facts["rc"] == 2 and message in err, err
    assert not facts["tensorflow"] and not facts["keras"]


@pytest.mark.slow  # timing-dependent: a fresh-clone run got RecursionError (exit 3) when SIGINT landed mid-import
def test_ctrl_c_while_tensorflow_loads_is_one_line_exit_130(files, tmp_path):
    """SIGINT during start-up (importing torch and TensorFlow): one line, exit 130, no traceback."""
    proc = subprocess.Popen([sys.executable, "-m", "tracer.cli", "convert", files["model"], "--input-shape", "1,3",
                             "-o", str(tmp_path / "out")], stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            cwd=tmp_path, env={**os.environ, "CI": "1"})
    first = proc.stderr.readline()  # "[tracer] start-up: importing torch and TensorFlow, ..." comes just before
    assert "start-up" in first, first
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    _, rest = proc.communicate(timeout=120)
    lines = [line for line in rest.strip().splitlines() if line]
    if proc.returncode == 0:
        pytest.skip("the start-up finished before the signal arrived")
    assert proc.returncode == 130, rest
    assert lines == ["tracer: interrupted; nothing written"], rest
    assert not (tmp_path / "out").exists()
