"""Reshapes with several axes that follow dynamic sizes (op_rules/dynamic_reshape.py): a gather whose flat
positions are computed at runtime. Each model converts once and matches PyTorch at the sample's size and
two others per dynamic axis, in Keras and fp32 LiteRT (builtin ops only); what the gather cannot size is
refused naming the line."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from tests.test_dynamic_sizes import assert_parity_at_sizes, convert_dynamic
from tracer.emitter.tflite import op_counts
from tracer.errors import ConversionError


class UnitAxis(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], x.shape[1], x.shape[2], 1) * 2  # a squeeze/expand_dims, no gather


class SplitBesideAnother(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], x.shape[1], x.shape[2] // 2, 2).flip(3) * 2


class ChannelShuffle(nn.Module):
    """ShuffleNet's shuffle between two convolutions: its input is stored channels-last in Keras."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.a(x)
        b, c, h, w = x.size()
        x = x.view(b, 2, c // 2, h, w).transpose(1, 2).contiguous().view(b, c, h, w)
        return self.b(x)


class SplitIntoBatch(nn.Module):
    """(B, T, 4) -> (B * T * 2, 2) -> (B, T, 2, 2): the batch axis changes with a dynamic axis beside it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        y = x.reshape(-1, 2).flip(1) + 1.0
        return y.view(b, t, c // 2, 2) * 3


@pytest.mark.parametrize("model, shape, dynamic", [
    (SplitBesideAnother(), (2, 5, 6), {1: "h", 2: "w*2"}),
    (ChannelShuffle(), (1, 3, 10, 12), {2: "h", 3: "w"}),
    (SplitIntoBatch(), (2, 6, 4), {1: "t"}),
], ids=["split-beside-another", "channel-shuffle", "split-into-batch"])
def test_gathered_reshape_keras_and_litert(model, shape, dynamic):
    torch.manual_seed(3)
    result = convert_dynamic(model, torch.randn(*shape), (dynamic,))
    for name in dynamic.values():
        assert_parity_at_sizes(result, name.split("*")[0])  # "w*2": the axis named w, a multiple of 2
    assert "GATHER" in op_counts(result.tflite["fp32"])


def test_unit_axes_added_beside_two_dynamic_axes_need_no_gather():
    torch.manual_seed(2)
    result = convert_dynamic(UnitAxis(), torch.randn(2, 5, 6), ({1: "h", 2: "w"},))
    for name in ("h", "w"):
        assert_parity_at_sizes(result, name)
    assert "GATHER" not in op_counts(result.tflite["fp32"])


def test_channel_shuffle_moves_no_extra_transposes():
    """The gather reads the channels-last input and writes the layout the next conv wants."""
    torch.manual_seed(4)
    result = convert_dynamic(ChannelShuffle(), torch.randn(1, 3, 10, 12), ({2: "h", 3: "w"},))
    ops = op_counts(result.tflite["fp32"])
    assert ops.get("TRANSPOSE") == 2, ops  # the NCHW input and output only


class InferredDynamic(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], x.shape[1], -1, 2) * 2  # the inferred line


def test_inferred_dynamic_axis_beside_another_refused_naming_the_line():
    torch.manual_seed(5)
    with pytest.raises(ConversionError) as err:
        convert_dynamic(InferredDynamic(), torch.randn(2, 5, 6), ({1: "h", 2: "w"},))
    text = str(err.value)
    assert "the inferred line" in text and "instead of -1" in text


class Windows(nn.Module):
    """Windows of 4 without padding: PyTorch runs it only at multiples of 4."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        y = x.view(b, h // 4, 4, w // 4, 4, c).permute(0, 1, 3, 2, 4, 5)  # the window line
        return y.reshape(b, h, w, c) * 2


def test_windows_at_multiples_convert_and_other_sizes_are_refused_naming_the_line():
    torch.manual_seed(6)
    result = convert_dynamic(Windows(), torch.randn(2, 8, 12, 3), ({1: "h*4", 2: "w*4"},))
    for name in ("h", "w"):
        assert_parity_at_sizes(result, name)
    with pytest.raises(ConversionError) as err:
        convert_dynamic(Windows(), torch.randn(2, 8, 12, 3), ({1: "h", 2: "w"},))
    text = str(err.value)
    assert "PyTorch itself fails at h=13" in text and "the window line" in text and "h*K" in text
