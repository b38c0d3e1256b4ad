"""tracer batch: every status from real isolated conversions, locally and as Ray tasks, resuming,
the manifest checks (one line, exit 2, before torch/TensorFlow), and summary.html in Chromium."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from tracer import batch
from tracer.batch.html import COLOURS, render
from tracer.cli import main

MODELS_SRC = textwrap.dedent('''
    import os
    import time

    import keras
    import torch
    import torch.nn as nn

    from tracer import Layout, rule


    class Net(nn.Module):
        def __init__(self, width=4):
            super().__init__()
            self.conv = nn.Conv2d(3, width, 3, padding=1)
            self.bn = nn.BatchNorm2d(width)
            self.head = nn.Linear(width, 2)

        def forward(self, x):
            return self.head(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


    class Twice(nn.Module):
        def forward(self, x):
            return 2 * x


    @rule(Twice, layout=Layout.ANY)
    def wrong_twice(node, ctx):  # a deliberately wrong rule: the conversion runs, parity fails
        return keras.ops.multiply(ctx.input(node, 0), 3.0)


    class Doubler(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(6, 6)
            self.twice = Twice()

        def forward(self, x):
            return self.twice(self.lin(x))


    class Unsupported(nn.Module):
        def forward(self, x):
            return torch.fft.fft(x).real


    def crash():
        os.abort()


    def hog():
        return torch.empty(2**31, dtype=torch.float32)  # 8 GB, over the entry's memory limit


    def hang():
        time.sleep(3600)
''')

MANIFEST = textwrap.dedent('''
    defaults:
      options: {n_random: 1, no_saved_model: true}
    models:
      - name: net
        model: models.py:Net
        init_args: {width: 6}
        weights: net.pt
        input_shapes: [[1, 3, 8, 8]]
      - name: net_nhwc_folded
        model: models.py:Net
        input_shapes: ["2,3,8,8"]
        options: {fold_bn: true, channels_last_io: true}
      - name: wrong_rule
        model: models.py:Doubler
        input_shapes: [[2, 6]]
      - name: fft
        model: models.py:Unsupported
        input_shapes: [[1, 3, 8, 8]]
      - name: gone
        model: no_such_file.py:Net
        input_shapes: [[1, 3, 8, 8]]
      - name: wrong_shape
        model: models.py:Net
        input_shapes: [[1, 5, 8, 8]]
''')
EXPECTED = {"net": "ok", "net_nhwc_folded": "ok", "wrong_rule": "parity_failed", "fft": "unsupported",
            "gone": "bad_input", "wrong_shape": "bad_input"}
FAILURES = {"defaults": {"options": {"n_random": 1, "no_saved_model": True}},
            "models": [{"name": "abort", "model": "models.py:crash", "input_shapes": [[1, 3]]},
                       {"name": "hog", "model": "models.py:hog", "input_shapes": [[1, 3]], "memory_mb": 3072},
                       {"name": "hang", "model": "models.py:hang", "input_shapes": [[1, 3]], "timeout": 15}]}


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("batch")
    (root / "models.py").write_text(MODELS_SRC)
    torch.manual_seed(0)
    state = {"conv.weight": torch.randn(6, 3, 3, 3), "conv.bias": torch.randn(6), "bn.weight": torch.rand(6) + 0.5,
             "bn.bias": torch.randn(6), "bn.running_mean": torch.randn(6), "bn.running_var": torch.rand(6) + 0.5,
             "bn.num_batches_tracked": torch.tensor(3), "head.weight": torch.randn(2, 6), "head.bias": torch.randn(2)}  # not Net's own init
    torch.save(state, root / "net.pt")
    (root / "models.yaml").write_text(MANIFEST)
    (root / "failures.json").write_text(json.dumps(FAILURES))
    return root


@pytest.fixture(scope="module")
def local_run(project: Path) -> tuple[Path, dict]:
    out = project / "out_local"
    return out, batch.run(project / "models.yaml", out, workers=2)


def _by_name(summary: dict) -> dict:
    return {r["name"]: r for r in summary["models"]}


def _check_statuses(out: Path, summary: dict) -> None:
    rows = _by_name(summary)
    assert {n: r["status"] for n, r in rows.items()} == EXPECTED
    assert [r["name"] for r in summary["models"]] == list(EXPECTED), "manifest order"
    assert summary["counts"] == {"ok": 2, "parity_failed": 1, "bad_input": 2, "unsupported": 1, "crashed": 0,
                                 "timeout": 0}
    for r in rows.values():
        assert set(r) >= {"name", "status", "reason", "seconds", "peak_rss_mb", "max_abs", "transposes", "outputs"}
        assert r["reason"] and "\n" not in r["reason"]
    assert rows["fft"]["reason"].startswith("1 operation(s) without a conversion rule: torch.")
    assert "fft" in rows["fft"]["reason"].split("rule: ")[1]  # the op, as tracer names it
    assert rows["gone"]["reason"].startswith("no such file: ") and rows["gone"]["reason"].endswith("no_such_file.py")
    assert "fails on input shape (1, 5, 8, 8)" in rows["wrong_shape"]["reason"]
    assert "outputs differ" in rows["wrong_rule"]["reason"] and rows["wrong_rule"]["max_abs"] > 1e-3
    for name in ("net", "net_nhwc_folded"):
        r = rows[name]
        assert r["max_abs"] < 1e-4 and r["peak_rss_mb"] > 100 and r["seconds"] > 0
        assert sorted(r["outputs"]) == [f"{name}/model.keras", f"{name}/report.json"]
        report = json.loads((out / name / "report.json").read_text())  # what tracer convert writes
        assert report["parity"]["ok"] and report["parity"]["max_abs"] == r["max_abs"]
        assert report["conversion"]["transpose_ops"] == r["transposes"]
    folded = json.loads((out / "net_nhwc_folded" / "report.json").read_text())
    assert folded["invocation"]["channels_last_io"] is True and folded["input_shapes"] == [[2, 3, 8, 8]]
    assert "BatchNormalization" not in (out / "net_nhwc_folded" / "model.keras").read_bytes().decode("latin-1")
    assert rows["wrong_rule"]["outputs"] == ["wrong_rule/report.json"]  # parity failed: the report only
    assert rows["fft"]["outputs"] == [] and (out / "fft" / "convert.log").is_file()
    assert "torch.fft.fft" in (out / "fft" / "convert.log").read_text()  # the full listing is in the log
    assert json.loads((out / "summary.json").read_text())["models"] == summary["models"]


def test_each_model_gets_its_status_locally(local_run):
    out, summary = local_run
    _check_statuses(out, summary)
    assert summary["skipped"] == 0 and not any(r["skipped"] for r in summary["models"])


def test_weights_from_the_manifest_are_loaded(local_run, project: Path):
    out, _ = local_run
    sys.path.insert(0, str(project))
    try:
        import models
    finally:
        sys.path.remove(str(project))
    net = models.Net(width=6).eval()
    net.load_state_dict(torch.load(project / "net.pt", weights_only=True))
    import keras
    keras_model = keras.models.load_model(out / "net" / "model.keras", safe_mode=True)
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    with torch.no_grad():
        want = net(torch.from_numpy(x)).numpy()
    got = np.asarray(keras_model(x))
    assert np.abs(got - want).max() <= 1e-5 * max(1.0, np.abs(want).max())


def test_rerun_skips_unchanged_entries(local_run, project: Path):
    out, first = local_run
    again = batch.run(project / "models.yaml", out, workers=2)
    assert again["skipped"] == len(EXPECTED) and all(r["skipped"] for r in again["models"])
    assert {r["name"]: r["status"] for r in again["models"]} == EXPECTED
    assert [r["key"] for r in again["models"]] == [r["key"] for r in first["models"]]
    forced = batch.run(project / "models.yaml", out, force=True, only=["gone"])  # no process for a missing file
    rows = _by_name(forced)
    assert not rows["gone"]["skipped"] and all(rows[n]["skipped"] for n in EXPECTED if n != "gone")
    assert len(rows) == len(EXPECTED), "--only keeps the other entries' last results in the summary"


def test_resume_key_follows_the_contents(project: Path, tmp_path: Path):
    for name in ("models.py", "net.pt", "models.yaml"):
        shutil.copy(project / name, tmp_path / name)
    key = {e.name: e.key("v") for e in batch.load(tmp_path / "models.yaml")}
    assert len(set(key.values())) == len(key)
    (tmp_path / "net.pt").write_bytes((tmp_path / "net.pt").read_bytes() + b"\0")
    after_weights = {e.name: e.key("v") for e in batch.load(tmp_path / "models.yaml")}
    assert after_weights["net"] != key["net"] and after_weights["fft"] == key["fft"]
    (tmp_path / "models.py").write_text(MODELS_SRC + "\n# edited\n")
    after_source = {e.name: e.key("v") for e in batch.load(tmp_path / "models.yaml")}
    assert after_source["fft"] != key["fft"] and after_source["gone"] == key["gone"]
    (tmp_path / "models.yaml").write_text(MANIFEST.replace("{width: 6}", "{width: 6, }").replace("n_random: 1", "n_random: 2"))
    edited = {e.name: e.key("v") for e in batch.load(tmp_path / "models.yaml")}
    assert edited["gone"] != after_source["gone"], "an option changed"
    assert {e.name: e.key("w") for e in batch.load(tmp_path / "models.yaml")}["gone"] != edited["gone"], "version"


def test_crash_out_of_memory_and_hang_are_isolated(project: Path):
    out = project / "out_failures"
    summary = batch.run(project / "failures.json", out, workers=3)
    rows = _by_name(summary)
    assert {n: r["status"] for n, r in rows.items()} == {"abort": "crashed", "hog": "crashed", "hang": "timeout"}
    assert "SIGABRT" in rows["abort"]["reason"]
    assert rows["hog"]["reason"].startswith("out of memory (limit 3072 MB)")
    assert "15 s timeout" in rows["hang"]["reason"] and 14 < rows["hang"]["seconds"] < 60
    assert (out / "abort" / "convert.log").is_file() and (out / "summary.html").is_file()


@pytest.mark.parametrize("text, message", [
    ("models: []", "models: must be a non-empty list"),
    ("models:\n  - {name: a, input_shapes: [[1, 3]]}", "models[0] (a): model: missing (required)"),
    ("models:\n  - {name: a, model: m.py, input_shapes: [[1]]}", "models[0] (a): model: 'm.py' must be path/to/module.py:ClassOrFactory"),
    ("models:\n  - {name: a, model: m.py:A, input_shapes: [[1, 0]]}", "models[0] (a): input_shapes: [1, 0] must be"),
    ("models:\n  - {name: a, model: m.py:A, input_shapes: [[1]]}\n  - {name: b, model: m.py:A, input_shapes: [[1]],"
     " options: {dynamic_shape: true}}", "models[1] (b): options.dynamic_shape: unknown option"),
    ("models:\n  - {name: a, model: m.py:A, input_shapes: [[1]], options: {tol: big}}", "options.tol: 'big' must be a float"),
    ("models:\n  - {name: a, model: m.py:A, input_shapes: [[1]], options: {tflite: [fp8]}}", "options.tflite: 'fp8' is not one of"),
    ("models:\n  - {name: a, model: m.py:A, input_shapes: [[1]], options: {fold_bn: 1}}", "options.fold_bn: 1 must be true or false"),
    ("models:\n  - {name: a, model: m.py:A, input_shapes: [[1]], timeout: -1}", "models[0] (a): timeout: -1 must be a positive"),
    ("models:\n  - {name: a/b, model: m.py:A, input_shapes: [[1]]}", "name: 'a/b' must be a folder name"),
    ("models:\n  - {name: a, model: m.py:A, input_shapes: [[1]]}\n  - {name: a, model: m.py:B, input_shapes: [[1]]}",
     "models[1] (a): name: also used by models[0]"),
    ("models:\n  - {name: a, model: m.py:A, input_shape: [[1]]}", "models[0] (a): input_shape: unknown field"),
    ("models: [a: b: c]", "not valid YAML"),
])
def test_bad_manifest_is_one_line_and_exit_2(tmp_path: Path, capsys, text: str, message: str):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    code = main(["batch", str(path), "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert message in err and str(path) in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_manifest_is_checked_before_torch_and_tensorflow_load(project: Path, tmp_path: Path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"models": [{"name": "x", "model": "models.py:Net", "input_shapes": [[1, 3]],
                                           "options": {"fold_bn": "yes"}}]}))
    code = ("import sys; from tracer.cli import main; from tracer import batch; "
            f"n = len(batch.load({str(project / 'models.yaml')!r})); rc = main(['batch', {str(bad)!r}]); "
            "print(n, rc, sorted(m for m in ('torch', 'tensorflow', 'keras', 'ray') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.split("\n")[0] == "6 2 []", done.stdout + done.stderr
    assert "models[0] (x): options.fold_bn: 'yes' must be true or false" in done.stderr


def test_summary_page_is_self_contained(local_run):
    out, summary = local_run
    page = (out / "summary.html").read_text()
    assert "<link" not in page and "src=" not in page and "http" not in page
    assert page.count("<tr class='row'") == len(EXPECTED)
    for status, n in summary["counts"].items():
        assert f"id='count-{status}'" in page and f">{status}: {n}</div>" in page
    assert "href='net/report.json'" in page and "href='fft/convert.log'" in page
    assert "href='gone/convert.log'" not in page  # no process ran for the missing file
    assert render({"models": [{**summary["models"][0], "outputs": ["net/report.html", "net/report.json"]}]}).count(
        "href='net/report.html'") == 1


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
needs_chromium = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=(
    "headless Chromium not installed: apt-get update && apt-get install -y chromium"))


@needs_chromium
def test_summary_renders_and_sorts_in_headless_chromium(local_run, tmp_path: Path):
    out, summary = local_run
    page = out / "summary.html"
    base = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
            f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run(base + ["--dump-dom", page.as_uri() + "#sort=-seconds"], check=True, capture_output=True,
                         text=True, timeout=90).stdout
    assert 'data-sorted="seconds desc"' in dom, "the script ran and sorted the table"
    names = [line.split('data-v="', 1)[1].split('"', 1)[0] for line in dom.split("<tr")[2:]]
    by_seconds = sorted(summary["models"], key=lambda r: -r["seconds"])
    assert [n for n in names] == [r["name"] for r in by_seconds]
    shot = tmp_path / "shot.png"
    subprocess.run(base + [f"--screenshot={shot}", "--window-size=1200,700", page.as_uri()], check=True,
                   capture_output=True, timeout=90)
    import tensorflow as tf
    pixels = tf.io.decode_png(shot.read_bytes(), channels=3).numpy().astype(int)
    assert pixels.std() > 20, "a blank page"
    for status in ("ok", "parity_failed", "unsupported"):
        rgb = tuple(int(COLOURS[status][i:i + 2], 16) for i in (1, 3, 5))
        assert (np.abs(pixels - rgb).sum(-1) < 30).sum() > 200, f"the {status} colour is drawn"


@pytest.mark.slow
def test_each_model_gets_its_status_with_ray_local(project: Path):
    pytest.importorskip("ray")
    out = project / "out_ray"
    summary = batch.run(project / "models.yaml", out, workers=2, ray="local")
    _check_statuses(out, summary)
    assert summary["backend"] == "ray local"
