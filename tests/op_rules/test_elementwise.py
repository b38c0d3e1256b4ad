"""Parity sweeps for op_rules/elementwise.py and op_rules/reduce.py.

Binary ops with Python scalars on either side, broadcasting against parameters, buffers and
(B, C, 1, 1) tensors, in-place forms, clamps, unary ops, and reductions over dims given every
way torch accepts, on NCHW conv outputs (NHWC inside: the dims must be mapped) and 3-D tensors.
"""
from __future__ import annotations

import operator
from typing import Callable

import pytest
import torch
import torch.nn as nn

from tests.helpers import Functional, assert_converts
from tracer import convert_model

B, C_IN, C, H, W = 2, 4, 6, 6, 5


def image(seed: int = 0) -> torch.Tensor:
    return torch.randn(B, C_IN, H, W, generator=torch.Generator().manual_seed(seed))


def seq(seed: int = 0) -> torch.Tensor:
    return torch.randn(B, 3, 7, generator=torch.Generator().manual_seed(seed))


class ConvThen(nn.Module):
    """``fn(self, conv(x))`` (``conv=False``: ``fn(self, x)``), with a (C,1,1) parameter
    ``self.p``, a (C,1,1) buffer ``self.buf``, a (W,) parameter ``self.row``, a second conv
    and an in-place ReLU."""

    def __init__(self, fn: Callable, conv: bool = True):
        super().__init__()
        torch.manual_seed(0)
        self.fn = fn
        self.conv = nn.Conv2d(C_IN, C, 3, padding=1) if conv else None
        self.conv2 = nn.Conv2d(C, C, 1)
        self.p = nn.Parameter(torch.rand(C, 1, 1) + 0.5)
        self.register_buffer("buf", torch.randn(C, 1, 1))
        self.row = nn.Parameter(torch.randn(W))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.fn(self, self.conv(x) if self.conv is not None else x)


def check(fn: Callable, conv: bool = True, x: torch.Tensor | None = None, **kw):
    x = x if x is not None else (image() if conv else seq())
    return assert_converts(ConvThen(fn, conv=conv), x, **kw)


# ---- binary ops with scalars ---------------------------------------------------------------------

