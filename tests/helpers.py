"""One shared convert-and-compare helper for every parity test."""
from __future__ import annotations

import torch

from tracer import convert_model
from tracer.api import ConversionResult

FP32_TOL = 1e-5  # max|keras - torch| <= FP32_TOL * max(1, max|torch|)


def randomize_bn(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-default running statistics and affine parameters, so BatchNorm bugs cannot hide."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.5)
                    m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) * 1.5 + 0.5)
                if m.weight is not None:
                    m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.2)
    return model


def assert_converts(model: torch.nn.Module, *inputs: torch.Tensor, tol: float = FP32_TOL,
                    channels_last_io: bool = False, n_random: int = 2) -> ConversionResult:
    """Convert ``model`` and assert every output matches PyTorch on the sample and random inputs."""
    model.eval()
    result = convert_model(model, inputs if len(inputs) > 1 else inputs[0], channels_last_io=channels_last_io,
                           n_random=n_random, tol=tol, raise_on_mismatch=False)
    report = result.report
    assert report is not None and report.trials, "parity was not checked"
    assert report.ok, report.summary()
    return result
