"""Helpers shared by the example models: BatchNorm statistics and parameter counts."""
from __future__ import annotations

import torch
import torch.nn as nn


def randomize_bn_stats(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-default running statistics and affine parameters.

    A freshly built model has mean 0, variance 1, weight 1 and bias 0 in every BatchNorm, so a
    converter that drops or mislays them still matches. This draws running means around 0
    (std 0.5), variances in [0.5, 2), weights in [0.5, 1.5) and biases around 0 (std 0.2)
    from a generator seeded with ``seed``; the model is changed in place and returned.
    """
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if not isinstance(m, nn.modules.batchnorm._BatchNorm):
            continue
        with torch.no_grad():
            if m.running_mean is not None:
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) * 1.5 + 0.5)
            if m.weight is not None:
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.2)
    return model


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    """Number of parameter entries (only those with ``requires_grad`` unless told otherwise)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


class ConvBN(nn.Sequential):
    """Convolution without bias followed by BatchNorm (``c`` and ``bn``, as RepViT names them)."""

    def __init__(self, cin: int, cout: int, kernel: int | tuple = 1, stride: int | tuple = 1,
                 padding: int | tuple = 0, groups: int = 1, bn_weight_init: float = 1.0):
        super().__init__()
        self.add_module("c", nn.Conv2d(cin, cout, kernel, stride, padding, groups=groups, bias=False))
        self.add_module("bn", nn.BatchNorm2d(cout))
        nn.init.constant_(self.bn.weight, bn_weight_init)
        nn.init.zeros_(self.bn.bias)


def sample_input(batch: int = 1, img_size: int = 224, seed: int = 0) -> torch.Tensor:
    """A seeded NCHW image batch."""
    return torch.randn(batch, 3, img_size, img_size, generator=torch.Generator().manual_seed(seed))


def convert_and_print(name: str, model: nn.Module, sample: torch.Tensor) -> None:
    """What each example prints when run as a script: size, ops, Transposes, seconds, parity."""
    from tracer import convert_model

    result = convert_model(model, sample)
    facts = result.facts()
    print(f"{name}: {sum(p.numel() for p in model.parameters()):,} parameters, {facts['nodes']} ops, "
          f"{facts['transpose_ops']} Transpose ops, {facts['seconds']} s")
    print(result.report.summary())
