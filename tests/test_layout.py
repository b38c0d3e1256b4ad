"""The layout pass: Transpose ops left on small models mixing layout-sensitive ops.

Each count is the minimum for the model: with PyTorch-layout I/O one conversion per image
input and output at most, with channels-last I/O none. Every remaining one carries its reason.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tests.helpers import assert_converts, randomize_bn


class MixedOps(nn.Module):
    """conv, BN, relu, concat, max pool, padding, slicing, GroupNorm, a reduction, map -> tokens ->
    LayerNorm/Linear/softmax -> map, conv."""

    def __init__(self):
        super().__init__()
        self.c1, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.gn = nn.Conv2d(16, 8, 1), nn.GroupNorm(2, 8)
        self.ln, self.fc, self.c3 = nn.LayerNorm(8), nn.Linear(8, 8), nn.Conv2d(8, 4, 3)

    def forward(self, x):
        y = F.relu(self.bn(self.c1(x)))
        y = torch.cat([y, F.max_pool2d(y, 3, 1, 1)], 1)
        y = F.pad(self.c2(y), (1, 1, 1, 1))[:, :, 1:-1, 1:-1]
        y = self.gn(y) * torch.sigmoid(y.mean((2, 3), keepdim=True))
        n, c, h, w = y.shape
        t = y.flatten(2).transpose(1, 2)
        t = torch.softmax(t + self.fc(self.ln(t)), -1)
        return self.c3(t.transpose(1, 2).reshape(n, c, h, w))


class InputResidual(nn.Module):
    """The input itself joins a residual sum: its channels-last copy is shared, not made twice."""

    def __init__(self):
        super().__init__()
        self.c, self.d = nn.Conv2d(3, 3, 3, padding=1), nn.Conv2d(3, 5, 1)

    def forward(self, x):
        return self.d(x + self.c(x))


class Preprocess(nn.Module):
    """Elementwise preprocessing before the first conv."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return self.c((x - 0.5) * 2.0)


class Gate(nn.Module):
    """Two inputs: a conv branch gated by the second input."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x, z):
        return self.c(x) * torch.sigmoid(z)


class FlattenHead(nn.Module):
    """Flatten of an NHWC map before a Linear (folded into its weights), then a constant matmul."""

    def __init__(self):
        super().__init__()
        self.c, self.fc = nn.Conv2d(3, 8, 3), nn.Linear(8 * 6 * 6, 10)
        self.w = nn.Parameter(torch.randn(10, 5))

    def forward(self, x):
        return torch.softmax(self.fc(torch.flatten(F.relu(self.c(x)), 1)) @ self.w, -1)


class ChannelMatmul(nn.Module):
    """A matmul over the channel axis with a constant matrix, written with permutes."""

    def __init__(self):
        super().__init__()
        self.c, self.w = nn.Conv2d(3, 8, 1), nn.Parameter(torch.randn(8, 6))

    def forward(self, x):
        return (self.c(x).permute(0, 2, 3, 1) @ self.w).permute(0, 3, 1, 2).amax(1)


class Conv1dTokens(nn.Module):
    """Tokens (N, L, C) through a 1x1 Conv1d by transposes, and back."""

    def __init__(self):
        super().__init__()
        self.c, self.fc = nn.Conv1d(6, 6, 1), nn.Linear(6, 4)

    def forward(self, t):
        return self.fc(F.gelu(self.c(t.transpose(1, 2)).transpose(1, 2)))


class UnfoldFold(nn.Module):
    """MobileViT: NCHW map -> (B, C, patch pixels, patches) -> norm + 1x1 conv residuals -> map."""

    def __init__(self, c: int = 8, p: int = 2):
        super().__init__()
        self.p = p
        self.conv_in, self.conv_out = nn.Conv2d(3, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1)
        self.norms = nn.ModuleList(nn.GroupNorm(1, c) for _ in range(2))
        self.mixers = nn.ModuleList(nn.Conv2d(c, c, 1) for _ in range(2))

    def forward(self, x):
        x = self.conv_in(x)
        b, c, h, w = x.shape
        p = self.p
        t = x.reshape(b, c, h // p, p, w // p, p).permute(0, 1, 3, 5, 2, 4).reshape(b, c, p * p, -1)
        for norm, mix in zip(self.norms, self.mixers):
            t = t + mix(norm(t))
        y = t.reshape(b, c, p, p, h // p, w // p).permute(0, 1, 4, 2, 5, 3).reshape(b, c, h, w)
        return self.conv_out(y)


CASES = [
    # model, input shapes, Transposes with PyTorch-layout I/O, with channels-last I/O
    (MixedOps, [(1, 3, 8, 8)], 2, 0),
    (InputResidual, [(1, 3, 8, 8)], 2, 0),
    (Preprocess, [(1, 3, 8, 8)], 2, 0),
    (Gate, [(1, 3, 8, 8), (1, 3, 8, 8)], 2, 0),
    (FlattenHead, [(1, 3, 8, 8)], 1, 0),
    (ChannelMatmul, [(1, 3, 6, 6)], 1, 0),
    (Conv1dTokens, [(1, 5, 6)], 0, 0),
    (UnfoldFold, [(2, 3, 8, 8)], 4, 2),  # the unfold and the fold each move data once
]


@pytest.mark.parametrize("channels_last_io", [False, True], ids=["torch_io", "channels_last_io"])
@pytest.mark.parametrize("cls,shapes,n_torch,n_cl", CASES, ids=[c[0].__name__ for c in CASES])
def test_transpose_count(cls, shapes, n_torch, n_cl, channels_last_io):
    torch.manual_seed(0)
    model = randomize_bn(cls()).eval()
    result = assert_converts(model, *[torch.randn(*s) for s in shapes], channels_last_io=channels_last_io)
    want = n_cl if channels_last_io else n_torch
    assert result.transpose_count == want, result.transposes
    assert len(result.transposes) == want  # each layout conversion is recorded with its reason
    assert result.facts()["layout_conversions"] == result.transposes


def test_transpose_reasons_name_the_consumer():
    torch.manual_seed(0)
    result = assert_converts(InputResidual().eval(), torch.randn(1, 3, 8, 8))
    first, last = result.transposes
    assert first.startswith("x: ") and "(c)" in first and "(0, 2, 3, 1)" in first
    assert "model output" in last


def test_export_capture_weighs_elementwise_layouts_like_fx():
    """ATen adds (torch.export capture) choose their layout as fx-captured adds do: no transposes
    back and forth around the residuals."""
    from tracer import convert_model
    torch.manual_seed(0)
    model = UnfoldFold().eval()
    result = convert_model(model, torch.randn(2, 3, 8, 8), capture="export", n_random=1, raise_on_mismatch=False)
    assert result.report.ok, result.report.summary()
    assert result.facts()["capture"]["method"] == "torch.export"
    assert result.transpose_count == 4, result.transposes
