"""op_rules/library.py: torchvision's stochastic depth (module and fx-wrapped function) is dropped with a
note; a library's fx-wrapped function without a rule is traced into through torch.export
(tracer/capture/fx.py). The torchvision tests skip where torchvision does not import (.venv's CPU torch)."""
from __future__ import annotations

import importlib

import pytest
import torch
import torch.fx
import torch.nn as nn

from tests.helpers import assert_converts
from tracer.errors import CaptureError


def sample(seed: int = 0) -> torch.Tensor:
    return torch.randn(1, 3, 9, 10, generator=torch.Generator().manual_seed(seed))


def window_sum(x: torch.Tensor, size: int) -> torch.Tensor:
    """Python on concrete shapes, like torchvision's shifted_window_attention: fx cannot trace it."""
    b, c, h, w = x.shape
    pad_h, pad_w = (size - h % size) % size, (size - w % size) % size
    x = nn.functional.pad(x, (0, pad_w, 0, pad_h))
    x = x.view(b, c, (h + pad_h) // size, size, (w + pad_w) // size, size)
    return x.sum(dim=(3, 5))


torch.fx.wrap("window_sum")


class Windows(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return window_sum(self.conv(x), 4)


def test_wrapped_function_without_rule_is_traced_through_export():
    result = assert_converts(Windows(), sample())
    capture = result.facts()["capture"]
    assert capture["method"] == "torch.export"
    assert "window_sum" in capture["reason"] and "torch.fx.wrap" in capture["reason"]


def test_wrapped_function_without_rule_under_fx_only_names_it():
    from tracer import convert_model

    with pytest.raises(CaptureError, match=r"test_library.window_sum .*no rule.*capture='export'"):
        convert_model(Windows(), sample(), capture="fx")


# ---- torchvision's stochastic depth -----------------------------------------------------------

class Residual(nn.Module):
    def __init__(self, drop: nn.Module | None = None, p: float = 0.2):
        super().__init__()
        self.conv, self.drop, self.p = nn.Conv2d(3, 3, 3, padding=1), drop, p

    def forward(self, x):
        sd = importlib.import_module("torchvision.ops.stochastic_depth")  # the module fx.wrap patches

        y = self.conv(x)
        y = self.drop(y) if self.drop is not None else sd.stochastic_depth(y, self.p, "batch", self.training)
        return x + y


@pytest.mark.parametrize("kind", ["module", "function"])
def test_stochastic_depth_dropped_with_a_note(kind):
    ops = pytest.importorskip("torchvision.ops")
    model = Residual(ops.StochasticDepth(0.3, "row") if kind == "module" else None)
    result = assert_converts(model, sample(1))
    notes = [n for n in result.facts()["notes"] if "stochastic depth" in n]
    assert len(notes) == 1 and "identity at inference" in notes[0]
    assert ("p=0.3, mode='row'" if kind == "module" else "p=0.2, mode='batch'") in notes[0]
    assert result.facts()["capture"]["method"] == "fx"
    assert "stochastic_depth" not in result.facts()["ops_by_rule"]
