"""Linear: Dense on the last axis, EinsumDense (one axis times the kernel) for token-mixing Linears on transposed tokens."""
from __future__ import annotations

import keras
import numpy as np
import pytest
import torch
import torch.nn as nn

import tracer  # noqa: F401  (registers the serializable layers for loading)
from tests.helpers import assert_converts
from tracer.verify.gradcheck import check_gradients


class MixerBlock(nn.Module):
    """MLP-Mixer: token MLP on ``x.transpose(1, 2)``, channel MLP on ``x``."""

    def __init__(self, tokens: int, dim: int):
        super().__init__()
        self.n1, self.n2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.tok = nn.Sequential(nn.Linear(tokens, 2 * tokens), nn.GELU(), nn.Linear(2 * tokens, tokens))
        self.ch = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        x = x + self.tok(self.n1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.ch(self.n2(x))


class SpatialGating(nn.Module):
    """gMLP's gating unit: split channels, normalize one half, Linear over tokens (bias-free here), gate."""

    def __init__(self, tokens: int, dim: int, bias: bool):
        super().__init__()
        self.norm = nn.LayerNorm(dim // 2)
        self.proj = nn.Linear(tokens, tokens, bias=bias)

    def forward(self, x):
        u, v = x.chunk(2, dim=-1)
        v = self.proj(self.norm(v).transpose(-1, -2))
        return u * v.transpose(-1, -2)


def _kinds(result) -> list[str]:
    return [type(layer).__name__ for layer in result.keras_model.layers]


def test_mixer_token_mlp_moves_no_data():
    torch.manual_seed(0)
    model = nn.Sequential(MixerBlock(12, 8), MixerBlock(12, 8)).eval()
    result = assert_converts(model, torch.randn(2, 12, 8))
    assert result.transpose_count == 0, result.facts()["layout_conversions"]
    assert _kinds(result).count("EinsumDense") == 4 and _kinds(result).count("Dense") == 4


@pytest.mark.parametrize("bias", [True, False])
def test_gmlp_spatial_gating_moves_no_data(bias):
    torch.manual_seed(0)
    result = assert_converts(SpatialGating(10, 12, bias).eval(), torch.randn(3, 10, 12))
    assert result.transpose_count == 0, result.facts()["layout_conversions"]
    assert "EinsumDense" in _kinds(result)


def test_token_linear_on_a_4d_tensor():
    """A Linear over the second-to-last physical axis of a rank-4 tensor (heads x tokens x dim)."""
    torch.manual_seed(0)
    class HeadTokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(5, 7)

        def forward(self, x):  # (B, H, N, D): mix N
            return self.fc(x.transpose(-1, -2)).transpose(-1, -2) * 2.0
    result = assert_converts(HeadTokens().eval(), torch.randn(2, 3, 5, 4))
    assert result.transpose_count == 0 and "EinsumDense" in _kinds(result)


def test_axis_dense_saves_and_loads_in_safe_mode(tmp_path):
    torch.manual_seed(0)
    model = MixerBlock(6, 4).eval()
    x = torch.randn(1, 6, 4)
    result = assert_converts(model, x)
    path = tmp_path / "mixer.keras"
    result.keras_model.save(path)
    loaded = keras.models.load_model(path, safe_mode=True)
    np.testing.assert_allclose(np.asarray(loaded(x.numpy())), model(x).detach().numpy(), atol=1e-5)


def test_axis_dense_trains_like_the_torch_linear():
    torch.manual_seed(0)
    model = MixerBlock(6, 4).eval()
    result = assert_converts(model, torch.randn(2, 6, 4))
    report = check_gradients(model, result, [np.zeros((2, 6, 4), np.float32)], batch=4)
    assert report.ok, report.summary()
    trainable = [k for k, p in model.named_parameters() if p.requires_grad]
    assert sorted(d.name for d in report.params) == sorted(trainable)


def test_axis_dense_exports_to_litert_without_transposes():
    torch.manual_seed(0)
    from tests.test_tflite import tflite_parity
    result = tflite_parity(MixerBlock(12, 8).eval(), torch.randn(2, 12, 8))
    ops = result.tflite_reports["fp32"].ops
    assert "BATCH_MATMUL" in ops and "TRANSPOSE" not in ops, ops


class TokenLinear(nn.Module):
    """A Linear over axis 1 of (B, C, L): the output's axis 1 and last axis can have one size."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.fc = nn.Linear(c_in, c_out)

    def forward(self, x):
        return torch.relu(self.fc(x.transpose(1, 2)).transpose(1, 2))


@pytest.mark.parametrize("c_in,c_out,length", [(5, 6, 6), (5, 7, 6), (4, 4, 4), (3, 5, 8)])
def test_token_linear_bias_on_its_own_axis(c_in, c_out, length):
    """Keras' EinsumDense adds its bias through keras.ops.add, whose bias_add shortcut adds a (C, 1) bias
    along the last axis when that axis also has C entries (found by the fuzzer: off by 3.0); the bias
    is then a weight of its own, added safely, and still trains like torch's."""
    torch.manual_seed(0)
    model = TokenLinear(c_in, c_out).eval()
    with torch.no_grad():
        model.fc.bias.mul_(10.0)  # a bias large enough that a wrong axis cannot hide in the tolerance
    result = assert_converts(model, torch.randn(2, c_in, length))
    report = check_gradients(model, result, [np.zeros((2, c_in, length), np.float32)], batch=4)
    assert report.ok, report.summary()


def test_linear_after_conv1d_keeps_its_bias_axis():
    """The fuzzer's minimized graph 1164: Conv1d(replicate) -> Linear(10 -> 4) with 4 channels."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(4, 4, 3, padding=1, padding_mode="replicate"), nn.Linear(10, 4)).eval()
    with torch.no_grad():
        model[1].bias.mul_(10.0)
    assert_converts(model, torch.randn(2, 4, 10))
