"""Parity sweeps for op_rules/misc_ops.py (unbind)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tests.helpers import assert_converts
from tracer import convert_model
from tracer.errors import ConversionError


class ConvUnbind(nn.Module):
    """conv (an NHWC map inside Keras), then the slices along ``dim`` combined with distinct weights."""

    def __init__(self, dim: int, method: bool = True):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.dim, self.method = dim, method

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        parts = y.unbind(self.dim) if self.method else torch.unbind(y, dim=self.dim)
        return sum((k + 1) * p for k, p in enumerate(parts))


@pytest.mark.parametrize("dim", [1, 2, 3, -1, -2])
@pytest.mark.parametrize("method", [True, False])
def test_unbind_of_an_image_map(dim, method):
    x = torch.randn(2, 3, 5, 4, generator=torch.Generator().manual_seed(1))
    result = assert_converts(ConvUnbind(dim, method), x)
    # the NCHW input, and for a rank-3 (B, C, W) result still channels-last, the output; the slicing none
    assert result.transpose_count == (1 if dim == 1 else 2)


class FusedQKV(nn.Module):
    """ViT-style heads: linear to 3*dim, reshape, permute(2, 0, 3, 1, 4), unbind(0), attention scores."""

    def __init__(self, dim: int = 8, heads: int = 2):
        super().__init__()
        torch.manual_seed(0)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.heads = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        return (q * 2.0 + k) * v.sigmoid()


def test_unbind_after_permute_moves_no_data():
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(2))
    result = assert_converts(FusedQKV(), x)
    assert result.transpose_count == 1  # only for the (B, heads, N, d) output in torch order


def test_unbind_captured_with_torch_export():
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(2))
    result = convert_model(FusedQKV(), x, capture="export", n_random=1, raise_on_mismatch=False)
    assert result.facts()["capture"]["method"] == "torch.export"
    assert result.report.ok, result.report.summary()
    assert result.facts()["ops_by_rule"]["unbind"] == 1


class UnbindBatch(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.unbind(0)[0]


def test_unbind_of_the_batch_axis_is_refused_with_a_reason():
    torch.manual_seed(0)
    with pytest.raises(ConversionError, match="batch axis"):
        convert_model(UnbindBatch(), torch.randn(2, 3))


class Affine(nn.Module):
    """ResMLP's affine layer: ``torch.addcmul(beta, alpha, x)`` with per-channel parameters."""

    def __init__(self, shape: tuple, conv: bool):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1) if conv else None
        self.alpha = nn.Parameter(torch.randn(shape))
        self.beta = nn.Parameter(torch.randn(shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x) if self.conv is not None else x
        return torch.addcmul(self.beta, self.alpha, x)


@pytest.mark.parametrize("shape, conv, x_shape", [((8,), False, (2, 5, 8)), ((1, 4, 1, 1), True, (2, 3, 6, 5))])
def test_addcmul_with_parameters(shape, conv, x_shape):
    x = torch.randn(*x_shape, generator=torch.Generator().manual_seed(4))
    result = assert_converts(Affine(shape, conv), x)
    assert result.facts()["ops_by_rule"]["addcmul"] == 1


class AddcmulTensors(nn.Module):
    def __init__(self, value: float, method: bool):
        super().__init__()
        self.value, self.method = value, method

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        t1, t2 = torch.tanh(x), torch.sigmoid(y)
        return x.addcmul(t1, t2, value=self.value) if self.method else torch.addcmul(y, t1, t2, value=self.value)


@pytest.mark.parametrize("value", [1.0, -0.5])
@pytest.mark.parametrize("method", [True, False])
def test_addcmul_of_tensors_with_a_value(value, method):
    g = torch.Generator().manual_seed(5)
    assert_converts(AddcmulTensors(value, method), torch.randn(2, 4, 3, generator=g), torch.randn(2, 1, 3, generator=g))


class Normalize(nn.Module):
    def __init__(self, p: float, dim: int, conv: bool):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1) if conv else None
        self.p, self.dim = p, dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x) if self.conv is not None else x
        return F.normalize(x, p=self.p, dim=self.dim)


@pytest.mark.parametrize("p", [1.0, 2.0])
@pytest.mark.parametrize("dim, conv, shape", [(1, True, (2, 3, 5, 4)), (-1, True, (2, 3, 5, 4)), (-1, False, (2, 6, 8)),
                                              (1, False, (2, 6, 8))])
def test_normalize(p, dim, conv, shape):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(6))
    assert_converts(Normalize(p, dim, conv), x)


def test_normalize_of_zeros_keeps_eps():
    x = torch.zeros(2, 6, 8)
    assert_converts(Normalize(2.0, -1, False), x)


class InvertedMask(nn.Module):
    """EdgeNeXt's positional encoding: ``~torch.zeros((B, H, W)).bool()`` summed along H and W, and
    ``~`` of a mask given as an input."""

    def __init__(self, method: str):
        super().__init__()
        self.method = method

    def _not(self, m: torch.Tensor) -> torch.Tensor:
        return {"op": lambda: ~m, "torch": lambda: torch.bitwise_not(m), "logical": lambda: torch.logical_not(m),
                "method": lambda: m.bitwise_not()}[self.method]()

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        inv = self._not(torch.zeros((b, h, w)).to(dtype=torch.bool))
        pos = inv.cumsum(1, dtype=torch.float32) + inv.cumsum(2, dtype=torch.float32)
        return x * self._not(mask).float() + pos.unsqueeze(1)


@pytest.mark.parametrize("method", ["op", "torch", "logical", "method"])
@pytest.mark.parametrize("capture", ["fx", "export"])
def test_invert_of_bool_masks(method, capture):
    x = torch.randn(1, 3, 4, 5, generator=torch.Generator().manual_seed(3))
    mask = torch.rand(1, 3, 4, 5, generator=torch.Generator().manual_seed(4)) > 0.5
    result = convert_model(InvertedMask(method).eval(), (x, mask), capture=capture, n_random=2,
                           raise_on_mismatch=False)
    assert result.report.ok, result.report.summary()


class IntInvert(nn.Module):
    def forward(self, ids: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x * (~ids).float() + torch.logical_not(ids).float()


def test_invert_of_integers_is_bitwise_not():
    torch.manual_seed(0)
    ids = torch.tensor([[0, 1, -3, 7], [2, -1, 5, 0]])
    result = assert_converts(IntInvert(), ids, torch.randn(2, 4))
    assert result.report.trials[0].outputs[0].max_abs == 0.0
