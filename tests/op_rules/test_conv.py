"""Parity sweeps for op_rules/conv.py and fixes/grouped_conv_transpose.py.

Axes are swept a few at a time (padding x stride, groups x dilation x bias, padding_mode x
padding, ...) rather than as one cartesian product, so the file stays fast.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tests.helpers import assert_converts

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")

IN_CH = 4
SIZES = {1: (13,), 2: (9, 11), 3: (5, 6, 7)}


def sample(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, IN_CH, *SIZES[n], generator=g)


def ids(case: dict) -> str:
    return "-".join(f"{k}{v}" for k, v in case.items()).replace(" ", "") or "default"


def layer_names(result) -> list[str]:
    return [type(layer).__name__ for layer in result.keras_model.layers]


class Wrap(nn.Module):
    """Holds the layer as a submodule, so it is captured as one module call (a bare root module
    would be traced through its forward instead)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


def conv(n: int, out: int = 6, k: int = 3, **kw) -> nn.Module:
    torch.manual_seed(0)
    return Wrap({1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[n](IN_CH, out, k, **kw))


def conv_t(n: int, out: int = 6, k: int = 3, **kw) -> nn.Module:
    torch.manual_seed(0)
    return Wrap({1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[n](IN_CH, out, k, **kw))


# ---- Conv1d / Conv2d -------------------------------------------------------------------------

@pytest.mark.parametrize("dilation", [1, 2], ids=["d1", "d2"])
@pytest.mark.parametrize("stride", [1, 2, (2, 1)], ids=["s1", "s2", "s21"])
@pytest.mark.parametrize("padding", [0, 1, 2, (1, 2), "valid"], ids=["p0", "p1", "p2", "p12", "valid"])
def test_conv2d_padding_stride_dilation(padding, stride, dilation):
    assert_converts(conv(2, padding=padding, stride=stride, dilation=dilation), sample(2))


@pytest.mark.parametrize("k", [3, 4, (2, 5)], ids=["k3", "k4", "k25"])
@pytest.mark.parametrize("dilation", [1, 2, (1, 2)], ids=["d1", "d2", "d12"])
def test_conv2d_same(k, dilation):
    """'same' (stride 1 only in torch) pads (total // 2, rest): asymmetric for even kernels."""
    assert_converts(conv(2, k=k, padding="same", dilation=dilation), sample(2))


GROUPS = {"g1": (1, 6), "g2": (2, 6), "depthwise": (IN_CH, IN_CH), "depthwise_x2": (IN_CH, 2 * IN_CH)}


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dilation", [1, 2], ids=["d1", "d2"])
@pytest.mark.parametrize("groups", list(GROUPS))
def test_conv2d_groups_dilation_bias(groups, dilation, bias):
    g, out = GROUPS[groups]
    result = assert_converts(conv(2, out=out, groups=g, dilation=dilation, bias=bias, padding=1), sample(2))
    if groups.startswith("depthwise"):
        assert "DepthwiseConv2D" in layer_names(result)


@pytest.mark.parametrize("groups", list(GROUPS))
def test_conv2d_groups_strided(groups):
    g, out = GROUPS[groups]
    assert_converts(conv(2, out=out, groups=g, stride=2, padding=(1, 2)), sample(2))


@pytest.mark.parametrize("padding", [1, (1, 2), "same"], ids=["p1", "p12", "same"])
@pytest.mark.parametrize("mode", ["zeros", "reflect", "replicate", "circular"])
def test_conv2d_padding_mode(mode, padding):
    assert_converts(conv(2, padding=padding, padding_mode=mode, k=(3, 4) if padding == "same" else 3), sample(2))


@pytest.mark.parametrize("mode", ["reflect", "circular"])
def test_conv2d_padding_mode_strided_grouped(mode):
    assert_converts(conv(2, out=8, padding=2, padding_mode=mode, stride=2, dilation=2, groups=2), sample(2))


def test_conv2d_stride2_uses_explicit_padding():
    """The seed issue: TF 'same' pads asymmetrically after a stride; the rule must pad explicitly."""
    torch.manual_seed(0)
    result = assert_converts(conv(2, padding=1, stride=2), torch.randn(1, IN_CH, 10, 12))
    names = layer_names(result)
    assert names.count("ZeroPadding2D") == 1
    keras_conv = next(layer for layer in result.keras_model.layers if type(layer).__name__ == "Conv2D")
    assert keras_conv.padding == "valid"


@pytest.mark.parametrize("case", [
    dict(padding=0), dict(padding=2, stride=2), dict(padding="same", dilation=2), dict(padding="valid", stride=3),
    dict(padding=1, groups=2, out=8), dict(padding=1, groups=IN_CH, out=IN_CH),
    dict(padding=1, groups=IN_CH, out=2 * IN_CH, stride=2), dict(padding=2, dilation=2, bias=False),
    dict(padding=1, padding_mode="reflect"), dict(padding=2, padding_mode="replicate", stride=2),
    dict(padding=1, padding_mode="circular", groups=2, out=8),
], ids=ids)
def test_conv1d(case):
    case = dict(case)
    out = case.pop("out", 6)
    result = assert_converts(conv(1, out=out, **case), sample(1))
    if case.get("groups") == IN_CH:
        assert "DepthwiseConv1D" in layer_names(result)


@pytest.mark.parametrize("case", [
    dict(padding=1), dict(padding=(0, 1, 2), stride=(1, 2, 2)), dict(padding="same", dilation=(1, 2, 1)),
    dict(padding=1, groups=2, out=8, bias=False), dict(padding=1, groups=IN_CH, out=IN_CH),
    dict(padding=1, padding_mode="circular", stride=2),
], ids=ids)
def test_conv3d(case):
    case = dict(case)
    out = case.pop("out", 6)
    assert_converts(conv(3, out=out, **case), sample(3))


# ---- functional convolutions -----------------------------------------------------------------

class FunctionalConv(nn.Module):
    """F.conv{1,2,3}d with the weight and bias held as this module's parameters."""

    def __init__(self, n: int, out: int, k: int, groups: int = 1, bias: bool = True, **kw):
        super().__init__()
        torch.manual_seed(0)
        self.weight = nn.Parameter(torch.randn(out, IN_CH // groups, *(k,) * n) * 0.3)
        self.bias = nn.Parameter(torch.randn(out)) if bias else None
        self.fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[n]
        self.kw = dict(groups=groups, **kw)

    def forward(self, x):
        return self.fn(x, self.weight, self.bias, **self.kw)


@pytest.mark.parametrize("case", [
    dict(n=2), dict(n=2, stride=2, padding=1), dict(n=2, stride=(2, 1), padding=(1, 2), dilation=2),
    dict(n=2, padding="same", dilation=2, k=4), dict(n=2, padding="valid", bias=False),
    dict(n=2, groups=2, out=8, padding=1), dict(n=2, groups=IN_CH, out=2 * IN_CH, padding=1, stride=2),
    dict(n=1, stride=2, padding=1), dict(n=1, groups=IN_CH, out=IN_CH, padding="same"),
    dict(n=3, padding=1, stride=2),
], ids=ids)
def test_functional_conv(case):
    case = dict(case)
    n, out, k = case.pop("n"), case.pop("out", 6), case.pop("k", 3)
    assert_converts(FunctionalConv(n, out, k, **case), sample(n))


def test_functional_conv_positional_args():
    class Positional(FunctionalConv):
        def forward(self, x):
            return F.conv2d(x, self.weight, self.bias, 2, 1, 1, 1)

    assert_converts(Positional(2, 6, 3), sample(2))


# ---- transposed convolutions -----------------------------------------------------------------

TRANSPOSE_SPS = [(s, p, op) for s in (1, 2, 3) for p in (0, 1, 2) for op in (0, 1) if op < s]


@pytest.mark.parametrize("stride,padding,output_padding", TRANSPOSE_SPS,
                         ids=[f"s{s}-p{p}-op{op}" for s, p, op in TRANSPOSE_SPS])
def test_conv_transpose2d_stride_padding(stride, padding, output_padding):
    m = conv_t(2, stride=stride, padding=padding, output_padding=output_padding)
    assert_converts(m, sample(2))


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dilation", [1, 2], ids=["d1", "d2"])
@pytest.mark.parametrize("groups", [1, 2], ids=["g1", "g2"])
def test_conv_transpose2d_groups_dilation_bias(groups, dilation, bias):
    m = conv_t(2, groups=groups, dilation=dilation, bias=bias, stride=2, padding=1, output_padding=1)
    result = assert_converts(m, sample(2))
    assert layer_names(result).count("Conv2DTranspose") == groups


@pytest.mark.parametrize("case", [
    dict(stride=(2, 3), padding=(1, 0), output_padding=(1, 2)), dict(stride=(1, 2), padding=(2, 1), dilation=(2, 1)),
    dict(k=4, stride=2, padding=1), dict(k=(2, 5), stride=3, padding=(0, 2), output_padding=(2, 1), groups=2),
], ids=ids)
def test_conv_transpose2d_per_dim(case):
    case = dict(case)
    assert_converts(conv_t(2, k=case.pop("k", 3), **case), sample(2))


@pytest.mark.parametrize("case", [
    dict(stride=1, dilation=2, output_padding=1), dict(stride=1, dilation=3, output_padding=2, padding=1),
    dict(stride=2, dilation=3, output_padding=2), dict(stride=(1, 2), dilation=(2, 3), output_padding=(1, 2)),
    dict(stride=2, dilation=3, output_padding=2, padding=2, groups=2),
], ids=ids)
def test_conv_transpose2d_output_padding_beyond_stride(case):
    """torch allows output_padding < max(stride, dilation); Keras's own output_padding must stay < stride."""
    assert_converts(conv_t(2, **case), sample(2))


class OutputSize(nn.Module):
    def __init__(self, n: int, size: tuple, **kw):
        super().__init__()
        self.layer = conv_t(n, **kw).layer
        self.size = size

    def forward(self, x):
        return self.layer(x, output_size=self.size)


@pytest.mark.parametrize("n,size,kw", [
    (2, (18, 22), dict(stride=2, padding=1)), (2, (18, 33), dict(stride=(2, 3), padding=1)),
    (1, (27,), dict(stride=2)), (2, (20, 24), dict(stride=2, padding=1, groups=2, dilation=2)),
], ids=["s2", "s23", "1d", "grouped-dilated"])
def test_conv_transpose_forward_output_size(n, size, kw):
    assert_converts(OutputSize(n, size, **kw), sample(n))


def test_conv_transpose2d_grouped_one_layer_per_group():
    m = conv_t(2, out=8, groups=4, stride=2, padding=1, output_padding=1)
    result = assert_converts(m, sample(2))
    names = layer_names(result)
    assert names.count("Conv2DTranspose") == 4
    assert names.count("Concatenate") == 1


@pytest.mark.parametrize("case", [
    dict(), dict(stride=2), dict(stride=2, padding=1, output_padding=1), dict(stride=3, padding=2, output_padding=2),
    dict(stride=2, padding=1, dilation=2, bias=False), dict(stride=2, padding=1, output_padding=1, groups=2),
    dict(stride=3, padding=0, output_padding=1, groups=4, out=4),
], ids=ids)
def test_conv_transpose1d(case):
    case = dict(case)
    out = case.pop("out", 6)
    assert_converts(conv_t(1, out=out, **case), sample(1))


@pytest.mark.parametrize("case", [
    dict(stride=2, padding=1, output_padding=1), dict(stride=(1, 2, 2), padding=(0, 1, 2), groups=2),
], ids=ids)
def test_conv_transpose3d(case):
    assert_converts(conv_t(3, **case), sample(3))


class FunctionalConvTranspose(nn.Module):
    def __init__(self, groups: int = 1, **kw):
        super().__init__()
        torch.manual_seed(0)
        self.weight = nn.Parameter(torch.randn(IN_CH, 3, 3, 3) * 0.3)  # (in, out / groups, kh, kw)
        self.bias = nn.Parameter(torch.randn(3 * groups))
        self.kw = dict(groups=groups, **kw)

    def forward(self, x):
        return F.conv_transpose2d(x, self.weight, self.bias, **self.kw)


@pytest.mark.parametrize("case", [
    dict(), dict(stride=2, padding=1, output_padding=1), dict(stride=3, padding=2, dilation=2, groups=2),
], ids=ids)
def test_functional_conv_transpose2d(case):
    assert_converts(FunctionalConvTranspose(**case), sample(2))


@pytest.mark.parametrize("transposed", [False, True], ids=["conv", "conv_transpose"])
def test_bare_root_module(transposed):
    """A conv that is the whole model (captured through its forward, not as one module call) converts too."""
    layer = (conv_t(2, stride=2, padding=1, output_padding=1, dilation=2) if transposed
             else conv(2, stride=2, padding=1, dilation=2)).layer
    assert_converts(layer, sample(2))


@pytest.mark.parametrize("transposed", [False, True], ids=["conv", "conv_transpose"])
def test_stride_with_dilation_structure(transposed):
    """Keras refuses stride > 1 with dilation > 1: the conv runs at stride 1 (fixes/strided_dilated_conv.py)."""
    make = conv_t if transposed else conv
    result = assert_converts(make(2, stride=(2, 1), dilation=(1, 2), padding=1), sample(2))
    keras_conv = next(layer for layer in result.keras_model.layers
                      if type(layer).__name__ == ("Conv2DTranspose" if transposed else "Conv2D"))
    assert keras_conv.strides == (1, 1) and keras_conv.dilation_rate == (1, 2)

