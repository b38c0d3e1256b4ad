"""Parity sweeps for op_rules/pooling.py: max/avg pooling (padding, ceil_mode, count_include_pad,
divisor_override) and adaptive pooling to sizes that do not divide the input.

Inputs have odd sizes (11 x 13, 17) so that ceil_mode changes the output size. Over dynamic axes the same
Keras model must match PyTorch at odd and even sizes alike.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tests.helpers import FP32_TOL, Functional, Wrap, assert_converts
from tracer import convert_model
from tracer.errors import ConversionError

SIZES = {1: (17,), 2: (11, 13), 3: (5, 7, 6)}


def sample(n: int, size: tuple | None = None, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 3, *(size or SIZES[n]), generator=g)


def layer_names(result) -> list[str]:
    return [type(layer).__name__ for layer in result.keras_model.layers]


WINDOWS = [(k, s, p) for k in (2, 3) for s in (None, 1, 2) for p in (0, 1)]
WINDOW_IDS = [f"k{k}-s{s}-p{p}" for k, s, p in WINDOWS]


# ---- max pooling -----------------------------------------------------------------------------

@pytest.mark.parametrize("ceil_mode", [False, True], ids=["floor", "ceil"])
@pytest.mark.parametrize("kernel,stride,padding", WINDOWS, ids=WINDOW_IDS)
def test_max_pool2d(kernel, stride, padding, ceil_mode):
    assert_converts(Wrap(nn.MaxPool2d(kernel, stride, padding, ceil_mode=ceil_mode)), sample(2))


@pytest.mark.parametrize("case", [
    dict(kernel_size=(2, 3), stride=(1, 2), padding=(1, 0), ceil_mode=True),
    dict(kernel_size=(3, 2), stride=(2, 3), padding=(1, 1), ceil_mode=True),
    dict(kernel_size=(3, 3), stride=(3, 2), padding=(0, 1)),
], ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_max_pool2d_per_dim(case):
    assert_converts(Wrap(nn.MaxPool2d(**case)), sample(2))


@pytest.mark.parametrize("ceil_mode", [False, True], ids=["floor", "ceil"])
@pytest.mark.parametrize("kernel,stride,padding", [(2, None, 0), (3, 2, 1), (3, 1, 1), (2, 2, 1)],
                         ids=["k2", "k3-s2-p1", "k3-s1-p1", "k2-s2-p1"])
def test_max_pool1d(kernel, stride, padding, ceil_mode):
    assert_converts(Wrap(nn.MaxPool1d(kernel, stride, padding, ceil_mode=ceil_mode)), sample(1))


def test_max_pool3d():
    assert_converts(Wrap(nn.MaxPool3d(3, 2, 1, ceil_mode=True)), sample(3))


def test_max_pool_all_negative_input_padding_is_never_picked():
    """Padding must act as -inf, not zero, when every value is negative."""
    x = -1.0 - sample(2).abs()
    assert_converts(Wrap(nn.MaxPool2d(3, 2, 1, ceil_mode=True)), x)


# ---- average pooling -------------------------------------------------------------------------

@pytest.mark.parametrize("count_include_pad", [True, False], ids=["incl", "excl"])
@pytest.mark.parametrize("ceil_mode", [False, True], ids=["floor", "ceil"])
@pytest.mark.parametrize("kernel,stride,padding", WINDOWS, ids=WINDOW_IDS)
def test_avg_pool2d(kernel, stride, padding, ceil_mode, count_include_pad):
    m = nn.AvgPool2d(kernel, stride, padding, ceil_mode=ceil_mode, count_include_pad=count_include_pad)
    assert_converts(Wrap(m), sample(2))


@pytest.mark.parametrize("case", [
    dict(kernel_size=3, stride=2, padding=1, divisor_override=5),
    dict(kernel_size=(2, 3), stride=(2, 2), padding=(1, 1), ceil_mode=True, divisor_override=2),
    dict(kernel_size=2, divisor_override=3),
    dict(kernel_size=(3, 2), stride=(1, 2), padding=(1, 0), ceil_mode=True, count_include_pad=False),
], ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_avg_pool2d_per_dim_and_divisor(case):
    assert_converts(Wrap(nn.AvgPool2d(**case)), sample(2))


@pytest.mark.parametrize("count_include_pad", [True, False], ids=["incl", "excl"])
@pytest.mark.parametrize("ceil_mode", [False, True], ids=["floor", "ceil"])
@pytest.mark.parametrize("kernel,stride,padding", [(2, None, 0), (3, 2, 1), (2, 2, 1)],
                         ids=["k2", "k3-s2-p1", "k2-s2-p1"])
def test_avg_pool1d(kernel, stride, padding, ceil_mode, count_include_pad):
    m = nn.AvgPool1d(kernel, stride, padding, ceil_mode=ceil_mode, count_include_pad=count_include_pad)
    assert_converts(Wrap(m), sample(1))


@pytest.mark.parametrize("count_include_pad", [True, False], ids=["incl", "excl"])
def test_avg_pool3d(count_include_pad):
    assert_converts(Wrap(nn.AvgPool3d(3, 2, 1, ceil_mode=True, count_include_pad=count_include_pad)), sample(3))


def test_avg_pool_plain_is_one_layer():
    result = assert_converts(Wrap(nn.AvgPool2d(2)), sample(2, (10, 12)))
    assert layer_names(result) == ["InputLayer", "AveragePooling2D"]


# ---- functional pooling ----------------------------------------------------------------------

@pytest.mark.parametrize("fn,args,kw", [
    (F.max_pool2d, (3,), {}),
    (F.max_pool2d, (3, 2, 1), {"ceil_mode": True}),
    (F.max_pool2d, (), {"kernel_size": (2, 3), "stride": (2, 1), "padding": (1, 0)}),
    (F.max_pool2d, (2, 2, 0, 1, True), {}),  # positional ceil_mode
    (F.avg_pool2d, (3,), {}),
    (F.avg_pool2d, (3, 2, 1, True, False), {}),
    (F.avg_pool2d, (), {"kernel_size": 3, "stride": 2, "padding": 1, "divisor_override": 4}),
    (F.avg_pool2d, (2,), {"stride": 1, "padding": 1, "ceil_mode": True, "count_include_pad": True}),
    (F.max_pool1d, (3, 2, 1), {"ceil_mode": True}),
    (F.avg_pool1d, (3, 2, 1), {"ceil_mode": True, "count_include_pad": False}),
], ids=lambda v: getattr(v, "__name__", None) or str(v).replace(" ", ""))
def test_functional_pool(fn, args, kw):
    n = 1 if fn in (F.max_pool1d, F.avg_pool1d) else 2
    assert_converts(Functional(fn, *args, **kw), sample(n))


# ---- dilation (Keras pooling has none: one strided slice per window tap) ----------------------

@pytest.mark.parametrize("case", [
    dict(kernel_size=3, stride=1, padding=1, dilation=2),
    dict(kernel_size=2, stride=2, padding=0, dilation=3, ceil_mode=True),
    dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 1), dilation=(2, 3)),
    dict(kernel_size=1, stride=2, dilation=2),
    dict(kernel_size=1, stride=1, dilation=3),
], ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()).replace(" ", ""))
def test_max_pool2d_dilation(case):
    assert_converts(Wrap(nn.MaxPool2d(**case)), sample(2))


def test_max_pool1d_dilation_functional():
    assert_converts(Functional(F.max_pool1d, 3, 2, 1, dilation=2, ceil_mode=True), sample(1))


def test_max_pool_dilation_all_negative_padding_never_picked():
    assert_converts(Wrap(nn.MaxPool2d(3, 2, 1, dilation=2, ceil_mode=True)), -10 - sample(2).abs())


# ---- unsupported -----------------------------------------------------------------------------


def test_max_pool_return_indices_raises():
    class Indices(nn.Module):
        def __init__(self):
            super().__init__()
            self.pool = nn.MaxPool2d(2, return_indices=True)

        def forward(self, x):
            y, idx = self.pool(x)
            return y

    with pytest.raises(ConversionError, match="return_indices"):
        assert_converts(Indices(), sample(2))


# ---- adaptive pooling ------------------------------------------------------------------------

ADAPTIVE_2D = [1, (2, 3), 3, 5, 7, (None, 4), (4, None), (12, 11), (10, 3), (5, 9)]


@pytest.mark.parametrize("output_size", ADAPTIVE_2D, ids=str)
@pytest.mark.parametrize("kind", ["avg", "max"])
def test_adaptive_pool2d(kind, output_size):
    cls = nn.AdaptiveAvgPool2d if kind == "avg" else nn.AdaptiveMaxPool2d
    assert_converts(Wrap(cls(output_size)), sample(2, (10, 9)))


@pytest.mark.parametrize("output_size", [1, 3, 5, 7, 10, 13], ids=str)
@pytest.mark.parametrize("kind", ["avg", "max"])
def test_adaptive_pool1d(kind, output_size):
    cls = nn.AdaptiveAvgPool1d if kind == "avg" else nn.AdaptiveMaxPool1d
    assert_converts(Wrap(cls(output_size)), sample(1, (10,)))


@pytest.mark.parametrize("kind", ["avg", "max"])
def test_adaptive_pool3d(kind):
    cls = nn.AdaptiveAvgPool3d if kind == "avg" else nn.AdaptiveMaxPool3d
    assert_converts(Wrap(cls((2, None, 4))), sample(3))


@pytest.mark.parametrize("fn,size", [(F.adaptive_avg_pool2d, (3, 4)), (F.adaptive_max_pool2d, 5),
                                     (F.adaptive_avg_pool2d, 1), (F.adaptive_avg_pool1d, 7),
                                     (F.adaptive_max_pool1d, 3)],
                         ids=lambda v: getattr(v, "__name__", None) or str(v).replace(" ", ""))
def test_functional_adaptive_pool(fn, size):
    n = 1 if fn in (F.adaptive_avg_pool1d, F.adaptive_max_pool1d) else 2
    assert_converts(Functional(fn, size), sample(n, (10,) if n == 1 else (10, 9)))


def test_adaptive_divisible_is_one_pooling_layer():
    result = assert_converts(Wrap(nn.AdaptiveAvgPool2d((5, 3))), sample(2, (10, 9)))
    assert layer_names(result) == ["InputLayer", "AveragePooling2D"]


def test_adaptive_max_pool_return_indices_raises():
    class Indices(nn.Module):
        def __init__(self):
            super().__init__()
            self.pool = nn.AdaptiveMaxPool2d(3, return_indices=True)

        def forward(self, x):
            return self.pool(x)[0]

    with pytest.raises(ConversionError, match="return_indices"):
        assert_converts(Indices(), sample(2))


# ---- dynamic spatial axes: one model for every size, odd ones included -------------------------

def assert_dynamic_pool(model: nn.Module, shape: tuple, axes: dict, sizes: list[tuple]) -> None:
    """Convert at ``shape`` with ``axes`` dynamic; the tester's own sizes (2x and an odd 1.5x + 1) must pass,
    and the same Keras model must match PyTorch at each of ``sizes`` (spatial sizes, odd and even)."""
    model.eval()
    result = convert_model(model, sample(len(shape), shape), dynamic_shapes=(axes,), n_random=1,
                           raise_on_mismatch=False)
    assert result.report.ok, result.report.summary()
    assert any(int(t.label.split("=")[1]) % 2 for t in result.report.trials if "=" in t.label)
    for seed, size in enumerate(sizes, 1):
        x = sample(len(size), size, seed=seed)
        want = model(x).detach().numpy()
        got = np.asarray(result.keras_model(x.numpy()))
        assert got.shape == want.shape, (size, got.shape, want.shape)
        assert np.abs(got - want).max() <= FP32_TOL * max(1.0, float(np.abs(want).max())), size


HW = {2: "h", 3: "w"}
ODD_HW = [(65, 63), (64, 65), (31, 33), (7, 8), (5, 5)]


@pytest.mark.parametrize("layer", [
    nn.MaxPool2d(3, 2, 1),
    nn.AvgPool2d(3, 2, 1),
    nn.AvgPool2d(3, 2, 1, count_include_pad=False),
    nn.MaxPool2d(3, 2, 1, ceil_mode=True),
    nn.MaxPool2d(2, 2, 1, ceil_mode=True),  # PyTorch drops the last window at some sizes only
    nn.AvgPool2d(3, 2, 1, ceil_mode=True),
    nn.AvgPool2d(2, 2, 1, ceil_mode=True, count_include_pad=False),
    nn.AvgPool2d((3, 2), (2, 3), (1, 0), ceil_mode=True),
    nn.AvgPool2d(3, 2, 1, divisor_override=4),
    nn.MaxPool2d(3, 2, 1, dilation=2),
    nn.MaxPool2d(2, 3, 1, dilation=2, ceil_mode=True),
], ids=repr)
def test_pool2d_dynamic_hw_exact_at_odd_sizes(layer):
    assert_dynamic_pool(Wrap(layer), (16, 16), HW, ODD_HW)


@pytest.mark.parametrize("layer", [nn.MaxPool1d(3, 2, 1), nn.MaxPool1d(2, 2, 1, ceil_mode=True),
                                   nn.AvgPool1d(3, 2, 1, count_include_pad=False),
                                   nn.AvgPool1d(3, 2, 1, ceil_mode=True)], ids=repr)
def test_pool1d_dynamic_length_exact_at_odd_sizes(layer):
    assert_dynamic_pool(Wrap(layer), (16,), {2: "t"}, [(33,), (34,), (9,), (4,)])


@pytest.mark.parametrize("layer", [nn.MaxPool3d(3, 2, 1, ceil_mode=True),
                                   nn.AvgPool3d(3, 2, 1, count_include_pad=False)], ids=repr)
def test_pool3d_dynamic_exact_at_odd_sizes(layer):
    assert_dynamic_pool(Wrap(layer), (6, 8, 8), {2: "d", 3: "h", 4: "w"}, [(7, 9, 8), (5, 6, 11)])


def result_ok(result) -> bool:
    return bool(result.report.ok) and any("=" in t.label for t in result.report.trials)


def test_avg_pool_excluding_padding_counts_at_runtime_on_a_dynamic_axis():
    """The divisor is average pooling of ones shaped like the input, not a constant of the sample's shape;
    without dynamic axes it stays a constant (one multiply by a Dense-held constant)."""
    m = Wrap(nn.AvgPool2d(3, 2, 1, count_include_pad=False)).eval()
    dynamic = convert_model(m, sample(2, (16, 16)), dynamic_shapes=(HW,), n_random=1, raise_on_mismatch=False)
    static = assert_converts(m, sample(2, (16, 16)))
    assert result_ok(dynamic) and layer_names(dynamic).count("AveragePooling2D") == 2
    assert "Dense" not in layer_names(dynamic)
    assert layer_names(static).count("AveragePooling2D") == 1 and "Dense" in layer_names(static)
