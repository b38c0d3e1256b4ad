"""The torch.export capture path: fallback from fx, forced export, ATen rules, decomposition."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tracer.emitter.build import build_model
from tests.helpers import FP32_TOL, assert_converts, randomize_bn
from tests.test_pipeline import SmallCNN
from tracer import CaptureError, InputError, convert_model
from tracer.api import _output_layouts
from tracer.capture.export import capture_export
from tracer.ir import check_integrity, ordered
from tracer.verify.parity import check_parity
from tracer.passes.pipeline import run_passes

aten = torch.ops.aten


class ShapeAssert(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        assert x.shape[1] == 3, "expects RGB"
        return F.relu(self.bn(self.conv(x)))


class ShapeBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        if x.shape[-1] > 8:
            x = F.avg_pool2d(x, 2)
        return self.conv(x)


class LoopOverChannels(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)

    def forward(self, x):
        parts = [self.conv(x[:, 2 * i:2 * i + 2]) for i in range(x.shape[1] // 2)]
        return torch.cat(parts, 1).mean((2, 3))


class DictOverInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 3)

    def forward(self, *xs):
        return {f"y{i}": torch.tanh(self.fc(x)) * (i + 1) for i, x in enumerate(xs)}


class TorchAssert(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        torch._assert(x.shape[1] == 3, "expects RGB")
        return F.relu(self.conv(x))


@pytest.mark.parametrize("model, inputs, code", [
    (ShapeAssert, ((2, 3, 8, 8),), "assert x.shape[1] == 3"),
    (ShapeBranch, ((2, 3, 16, 16),), "if x.shape[-1] > 8:"),
    (LoopOverChannels, ((2, 6, 8, 8),), "for i in range(x.shape[1] // 2)"),
    (DictOverInputs, ((2, 5), (2, 5)), "for i, x in enumerate(xs)"),
], ids=["shape-assert", "shape-branch", "loop-over-shape", "dict-over-varargs"])
def test_fx_failure_falls_back_to_export_with_parity(model, inputs, code):
    torch.manual_seed(0)
    result = assert_converts(randomize_bn(model()), *[torch.randn(s) for s in inputs])
    how = result.facts()["capture"]
    assert how["method"] == "torch.export"
    assert how["reason"].startswith(f"torch.fx could not trace {model.__name__}: ")
    assert f"{__file__}:" in how["reason"] and code in how["reason"]  # the user's line that stopped fx
    assert how["decomposed"] == []


def test_fx_is_used_when_it_can_trace():
    torch.manual_seed(0)
    result = assert_converts(TorchAssert(), torch.randn(2, 3, 8, 8))  # fx traces torch._assert
    assert result.facts()["capture"] == {"method": "fx", "reason": "torch.fx traced the model"}


def test_progress_says_which_capture_and_why():
    torch.manual_seed(0)
    said: list[str] = []
    convert_model(ShapeBranch(), torch.randn(2, 3, 16, 16), n_random=1, progress=said.append)
    assert said[0] == "capture: with torch.fx"
    assert said[1].startswith("capture: ") and said[1].endswith("s")  # the stage's time
    assert said[2].startswith("captured with torch.export instead: torch.fx could not trace ShapeBranch")


def test_capture_option_is_checked_and_fx_only_raises():
    torch.manual_seed(0)
    with pytest.raises(InputError, match="Received: capture='jit'"):
        convert_model(SmallCNN(), torch.randn(1, 3, 8, 8), capture="jit")
    with pytest.raises(CaptureError, match="torch.fx could not trace ShapeAssert"):
        convert_model(ShapeAssert(), torch.randn(1, 3, 8, 8), capture="fx")


def test_value_dependent_control_flow_fails_in_both_with_the_line():
    torch.manual_seed(0)
    class DataDependent(nn.Module):
        def forward(self, x):
            if x.sum() > 0:
                return x * 2
            return x

    with pytest.raises(CaptureError) as info:
        convert_model(DataDependent(), torch.randn(2, 3))
    text = str(info.value)
    assert "torch.fx could not trace DataDependent" in text and "torch.export could not capture" in text
    assert "if x.sum() > 0:" in text and "torch.where" in text


def test_forced_export_small_cnn_parity_and_ir():
    torch.manual_seed(0)
    model = randomize_bn(SmallCNN())
    result = assert_converts_export(model, torch.randn(2, 3, 8, 8))
    assert result.facts()["capture"]["method"] == "torch.export"
    assert result.transpose_count == 1  # as on the fx path: the NCHW input only
    nodes = ordered(result.graph)
    assert [n.name for n in nodes if n.kind == "placeholder"] == ["x"]  # weights are constants, not inputs
    stem = next(n for n in nodes if n.target is aten.conv2d.default and n.module_path == "stem")
    assert stem.source.file.endswith("test_pipeline.py") and "self.stem(x)" in stem.source.code
    weight = result.graph.nodes[stem.inputs[1]]["op"]
    assert weight.kind == "get_attr" and torch.equal(weight.value, model.stem.weight)
    assert weight.kw["trainable"] and weight.module_path == "stem"
    check_integrity(result.graph)


def assert_converts_export(model: nn.Module, *inputs: torch.Tensor):
    model.eval()
    result = convert_model(model, inputs if len(inputs) > 1 else inputs[0], capture="export", n_random=2,
                           raise_on_mismatch=False)
    assert result.report.ok, result.report.summary()
    return result


class ManyOps(nn.Module):
    """One of most ATen ops the rules map, on an image map and tokens. ``core``: leave out what
    the core ATen decompositions lower to ops without rules here (where, index)."""

    def __init__(self, core: bool = False):
        super().__init__()
        self.core = core
        self.conv = nn.Conv2d(3, 8, 3, padding=1, padding_mode="zeros" if core else "reflect")
        self.bn = nn.BatchNorm2d(8)
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)
        self.fc = nn.Linear(4, 5)
        self.head = nn.Linear(10, 3)

    def forward(self, x):
        y = F.silu(self.bn(self.conv(x)))
        y = F.gelu(F.max_pool2d(y, 2)) + torch.sigmoid(F.avg_pool2d(y, 2)) * 2 - 1 / (torch.tanh(y[:, :, ::2, ::2]) + 3)
        if not self.core:
            y = F.hardtanh(F.leaky_relu(y, 0.2)) + F.elu(y) + F.hardswish(y) - F.softplus(y)
        y = self.up(F.relu(y))
        y = F.interpolate(y, scale_factor=2, mode="nearest") + F.interpolate(y, scale_factor=2, mode="bilinear")
        y = F.pad(y, (1, 1, 0, 2)) ** 2
        tokens = F.log_softmax(self.fc(y.flatten(2).transpose(1, 2)), -1)
        z = F.adaptive_avg_pool2d(y, 1).squeeze(-1).squeeze(-1)
        z = torch.cat([z, z[:, 1:3], z.unsqueeze(1).mean(1), 1 - z[:, :2]], 1).view(-1, 12)[:, :10]
        z = self.head(z.permute(1, 0).t().contiguous()).clamp(-1, 1)
        # 3 of the 4 channels: (4, 4) + (4, 1) in eager Keras 3.15 (TF) is taken for a bias add (see report)
        w = torch.amax(y, dim=(2, 3))[:, :3] / 3 + x[:, 0, 0, :1].clone() + y.sum(dim=(1, 2)).mean(-1, keepdim=True)
        return tokens.reshape(tokens.shape[0], -1), z.softmax(1), w


@pytest.mark.parametrize("core_aten", [False, True], ids=["as-exported", "core-aten"])
def test_aten_rules_match_torch(core_aten):
    torch.manual_seed(0)
    model = randomize_bn(ManyOps(core=core_aten)).eval()
    x = torch.randn(2, 3, 16, 16)
    graph = capture_export(model, (x,), reason="test", core_aten=core_aten)
    targets = {n.target for n in ordered(graph) if n.kind == "call_function"}
    if core_aten:  # lowered, and tuple results put back into one-output forms
        assert {aten.convolution.default, aten.addmm.default, aten.batch_norm.default, aten.max_pool2d.default} <= targets
        assert aten._native_batch_norm_legit_no_training.default not in targets
    else:
        assert {aten.conv2d.default, aten.linear.default, aten.batch_norm.default, aten.slice.Tensor} <= targets
    graph = run_passes(graph)
    keras_model, _ = build_model(graph)
    out = next(n for n in ordered(graph) if n.kind == "output")
    report = check_parity(model, keras_model, [x.numpy()], [n.layout for n in ordered(graph) if n.kind == "placeholder"],
                          _output_layouts(out), n_random=1, tol=FP32_TOL)
    assert report.ok, report.summary()


def test_inplace_ops_are_functionalized_and_unsupported_ops_decomposed():
    torch.manual_seed(0)
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(5, 4))
            self.b = nn.Parameter(torch.randn(4))
            self.w2 = nn.Parameter(torch.randn(4, 3))
            self.act = nn.ReLU(inplace=True)

        def forward(self, x):
            y = self.act(torch.addmm(self.b, x, self.w))
            y += 1
            z = y @ self.w2  # aten.matmul with a constant matrix: a Dense layer (op_rules/matmul.py)
            return torch.addcdiv(z, z, z * z + 1, value=0.5)  # no rule, decomposes to div, mul and add

    result = assert_converts_export(Mixed(), torch.randn(2, 5))
    facts = result.facts()
    assert facts["capture"]["decomposed"] == ["aten.addcdiv.default"]
    assert facts["ops_by_rule"]["matrix_product"] == 1 and facts["ops_by_rule"]["aten_as_matmul"] == 1  # Dense
    assert not any(n.target._schema.is_mutable for n in ordered(result.graph)
                   if isinstance(n.target, torch._ops.OpOverload))
    # the two matrix products; constants are Dense kernels too, on a (1, 1) tensor of ones (emitter/layers.py)
    assert sum(type(layer).__name__ == "Dense" and layer.kernel.shape[0] > 1
               for layer in result.keras_model.layers) == 2
