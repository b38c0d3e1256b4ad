"""The deep tester localizes deliberately broken rules to exactly the node and source line that uses them,
catches NaN/Inf and constant outputs with their cause, and runs from the API and the command line."""
from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import keras
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tracer.op_rules import Layout, all_targets, lookup, register, unregister
from tracer.op_rules.common import call_with_weights
from tests.helpers import randomize_bn
from tracer import convert_model
from tracer.cli import EXIT_CONVERT, EXIT_INPUT, EXIT_OK, EXIT_PARITY, main
from tracer.ir import Phys, ordered
from tracer.verify.deep import Stats, compare_value, deep_verify, make_inputs, to_torch_order

HERE = Path(__file__).resolve()


def line_of(marker: str) -> int:
    """The line of this file that carries ``# <- marker``."""
    lines = HERE.read_text().splitlines()
    hits = [i + 1 for i, text in enumerate(lines) if text.rstrip().endswith(f"# <- {marker}")]
    assert len(hits) == 1, marker
    return hits[0]


class BugNet(nn.Module):
    """Every op a broken rule below targets appears once, on its own marked line."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.mix = nn.Conv2d(8, 8, 1)
        self.head = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x):
        y = self.stem(x)  # <- stem
        y = self.bn(y)  # <- bn
        y = F.gelu(y)  # <- gelu
        y = y.transpose(2, 3)  # <- transpose
        y = torch.relu(self.mix(y))  # <- relu
        return self.head(y.flatten(1))  # <- head


@contextmanager
def broken(targets: tuple, fn: Callable | None, layout: Any = None):
    """Register ``fn`` over the rules of ``targets`` (or, with ``fn=None``, remove them) for the duration;
    the originals come back after."""
    direct = set(all_targets())
    saved = {t: lookup(t) for t in targets}
    if fn is None:
        unregister(*targets)
    else:
        register(targets, fn, layout, override=True)
    try:
        yield
    finally:
        for t, r in saved.items():
            if r is not None and t in direct:
                register([t], r.fn, r.layout, override=True)
            else:
                unregister(t)


def conv_tf_same_padding(node, ctx):
    """Broken: TF's 'same' padding pads (0, 1) after a stride where PyTorch pads (1, 1)."""
    m = node.module
    layer = keras.layers.Conv2D(m.out_channels, m.kernel_size, strides=m.stride,
                                padding="same" if any(m.padding) else "valid", name=ctx.name(node))
    kernel = np.transpose(m.weight.detach().numpy(), (2, 3, 1, 0))
    return call_with_weights(layer, ctx.input(node, 0), [kernel, m.bias.detach().numpy()])


def bn_keras_epsilon(node, ctx):
    """Broken: Keras's default epsilon 1e-3 instead of the module's 1e-5."""
    m = node.module
    layer = keras.layers.BatchNormalization(axis=-1, epsilon=1e-3, name=ctx.name(node))
    weights = [t.detach().numpy() for t in (m.weight, m.bias, m.running_mean, m.running_var)]
    return call_with_weights(layer, ctx.input(node, 0), weights)


def conv_kernel_hw_swapped(node, ctx):
    """Broken weight transfer: the kernel permuted to (kw, kh, in, out) instead of (kh, kw, in, out)."""
    m = node.module
    x = keras.layers.ZeroPadding2D(m.padding)(ctx.input(node, 0))
    layer = keras.layers.Conv2D(m.out_channels, m.kernel_size, strides=m.stride, name=ctx.name(node))
    kernel = np.transpose(m.weight.detach().numpy(), (3, 2, 1, 0))
    return call_with_weights(layer, x, [kernel, m.bias.detach().numpy()])


def transpose_forgotten(node, ctx):
    """Broken: the axes are never swapped (same shape because H == W)."""
    return ctx.input(node, 0)


def gelu_tanh(node, ctx):
    """Broken: the tanh approximation where PyTorch computes the exact erf GELU."""
    return keras.ops.gelu(ctx.input(node, 0), approximate=True)


