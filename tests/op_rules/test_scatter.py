"""Writes into slices as torch.export records them (op_rules/scatter.py: aten.copy, aten.slice_scatter),
statically and on a mask whose size follows dynamic axes (Swin's shifted windows), and torch.roll over a
dynamic axis; each checked against PyTorch in Keras and fp32 LiteRT."""
from __future__ import annotations

import torch
import torch.nn as nn

from tests.helpers import FP32_TOL
from tests.test_dynamic_sizes import assert_parity_at_sizes, convert_dynamic
from tracer import convert_model
from tracer.ir import ordered

aten = torch.ops.aten


class SliceWrites(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.clone()
        y[:, 1:3] = 0.5
        y[:, -2:, ::2] = x[:, :2, 1::2] * 2.0  # a tensor written, negative start, step 2
        return y


def test_slice_writes_under_export_keras_and_litert():
    torch.manual_seed(0)
    result = convert_model(SliceWrites().eval(), torch.randn(2, 6, 6), capture="export", n_random=1,
                           raise_on_mismatch=False, tflite=("fp32",))
    assert result.report.ok and result.tflite_reports["fp32"].ok, result.report.summary()
    assert all(o.max_rel <= FP32_TOL for t in result.report.trials for o in t.outputs)
    targets = {n.target for n in ordered(result.graph)}
    assert aten.slice_scatter.default in targets and aten.copy.default in targets


class ShiftedWindows(nn.Module):
    """torchvision's shifted_window_attention cut down: a cyclic shift, windows, the region mask built from the
    size (``new_zeros((H, W))`` written region by region), attention per window, windows back, shift back."""

    def __init__(self, ws: int = 4, shift: int = 2, c: int = 6) -> None:
        super().__init__()
        self.ws, self.shift, self.proj = ws, shift, nn.Linear(c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, W, C)
        b, h, w, c = x.shape
        ws, s = self.ws, self.shift
        x = torch.roll(x, shifts=(-s, -s), dims=(1, 2))
        nw = (h // ws) * (w // ws)
        win = x.view(b, h // ws, ws, w // ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(b * nw, ws * ws, c)
        attn = win @ win.transpose(1, 2) * 0.1
        mask = x.new_zeros((h, w))
        count = 0
        for rows in ((0, -ws), (-ws, -s), (-s, None)):
            for cols in ((0, -ws), (-ws, -s), (-s, None)):
                mask[rows[0]:rows[1], cols[0]:cols[1]] = count
                count += 1
        mask = mask.view(h // ws, ws, w // ws, ws).permute(0, 2, 1, 3).reshape(nw, ws * ws)
        mask = mask.unsqueeze(1) - mask.unsqueeze(2)
        mask = mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)
        attn = attn.view(win.size(0) // nw, nw, ws * ws, ws * ws) + mask.unsqueeze(0)
        y = self.proj(attn.view(-1, ws * ws, ws * ws).softmax(-1) @ win)
        y = y.view(b, h // ws, w // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)
        return torch.roll(y, shifts=(s, s), dims=(1, 2))


def test_shifted_windows_over_dynamic_multiples_of_the_window_keras_and_litert():
    torch.manual_seed(1)
    result = convert_model(ShiftedWindows().eval(), torch.randn(2, 8, 12, 6), capture="export",
                           dynamic_shapes=({1: "h*4", 2: "w*4"},), n_random=1, raise_on_mismatch=False,
                           tflite=("fp32",))
    for name in ("h", "w"):
        assert_parity_at_sizes(result, name)
    sizes = [t.label for t in result.report.trials if "=" in t.label]
    assert sizes == ["h=16", "h=12", "w=24", "w=20"]  # multiples of the window, one an odd count of windows
    assert aten.slice_scatter.default in {n.target for n in ordered(result.graph)}


class Roll(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.roll(x, shifts=(3, -2), dims=(1, 2)) * 2


def test_roll_over_dynamic_axes_keras_and_litert():
    torch.manual_seed(2)
    result = convert_dynamic(Roll(), torch.randn(2, 7, 6), ({1: "t", 2: "f"},))
    for name in ("t", "f"):
        assert_parity_at_sizes(result, name)
