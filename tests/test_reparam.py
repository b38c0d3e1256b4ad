"""Parallel conv branches merged into one conv in inference models (tracer/passes/reparam.py, fold_bn=True)."""
from __future__ import annotations

import collections

import torch
import torch.nn as nn

from tests.helpers import assert_converts, randomize_bn


def _kinds(result) -> collections.Counter:
    return collections.Counter(type(layer).__name__ for layer in result.keras_model.layers)


class ConvBN(nn.Sequential):
    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, pad: int | None = None, groups: int = 1,
                 dilation: int = 1, conv=nn.Conv2d, bn=nn.BatchNorm2d):
        pad = dilation * (k - 1) // 2 if pad is None else pad
        super().__init__(conv(cin, cout, k, stride, pad, dilation=dilation, groups=groups, bias=False), bn(cout))


class RepBlock(nn.Module):
    """RepVGG's training form: 3x3 conv-BN + 1x1 conv-BN (+ BN identity) -> ReLU."""

    def __init__(self, c: int, groups: int = 1, identity: str | None = "bn", stride: int = 1):
        super().__init__()
        self.dense, self.one = ConvBN(c, c, 3, stride, groups=groups), ConvBN(c, c, 1, stride, groups=groups)
        self.identity = {"bn": nn.BatchNorm2d(c), "plain": nn.Identity(), None: None}[identity]

    def forward(self, x):
        y = self.dense(x) + self.one(x)
        return torch.relu(y + self.identity(x) if self.identity is not None else y)


def _rep(model: nn.Module) -> nn.Module:
    return randomize_bn(model.eval())


def test_repvgg_block_becomes_one_conv_with_parity():
    torch.manual_seed(0)
    model = _rep(nn.Sequential(RepBlock(8), RepBlock(8, identity="plain"), RepBlock(8, identity=None, stride=2)))
    result = assert_converts(model, torch.randn(1, 8, 12, 12), fold_bn=True)
    kinds = _kinds(result)
    assert kinds["Conv2D"] == 3 and kinds["BatchNormalization"] == 0, kinds
    notes = " ".join(result.facts()["notes"])
    assert "summed into one conv" in notes and "the identity" in notes


def test_grouped_branches_keep_groups_and_identity_lands_in_its_group():
    torch.manual_seed(0)
    model = _rep(nn.Sequential(RepBlock(8, groups=4), RepBlock(8, groups=2, identity="plain")))
    result = assert_converts(model, torch.randn(2, 8, 9, 9), fold_bn=True)
    convs = [layer for layer in result.keras_model.layers if type(layer).__name__ == "Conv2D"]
    assert [c.groups for c in convs] == [4, 2]


class RepDW(nn.Module):
    """RepViT's RepVGG-DW mixer: BN(dw3x3-BN(x) + dw1x1(x) + x)."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = ConvBN(c, c, 3, groups=c)
        self.conv1 = nn.Conv2d(c, c, 1, groups=c)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        return self.bn((self.conv(x) + self.conv1(x)) + x)


def test_depthwise_mixer_then_bn_becomes_one_depthwise_conv():
    torch.manual_seed(0)
    result = assert_converts(_rep(RepDW(6)), torch.randn(1, 6, 7, 5), fold_bn=True)
    kinds = _kinds(result)
    assert kinds["DepthwiseConv2D"] == 1 and kinds["BatchNormalization"] == 0 and kinds["Add"] == 0, kinds


class TwoConvs(nn.Module):
    def __init__(self, a: nn.Module, b: nn.Module, reuse: bool = False):
        super().__init__()
        self.a, self.b, self.reuse = a, b, reuse

    def forward(self, x):
        ya = self.a(x)
        y = ya + self.b(x)
        return (y, ya) if self.reuse else y


def test_5x5_and_3x3_merge_to_5x5_and_conv1d_works():
    torch.manual_seed(0)
    model = _rep(TwoConvs(ConvBN(4, 6, 5), ConvBN(4, 6, 3)))
    result = assert_converts(model, torch.randn(1, 4, 10, 10), fold_bn=True)
    (conv,) = [layer for layer in result.keras_model.layers if type(layer).__name__ == "Conv2D"]
    assert tuple(conv.kernel_size) == (5, 5)
    model1d = _rep(TwoConvs(ConvBN(4, 4, 3, conv=nn.Conv1d, bn=nn.BatchNorm1d),
                            ConvBN(4, 4, 1, conv=nn.Conv1d, bn=nn.BatchNorm1d)))
    assert _kinds(assert_converts(model1d, torch.randn(1, 4, 16), fold_bn=True))["Conv1D"] == 1


def test_branches_that_cannot_share_a_kernel_stay_apart():
    torch.manual_seed(0)
    cases = {
        "dilation differs": TwoConvs(ConvBN(4, 4, 3), ConvBN(4, 4, 3, dilation=2)),
        "even kernel": TwoConvs(ConvBN(4, 4, 2, pad=0), ConvBN(4, 4, 2, pad=0)),
        "branch used twice": TwoConvs(ConvBN(4, 4, 3), ConvBN(4, 4, 1), reuse=True),
        "groups differ": TwoConvs(ConvBN(4, 4, 3, groups=2), ConvBN(4, 4, 1)),
    }
    for why, model in cases.items():
        result = assert_converts(_rep(model), torch.randn(1, 4, 8, 8), fold_bn=True)
        assert _kinds(result)["Conv2D"] == 2, why


def test_branches_padded_past_their_centre_merge_with_that_offset():
    """3x3 pad 2 and 1x1 pad 1 both grow the map by one pixel a side: one 3x3 conv with pad 2."""
    torch.manual_seed(0)
    result = assert_converts(_rep(TwoConvs(ConvBN(4, 4, 3, pad=2), ConvBN(4, 4, 1, pad=1))),
                             torch.randn(1, 4, 8, 8), fold_bn=True)
    assert _kinds(result)["Conv2D"] == 1


def test_default_conversion_keeps_every_branch_trainable():
    torch.manual_seed(0)
    model = _rep(RepBlock(8))
    kinds = _kinds(assert_converts(model, torch.randn(1, 8, 6, 6)))
    assert kinds["Conv2D"] == 2 and kinds["BatchNormalization"] == 3, kinds
