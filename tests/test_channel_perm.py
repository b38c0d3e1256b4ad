"""Channel shuffles absorbed into weights in inference models (tracer/passes/channel_perm.py, fold_bn=True)."""
from __future__ import annotations

import torch
import torch.nn as nn

from tests.helpers import assert_converts, randomize_bn


def shuffle(x: torch.Tensor, g: int) -> torch.Tensor:
    n, c, h, w = x.shape
    return x.view(n, g, c // g, h, w).permute(0, 2, 1, 3, 4).contiguous().view(n, c, h, w)


class ShuffleBlock(nn.Module):
    """FBNet/ShuffleNet: [grouped 1x1 -> BN -> ReLU] -> shuffle -> dw -> BN -> ReLU -> grouped 1x1 -> BN (+ x)."""

    def __init__(self, c: int, g: int, expand: bool, pwl_groups: int | None = None):
        super().__init__()
        self.g = g
        self.pw = nn.Sequential(nn.Conv2d(c, c, 1, groups=g), nn.BatchNorm2d(c), nn.ReLU()) if expand else None
        self.dw = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, groups=c), nn.BatchNorm2d(c), nn.ReLU6())
        self.pwl = nn.Sequential(nn.Conv2d(c, c, 1, groups=pwl_groups or g), nn.BatchNorm2d(c))

    def forward(self, x):
        y = self.pw(x) if self.pw is not None else x
        return x + self.pwl(self.dw(shuffle(y, self.g)))


class Net(nn.Module):
    def __init__(self, *blocks: nn.Module, c: int = 8):
        super().__init__()
        self.stem, self.blocks, self.head = nn.Conv2d(3, c, 3, padding=1), nn.Sequential(*blocks), nn.Linear(c, 5)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def _net(*blocks: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(Net(*blocks)).eval()


def test_shuffles_feeding_convs_move_no_data():
    torch.manual_seed(0)
    model = _net(ShuffleBlock(8, 2, expand=True), ShuffleBlock(8, 4, expand=False), ShuffleBlock(8, 2, False, 1))
    x = torch.randn(2, 3, 6, 6)
    folded = assert_converts(model, x, fold_bn=True, channels_last_io=True)
    assert folded.transpose_count == 0, folded.transposes
    notes = " ".join(folded.facts()["notes"])
    assert notes.count("channel permutation") == 3
    default = assert_converts(model, x, channels_last_io=True)
    assert default.transpose_count == 3  # trainable model: the grouped convs stay grouped


def test_absorbed_grouped_conv_becomes_dense_with_zeros_outside_the_groups():
    torch.manual_seed(0)
    model = _net(ShuffleBlock(8, 2, expand=False))
    result = assert_converts(model, torch.randn(1, 3, 5, 5), fold_bn=True)
    convs = [layer for layer in result.keras_model.layers if type(layer).__name__ == "Conv2D"]
    assert [c.groups for c in convs] == [1, 1]  # stem, pwl (was groups=2)
    kernel = convs[1].get_weights()[0][0, 0]  # (in, out)
    assert (kernel == 0).sum() == kernel.size // 2


class NotPerChannel(nn.Module):
    """The shuffled tensor meets another tensor before any conv: the permutation must stay."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        return self.conv(shuffle(x, 2) + x)


class SpaceToChannel(nn.Module):
    """view/permute/view that moves pixels into channels: not a channel permutation."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        n, c, h, w = x.shape
        y = x.view(n, c, h // 2, 2, w).permute(0, 1, 3, 2, 4).reshape(n, c, h, w)
        return self.conv(y)


def test_other_permutations_are_left_alone():
    torch.manual_seed(0)
    for model in (NotPerChannel(), SpaceToChannel()):
        result = assert_converts(model.eval(), torch.randn(2, 8, 4, 4), fold_bn=True)
        assert "channel permutation" not in " ".join(result.facts()["notes"]), type(model).__name__
