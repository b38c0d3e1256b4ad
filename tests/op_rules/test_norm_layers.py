"""Parity sweeps for op_rules/norm_layers.py: LayerNorm, GroupNorm, InstanceNorm.

Affine parameters and running statistics are randomized, so a transposed gamma or a wrong
statistic cannot hide behind ones and zeros.
"""
from __future__ import annotations

import copy
from typing import Callable

import numpy as np

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tests.helpers import FP32_TOL, assert_converts
from tracer import convert_model
from tracer.verify.parity import run_keras

B, C, H, W = 2, 8, 5, 6


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif t.is_floating_point():
                t.copy_(torch.randn(t.shape, generator=g) * 0.5 + (1.0 if name.endswith("weight") else 0.0))
    return model


class ConvThen(nn.Module):
    """``fn(self, conv(x))`` with ``norm`` as ``self.norm``; ``conv=False``: ``fn(self, x)``."""

    def __init__(self, norm: nn.Module | None, fn: Callable, dims: int = 2, conv: bool = True):
        super().__init__()
        conv_cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
        self.conv = conv_cls(3, C, 3, padding=1) if conv else None
        self.norm = norm
        self.fn = fn

    def forward(self, x):
        return self.fn(self, self.conv(x) if self.conv is not None else x)


def image(dims: int = 2, c: int = 3) -> torch.Tensor:
    shape = {1: (B, c, W), 2: (B, c, H, W), 3: (B, c, 3, H, W)}[dims]
    return torch.randn(shape, generator=torch.Generator().manual_seed(1))


# ---- LayerNorm -------------------------------------------------------------------------------

@pytest.mark.parametrize("norm", [
    pytest.param(nn.LayerNorm(C), id="affine"),
    pytest.param(nn.LayerNorm(C, elementwise_affine=False), id="no_affine"),
    pytest.param(nn.LayerNorm(C, bias=False), id="no_bias"),
    pytest.param(nn.LayerNorm(C, eps=1e-3), id="eps"),
])
def test_layer_norm_on_tokens(norm):
    torch.manual_seed(0)
    assert_converts(randomize(ConvThen(norm, lambda m, x: m.norm(x), conv=False)), torch.randn(B, 7, C))


@pytest.mark.parametrize("norm, fn", [
    pytest.param(nn.LayerNorm(C), lambda m, y: m.norm(y.permute(0, 2, 3, 1)).permute(0, 3, 1, 2), id="channels"),
    pytest.param(nn.LayerNorm(W), lambda m, y: m.norm(y), id="width"),
    pytest.param(nn.LayerNorm((H, W)), lambda m, y: m.norm(y), id="height_width"),
    pytest.param(nn.LayerNorm((C, H, W)), lambda m, y: m.norm(y), id="chw"),
    pytest.param(nn.LayerNorm((W, C)), lambda m, y: m.norm(y.permute(0, 2, 3, 1)), id="width_channels"),
    pytest.param(nn.LayerNorm(C * H * W), lambda m, y: m.norm(y.flatten(1)), id="flattened"),
])
@pytest.mark.parametrize("channels_last_io", [False, True], ids=["nchw_io", "nhwc_io"])
def test_layer_norm_on_image_maps(norm, fn, channels_last_io):
    assert_converts(randomize(ConvThen(norm, fn)), image(), channels_last_io=channels_last_io)


def test_layer_norm_over_channels_moves_no_data():
    """ConvNeXt's channels-last LayerNorm between convolutions: NHWC all the way."""
    model = randomize(ConvThen(nn.LayerNorm(C), lambda m, y: m.norm(y.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)))
    result = assert_converts(model, image(), channels_last_io=True)
    assert result.transpose_count == 0, result.transposes


class FunctionalLayerNorm(nn.Module):
    def __init__(self, affine: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(C)) if affine else None
        self.bias = nn.Parameter(torch.randn(C)) if affine else None

    def forward(self, x):
        return F.layer_norm(x, (C,), self.weight, self.bias, eps=1e-6)


@pytest.mark.parametrize("affine", [False, True])
def test_functional_layer_norm(affine):
    torch.manual_seed(0)
    assert_converts(FunctionalLayerNorm(affine), torch.randn(B, 4, C))


# ---- GroupNorm / InstanceNorm ------------------------------------------------------------------

@pytest.mark.parametrize("groups", [1, 2, 4, 8])
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_group_norm(groups, dims):
    assert_converts(randomize(ConvThen(nn.GroupNorm(groups, C), lambda m, y: m.norm(y), dims)), image(dims))


