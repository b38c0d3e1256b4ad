"""Parity sweeps for op_rules/norm.py (BatchNorm) and op_rules/linear.py (Linear, and the
inference identities Dropout/Identity), with the Keras layers' hyper-parameters checked too."""
from __future__ import annotations

import keras
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tests.helpers import assert_converts, randomize_bn

B, C_IN, C, H, W, L = 2, 4, 6, 6, 5, 7


def sample(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def image() -> torch.Tensor:
    return sample(B, C_IN, H, W)


def keras_layers(result, cls: type) -> list:
    return [layer for layer in result.keras_model.layers if isinstance(layer, cls)]


# ---- BatchNorm -----------------------------------------------------------------------------------

class ConvBN(nn.Module):
    def __init__(self, bn: nn.Module, n: int = 2):
        super().__init__()
        torch.manual_seed(0)
        self.conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[n](C_IN, C, 3, padding=1)
        self.bn = bn

    def forward(self, x):
        return self.bn(self.conv(x))


class WrapBN(nn.Module):
    def __init__(self, bn: nn.Module):
        super().__init__()
        self.bn = bn

    def forward(self, x):
        return self.bn(x)


def check_bn_layer(result, torch_bn: nn.modules.batchnorm._BatchNorm) -> None:
    (layer,) = keras_layers(result, keras.layers.BatchNormalization)
    assert layer.epsilon == pytest.approx(torch_bn.eps, rel=1e-12)
    assert layer.momentum == pytest.approx(1.0 - torch_bn.momentum, rel=1e-12)
    np.testing.assert_array_equal(np.asarray(layer.moving_mean), torch_bn.running_mean.numpy())
    np.testing.assert_array_equal(np.asarray(layer.moving_variance), torch_bn.running_var.numpy())
    assert (layer.gamma is not None) == torch_bn.affine and (layer.beta is not None) == torch_bn.affine
    if torch_bn.affine:
        np.testing.assert_array_equal(np.asarray(layer.gamma), torch_bn.weight.detach().numpy())
        np.testing.assert_array_equal(np.asarray(layer.beta), torch_bn.bias.detach().numpy())


@pytest.mark.parametrize("momentum", [0.1, 0.3])
@pytest.mark.parametrize("eps", [1e-3, 1e-5])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
def test_batchnorm2d(eps, momentum, affine):
    bn = nn.BatchNorm2d(C, eps=eps, momentum=momentum, affine=affine)
    model = randomize_bn(ConvBN(bn))
    result = assert_converts(model, image())
    check_bn_layer(result, bn)


@pytest.mark.parametrize("channels_last_io", [False, True], ids=["nchw_io", "nhwc_io"])
def test_batchnorm2d_after_conv_adds_no_transpose(channels_last_io):
    result = assert_converts(randomize_bn(ConvBN(nn.BatchNorm2d(C))), image(), channels_last_io=channels_last_io)
    assert result.transpose_count == (0 if channels_last_io else 2), result.transposes


@pytest.mark.parametrize("eps,momentum", [(1e-5, 0.1), (1e-3, 0.3)])
def test_batchnorm1d_on_nc(eps, momentum):
    bn = nn.BatchNorm1d(C, eps=eps, momentum=momentum)
    result = assert_converts(randomize_bn(WrapBN(bn)), sample(B, C))
    check_bn_layer(result, bn)


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
@pytest.mark.parametrize("after_conv", [True, False], ids=["conv1d", "plain"])
def test_batchnorm1d_on_ncl(after_conv, affine):
    bn = nn.BatchNorm1d(C if after_conv else C_IN, momentum=0.3, affine=affine)
    model = ConvBN(bn, n=1) if after_conv else WrapBN(bn)
    result = assert_converts(randomize_bn(model), sample(B, C_IN, L))
    check_bn_layer(result, bn)


def test_batchnorm3d():
    bn = nn.BatchNorm3d(C, eps=1e-3)
    result = assert_converts(randomize_bn(ConvBN(bn, n=3)), sample(B, C_IN, 3, 4, 5))
    check_bn_layer(result, bn)


def test_batchnorm2d_on_plain_input():
    bn = nn.BatchNorm2d(C_IN)
    result = assert_converts(randomize_bn(WrapBN(bn)), image())
    check_bn_layer(result, bn)


@pytest.mark.parametrize("frozen", [True, False], ids=["frozen", "trainable"])
def test_batchnorm_frozen_parameters_make_layer_not_trainable(frozen):
    bn = nn.BatchNorm2d(C)
    bn.requires_grad_(not frozen)
    result = assert_converts(randomize_bn(ConvBN(bn)), image())
    (layer,) = keras_layers(result, keras.layers.BatchNormalization)
    assert layer.trainable is (not frozen)
    (conv,) = keras_layers(result, keras.layers.Conv2D)
    assert conv.trainable


def test_batchnorm_momentum_none_uses_keras_default():
    bn = nn.BatchNorm2d(C, momentum=None)
    result = assert_converts(randomize_bn(ConvBN(bn)), image())
    (layer,) = keras_layers(result, keras.layers.BatchNormalization)
    assert layer.momentum == pytest.approx(0.9)


def test_functional_batch_norm():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.conv = nn.Conv2d(C_IN, C, 3, padding=1)
            self.register_buffer("mean", torch.randn(C) * 0.3)
            self.register_buffer("var", torch.rand(C) + 0.5)
            self.weight = nn.Parameter(torch.rand(C) + 0.5)
            self.bias = nn.Parameter(torch.randn(C))

        def forward(self, x):
            return F.batch_norm(self.conv(x), self.mean, self.var, self.weight, self.bias, eps=1e-3)

    result = assert_converts(Net(), image())
    (layer,) = keras_layers(result, keras.layers.BatchNormalization)
    assert layer.epsilon == pytest.approx(1e-3)


def test_batchnorm_without_running_stats_raises_clear_error():
    from tracer import ConversionError

    with pytest.raises(ConversionError, match="track_running_stats=False"):
        assert_converts(ConvBN(nn.BatchNorm2d(C, track_running_stats=False)), image())


# ---- Linear --------------------------------------------------------------------------------------

class WrapLinear(nn.Module):
    def __init__(self, in_features: int, bias: bool = True, out_features: int = 5):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(in_features, out_features, bias=bias)

    def forward(self, x):
        return self.fc(x)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("shape", [(B, 7), (B, 3, 7), (B, 3, 4, 7), (B, 2, 3, 4, 7)], ids=["2d", "3d", "4d", "5d"])
def test_linear(shape, bias):
    result = assert_converts(WrapLinear(shape[-1], bias), sample(*shape))
    (dense,) = keras_layers(result, keras.layers.Dense)
    assert dense.use_bias is bias
    assert result.transpose_count == 0, result.transposes


def test_linear_frozen_is_not_trainable():
    model = WrapLinear(7)
    model.fc.requires_grad_(False)
    result = assert_converts(model, sample(B, 7))
    (dense,) = keras_layers(result, keras.layers.Dense)
    assert not dense.trainable


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_functional_linear(bias):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.weight = nn.Parameter(torch.randn(5, 7))
            self.bias = nn.Parameter(torch.randn(5)) if bias else None

        def forward(self, x):
            return F.linear(x, self.weight, self.bias)

    assert_converts(Net(), sample(B, 3, 7))


class ChannelsLastMLP(nn.Module):
    """ConvNeXt-style: conv, permute to NHWC, Linear over channels, permute back, conv."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(C_IN, C, 3, padding=1)
        self.fc = nn.Linear(C, 2 * C)
        self.conv2 = nn.Conv2d(2 * C, C, 1)

    def forward(self, x):
        y = self.fc(self.conv(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.conv2(y)


@pytest.mark.parametrize("channels_last_io", [False, True], ids=["nchw_io", "nhwc_io"])
def test_linear_over_channels_of_a_map_moves_no_data(channels_last_io):
    result = assert_converts(ChannelsLastMLP(), image(), channels_last_io=channels_last_io)
    assert result.transpose_count == (0 if channels_last_io else 2), result.transposes


def test_linear_on_last_axis_of_nchw_map():
    """A Linear over W of an NCHW conv output: the map must come back to torch order first."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.conv = nn.Conv2d(C_IN, C, 3, padding=1)
            self.fc = nn.Linear(W, 3)

        def forward(self, x):
            return self.fc(self.conv(x))

    assert_converts(Net(), image())


# ---- inference identities ------------------------------------------------------------------------

def layer_types(result) -> list[str]:
    return [type(x).__name__ for x in result.keras_model.layers]


class Passes(nn.Module):
    def __init__(self, layer: nn.Module | None = None, fn=None):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(C_IN, C, 3, padding=1)
        self.layer = layer
        self.fn = fn

    def forward(self, x):
        y = self.conv(x)
        y = self.layer(y) if self.layer is not None else self.fn(y, self.training)
        return y


@pytest.mark.parametrize("layer", [
    pytest.param(nn.Identity(), id="Identity"),
    pytest.param(nn.Dropout(0.5), id="Dropout"),
    pytest.param(nn.Dropout(0.5, inplace=True), id="Dropout_inplace"),
    pytest.param(nn.Dropout2d(0.3), id="Dropout2d"),
    pytest.param(nn.AlphaDropout(0.2), id="AlphaDropout"),
])
def test_identity_modules_emit_no_layer(layer):
    result = assert_converts(Passes(layer), image())
    assert layer_types(result) == layer_types(assert_converts(Passes(fn=lambda y, training: y), image()))


@pytest.mark.parametrize("fn", [
    pytest.param(lambda y, training: F.dropout(y, 0.3, training=training), id="F.dropout"),
    pytest.param(lambda y, training: F.dropout2d(y, 0.3, training), id="F.dropout2d"),
    pytest.param(lambda y, training: y.contiguous(), id="contiguous"),
    pytest.param(lambda y, training: y.clone(), id="clone"),
    pytest.param(lambda y, training: y.detach(), id="detach"),
])
def test_identity_functions_emit_no_layer(fn):
    result = assert_converts(Passes(fn=fn), image())
    assert layer_types(result) == layer_types(assert_converts(Passes(fn=lambda y, training: y), image()))
