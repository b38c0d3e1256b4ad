"""Start-up: ``import tracer``, ``tracer --help`` and every bad-input error import neither torch nor
TensorFlow (so they answer in well under a second), and Ctrl-C before anything is written (torch and
TensorFlow loading, the capture's lazy imports) is one line and exit 130."""
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


# (marker line, seconds after it): inside torch's import (torch._C imports numpy from C), Keras and
# TensorFlow's, and capture's lazy imports of sympy / torch._dynamo, each of which once swallowed the
# interrupt or left a half-imported module behind (RecursionError, exit 3)
def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


CTRL_C_MOMENTS = [("start-up", 0.0), ("start-up", 0.15), ("start-up", 0.3), ("start-up", 0.6), ("start-up", 1.2),
                  ("start-up", 2.0), ("capture", 0.2)]


@pytest.mark.parametrize("marker, delay", CTRL_C_MOMENTS, ids=[f"{m}+{d}s" for m, d in CTRL_C_MOMENTS])
def test_ctrl_c_before_anything_is_written_is_one_line_exit_130(marker, delay, files, tmp_path):
    """SIGINT while torch and TensorFlow load or the model is captured: one line, exit 130, no traceback."""
    proc = subprocess.Popen([sys.executable, "-m", "tracer.cli", "convert", files["model"], "--input-shape", "1,3",
                             "-o", str(tmp_path / "out")], stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            cwd=tmp_path, env={**os.environ, "CI": "1"},
                            preexec_fn=_default_sigint)  # a test run started with `&` by a script ignores SIGINT
    before = []  # "[tracer] start-up: importing torch and TensorFlow, ..." / "[tracer] capture: with torch.fx"
    while not before or not before[-1].startswith(f"[tracer] {marker}:"):
        before.append(proc.stderr.readline())
        assert before[-1], f"the process ended before {marker}: {''.join(before)}"
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    out, rest = proc.communicate(timeout=120)
    if "converted in" in out:  # (a signal during the interpreter's exit after that ends it by SIGINT: -2)
        pytest.skip(f"the conversion finished within {delay}s of {marker}, before the signal arrived")
    assert proc.returncode == 130, rest
    assert [line for line in rest.splitlines() if line.strip()] == ["tracer: interrupted; nothing written"], rest
    assert not (tmp_path / "out").exists()


def test_exit_on_interrupt_ends_the_process_whatever_the_block_does_with_the_interrupt(tmp_path):
    """The mechanism on its own: the block swallows KeyboardInterrupt, as torch does inside its imports, and
    has fd 2 pointed at /dev/null (quiet_stderr, as while TensorFlow loads); the line still reaches
    stderr, the exit code is 130 and an open TemporaryDirectory (the TFLite export's) is removed.
    After the block, Ctrl-C is a KeyboardInterrupt again."""
    script = textwrap.dedent("""
        import os, signal, sys, tempfile, time
        from tracer.backends import exit_on_interrupt, quiet_stderr
        with exit_on_interrupt("tracer: interrupted; nothing written", 130, before=lambda: print("closed")):
            pass
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
        except KeyboardInterrupt:
            print("after the block: KeyboardInterrupt", flush=True)
        with exit_on_interrupt("tracer: interrupted; nothing written", 130, before=lambda: print("closed")):
            with quiet_stderr(), tempfile.TemporaryDirectory(prefix="tracer-tflite-") as tmp:
                print(tmp, flush=True)
                for _ in range(50):
                    try:
                        os.kill(os.getpid(), signal.SIGINT)
                        time.sleep(0.1)
                    except BaseException:
                        pass
        print("went on")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=60,
                          env={**os.environ, "TRACER_TF_LOGS": "", "TMPDIR": str(tmp_path)}, preexec_fn=_default_sigint)
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr == "tracer: interrupted; nothing written\n"
    after, tmp, closed = proc.stdout.splitlines()
    assert (after, closed) == ("after the block: KeyboardInterrupt", "closed")
    assert Path(tmp).parent == tmp_path and not Path(tmp).exists()
