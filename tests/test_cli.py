"""CLI: a real conversion end to end, and every kind of bad input -> one line, exit 2, nothing written."""
from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from tracer.cli import EXIT_CONVERT, EXIT_INPUT, EXIT_OK, main

MODEL_SRC = textwrap.dedent('''
    import torch
    import torch.nn as nn

    class Net(nn.Module):
        def __init__(self, width=8):
            super().__init__()
            self.conv = nn.Conv2d(3, width, 3, stride=2, padding=1)
            self.bn = nn.BatchNorm2d(width)
            self.head = nn.Linear(width, 5)

        def forward(self, x):
            y = torch.relu(self.bn(self.conv(x)))
            return self.head(y.mean((2, 3)))

    def factory(width=4):
        return Net(width)

    NOT_A_MODEL = 42

    def not_a_module():
        return "hello"

    class LayerScale(nn.Module):  # no rule: traced through, its parameter becomes a constant
        def __init__(self, width):
            super().__init__()
            self.gamma = nn.Parameter(torch.full((width, 1, 1), 0.5))

        def forward(self, x):
            return x * self.gamma

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.scale = LayerScale(4)

        def forward(self, x):
            return self.scale(self.conv(x))

    class Unsupported(nn.Module):
        def forward(self, x):
            return torch.fft.fft(x).real + torch.special.bessel_j0(x)
''')


@pytest.fixture()
def model_file(tmp_path: Path) -> Path:
    path = tmp_path / "models.py"
    path.write_text(MODEL_SRC)
    return path


def run_cli(*args: str) -> int:
    return main(["convert", *args])


def test_convert_writes_model_savedmodel_and_report(model_file: Path, tmp_path: Path, capsys):
    out = tmp_path / "out"
    code = run_cli(f"{model_file}:Net", "--input-shape", "1,3,16,16", "--init-args", '{"width": 6}',
                   "-o", str(out), "-q")
    assert code == EXIT_OK
    assert (out / "model.keras").is_file() and (out / "saved_model" / "saved_model.pb").is_file()
    report = json.loads((out / "report.json").read_text())
    assert report["parity"]["ok"] is True
    assert report["parity"]["max_abs"] <= 1e-5
    assert len(report["parity"]["trials"]) == 4
    stages = report["stage_seconds"]
    assert list(stages) == ["start-up", "capture", "passes", "emission", "parity"]
    assert report["total_seconds"] >= sum(stages.values()) - 0.01
    assert "parity: OK" in capsys.readouterr().out
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


def test_factory_weights_and_channels_last_io(model_file: Path, tmp_path: Path):
    torch.manual_seed(0)
    state = _user_module(model_file).factory(width=4).state_dict()
    weights = tmp_path / "w.pt"
    torch.save(state, weights)
    out = tmp_path / "out"
    code = run_cli(f"{model_file}:factory", "--input-shape", "2,3,16,16", "--weights", str(weights),
                   "--channels-last-io", "--no-saved-model", "-o", str(out), "-q")
    assert code == EXIT_OK
    report = json.loads((out / "report.json").read_text())
    assert report["conversion"]["input_layouts"] == [[0, 2, 3, 1]]
    assert report["conversion"]["transpose_ops"] == 0


