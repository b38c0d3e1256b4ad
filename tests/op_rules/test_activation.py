"""Parity sweeps for op_rules/activation.py: every activation as a module and as a function,
on a conv output (NCHW in torch, NHWC inside Keras) and on a 2-D tensor; softmax axes mapped
through the layout."""
from __future__ import annotations

from typing import Callable

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tests.helpers import assert_converts

B, C_IN, C, H, W = 2, 4, 6, 6, 5


def image(seed: int = 0) -> torch.Tensor:
    # wide range, so clipping regions and thresholds are all reached
    return 3 * torch.randn(B, C_IN, H, W, generator=torch.Generator().manual_seed(seed))


def vec(seed: int = 0) -> torch.Tensor:
    return 4 * torch.randn(B, C, generator=torch.Generator().manual_seed(seed))


class ConvThen(nn.Module):
    """``act(conv(x))`` (``conv=False``: ``act(x)``); ``act`` is a module or a function, followed
    by a second conv when ``then_conv`` (the activation's output must feed a layer correctly)."""

    def __init__(self, act: nn.Module | Callable, conv: bool = True, then_conv: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(C_IN, C, 3, padding=1) if conv else None
        self.act = act if isinstance(act, nn.Module) else None
        self.fn = None if isinstance(act, nn.Module) else act
        self.conv2 = nn.Conv2d(C, C, 1) if then_conv else None

    def forward(self, x):
        y = self.conv(x) if self.conv is not None else x
        y = self.act(y) if self.act is not None else self.fn(y)
        return self.conv2(y) if self.conv2 is not None else y


MODULES = [
    pytest.param(lambda: nn.ReLU(), id="ReLU"),
    pytest.param(lambda: nn.ReLU(inplace=True), id="ReLU_inplace"),
    pytest.param(lambda: nn.ReLU6(), id="ReLU6"),
    pytest.param(lambda: nn.LeakyReLU(0.2), id="LeakyReLU_0.2"),
    pytest.param(lambda: nn.LeakyReLU(), id="LeakyReLU_default"),
    pytest.param(lambda: nn.ELU(0.5), id="ELU_0.5"),
    pytest.param(lambda: nn.ELU(), id="ELU"),
    pytest.param(lambda: nn.SiLU(), id="SiLU"),
    pytest.param(lambda: nn.GELU(), id="GELU"),
    pytest.param(lambda: nn.GELU(approximate="tanh"), id="GELU_tanh"),
    pytest.param(lambda: nn.Hardswish(), id="Hardswish"),
    pytest.param(lambda: nn.Hardsigmoid(), id="Hardsigmoid"),
    pytest.param(lambda: nn.Sigmoid(), id="Sigmoid"),
    pytest.param(lambda: nn.Tanh(), id="Tanh"),
    pytest.param(lambda: nn.Softplus(), id="Softplus"),
    pytest.param(lambda: nn.Softplus(beta=2), id="Softplus_beta2"),
    pytest.param(lambda: nn.Softplus(beta=2, threshold=1), id="Softplus_beta2_threshold1"),
    pytest.param(lambda: nn.Softplus(beta=0.5, threshold=3), id="Softplus_beta0.5_threshold3"),
    pytest.param(lambda: nn.Mish(), id="Mish"),
    pytest.param(lambda: nn.Hardtanh(), id="Hardtanh"),
    pytest.param(lambda: nn.Hardtanh(-0.5, 2.0), id="Hardtanh_custom"),
    pytest.param(lambda: nn.SELU(), id="SELU"),
    pytest.param(lambda: nn.Softsign(), id="Softsign"),
    pytest.param(lambda: nn.LogSigmoid(), id="LogSigmoid"),
]


@pytest.mark.parametrize("make", MODULES)
@pytest.mark.parametrize("where", ["map", "map_then_conv", "vec"])
def test_activation_module(make, where):
    model = ConvThen(make(), conv=where != "vec", then_conv=where == "map_then_conv")
    assert_converts(model, vec() if where == "vec" else image())


FUNCTIONS = [
    pytest.param(F.relu, id="F.relu"),
    pytest.param(torch.relu, id="torch.relu"),
    pytest.param(lambda y: y.relu(), id="Tensor.relu"),
    pytest.param(lambda y: F.relu(y, inplace=True), id="F.relu_inplace"),
    pytest.param(F.relu6, id="F.relu6"),
    pytest.param(lambda y: F.leaky_relu(y, 0.2), id="F.leaky_relu_0.2"),
    pytest.param(lambda y: F.leaky_relu(y, negative_slope=0.2), id="F.leaky_relu_kw"),
    pytest.param(F.leaky_relu, id="F.leaky_relu_default"),
    pytest.param(lambda y: F.elu(y, 0.5), id="F.elu_0.5"),
    pytest.param(lambda y: F.elu(y, alpha=0.5), id="F.elu_kw"),
    pytest.param(F.silu, id="F.silu"),
    pytest.param(F.gelu, id="F.gelu"),
    pytest.param(lambda y: F.gelu(y, approximate="tanh"), id="F.gelu_tanh"),
    pytest.param(F.hardswish, id="F.hardswish"),
    pytest.param(F.hardsigmoid, id="F.hardsigmoid"),
    pytest.param(torch.sigmoid, id="torch.sigmoid"),
    pytest.param(F.sigmoid, id="F.sigmoid"),
    pytest.param(lambda y: y.sigmoid(), id="Tensor.sigmoid"),
    pytest.param(torch.tanh, id="torch.tanh"),
    pytest.param(lambda y: y.tanh(), id="Tensor.tanh"),
    pytest.param(F.softplus, id="F.softplus"),
    pytest.param(lambda y: F.softplus(y, beta=2), id="F.softplus_beta2"),
    pytest.param(lambda y: F.softplus(y, 2, 1), id="F.softplus_beta2_threshold1_positional"),
    pytest.param(F.mish, id="F.mish"),
    pytest.param(F.hardtanh, id="F.hardtanh"),
    pytest.param(lambda y: F.hardtanh(y, -2.0, 0.5), id="F.hardtanh_custom"),
    pytest.param(lambda y: F.hardtanh(y, min_val=-2.0, max_val=0.5), id="F.hardtanh_kw"),
    pytest.param(F.selu, id="F.selu"),
    pytest.param(torch.selu, id="torch.selu"),
]


@pytest.mark.parametrize("fn", FUNCTIONS)
@pytest.mark.parametrize("where", ["map", "map_then_conv", "vec"])
def test_activation_function(fn, where):
    model = ConvThen(fn, conv=where != "vec", then_conv=where == "map_then_conv")
    assert_converts(model, vec() if where == "vec" else image())


# ---- PReLU ---------------------------------------------------------------------------------------

def prelu(num_parameters: int) -> nn.PReLU:
    m = nn.PReLU(num_parameters)
    with torch.no_grad():
        m.weight.copy_(torch.linspace(-0.5, 0.8, num_parameters))
    return m


class PReLUNet(nn.Module):
    def __init__(self, num_parameters: int, rank: int):
        super().__init__()
        torch.manual_seed(0)
        self.rank = rank
        self.conv = nn.Conv2d(C_IN, C, 3, padding=1)
        self.act = prelu(num_parameters)

    def forward(self, x):
        y = self.conv(x)
        if self.rank == 2:
            y = y.mean((2, 3))
        elif self.rank == 3:
            y = y.flatten(2)
        return self.act(y)


@pytest.mark.parametrize("num_parameters", [1, C], ids=["shared", "per_channel"])
@pytest.mark.parametrize("rank", [2, 3, 4])
def test_prelu(num_parameters, rank):
    assert_converts(PReLUNet(num_parameters, rank), image())


@pytest.mark.parametrize("num_parameters", [1, C], ids=["shared", "per_channel"])
def test_functional_prelu(num_parameters):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.conv = nn.Conv2d(C_IN, C, 3, padding=1)
            self.weight = nn.Parameter(torch.linspace(-0.3, 0.6, num_parameters))

        def forward(self, x):
            return F.prelu(self.conv(x), self.weight)

    assert_converts(Net(), image())


# ---- softmax / log_softmax -----------------------------------------------------------------------

SOFTMAX_DIMS = [1, -1, 2, 3, -3, -2]


@pytest.mark.parametrize("dim", SOFTMAX_DIMS)
@pytest.mark.parametrize("kind", ["Softmax", "LogSoftmax"])
def test_softmax_module_on_map(kind, dim):
    assert_converts(ConvThen(getattr(nn, kind)(dim=dim)), image())


@pytest.mark.parametrize("dim", SOFTMAX_DIMS)
@pytest.mark.parametrize("fn", [
    pytest.param(lambda y, d: F.softmax(y, dim=d), id="F.softmax"),
    pytest.param(lambda y, d: torch.softmax(y, d), id="torch.softmax"),
    pytest.param(lambda y, d: y.softmax(d), id="Tensor.softmax"),
    pytest.param(lambda y, d: F.log_softmax(y, dim=d), id="F.log_softmax"),
    pytest.param(lambda y, d: torch.log_softmax(y, d), id="torch.log_softmax"),
    pytest.param(lambda y, d: y.log_softmax(dim=d), id="Tensor.log_softmax"),
])
def test_softmax_function_on_map(fn, dim):
    assert_converts(ConvThen(lambda y: fn(y, dim)), image())


@pytest.mark.parametrize("dim", [1, -1, 2])
@pytest.mark.parametrize("kind", ["Softmax", "LogSoftmax"])
def test_softmax_on_map_then_conv(kind, dim):
    assert_converts(ConvThen(getattr(nn, kind)(dim=dim), then_conv=True), image())


@pytest.mark.parametrize("dim", [0, 1, -1])
@pytest.mark.parametrize("kind", ["Softmax", "LogSoftmax"])
def test_softmax_on_vec(kind, dim):
    assert_converts(ConvThen(getattr(nn, kind)(dim=dim), conv=False), vec())


def test_softmax_over_tokens_of_a_map():
    assert_converts(ConvThen(lambda y: y.flatten(2).transpose(1, 2).softmax(-1)), image())


@pytest.mark.parametrize("channels_last_io", [False, True], ids=["nchw_io", "nhwc_io"])
def test_channel_softmax_adds_no_transpose(channels_last_io):
    result = assert_converts(ConvThen(nn.Softmax(dim=1), then_conv=True), image(),
                             channels_last_io=channels_last_io)
    assert result.transpose_count == (0 if channels_last_io else 2), result.transposes


@pytest.mark.filterwarnings("ignore:Implicit dimension choice")
def test_softmax_without_dim_raises_clear_error():
    from tracer import ConversionError

    with pytest.raises(ConversionError, match="dim="):
        assert_converts(ConvThen(nn.Softmax()), image())