SCALARS = [
    pytest.param(lambda m, y: y + 2, id="add"),
    pytest.param(lambda m, y: 2 + y, id="radd"),
    pytest.param(lambda m, y: y - 0.5, id="sub"),
    pytest.param(lambda m, y: 2 - y, id="rsub"),
    pytest.param(lambda m, y: y * 3, id="mul"),
    pytest.param(lambda m, y: 3 * y, id="rmul"),
    pytest.param(lambda m, y: y / 4, id="div"),
    pytest.param(lambda m, y: 1 / (y.abs() + 1), id="rdiv"),
    pytest.param(lambda m, y: y ** 2, id="pow"),
    pytest.param(lambda m, y: y.abs() ** 0.5, id="pow_half"),
    pytest.param(lambda m, y: 2 ** y, id="rpow"),
    pytest.param(lambda m, y: y // 0.5, id="floordiv"),
    pytest.param(lambda m, y: torch.add(y, 1, alpha=3), id="torch_add_scalar_alpha"),
    pytest.param(lambda m, y: torch.sub(y, 2), id="torch_sub"),
    pytest.param(lambda m, y: y.mul(-1.5), id="method_mul"),
    pytest.param(lambda m, y: y.div(3), id="method_div"),
    pytest.param(lambda m, y: torch.pow(y, 3), id="torch_pow"),
    pytest.param(lambda m, y: y.pow(2), id="method_pow"),
    pytest.param(lambda m, y: torch.true_divide(y, 7), id="true_divide"),
]


@pytest.mark.parametrize("conv", [True, False], ids=["map", "seq"])
@pytest.mark.parametrize("fn", SCALARS)
def test_binary_with_scalar(fn, conv):
    check(fn, conv)


# ---- binary ops between tensors, broadcasting --------------------------------------------------

BROADCASTS = [
    pytest.param(lambda m, y: y * m.p, id="map_times_param_c11"),
    pytest.param(lambda m, y: m.p * y, id="param_c11_times_map"),
    pytest.param(lambda m, y: y + m.buf, id="map_plus_buffer_c11"),
    pytest.param(lambda m, y: m.buf - y, id="buffer_minus_map"),
    pytest.param(lambda m, y: y / m.p, id="map_over_param"),
    pytest.param(lambda m, y: m.p / (y.abs() + 1), id="param_over_map"),
    pytest.param(lambda m, y: y + m.row, id="map_plus_row_w"),
    pytest.param(lambda m, y: y * m.p.view(1, C, 1, 1), id="param_viewed_1c11"),
    pytest.param(lambda m, y: y * y.mean((2, 3), keepdim=True), id="map_times_b_c11"),
    pytest.param(lambda m, y: y.mean((2, 3), keepdim=True) - y, id="b_c11_minus_map"),
    pytest.param(lambda m, y: y * y.mean(1, keepdim=True), id="map_times_b1hw"),
    pytest.param(lambda m, y: y + y.amax(-1, keepdim=True), id="map_plus_bch1"),
    pytest.param(lambda m, y: y * y.mean((2, 3)).view(y.size(0), C, 1, 1), id="map_times_viewed_gate"),
    pytest.param(lambda m, y: y + m.conv2(y), id="map_plus_map"),
    pytest.param(lambda m, y: y - m.conv2(y), id="map_minus_map"),
    pytest.param(lambda m, y: y * torch.sigmoid(m.conv2(y)), id="map_times_map"),
    pytest.param(lambda m, y: y / (m.conv2(y).abs() + 1), id="map_over_map"),
    pytest.param(lambda m, y: torch.add(y, m.conv2(y), alpha=2), id="torch_add_alpha"),
    pytest.param(lambda m, y: torch.sub(y, m.conv2(y), alpha=0.5), id="torch_sub_alpha"),
    pytest.param(lambda m, y: y.add(m.p, alpha=-1.5), id="method_add_param_alpha"),
    pytest.param(lambda m, y: (y * 3) / torch.arange(1.0, W + 1), id="scalar_mul_then_constant"),
    pytest.param(lambda m, y: (2 * y) + m.buf, id="scalar_rmul_then_buffer"),
    pytest.param(lambda m, y: m.conv2(torch.add(y, y.mean(1, keepdim=True), alpha=2) * 0.5) + m.p,
                 id="alpha_scale_then_layers"),
    pytest.param(lambda m, y: torch.div(y, m.conv2(y).abs() + 0.5, rounding_mode="floor"), id="div_floor"),
    pytest.param(lambda m, y: torch.div(y * 4, 1.5, rounding_mode="floor"), id="div_floor_scalar"),
    pytest.param(lambda m, y: torch.div(y * 4, m.p, rounding_mode="trunc"), id="div_trunc_param"),
    pytest.param(lambda m, y: torch.div(y * 4, m.conv2(y).abs() + 0.5, rounding_mode="trunc"), id="div_trunc"),
    pytest.param(lambda m, y: torch.maximum(y, m.conv2(y)), id="maximum"),
    pytest.param(lambda m, y: torch.minimum(y, m.buf), id="minimum_buffer"),
    pytest.param(lambda m, y: y.maximum(m.p), id="method_maximum_param"),
    pytest.param(lambda m, y: y.abs() ** m.p, id="pow_param"),
    pytest.param(lambda m, y: y.flatten(1) + m.conv2(y).flatten(1), id="flat_plus_flat"),
    pytest.param(lambda m, y: y.flatten(1) * torch.linspace(0, 1, C * H * W), id="flat_times_constant"),
    pytest.param(lambda m, y: y.flatten(2) + m.row.repeat(H), id="tokens_plus_constant"),
]


@pytest.mark.parametrize("fn", BROADCASTS)
def test_binary_broadcast_on_maps(fn):
    check(fn)


@pytest.mark.parametrize("channels_last_io", [False, True], ids=["nchw_io", "nhwc_io"])
def test_param_broadcast_adds_no_transpose(channels_last_io):
    result = check(lambda m, y: m.conv2(y * m.p + m.buf), channels_last_io=channels_last_io)
    assert result.transpose_count == (0 if channels_last_io else 2), result.transposes


SEQ_BROADCASTS = [
    pytest.param(lambda m, x: x + x.mean(-1, keepdim=True), id="plus_keepdim_mean"),
    pytest.param(lambda m, x: x * x[:, :1], id="times_first_row"),
    pytest.param(lambda m, x: x - x.sum(1, keepdim=True), id="minus_sum_dim1"),
    pytest.param(lambda m, x: x * torch.arange(7.0), id="times_arange"),
    pytest.param(lambda m, x: torch.maximum(x, x.transpose(1, 2)[:, :3, :3].sum(-1, keepdim=True)), id="maximum"),
]


@pytest.mark.parametrize("fn", SEQ_BROADCASTS)
def test_binary_broadcast_on_sequences(fn):
    check(fn, conv=False)


def test_two_inputs_broadcast_b_c11():
    class TwoIn(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.conv = nn.Conv2d(C_IN, C, 3, padding=1)

        def forward(self, x, s):
            return self.conv(x) * s + s

    assert_converts(TwoIn(), image(), torch.randn(B, C, 1, 1))


# ---- in-place forms ------------------------------------------------------------------------------

def _iadd(m, y):
    z = m.conv2(y)
    z += y
    return z


def _imul_method(m, y):
    z = m.conv2(y)
    z.mul_(2)
    return z + y


def _chain_inplace(m, y):
    z = y * 1
    z.add_(m.p).sub_(1).div_(2)
    return torch.relu_(z)


def _inplace_then_reuse(m, y):
    z = m.conv2(y)
    w = z.clamp_(min=0)
    return w + 2 * z  # z is w now


def _inplace_module_then_reuse(m, y):
    z = m.conv2(y)
    w = m.relu(z)  # nn.ReLU(inplace=True): z is w now
    return w - 3 * z


def _inplace_functional_then_reuse(m, y):
    z = m.conv2(y)
    w = torch.nn.functional.leaky_relu(z, 0.2, inplace=True)
    return torch.cat([w, z], 1)


def _inplace_on_a_view_base_unused(m, y):
    z = m.conv2(y)
    return torch.nn.functional.relu(z.flatten(1), inplace=True) * 2


def _view_taken_after_inplace(m, y):
    z = m.conv2(y)
    z.mul_(2)
    return z.flatten(1) + y.flatten(1)


def _inplace_on_view_raises(m, y):
    z = m.conv2(y)
    z[:, :2].mul_(2)
    return z


INPLACE = [
    pytest.param(_iadd, id="iadd"),
    pytest.param(lambda m, y: operator.imul(m.conv2(y), 3), id="operator_imul"),
    pytest.param(_imul_method, id="mul__result_unused"),
    pytest.param(lambda m, y: m.conv2(y).mul_(2), id="mul_"),
    pytest.param(lambda m, y: m.conv2(y).add_(y, alpha=2), id="add__alpha"),
    pytest.param(_chain_inplace, id="chain"),
    pytest.param(_inplace_then_reuse, id="clamp__reused"),
    pytest.param(_inplace_module_then_reuse, id="module_inplace_reused"),
    pytest.param(_inplace_functional_then_reuse, id="functional_inplace_reused"),
    pytest.param(_inplace_on_a_view_base_unused, id="inplace_on_view_base_unused"),
    pytest.param(_view_taken_after_inplace, id="view_taken_after_inplace"),
]


@pytest.mark.parametrize("fn", INPLACE)
def test_inplace(fn):
    check(fn)


def test_inplace_on_the_model_input():
    def fn(m, x):
        y = x.mul_(2)
        return x + y

    check(fn, conv=False)


def test_inplace_on_a_view_raises_clear_error():
    from tracer import ConversionError

    with pytest.raises(ConversionError, match="in-place.*view"):
        check(_inplace_on_view_raises)


def test_inplace_then_earlier_view_read_raises_clear_error():
    from tracer import ConversionError

    def fn(m, y):
        z = m.conv2(y)
        v = z.flatten(1)
        z.add_(1)
        return v  # torch: v sees the add

    with pytest.raises(ConversionError, match="in-place.*view"):
        check(fn)


# ---- clamp ---------------------------------------------------------------------------------------

CLAMPS = [
    pytest.param(lambda m, y: y.clamp(min=-0.2), id="clamp_min_kw"),
    pytest.param(lambda m, y: y.clamp(max=0.3), id="clamp_max_kw"),
    pytest.param(lambda m, y: y.clamp(-0.2, 0.3), id="clamp_both"),
    pytest.param(lambda m, y: torch.clamp(y, min=0.1), id="torch_clamp_min"),
    pytest.param(lambda m, y: torch.clamp(y, max=-0.1), id="torch_clamp_max"),
    pytest.param(lambda m, y: torch.clamp(y, -1, 1), id="torch_clamp_both_positional"),
    pytest.param(lambda m, y: y.clip(0, 6), id="clip_method"),
    pytest.param(lambda m, y: torch.clip(y, max=0.5), id="torch_clip_max"),
    pytest.param(lambda m, y: y.clamp_min(0.1), id="clamp_min_method"),
    pytest.param(lambda m, y: y.clamp_max(0.1), id="clamp_max_method"),
    pytest.param(lambda m, y: torch.clamp_min(y, -0.1), id="torch_clamp_min_fn"),
    pytest.param(lambda m, y: torch.clamp_max(y, -0.1), id="torch_clamp_max_fn"),
    pytest.param(lambda m, y: (y * 1).clamp_(min=-0.3, max=0.2), id="clamp_"),
    pytest.param(lambda m, y: y.clamp(min=-0.5, max=None), id="clamp_max_none"),
]


@pytest.mark.parametrize("fn", CLAMPS)
def test_clamp(fn):
    check(fn)


def test_clamp_with_tensor_bound_raises_clear_error():
    from tracer import ConversionError

    with pytest.raises(ConversionError, match="tensor bounds"):
        check(lambda m, y: y.clamp(min=m.conv2(y)))


# ---- unary ---------------------------------------------------------------------------------------

UNARY = [
    pytest.param(lambda m, y: -y, id="neg_operator"),
    pytest.param(lambda m, y: torch.neg(y), id="neg"),
    pytest.param(lambda m, y: y.neg(), id="neg_method"),
    pytest.param(lambda m, y: torch.abs(y), id="abs"),
    pytest.param(lambda m, y: abs(y), id="abs_builtin"),
    pytest.param(lambda m, y: y.abs(), id="abs_method"),
    pytest.param(lambda m, y: torch.exp(y), id="exp"),
    pytest.param(lambda m, y: y.exp(), id="exp_method"),
    pytest.param(lambda m, y: torch.log(y.abs() + 0.1), id="log"),
    pytest.param(lambda m, y: (y * y + 1).log(), id="log_method"),
    pytest.param(lambda m, y: torch.sqrt(y.abs()), id="sqrt"),
    pytest.param(lambda m, y: (y * y).sqrt(), id="sqrt_method"),
    pytest.param(lambda m, y: torch.rsqrt(y.abs() + 0.5), id="rsqrt"),
    pytest.param(lambda m, y: (y * y + 1).rsqrt(), id="rsqrt_method"),
    pytest.param(lambda m, y: torch.erf(y), id="erf"),
    pytest.param(lambda m, y: torch.special.erf(y), id="special_erf"),
    pytest.param(lambda m, y: y.erf(), id="erf_method"),
    pytest.param(lambda m, y: torch.reciprocal(y.abs() + 1), id="reciprocal"),
    pytest.param(lambda m, y: torch.square(y), id="square"),
    pytest.param(lambda m, y: torch.sin(y) + torch.cos(y), id="sin_cos"),
    pytest.param(lambda m, y: torch.floor(y * 3) + torch.ceil(y * 3), id="floor_ceil"),
    pytest.param(lambda m, y: torch.sign(y), id="sign"),
    pytest.param(lambda m, y: torch.log1p(y.abs()), id="log1p"),
]


@pytest.mark.parametrize("conv", [True, False], ids=["map", "seq"])
@pytest.mark.parametrize("fn", UNARY)
def test_unary(fn, conv):
    check(fn, conv)


# ---- reductions ----------------------------------------------------------------------------------

REDUCE_FNS = {
    "mean": (torch.mean, "mean"),
    "sum": (torch.sum, "sum"),
    "amax": (torch.amax, "amax"),
    "amin": (torch.amin, "amin"),
}
MAP_DIMS = [1, 2, 3, -1, -3, (2, 3), (-2, -1), (1, 2), (1, 3), [1, -1], (1, 2, 3)]


def _reducer(name: str, method: bool, dim, keepdim: bool) -> Callable:
    fn, meth = REDUCE_FNS[name]
    if method:
        return lambda m, y: getattr(y, meth)(dim, keepdim=keepdim)
    return lambda m, y: fn(y, dim=dim, keepdim=keepdim)


@pytest.mark.parametrize("keepdim", [False, True], ids=["drop", "keep"])
@pytest.mark.parametrize("dim", MAP_DIMS, ids=str)
@pytest.mark.parametrize("name", list(REDUCE_FNS))
def test_reduce_map(name, dim, keepdim):
    check(_reducer(name, method=name in ("mean", "amax"), dim=dim, keepdim=keepdim))


@pytest.mark.parametrize("keepdim", [False, True], ids=["drop", "keep"])
@pytest.mark.parametrize("dim", [1, 2, -1, (1, 2), (-1, 1)], ids=str)
@pytest.mark.parametrize("name", list(REDUCE_FNS))
def test_reduce_seq(name, dim, keepdim):
    check(_reducer(name, method=name in ("sum", "amin"), dim=dim, keepdim=keepdim), conv=False)


@pytest.mark.parametrize("fn", [
    pytest.param(lambda m, y: y.mean(), id="mean_all"),
    pytest.param(lambda m, y: torch.sum(y), id="sum_all"),
    pytest.param(lambda m, y: y.amax((1, 2, 3)), id="amax_all_but_batch"),
    pytest.param(lambda m, y: y.sum(dim=(2, 3)) / (H * W), id="sum_over_count"),
    pytest.param(lambda m, y: m.conv2(y - y.mean((2, 3), keepdim=True)), id="centered_then_conv"),
    pytest.param(lambda m, y: y.mean(1).flatten(1), id="mean_channels_then_flatten"),
    pytest.param(lambda m, y: y.flatten(1).sum(-1), id="flat_then_sum"),
    pytest.param(lambda m, y: y.permute(0, 2, 3, 1).mean(-1), id="permuted_then_mean"),
    pytest.param(lambda m, y: y.flatten(2).mean(-1), id="tokens_mean"),
])
def test_reduce_special(fn):
    check(fn)


@pytest.mark.parametrize("channels_last_io", [False, True], ids=["nchw_io", "nhwc_io"])
def test_global_mean_pool_needs_no_transpose_after_input(channels_last_io):
    result = check(lambda m, y: y.mean((2, 3)), channels_last_io=channels_last_io)
    assert result.transpose_count == (0 if channels_last_io else 1), result.transposes


@pytest.mark.parametrize("fn", [lambda x: 0.7 - torch.softmax(x, 1), lambda x: 0.7 - torch.relu(x),
                                lambda x: 0.7 / (torch.relu(x) + 1)], ids=["rsub_softmax", "rsub_relu", "rdiv"])
def test_number_minus_map_keeps_its_sign_in_litert(fn):
    """``c - x`` / ``c / x`` on an NCHW map held NHWC: TF 2.21's TFLite converter swapped the operands of
    SUB(c, TRANSPOSE(x)) (fuzzer graph 1810, 1.39 off); the rule's form keeps them (op_rules/elementwise.py)."""
    torch.manual_seed(12)
    result = convert_model(Functional(fn).eval(), torch.randn(1, 3, 8, 8), n_random=1, tflite=("fp32",),
                           raise_on_mismatch=False)
    assert result.report.ok, result.report.summary()
    assert result.tflite_reports["fp32"].ok, result.tflite_reports["fp32"].summary()
