"""FBNet-A for ImageNet (224x224, 1000 classes), written in plain PyTorch.

The architecture is the FBNet_a definition of Facebook's mobile_cv model zoo (FBNet: Wu et al.,
"Hardware-Aware Efficient ConvNet Design via Differentiable Neural Architecture Search", 2019):
a stride-2 3x3 ConvBNRelu stem, 22 searched blocks in stages ``xif1`` to ``xif5`` and a 1x1
ConvBNRelu to 1504 channels, then average pooling and a 1x1 convolution to the classes.

A searched block is an inverted residual (``IRFBlock``): 1x1 expansion ConvBNRelu (absent when
the expansion is 1), a depthwise k3 or k5 ConvBNRelu, a 1x1 projection ConvBN, and a residual
add when the shape is unchanged. The ``g2`` blocks use groups=2 in their 1x1 convolutions and
shuffle the channels (ShuffleNet's channel shuffle) after the expansion. ``skip`` blocks are
identities. Every convolution has a bias, as in the model zoo's ``use_bias`` configuration.
The 3x3 stride-2 stem and the stride-2 depthwise convolutions pad 1 (k3) or 2 (k5) on every
side, which TensorFlow's 'same' padding does not reproduce on even inputs (it pads 0 before and
1 after, or 1 and 2).

The layers run at 112, 56, 28, 14 and 7 pixels for 224x224 input; any input size that is a
multiple of 32 works (the tests use smaller ones).

Convert:  tracer convert examples/fbnet_a.py:build --input-shape 1,3,224,224
"""
from __future__ import annotations

import torch
import torch.nn as nn

# Stages of (op, out channels, stride, expansion, groups of the 1x1 convs); op "skip" is identity.
FBNET_A = (
    (("skip", 16, 1, 1, 1),),
    (("ir_k3", 24, 2, 3, 1), ("ir_k3", 24, 1, 1, 1), ("skip", 24, 1, 1, 1), ("skip", 24, 1, 1, 1)),
    (("ir_k5", 32, 2, 6, 1), ("ir_k3", 32, 1, 3, 1), ("ir_k5", 32, 1, 1, 1), ("ir_k3", 32, 1, 3, 1)),
    (("ir_k5", 64, 2, 6, 1), ("ir_k5", 64, 1, 3, 1), ("ir_k5", 64, 1, 1, 2), ("ir_k5", 64, 1, 6, 1),
     ("ir_k3", 112, 1, 6, 1), ("ir_k5", 112, 1, 1, 2), ("ir_k5", 112, 1, 3, 1), ("ir_k3", 112, 1, 1, 2)),
    (("ir_k5", 184, 2, 6, 1), ("ir_k5", 184, 1, 6, 1), ("ir_k5", 184, 1, 3, 1), ("ir_k5", 184, 1, 6, 1),
     ("ir_k5", 352, 1, 6, 1)),
)
STEM_CHANNELS, LAST_CHANNELS = 16, 1504


class ConvBNRelu(nn.Module):
    """conv -> bn (-> relu), named as the model zoo names them."""

    def __init__(self, cin: int, cout: int, kernel: int = 1, stride: int = 1, groups: int = 1,
                 relu: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=True)
        self.bn = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True) if relu else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv(x))
        return self.relu(x) if self.relu is not None else x


class ChannelShuffle(nn.Module):
    """ShuffleNet's channel shuffle: (N, g*k, H, W) -> view (N, g, k, H, W) -> swap g, k -> back."""

    def __init__(self, groups: int):
        super().__init__()
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.size()
        g = self.groups
        return x.view(n, g, c // g, h, w).permute(0, 2, 1, 3, 4).contiguous().view(n, c, h, w)


class IRFBlock(nn.Module):
    """Inverted residual: [1x1 expand] -> [shuffle] -> depthwise kxk -> 1x1 project (+ input)."""

    def __init__(self, cin: int, cout: int, expansion: int, kernel: int, stride: int, groups: int = 1):
        super().__init__()
        mid = cin * expansion
        self.pw = ConvBNRelu(cin, mid, 1, groups=groups) if mid != cin else None
        self.shuffle = ChannelShuffle(groups) if groups > 1 else None
        self.dw = ConvBNRelu(mid, mid, kernel, stride, groups=mid)
        self.pwl = ConvBNRelu(mid, cout, 1, groups=groups, relu=False)
        self.residual = cin == cout and stride == 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pw(x) if self.pw is not None else x
        if self.shuffle is not None:
            y = self.shuffle(y)
        y = self.pwl(self.dw(y))
        return y + x if self.residual else y


class ClsConvHead(nn.Module):
    """Global average pooling, a 1x1 convolution to the classes, flattened to (N, classes)."""

    def __init__(self, cin: int, num_classes: int):
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d((1, 1))
        self.conv = nn.Conv2d(cin, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.conv(self.avg_pool(x)), 1)


def _block(op: str, cin: int, cout: int, stride: int, expansion: int, groups: int) -> nn.Module:
    if op == "skip":
        if cin != cout or stride != 1:
            raise ValueError(f"a skip block keeps its shape; received cin={cin}, cout={cout}, stride={stride}")
        return nn.Identity()
    kernel = {"ir_k3": 3, "ir_k5": 5}[op]
    return IRFBlock(cin, cout, expansion, kernel, stride, groups)


class FBNet(nn.Module):
    """``backbone.stages`` holds ``xif0_0`` (stem) ... ``xif6_0`` (last 1x1); ``head`` classifies."""

    def __init__(self, arch=FBNET_A, num_classes: int = 1000):
        super().__init__()
        stages = nn.Sequential()
        stages.add_module("xif0_0", ConvBNRelu(3, STEM_CHANNELS, 3, 2))
        width = STEM_CHANNELS
        for s, stage in enumerate(arch, start=1):
            for i, (op, cout, stride, expansion, groups) in enumerate(stage):
                stages.add_module(f"xif{s}_{i}", _block(op, width, cout, stride, expansion, groups))
                width = cout
        stages.add_module(f"xif{len(arch) + 1}_0", ConvBNRelu(width, LAST_CHANNELS, 1))
        self.backbone = nn.Module()
        self.backbone.stages = stages
        self.head = ClsConvHead(LAST_CHANNELS, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone.stages(x))


def build(num_classes: int = 1000) -> FBNet:
    """FBNet-A in eval mode (4.3M parameters with 1000 classes)."""
    return FBNet(FBNET_A, num_classes).eval()


SAMPLE_SHAPE = (1, 3, 224, 224)

if __name__ == "__main__":
    from tracer import convert

    keras_model = convert(build(), torch.randn(SAMPLE_SHAPE))
    print(keras_model.tracer_result.report.summary())
