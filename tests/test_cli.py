"""CLI: a real conversion end to end, and every kind of bad input -> one line, exit 2, nothing written."""
from __future__ import annotations

import json
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
    ("corrupt weights", ["{f}:Net", "--input-shape", "1,3,8,8", "--weights", "{corrupt}"], "cannot read weights"),
    ("wrong weights", ["{f}:Net", "--input-shape", "1,3,8,8", "--weights", "{wrong}"], "do not fit the model"),
    ("missing weights", ["{f}:Net", "--input-shape", "1,3,8,8", "--weights", "none.pt"], "no such weights file"),
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(case, args, message, model_file, tmp_path, capsys):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"this is not a torch file")
    wrong = tmp_path / "wrong.pt"
    torch.save({"conv.weight": torch.zeros(1)}, wrong)
    out = tmp_path / "out"
    subst = {"{f}": str(model_file), "{corrupt}": str(corrupt), "{wrong}": str(wrong)}
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
    for word in ("--input-shape", "--channels-last-io", "--weights", "exit codes", "examples:"):
        assert word in proc.stdout