def test_group_norm_variants():
    torch.manual_seed(0)
    assert_converts(randomize(ConvThen(nn.GroupNorm(2, C, eps=1e-3, affine=False), lambda m, y: m.norm(y))), image())
    assert_converts(ConvThen(None, lambda m, y: F.group_norm(y, 4, eps=1e-4)), image(), channels_last_io=True)
    assert_converts(randomize(ConvThen(nn.GroupNorm(2, C), lambda m, y: m.norm(y), conv=False)), torch.randn(B, C))


@pytest.mark.parametrize("affine", [False, True], ids=["plain", "affine"])
@pytest.mark.parametrize("track", [False, True], ids=["batch_stats", "running_stats"])
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_instance_norm(dims, affine, track):
    cls = {1: nn.InstanceNorm1d, 2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}[dims]
    model = randomize(ConvThen(cls(C, affine=affine, track_running_stats=track), lambda m, y: m.norm(y), dims))
    assert_converts(model, image(dims))


def test_functional_instance_norm():
    assert_converts(ConvThen(None, lambda m, y: F.instance_norm(y, eps=1e-3)), image(), channels_last_io=True)



class NearConstantChannels(nn.Module):
    """GroupNorm then InstanceNorm where two channels vary 300x less than the others of their
    group (fuzzer graph 1683's shape): after the GroupNorm they are nearly constant, so the
    InstanceNorm magnifies any rounding in the GroupNorm's output by ~300."""

    def __init__(self):
        super().__init__()
        self.conv, self.gn, self.inorm = nn.Conv2d(4, 4, 1), nn.GroupNorm(2, 4), nn.InstanceNorm2d(4)
        with torch.no_grad():
            self.conv.weight.copy_(torch.diag(torch.tensor([1.0, 0.003, 1.0, 0.003])).reshape(4, 4, 1, 1))
            self.conv.bias.copy_(torch.tensor([0.0, 0.5, 0.2, -0.3]))

    def forward(self, x):
        return self.inorm(self.gn(self.conv(x)))


def test_group_norm_statistics_as_precise_as_pytorch():
    """The group statistics are reduced one axis at a time and normalize ``x - mean``: with keras
    GroupNormalization (a long sequential sum over non-contiguous axes, ``x * inv + (beta - mean *
    inv)``) this model was 1.7e-5 off float64 where PyTorch fp32 is 2.8e-6."""
    model = NearConstantChannels().eval()
    x = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(1))
    result = assert_converts(model, x)
    got = run_keras(result.keras_model, [x.numpy()], result.input_layouts, result.output_layouts)[0]
    with torch.no_grad():
        want = copy.deepcopy(model).double()(x.double()).numpy()
    assert np.abs(got - want).max() <= FP32_TOL * max(1.0, np.abs(want).max())


# ---- torch.export path: aten.layer_norm / aten.group_norm ----------------------------------------

class Norms(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, C, 3, padding=1)
        self.gn = nn.GroupNorm(4, C)
        self.ln = nn.LayerNorm(C)

    def forward(self, x):
        y = self.gn(self.conv(x))
        return self.ln(y.flatten(2).transpose(1, 2))


def test_norms_through_torch_export():
    model = randomize(Norms()).eval()
    result = convert_model(model, image(), capture="export", n_random=2, raise_on_mismatch=False)
    assert result.report.ok, result.report.summary()
    assert result.facts()["capture"]["method"] == "torch.export"
    rules = result.facts()["ops_by_rule"]
    assert rules.get("aten_as_layer_norm") == 1 and rules.get("aten_as_group_norm") == 1, rules


@pytest.mark.parametrize("dims, affine, track",
                         [(1, False, False), (2, False, True), (3, True, False), (2, True, True)])
def test_instance_norm_through_torch_export(dims, affine, track):
    """aten.instance_norm stays one op (its decomposition, _native_batch_norm_legit.no_stats over a
    (1, B*C, ...) view, was refused); running statistics randomized, parity at another batch size."""
    cls = {1: nn.InstanceNorm1d, 2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}[dims]
    model = randomize(ConvThen(cls(C, affine=affine, track_running_stats=track), lambda m, y: m.norm(y), dims)).eval()
    result = convert_model(model, image(dims), capture="export", n_random=2, raise_on_mismatch=False)
    assert result.report.ok, result.report.summary()
    assert result.facts()["ops_by_rule"].get("instance_norm") == 1, result.facts()["ops_by_rule"]


def test_instance_norm_as_the_whole_model():
    """A bare nn.InstanceNorm2d: fx cannot trace its own forward (a shape check), torch.export can."""
    model = randomize(nn.InstanceNorm2d(C, affine=False, track_running_stats=True))
    assert_converts(model, torch.randn(B, C, H, W, generator=torch.Generator().manual_seed(2)) * 3 + 1)