@pytest.mark.parametrize("case, args, message", [
    ("missing file", ["nowhere.py:Net", "--input-shape", "1,3,8,8"], "no such file"),
    ("missing name", ["{f}:Nope", "--input-shape", "1,3,8,8"], "has no 'Nope'"),
    ("not callable", ["{f}:NOT_A_MODEL", "--input-shape", "1,3,8,8"], "not an nn.Module"),
    ("not a module", ["{f}:not_a_module", "--input-shape", "1,3,8,8"], "not a torch.nn.Module"),
    ("bad target", ["{f}", "--input-shape", "1,3,8,8"], "path/to/module.py:Name"),
    ("shape does not fit", ["{f}:Net", "--input-shape", "1,4,8,8"], "fails on input shape (1, 4, 8, 8)"),
    ("bad shape text", ["{f}:Net", "--input-shape", "1,three,8"], "not a comma-separated list"),
    ("bad init json", ["{f}:Net", "--input-shape", "1,3,8,8", "--init-args", "{width: 3"], "not valid JSON"),
    ("bad init arg", ["{f}:Net", "--input-shape", "1,3,8,8", "--init-args", '{"depth": 3}'], "failed: TypeError"),
    ("corrupt weights", ["{f}:Net", "--input-shape", "1,3,8,8", "--weights", "{corrupt}"],
     "is not a PyTorch checkpoint"),
    ("truncated weights", ["{f}:Net", "--input-shape", "1,3,8,8", "--weights", "{truncated}"],
     "is not a PyTorch checkpoint torch.load can read"),
    ("wrong weights", ["{f}:Net", "--input-shape", "1,3,8,8", "--weights", "{wrong}"],
     "shape mismatches: conv.weight (1,) in the file, (8, 3, 3, 3) in the model"),
    ("another model's weights", ["{f}:Net", "--input-shape", "1,3,8,8", "--weights", "{other}"],
     "missing keys: conv.weight, conv.bias, bn.weight, ... (9 in all); unexpected keys: fc1.weight, fc1.bias; "
     "no key in common"),
    ("bad dtype", ["{f}:Net", "--input-shape", "1,3,8,8", "--input-dtype", "float"], "is not one of float32"),
    ("missing inputs", ["{f}:Net", "--input-shape", "1,3,8,8", "--inputs", "none.npy"], "no such inputs file"),
    ("int8 without data", ["{f}:Net", "--input-shape", "1,3,8,8", "--tflite", "int8"], "needs calibration data"),
    ("missing weights", ["{f}:Net", "--input-shape", "1,3,8,8", "--weights", "none.pt"], "no such weights file"),
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(case, args, message, model_file, tmp_path, capsys):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"this is not a torch file")
    wrong = tmp_path / "wrong.pt"
    torch.save({"conv.weight": torch.zeros(1)}, wrong)
    other = tmp_path / "other.pt"
    torch.save(torch.nn.Sequential(collections.OrderedDict(fc1=torch.nn.Linear(2, 2))).state_dict(), other)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(other.read_bytes()[:60])  # a zip archive cut short
    out = tmp_path / "out"
    subst = {"{f}": str(model_file), "{corrupt}": str(corrupt), "{wrong}": str(wrong), "{other}": str(other),
             "{truncated}": str(truncated)}
    args = [subst.get(a.split(":")[0], a.split(":")[0]) + a[len(a.split(":")[0]):] if a.startswith("{") else a
            for a in args]
    code = run_cli(*args, "-o", str(out), "-q")
    err = capsys.readouterr().err.strip()
    assert code == EXIT_INPUT, err
    assert message in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()


def test_unsupported_ops_listed_with_source_and_nothing_written(model_file, tmp_path, capsys):
    out = tmp_path / "out"
    code = run_cli(f"{model_file}:Unsupported", "--input-shape", "1,3,8,8", "-o", str(out), "-q")
    err = capsys.readouterr().err
    assert code == EXIT_CONVERT
    assert "torch.fft.fft" in err and "bessel_j0" in err
    assert f"{model_file}:" in err and "return torch.fft.fft(x).real" in err
    assert "@rule(" in err
    assert not out.exists()


def test_debug_shows_traceback(model_file, tmp_path):
    with pytest.raises(Exception):
        run_cli(f"{model_file}:Nope", "--input-shape", "1,3,8,8", "-o", str(tmp_path / "o"), "--debug", "-q")


def _user_module(model_file: Path):
    sys.path.insert(0, str(model_file.parent))
    try:
        import importlib
        import models
        return importlib.reload(models)
    finally:
        sys.path.remove(str(model_file.parent))
        sys.modules.pop("models", None)


def test_keras_file_reloads_in_fresh_process_with_safe_mode(model_file, tmp_path):
    models = _user_module(model_file)
    torch.manual_seed(1)
    net = models.Net()
    torch.save(net.state_dict(), tmp_path / "w.pt")
    out = tmp_path / "out"
    assert run_cli(f"{model_file}:Net", "--input-shape", "1,3,16,16", "--weights", str(tmp_path / "w.pt"),
                   "-o", str(out), "-q", "--no-saved-model") == EXIT_OK
    x = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    script = (
        "import numpy as np, tracer, keras\n"
        f"m = keras.models.load_model(r'{out / 'model.keras'}', safe_mode=True)\n"
        f"np.save(r'{tmp_path / 'y.npy'}', np.asarray(m(np.load(r'{tmp_path / 'x.npy'}'))))\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, timeout=300)
    y = np.load(tmp_path / "y.npy")
    with torch.no_grad():
        expected = net.eval()(torch.from_numpy(x)).numpy()
    assert np.max(np.abs(y - expected)) <= 1e-5 * max(1.0, float(np.max(np.abs(expected))))


def test_help_teaches():
    proc = subprocess.run([sys.executable, "-m", "tracer.cli", "convert", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0
    for word in ("--input-shape", "--channels-last-io", "--weights", "exit codes", "examples:", "--calib samples/",
                 "--verify deep", "tracer verify out/net", "--input-dtype int64", "130 interrupted", "progress:"):
        assert word in proc.stdout
    top = subprocess.run([sys.executable, "-m", "tracer.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert top.returncode == 0 and "examples:" in top.stdout and "tracer convert --help" in top.stdout


@pytest.mark.parametrize("case", ["existing file", "under a file", "not writable"])
def test_unusable_output_folder_refused_up_front(case, model_file, tmp_path, capsys):
    """-o that cannot hold the result: exit 2 and one line before any conversion work (it used to
    be exit 3, "internal error", after the whole conversion)."""
    blocker = tmp_path / "taken"
    blocker.write_text("a file of the user's")
    if case == "not writable":
        if os.geteuid() == 0:  # root writes anywhere a chmod forbids; /proc refuses even root
            if not Path("/proc").is_dir():
                pytest.skip("needs a folder this user cannot write in")
            out, want = Path("/proc/tracer_out"), "cannot write in /proc"
        else:
            locked = tmp_path / "locked"
            locked.mkdir(mode=0o500)
            out, want = locked / "out", "cannot write in"
    else:
        out = blocker if case == "existing file" else blocker / "out"
        want = "is an existing file" if case == "existing file" else "is a file, so the folder cannot be created"
    code = run_cli(f"{model_file}:Net", "--input-shape", "1,3,8,8", "-o", str(out), "-q")
    err = capsys.readouterr().err.strip()
    assert code == EXIT_INPUT, err
    assert want in err and len(err.splitlines()) == 1
    assert blocker.read_text() == "a file of the user's"


def test_reused_output_folder_holds_one_conversion(model_file, tmp_path):
    """An earlier conversion's files (a .tflite, report.html) do not stay beside the new model;
    the user's own files in the folder do."""
    out = tmp_path / "out"
    out.mkdir()
    for stale in ("model_fp32.tflite", "model_int8.tflite", "report.html"):
        (out / stale).write_bytes(b"from another model")
    (out / "notes.txt").write_text("mine")
    assert run_cli(f"{model_file}:Net", "--input-shape", "1,3,8,8", "-o", str(out), "-q", "--no-saved-model") == EXIT_OK
    assert sorted(p.name for p in out.iterdir()) == ["model.keras", "notes.txt", "report.json"]


def test_parity_failure_does_not_leave_an_earlier_model(tmp_path):
    """Only report.json is written when parity fails: an earlier model.keras there is removed too."""
    from tracer.emitter.save import save_outputs
    out = tmp_path / "out"
    (out / "saved_model").mkdir(parents=True)
    (out / "model.keras").write_bytes(b"an earlier model")
    save_outputs(None, out, {"parity": {"ok": False}}, keras_file=False, saved_model=False)
    assert sorted(p.name for p in out.iterdir()) == ["report.json"]


def test_learnable_parameter_that_freezes_is_reported(model_file, tmp_path, capsys):
    """A trainable nn.Parameter used in a module without a rule becomes a frozen Keras constant:
    said on the console and in report.json (it used to be rc 0 with notes: [] and no word)."""
    out = tmp_path / "out"
    assert run_cli(f"{model_file}:Scaled", "--input-shape", "1,3,8,8", "-o", str(out), "-q",
                   "--no-saved-model") == EXIT_OK
    err = capsys.readouterr().err
    assert "tracer: warning: trainable parameter scale.gamma (used in scale at " in err
    assert "is a frozen constant in the Keras model" in err
    notes = json.loads((out / "report.json").read_text())["conversion"]["notes"]
    assert [n for n in notes if "scale.gamma" in n and "frozen" in n]


def test_parameters_kept_trainable_are_not_reported(model_file, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_cli(f"{model_file}:Net", "--input-shape", "1,3,8,8", "-o", str(out), "-q", "--no-saved-model") == EXIT_OK
    assert "frozen" not in capsys.readouterr().err
    assert not json.loads((out / "report.json").read_text())["conversion"]["notes"]


def test_unsupported_op_stubs_name_public_targets_and_run(model_file, tmp_path, capsys):
    """The stubs name what users import (torch.fft.fft, not torch._C._fft.fft_fft), suggest
    Layout.TORCH for an op that takes a dim, and their imports and code run as printed."""
    from tracer import unregister
    assert run_cli(f"{model_file}:Unsupported", "--input-shape", "1,3,8,8", "-o", str(tmp_path / "o"), "-q") \
        == EXIT_CONVERT
    err = capsys.readouterr().err
    assert "1. torch.fft.fft  (node" in err and "torch.special.bessel_j0  (node" in err
    assert "_C." not in err and "_VariableFunctionsClass" not in err
    head = "import keras\nimport torch\nfrom tracer import Emit, KerasTensor, Layout, OpNode, rule\n"
    assert head in err
    stubs = err[err.index(head) + len(head):].strip().split("\n\n")
    assert stubs[0].startswith("@rule(torch.fft.fft, layout=Layout.TORCH)")
    assert stubs[1].startswith("@rule(torch.special.bessel_j0, layout=Layout.ANY)")
    space: dict = {}
    exec(head + stubs[1].replace("<your op>", "tanh"), space)  # noqa: S102 - the printed code, as a user pastes it
    try:
        assert space["bessel_j0"].__name__ == "bessel_j0"
    finally:
        unregister(torch.special.bessel_j0)
