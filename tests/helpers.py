"""One shared convert-and-compare helper for every parity test."""
from __future__ import annotations

import torch

from examples.common import randomize_bn_stats as randomize_bn  # noqa: F401  (non-default BN statistics)
from tracer import convert_model
from tracer.api import ConversionResult

FP32_TOL = 1e-5  # max|keras - torch| <= FP32_TOL * max(1, max|torch|)


def assert_converts(model: torch.nn.Module, *inputs: torch.Tensor, tol: float = FP32_TOL,
                    channels_last_io: bool = False, n_random: int = 2, fold_bn: bool = False) -> ConversionResult:
    """Convert ``model`` and assert every output matches PyTorch on the sample and random inputs."""
    model.eval()
    result = convert_model(model, inputs if len(inputs) > 1 else inputs[0], channels_last_io=channels_last_io,
                           fold_bn=fold_bn, n_random=n_random, tol=tol, raise_on_mismatch=False)
    report = result.report
    assert report is not None and report.trials, "parity was not checked"
    assert report.ok, report.summary()
    return result


class Wrap(torch.nn.Module):
    """Holds the layer as a submodule so it is captured as one module call."""

    def __init__(self, layer: torch.nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


class Functional(torch.nn.Module):
    """``fn(x, *args, **kw)`` as a model: a functional op captured as one call."""

    def __init__(self, fn, *args, **kw):
        super().__init__()
        self.fn, self.args, self.kw = fn, args, kw

    def forward(self, x):
        return self.fn(x, *self.args, **self.kw)
