"""Parity sweeps for op_rules/reduce.py: vector norms (torch.norm, Tensor.norm, torch.linalg.vector_norm /
norm: p = 0, 1, 2, 3, inf, -inf, 'fro'; dims; keepdim) and max/min along a dim (values and indices),
over everything and elementwise. Inputs are image maps, so dims are also read through the NHWC layout."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from tests.helpers import assert_converts
from tracer.errors import ConversionError


def sample(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


class AfterConv(nn.Module):
    """``fn`` on a conv's output: a channels-last map inside Keras, dims given in torch's order."""

    def __init__(self, fn):
        super().__init__()
        self.conv, self.fn = nn.Conv2d(3, 4, 3, padding=1), fn

    def forward(self, x):
        return self.fn(self.conv(x))


NORMS = {
    "tensor-p2-dim1-keep": lambda y: y.norm(p=2, dim=1, keepdim=True),
    "tensor-fro-all": lambda y: y.norm(),
    "torch-p1-dims23": lambda y: torch.norm(y, 1, dim=(2, 3)),
    "torch-inf-dim-1": lambda y: torch.norm(y, float("inf"), dim=-1),
    "torch-fro-dims23-keep": lambda y: torch.norm(y, "fro", dim=(2, 3), keepdim=True),
    "vector-p3-dim1": lambda y: torch.linalg.vector_norm(y, ord=3, dim=1),
    "vector-neginf-dims12": lambda y: torch.linalg.vector_norm(y, ord=-math.inf, dim=(1, 2)),
    "vector-p0-dim2-keep": lambda y: torch.linalg.vector_norm(torch.relu(y), ord=0, dim=2, keepdim=True),
    "vector-p2-all": lambda y: torch.linalg.vector_norm(y),
    "linalg-dim1": lambda y: torch.linalg.norm(y, dim=1),
    "convnextv2-grn": lambda y: y * (y.norm(p=2, dim=(2, 3), keepdim=True)
                                     / (y.norm(p=2, dim=(2, 3), keepdim=True).mean(dim=1, keepdim=True) + 1e-6)),
}


@pytest.mark.parametrize("fn", list(NORMS.values()), ids=list(NORMS))
def test_norm(fn):
    assert_converts(AfterConv(fn), sample(1, 3, 7, 9))


def test_matrix_norm_is_refused_naming_the_op():
    with pytest.raises(ConversionError, match="matrix norm"):
        assert_converts(AfterConv(lambda y: torch.linalg.norm(y, ord=2, dim=(2, 3))), sample(1, 3, 7, 9))


MINMAX = {
    "max-dim1-values": lambda y: y.max(dim=1)[0],
    "max-dim1-both": lambda y: tuple(y.max(1)),
    "min-dim-1-values-attr": lambda y: y.min(-1).values,
    "min-dim2-indices-attr": lambda y: y.min(dim=2).indices,
    "torch-max-dim3-keep": lambda y: torch.max(y, 3, keepdim=True),
    "torch-min-dim1-keep-indices": lambda y: torch.min(y, dim=1, keepdim=True)[1],
    "max-all": lambda y: y.max() * torch.ones_like(y),
    "max-elementwise": lambda y: torch.max(y, y.flip(1)),
    "min-elementwise": lambda y: torch.min(y, -y),
}


@pytest.mark.parametrize("fn", list(MINMAX.values()), ids=list(MINMAX))
def test_max_min(fn):
    assert_converts(AfterConv(fn), sample(1, 3, 6, 5))


def test_max_along_tokens_of_a_sequence():
    """A (B, T, C) sequence: the max over time, values and argmax indices (int64 in torch, int32 in Keras)."""
    class Pool(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(8, 6)

        def forward(self, x):
            v, i = self.proj(x).max(dim=1)
            return v, i

    result = assert_converts(Pool(), sample(2, 5, 8, seed=1))
    assert str(result.keras_model.outputs[1].dtype) == "int32"