def relu_as_log(node, ctx):
    """Broken: NaN for negative inputs."""
    return keras.ops.log(ctx.input(node, 0))


def linear_ignores_input(node, ctx):
    """Broken: a Dense layer with a zero kernel, so the output is the bias whatever the input."""
    m = node.module
    layer = keras.layers.Dense(m.out_features, name=ctx.name(node))
    kernel = np.zeros((m.in_features, m.out_features), np.float32)
    return call_with_weights(layer, ctx.input(node, 0), [kernel, m.bias.detach().numpy()])


BROKEN = {  # case -> (targets, broken rule, layout, node it must be found at, marker of its line)
    "padding": ((nn.Conv2d,), conv_tf_same_padding, Layout.CHANNELS_LAST, "stem", "stem"),
    "bn_epsilon": ((nn.BatchNorm2d,), bn_keras_epsilon, Layout.CHANNELS_LAST, "bn", "bn"),
    "permutation": (("transpose",), transpose_forgotten, Layout.TORCH, "transpose", "transpose"),
    "weight_permutation": ((nn.Conv2d,), conv_kernel_hw_swapped, Layout.CHANNELS_LAST, "stem", "stem"),
    "gelu_variant": ((F.gelu,), gelu_tanh, Layout.ANY, "gelu", "gelu"),
}


def _bugnet() -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(BugNet()).eval()


def _convert(model: nn.Module) -> Any:
    return convert_model(model, torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)),
                         raise_on_mismatch=False, n_random=1)


def test_intact_rules_pass_every_node(tmp_path: Path):
    model = _bugnet()
    result = _convert(model)
    report = deep_verify(model, result, gradients=False)
    assert report.ok and report.exit_code == EXIT_OK, report.summary()
    assert report.first_divergence is None
    ops = {n.name for n in ordered(result.graph) if n.kind.startswith("call") and not n.is_constant}
    assert {n.name for n in report.nodes} == ops >= {"stem", "bn", "gelu", "transpose", "relu", "flatten", "head"}
    assert report.max_node_error < 1e-5
    html = report.save(tmp_path, title="BugNet")  # the API's report.json + report.html
    saved = json.loads((tmp_path / "report.json").read_text())
    assert html == tmp_path / "report.html" and saved["verify"]["verdict"] == "parity"
    assert len(saved["verify"]["nodes"]) == len(report.nodes) and "<svg id='error-plot'" in html.read_text()


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_rule_is_localized_to_its_node_and_line(case):
    targets, fn, layout, node, marker = BROKEN[case]
    model = _bugnet()
    with broken(targets, fn, layout):
        result = _convert(model)
        report = deep_verify(model, result, gradients=False)
    assert not report.ok and report.exit_code == 1
    first = report.first_divergence
    assert first is not None, report.summary()
    assert first.name == node, report.summary()
    assert (first.file, first.line) == (str(HERE), line_of(marker)), first
    assert first.rule == fn.__name__ and first.cause == "tolerance"
    assert [d.name for d in report.divergences] == [node], "later nodes only propagate the error"
    assert first.torch != first.keras and np.isfinite(first.torch.std)
    text = report.summary()
    assert f"{node} (" in text and f"{HERE}:{line_of(marker)}" in text and fn.__name__ in text
    assert lookup(targets[0]).fn is not fn, "the original rule is back"


def test_fp32_tflite_is_compared_node_by_node():
    torch.manual_seed(0)
    model = _bugnet()
    sample = torch.randn(2, 3, 8, 8)
    good = deep_verify(model, convert_model(model, sample, tflite=["fp32"], n_random=1), n_inputs=1, gradients=False)
    assert good.ok and {"bn", "relu"} <= {n.name for n in good.tflite_nodes}, good.summary()
    with broken((nn.BatchNorm2d,), bn_keras_epsilon, Layout.CHANNELS_LAST):
        result = convert_model(model, sample, tflite=["fp32"], n_random=1, raise_on_mismatch=False)
    bad = deep_verify(model, result, n_inputs=1, gradients=False)
    (problem,) = [p for p in bad.problems if p.kind == "tflite"]
    assert problem.where == f"bn at {HERE}:{line_of('bn')}" and "fp32 TFLite" in problem.message


