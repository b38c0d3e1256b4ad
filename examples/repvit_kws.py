"""A RepViT keyword spotter for log-mel input, written in plain PyTorch.

RepViT's blocks follow Wang et al., "RepViT: Revisiting Mobile CNN From ViT Perspective"
(CVPR 2024; github.com/THU-MIG/RepViT), sized down for keyword spotting.

Input ``(B, 100, 40)``: 100 frames of 40 mel bins; the model adds the channel axis itself.
Output ``(B, num_classes)`` logits (2 by default: keyword / no keyword).

Shapes through the network (channels, time, frequency)::

    (1, 100, 40) -> patch embedding, two stride-2 convs -> (24, 25, 10)
    3 blocks at 24 channels                             -> (24, 25, 10)
    stride-(2, 1) block, then 6 blocks at 48 channels   -> (48, 13, 10)
    stride-(2, 1) block, then 2 blocks at 96 channels   -> (96,  7, 10)
    global average pool + Linear(96, num_classes)

The time axis shrinks 100 -> 50 -> 25 -> 13 -> 7 and the frequency axis 40 -> 20 -> 10, then
stays. 25 and 13 frames are odd, so the stride-2 time convolutions are the cases where
TensorFlow's 'same' padding pads asymmetrically (0 before, 1 after) while PyTorch pads 1 on
both sides; the converter must pad explicitly to agree.

With two classes the model has exactly 214,222 trainable parameters; BatchNorm
layers hold 3,444 channels (6,888 running statistics). RepViT's blocks: a token mixer (a
RepVGG-style depthwise 3x3 + 1x1 + identity, or a strided depthwise conv for downsampling,
optionally followed by squeeze-excitation) and a residual channel mixer (1x1 expand x2, GELU,
1x1 project, whose BatchNorm starts at weight 0).

Convert:  tracer convert examples/repvit_kws.py:build --input-shape 1,100,40
"""
from __future__ import annotations

import torch
import torch.nn as nn

try:  # imported as examples.repvit_kws (tests)
    from examples.common import ConvBN
except ImportError:  # loaded from its file (tracer convert puts this folder on sys.path)
    from common import ConvBN

# (kernel, expansion, channels, squeeze-excite, stride): 13 blocks, as RepViT's configs
KWS_TINY_CFGS = (
    (3, 2, 24, True, 1), (3, 2, 24, False, 1), (3, 2, 24, False, 1),
    (3, 2, 48, False, (2, 1)),
    (3, 2, 48, True, 1), (3, 2, 48, False, 1), (3, 2, 48, True, 1),
    (3, 2, 48, False, 1), (3, 2, 48, True, 1), (3, 2, 48, False, 1),
    (3, 2, 96, False, (2, 1)),
    (3, 2, 96, True, 1), (3, 2, 96, False, 1),
)


def make_divisible(v: float, divisor: int = 8) -> int:
    """Round ``v`` to a multiple of ``divisor``, never below it nor more than 10% down."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


class SqueezeExcite(nn.Module):
    """x * sigmoid(fc2(relu(fc1(mean over space)))), with ``channels / 4`` rounded to 8 inside."""

    def __init__(self, channels: int, ratio: float = 0.25):
        super().__init__()
        hidden = make_divisible(channels * ratio)
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.act = nn.ReLU()
        self.fc2 = nn.Conv2d(hidden, channels, 1)
        self.gate = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((2, 3), keepdim=True)
        return x * self.gate(self.fc2(self.act(self.fc1(s))))


class RepVGGDW(nn.Module):
    """Depthwise 3x3 conv-BN + depthwise 1x1 conv + identity, then BatchNorm (one conv once fused)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = ConvBN(channels, channels, 3, 1, 1, groups=channels)
        self.conv1 = nn.Conv2d(channels, channels, 1, groups=channels)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn((self.conv(x) + self.conv1(x)) + x)


class Residual(nn.Module):
    def __init__(self, m: nn.Module):
        super().__init__()
        self.m = m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.m(x)


def channel_mixer(channels: int, hidden: int) -> Residual:
    return Residual(nn.Sequential(
        ConvBN(channels, hidden, 1), nn.GELU(), ConvBN(hidden, channels, 1, bn_weight_init=0.0)))


class RepViTBlock(nn.Module):
    """Token mixer then residual channel mixer; a strided block also changes the width."""

    def __init__(self, cin: int, hidden: int, cout: int, kernel: int, stride, use_se: bool):
        super().__init__()
        se = SqueezeExcite(cin) if use_se else nn.Identity()
        if stride != 1:
            self.token_mixer = nn.Sequential(
                ConvBN(cin, cin, kernel, stride, (kernel - 1) // 2, groups=cin), se, ConvBN(cin, cout, 1))
            self.channel_mixer = channel_mixer(cout, 2 * cout)
        else:
            if cin != cout:
                raise ValueError(f"a stride-1 block keeps its width; received cin={cin}, cout={cout}")
            self.token_mixer = nn.Sequential(RepVGGDW(cin), se)
            self.channel_mixer = channel_mixer(cin, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.channel_mixer(self.token_mixer(x))


class KWSRepViT(nn.Module):
    """(B, time, mel) -> (B, num_classes); ``features`` are the patch embedding and 13 blocks."""

    def __init__(self, num_classes: int = 2, cfgs=KWS_TINY_CFGS, in_channels: int = 1):
        super().__init__()
        width = cfgs[0][2]
        patch_embed = nn.Sequential(ConvBN(in_channels, width // 2, 3, 2, 1), nn.GELU(),
                                    ConvBN(width // 2, width, 3, 2, 1))
        layers: list[nn.Module] = [patch_embed]
        for kernel, expansion, channels, use_se, stride in cfgs:
            cout = make_divisible(channels)
            layers.append(RepViTBlock(width, make_divisible(width * expansion), cout, kernel, stride, use_se))
            width = cout
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x.unsqueeze(1))
        return self.classifier(torch.flatten(self.pool(x), 1))


def build(num_classes: int = 2) -> KWSRepViT:
    """The KWS model in eval mode (214,222 trainable parameters with 2 classes)."""
    return KWSRepViT(num_classes).eval()


SAMPLE_SHAPE = (1, 100, 40)

if __name__ == "__main__":
    from tracer import convert

    model = build()
    print(f"{sum(p.numel() for p in model.parameters()):,} trainable parameters")
    keras_model = convert(model, torch.randn(SAMPLE_SHAPE))
    print(keras_model.tracer_result.report.summary())
