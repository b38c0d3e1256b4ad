"""RepVGG for CIFAR-100 (32x32 input, 100 classes), written in plain PyTorch.

After Ding et al., "RepVGG: Making VGG-style ConvNets Great Again" (CVPR 2021;
github.com/DingXiaoH/RepVGG).

Training form: every block sums a 3x3 conv-BN, a 1x1 conv-BN and (when the shape allows) an
identity BatchNorm, then applies ReLU. ``switch_to_deploy()`` fuses the three branches into
one biased 3x3 convolution per block (structural re-parameterization); in eval mode the fused
model computes the same function.

The CIFAR variant: stage widths (32, 32, 64, 128, 256) scaled by ``a`` for the
first four stages (the first capped at 32) and by ``b`` for the last, and the first two stages
keep stride 1, so the stages run at 32, 32, 16, 8 and 4 pixels.

===========  ==================  ====  ====  ==================
name         blocks per stage    a     b     groups
===========  ==================  ====  ====  ==================
RepVGG-A0    1, 2, 4, 14, 1      0.75  2.5   1
RepVGG-B1g4  1, 4, 6, 16, 1      2     4     4 on layers 2, 4, ..., 26
===========  ==================  ====  ====  ==================

Factories: ``build_a0`` (training form), ``build_a0_deploy`` (fused form, random weights),
``build_b1g4`` (training form). Convert:
``tracer convert examples/repvgg.py:build_a0 --input-shape 1,3,32,32``
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

try:  # imported as examples.repvgg (tests)
    from examples.common import ConvBN
except ImportError:  # loaded from its file (tracer convert puts this folder on sys.path)
    from common import ConvBN

G4_LAYERS = tuple(range(2, 27, 2))  # the paper's g4 variants: groups=4 on these layer indices


class RepVGGBlock(nn.Module):
    """3x3 conv-BN + 1x1 conv-BN (+ identity BN) -> ReLU, or one fused 3x3 conv -> ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1, groups: int = 1, deploy: bool = False):
        super().__init__()
        self.cin, self.cout, self.stride, self.groups = cin, cout, stride, groups
        self.nonlinearity = nn.ReLU()
        if deploy:
            self.rbr_reparam = nn.Conv2d(cin, cout, 3, stride, 1, groups=groups, bias=True)
            return
        self.rbr_reparam = None
        self.rbr_identity = nn.BatchNorm2d(cin) if cin == cout and stride == 1 else None
        self.rbr_dense = ConvBN(cin, cout, 3, stride, 1, groups=groups)
        self.rbr_1x1 = ConvBN(cin, cout, 1, stride, 0, groups=groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rbr_reparam is not None:
            return self.nonlinearity(self.rbr_reparam(x))
        y = self.rbr_dense(x) + self.rbr_1x1(x)
        if self.rbr_identity is not None:
            y = y + self.rbr_identity(x)
        return self.nonlinearity(y)

    def equivalent_kernel_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The 3x3 kernel and bias of the one convolution that equals the three branches (eval mode)."""
        k3, b3 = _fuse_bn(self.rbr_dense.c.weight, self.rbr_dense.bn)
        k1, b1 = _fuse_bn(self.rbr_1x1.c.weight, self.rbr_1x1.bn)
        kernel, bias = k3 + F.pad(k1, [1, 1, 1, 1]), b3 + b1
        if self.rbr_identity is not None:
            per_group = self.cin // self.groups
            eye = torch.zeros(self.cin, per_group, 3, 3, dtype=kernel.dtype)
            eye[torch.arange(self.cin), torch.arange(self.cin) % per_group, 1, 1] = 1.0
            ki, bi = _fuse_bn(eye, self.rbr_identity)
            kernel, bias = kernel + ki, bias + bi
        return kernel, bias

    def switch_to_deploy(self) -> None:
        if self.rbr_reparam is not None:
            return
        with torch.no_grad():
            kernel, bias = self.equivalent_kernel_bias()
            conv = nn.Conv2d(self.cin, self.cout, 3, self.stride, 1, groups=self.groups, bias=True)
            conv.weight.copy_(kernel)
            conv.bias.copy_(bias)
        self.rbr_reparam = conv
        for name in ("rbr_dense", "rbr_1x1", "rbr_identity"):
            delattr(self, name)


def _fuse_bn(kernel: torch.Tensor, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """conv(x, kernel) followed by ``bn`` in eval mode, as one kernel and bias (in float64)."""
    std = (bn.running_var.double() + bn.eps).sqrt()
    t = bn.weight.double() / std
    fused = kernel.double() * t.reshape(-1, 1, 1, 1)
    return fused.float(), (bn.bias.double() - bn.running_mean.double() * t).float()


class RepVGG(nn.Module):
    """Five stages of RepVGG blocks, global average pooling and a Linear classifier."""

    def __init__(self, num_blocks: tuple[int, int, int], width_multiplier: tuple[float, float],
                 num_classes: int = 100, groups_on: tuple[int, ...] = (), groups: int = 1,
                 deploy: bool = False):
        super().__init__()
        a, b = width_multiplier
        self.in_planes = min(32, int(32 * a))
        self.stage0 = RepVGGBlock(3, self.in_planes, stride=1, deploy=deploy)
        self.layer_idx = 1
        widths = (int(32 * a), int(64 * a), int(128 * a), int(256 * b))
        strides = (1, 2, 2, 2)
        spec = zip(widths, (*num_blocks, 1), strides)
        self.stage1, self.stage2, self.stage3, self.stage4 = (
            self._make_stage(w, n, s, groups_on, groups, deploy) for w, n, s in spec)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(widths[-1], num_classes)

    def _make_stage(self, planes: int, blocks: int, stride: int, groups_on: tuple, groups: int,
                    deploy: bool) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (blocks - 1):
            g = groups if self.layer_idx in groups_on else 1
            layers.append(RepVGGBlock(self.in_planes, planes, s, g, deploy))
            self.in_planes = planes
            self.layer_idx += 1
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage0(x)
        x = self.stage4(self.stage3(self.stage2(self.stage1(x))))
        return self.linear(torch.flatten(self.gap(x), 1))

    def switch_to_deploy(self) -> "RepVGG":
        """Fuse every block in place (the model must hold its final BatchNorm statistics)."""
        for m in self.modules():
            if isinstance(m, RepVGGBlock):
                m.switch_to_deploy()
        return self


def build_a0(num_classes: int = 100) -> RepVGG:
    """RepVGG-A0, training form (three branches per block), eval mode."""
    return RepVGG((2, 4, 14), (0.75, 2.5), num_classes).eval()


def build_a0_deploy(num_classes: int = 100) -> RepVGG:
    """RepVGG-A0 fused: one 3x3 conv + ReLU per block (fuse a trained model with switch_to_deploy)."""
    return RepVGG((2, 4, 14), (0.75, 2.5), num_classes, deploy=True).eval()


def build_b1g4(num_classes: int = 100) -> RepVGG:
    """RepVGG-B1g4, training form: groups=4 on layers 2, 4, ..., 26."""
    return RepVGG((4, 6, 16), (2.0, 4.0), num_classes, groups_on=G4_LAYERS, groups=4).eval()


SAMPLE_SHAPE = (1, 3, 32, 32)

if __name__ == "__main__":
    from tracer import convert

    model = build_a0()
    keras_model = convert(model, torch.randn(SAMPLE_SHAPE))
    print(keras_model.tracer_result.report.summary())
