"""report.html: self-contained, the plot drawn, and it renders in headless Chromium.

The Chromium test needs Debian's chromium package (``apt-get update && apt-get install -y chromium``;
``bash dev.sh test`` installs it when run as root with apt-get); without it the test is skipped.
"""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch.nn.functional as F

from tracer.op_rules import Layout
from tests.test_verify import HERE, _bugnet, _convert, broken, gelu_tanh, line_of
from tracer.verify.report_html import plot_svg, render, write
from tracer.verify.deep import deep_verify

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
needs_chromium = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=(
    "headless Chromium not installed: apt-get update && apt-get install -y chromium"))


@pytest.fixture(scope="module")
def failing_report() -> dict:
    """A deep report with a broken GELU rule: a first divergence to mark, gradients to show."""
    model = _bugnet()
    with broken((F.gelu,), gelu_tanh, Layout.ANY):
        return deep_verify(model, _convert(model), n_inputs=2).to_dict()


def test_page_is_self_contained_and_complete(failing_report: dict):
    page = render(failing_report, title="BugNet")
    assert "<script" not in page and "http://" not in page.replace("http://www.w3.org/2000/svg", "")
    assert "https://" not in page and "<link" not in page  # no network, no external files
    for element in ("id='verdict'", "id='problems'", "id='first-divergence'", "id='error-plot'",
                    "id='tolerance-line'", "id='first-divergence-marker'", "id='largest'", "id='outputs'",
                    "id='gradients'", "id='facts'", "id='rules'"):
        assert element in page, element
    assert page.count("class='node-point'") == len(failing_report["nodes"])
    assert f"{HERE.as_uri()}" in page and f"test_verify.py:{line_of('gelu')}" in page  # linked to the user's line
    assert "gelu_tanh" in page and "Parity failed: " in page and "(tolerance 1" in page  # problems by kind
    assert "Transpose op(s)" in page


def test_plot_scales_and_marks():
    nodes = [{"name": f"n{i}", "op": "op", "depth": i, "error": e, "ok": e <= 1e-5, "source": "f.py:1"}
             for i, e in enumerate([0.0, 1e-8, 3e-7, 2e-3, float("inf")])]
    svg = plot_svg(nodes, 1e-5, nodes[3])
    assert svg.count("<circle class='node-point'") == 5 and "first divergence: n3" in svg
    ys = [float(y) for y in re.findall(r"class='node-point' cx='[\d.]+' cy='([\d.]+)'", svg)]
    assert ys == sorted(ys, reverse=True), "larger errors are drawn higher (log scale)"
    assert "1e-5" in svg and plot_svg([], 1e-5, None).startswith("<p")


def _png_pixels(path: Path) -> np.ndarray:
    import tensorflow as tf
    return tf.io.decode_png(path.read_bytes(), channels=3).numpy()


@needs_chromium
def test_renders_in_headless_chromium(failing_report: dict, tmp_path: Path):
    page = write(tmp_path / "report.html", failing_report, title="BugNet")
    shot = tmp_path / "shot.png"
    base = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
            f"--user-data-dir={tmp_path / 'profile'}"]
    subprocess.run(base + [f"--screenshot={shot}", "--window-size=1100,1800", page.as_uri()],
                   check=True, capture_output=True, timeout=90)
    pixels = _png_pixels(shot).astype(int)
    assert pixels.shape[:2] == (1800, 1100)
    assert pixels.std() > 20 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50, "a blank page"
    red = (pixels[..., 0] > 150) & (pixels[..., 1] < 90) & (pixels[..., 2] < 80)
    assert red[:300].sum() > 5000, "the red verdict banner at the top"
    # the plot's points, drawn at 75% opacity on white: blue within tolerance, orange carrying the error on
    blue = np.abs(pixels - (87, 153, 199)).sum(-1) < 60
    orange = np.abs(pixels - (236, 158, 89)).sum(-1) < 60
    assert blue[300:].sum() > 20 and orange[300:].sum() > 50, "the per-node error points are drawn"
    dom = subprocess.run(base + ["--dump-dom", page.as_uri()], check=True, capture_output=True, text=True,
                         timeout=90).stdout
    assert '<svg id="error-plot"' in dom and 'id="tolerance-line"' in dom and 'id="first-divergence-marker"' in dom
    assert dom.count('class="node-point"') == len(failing_report["nodes"])
    assert 'id="max-error-line"' in dom and "first divergence: gelu" in dom