def test_keras_only_nan_is_reported_with_its_cause():
    model = _bugnet()
    with broken((torch.relu,), relu_as_log, Layout.ANY):
        report = deep_verify(model, _convert(model), gradients=False)
    first = report.first_divergence
    assert first.name == "relu" and first.cause == "nonfinite" and first.line == line_of("relu")
    assert "Keras has NaN/Inf" in first.detail and first.keras.nonfinite > 0 and first.torch.nonfinite == 0
    where = {(p.kind, p.where) for p in report.problems}
    assert ("nonfinite", f"relu at {HERE}:{line_of('relu')}") in where  # the intermediate, with its source line
    assert ("nonfinite", "output 0") in where and report.exit_code == EXIT_PARITY  # and the output it reaches


def test_nan_in_pytorch_too_is_a_warning_not_a_failure():
    torch.manual_seed(0)
    class LogNet(nn.Module):
        def forward(self, x):
            return torch.log(x) * 2.0

    model = LogNet()
    report = deep_verify(model, convert_model(model, torch.rand(2, 6), raise_on_mismatch=False), n_inputs=2,
                         gradients=False)
    assert report.ok, report.summary()
    assert any("PyTorch itself produces NaN/Inf" in w for w in report.warnings)


def test_constant_output_is_named():
    model = _bugnet()
    with broken((nn.Linear,), linear_ignores_input, Layout.TORCH):
        report = deep_verify(model, _convert(model), n_inputs=2, gradients=False)
    kinds = {p.kind for p in report.problems}
    assert "constant_output" in kinds, report.summary()
    assert report.first_divergence.name == "head"
    assert "does not depend on its input" in next(p.message for p in report.problems if p.kind == "constant_output")


def test_user_inputs_and_uniform_distribution():
    model = _bugnet()
    result = _convert(model)
    user = [[np.full((3, 3, 8, 8), 0.5, np.float32)]]
    report = deep_verify(model, result, n_inputs=2, distribution="uniform", inputs=user, gradients=False)
    assert report.ok and report.inputs["trials"] == ["uniform0", "uniform1 (batch 4)", "user0"]
    assert all(x.min() >= 0 for _, xs in make_inputs([(2, 3)], ["float32"], 3, "uniform") for x in xs)
    with pytest.raises(Exception, match="distribution"):
        deep_verify(model, result, distribution="cauchy", gradients=False)


def test_to_torch_order_undoes_layouts():
    x = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)  # torch NCHW
    nhwc = Phys.channels_last(4)
    assert np.array_equal(to_torch_order(np.transpose(x, nhwc.perm), nhwc), x)
    flat = Phys((0, 1), flat=((3, 4, 5), (1, 2, 0)))  # torch x.flatten(1) held as an NHWC flattening
    keras_value = np.transpose(x, (0, 2, 3, 1)).reshape(2, -1)
    assert np.array_equal(to_torch_order(keras_value, flat), x.reshape(2, -1))


def test_compare_value_causes():
    a = np.array([1.0, 2.0, np.nan], np.float32)
    assert compare_value(a, a.copy())[2] == ""
    assert compare_value(a, np.array([1.0, 2.0, 3.0], np.float32))[2] == "nonfinite"
    assert compare_value(a, np.zeros(2, np.float32))[2] == "shape"
    assert Stats.of(a).nonfinite == 1 and Stats.of(a).max == 2.0


# ---- command line ---------------------------------------------------------------------------------
MODEL_SRC = '''
import torch
import torch.nn as nn
import torch.nn.functional as F


class Net(nn.Module):
    def __init__(self, width=8):
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.head = nn.Linear(width, 4)

    def forward(self, x):
        y = F.gelu(self.bn(self.conv(x)))
        return self.head(y.mean((2, 3)))
'''


@pytest.fixture()
def model_file(tmp_path: Path) -> Path:
    path = tmp_path / "net.py"
    path.write_text(MODEL_SRC)
    return path


def test_cli_convert_deep_then_verify_outdir(model_file: Path, tmp_path: Path, capsys):
    out = tmp_path / "out"
    code = main(["convert", f"{model_file}:Net", "--input-shape", "2,3,8,8", "--init-args", '{"width": 6}',
                 "-o", str(out), "--verify", "deep", "--random-inputs", "1", "-q"])
    assert code == EXIT_OK, capsys.readouterr()
    report = json.loads((out / "report.json").read_text())
    assert report["verify"]["ok"] and report["verify"]["gradients"]["ok"]
    assert report["invocation"]["init_args"] == '{"width": 6}'
    assert "<svg id='error-plot'" in (out / "report.html").read_text()
    (out / "report.html").unlink()
    code = main(["verify", str(out), "--random-inputs", "1", "--distribution", "uniform", "-q"])
    assert code == EXIT_OK, capsys.readouterr()
    again = json.loads((out / "report.json").read_text())["verify"]
    assert again["inputs"]["distribution"] == "uniform" and again["facts"]["saved_model_parity"]["ok"]
    # no --weights: all 8 tensors taken back from model.keras (its layer names differ from this process's)
    assert any("8 PyTorch tensors restored from" in w and "not restorable" not in w for w in again["warnings"])
    assert (out / "report.html").is_file()


def test_cli_deep_failure_exit_code_and_report(model_file: Path, tmp_path: Path, capsys):
    out = tmp_path / "bad"
    with broken((F.gelu,), gelu_tanh, Layout.ANY):
        code = main(["convert", f"{model_file}:Net", "--input-shape", "2,3,8,8", "-o", str(out), "--verify", "deep",
                     "--random-inputs", "1", "--tol", "1e-6", "-q"])
    assert code == EXIT_PARITY
    first = json.loads((out / "report.json").read_text())["verify"]["first_divergence"]
    assert first["name"] == "gelu" and first["line"] == 15 and first["file"] == str(model_file.resolve())
    assert "first divergence: gelu" in (out / "report.html").read_text()


def test_cli_verify_bad_folder(tmp_path: Path, capsys):
    assert main(["verify", str(tmp_path / "nothing")]) == EXIT_INPUT
    assert "report.json not found" in capsys.readouterr().err


def test_cli_verify_exit_code_when_the_model_no_longer_converts(model_file: Path, tmp_path: Path, capsys):
    out = tmp_path / "out"
    assert main(["convert", f"{model_file}:Net", "--input-shape", "2,3,8,8", "-o", str(out), "--no-saved-model",
                 "--random-inputs", "1", "-q"]) == EXIT_OK
    with broken((F.gelu,), None):  # the GELU rule is gone: the model cannot be converted again
        code = main(["verify", str(out), "--random-inputs", "1", "-q"])
    assert code == EXIT_CONVERT
    err = capsys.readouterr().err
    assert "torch.nn.functional.gelu" in err and f"{model_file.resolve()}:15" in err


def test_graph_that_differs_from_the_model_is_reported():
    torch.manual_seed(0)
    class Frozen(nn.Module):
        def forward(self, x):
            return x * float(x.shape[0])  # the batch size is frozen into the captured graph

    model = Frozen()
    report = deep_verify(model, convert_model(model, torch.randn(2, 3), raise_on_mismatch=False), n_inputs=2,
                         gradients=False)
    assert any(p.kind == "capture" and "normal1 (batch 4)" in p.message for p in report.problems), report.summary()


def test_report_json_is_strict():
    model = _bugnet()
    with broken((torch.relu,), relu_as_log, Layout.ANY):
        report = deep_verify(model, _convert(model), n_inputs=1, gradients=False)
    text = report.to_json()
    def refuse(constant):
        raise AssertionError(f"{constant} is not JSON")

    assert json.loads(text, parse_constant=refuse)["first_divergence"]["error"] == "inf"
