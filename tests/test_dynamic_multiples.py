"""Dynamic axes whose size is always a multiple of a number (a window, a total stride): ``"h*4"``,
``torch.export.Dim("hb", max=32) * 8`` and ``--dynamic-axis 0:2=h*8``; the sizes tried stay multiples (one an
odd number of them), sizes found at any of them follow the axis, and torch.export gets a derived Dim."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.export import Dim

from tests.test_dynamic_sizes import assert_parity_at_sizes, convert_dynamic
from tracer.capture.export import export, export_dims
from tracer.dynamic import DynamicAxis, parse_dynamic_shapes
from tracer.errors import ConversionError, InputError
from tracer.options import convert_options, parse_dynamic_axes


class PaddedCNN(nn.Module):
    """Pads H and W up to a multiple of 4 (as Swin pads to its window), then two stride-2 convs."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.b = nn.Conv2d(8, 6, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad_h = (4 - x.shape[2] % 4) % 4
        pad_w = (4 - x.shape[3] % 4) % 4
        x = F.pad(x, (0, pad_w, 0, pad_h))
        return self.b(torch.relu(self.a(x)))


class SizeSwitch(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2 if x.shape[2] == 16 else x


def test_a_derived_dim_and_a_name_with_a_multiple_are_parsed():
    x = torch.zeros(1, 3, 16, 12)
    h, w = parse_dynamic_shapes(({2: Dim("hb", min=1, max=32) * 8, 3: "w*4"},), [x])
    assert h == DynamicAxis("8*hb", ((0, 2),), 16, low=8, high=256, multiple=8)
    assert w == DynamicAxis("w", ((0, 3),), 12, low=4, high=None, multiple=4)
    (plain,) = parse_dynamic_shapes(({2: "h"},), [x])
    assert plain.multiple == 1 and plain.low == 1


def test_a_sample_that_is_not_a_multiple_or_outside_the_range_is_refused():
    x = torch.zeros(1, 3, 12, 12)
    with pytest.raises(InputError, match=r"'h' must be a multiple of 8, but the sample's size .* is 12"):
        parse_dynamic_shapes(({2: "h*8"},), [x])
    with pytest.raises(InputError, match="outside its range"):
        parse_dynamic_shapes(({2: Dim("hb", max=2) * 4},), [torch.zeros(1, 3, 16, 12)])
    with pytest.raises(InputError, match="not a multiple of its root"):
        parse_dynamic_shapes(({2: Dim("hb") * 4 + 1},), [torch.zeros(1, 3, 13, 12)])
    with pytest.raises(InputError, match="give them the same multiple"):
        parse_dynamic_shapes(({2: "s*4", 3: "s*2"},), [x])


def test_cli_name_with_a_multiple():
    shapes = [[1, 3, 16, 16]]
    assert parse_dynamic_axes(["0:2=h*8", "0:3=w"], shapes) == ({2: "h*8", 3: "w"},)
    assert parse_dynamic_axes(["0:-1=*4"], shapes) == ({3: "input0_axis3*4"},)
    for bad in ("0:2=h*x", "0:2=h*0", "0:2=1h*2"):
        with pytest.raises(InputError, match="--dynamic-axis"):
            parse_dynamic_axes([bad], shapes)
    assert "NAME*MULTIPLE" in convert_options()["dynamic_axis"].help
    (h,) = parse_dynamic_shapes(parse_dynamic_axes(["0:2=h*8"], shapes), [torch.zeros(1, 3, 16, 16)])
    assert (h.name, h.multiple, h.low) == ("h", 8, 8)


def test_other_sizes_are_multiples_with_an_odd_count():
    assert DynamicAxis("h", ((0, 2),), 16, 4, None, 4).others() == [32, 28]  # 8 and 7 windows
    assert DynamicAxis("h", ((0, 2),), 224, 32, None, 32).others() == [448, 352]  # 14 and 11
    assert DynamicAxis("h", ((0, 2),), 16, 4, 24, 4).others() == [20, 24]  # within the range: 5, 6
    assert DynamicAxis("h", ((0, 2),), 8, 8, 8, 8).others() == []
    assert DynamicAxis("t", ((0, 1),), 10).others() == [20, 15]  # no multiple: as before


def test_padded_cnn_with_multiples_of_4_matches_pytorch():
    torch.manual_seed(0)
    sample = torch.randn(1, 3, 16, 12)
    result = convert_dynamic(PaddedCNN(), sample, ({2: "h*4", 3: Dim("wb", max=16) * 4},))
    assert_parity_at_sizes(result, "h")
    assert_parity_at_sizes(result, "4*wb")
    labels = [t.label for t in result.report.trials]
    assert {"h=32", "h=28", "4*wb=24", "4*wb=20"} <= set(labels), labels


def test_padded_cnn_with_any_size_is_refused_naming_the_mod_line():
    torch.manual_seed(0)
    with pytest.raises(ConversionError, match=r"mod .*pad_h = \(4 - x.shape\[2\] % 4\) % 4"):
        convert_dynamic(PaddedCNN(), torch.randn(1, 3, 16, 12), ({2: "h", 3: "w"},), tflite=())


def test_export_gets_a_derived_dim_and_falls_back_where_torch_refuses_it():
    x = torch.randn(1, 3, 16, 12)
    dims = parse_dynamic_shapes(({2: "h*4"},), [x])
    (spec,) = export_dims([x], dims)
    assert spec[2].fn(3) == 12 and spec[2].root.min == 1
    ep = export(PaddedCNN(), (x,), dims=dims)
    assert any("4*" in str(k) for k in ep.range_constraints), ep.range_constraints
    export(SizeSwitch(), (torch.randn(1, 2, 16),), dims=parse_dynamic_shapes(({2: "t*4"},), [torch.randn(1, 2, 16)]))


def test_a_size_that_is_not_a_multiple_fails_loudly_in_keras_and_litert():
    """Converted for multiples of 4 only: at 18 the model must raise, not compute wrong numbers."""
    import numpy as np
    from ai_edge_litert.interpreter import Interpreter

    torch.manual_seed(9)
    result = convert_dynamic(PaddedCNN(), torch.randn(1, 3, 16, 12), ({2: "h*4", 3: "w*4"},))
    x = np.random.default_rng(0).standard_normal((1, 3, 18, 12)).astype(np.float32)
    with pytest.raises(Exception, match="reshape"):
        result.keras_model(x)
    lite = Interpreter(model_content=result.tflite["fp32"])
    lite.resize_tensor_input(lite.get_input_details()[0]["index"], list(x.shape))
    with pytest.raises(Exception):
        lite.allocate_tensors()
        lite.set_tensor(lite.get_input_details()[0]["index"], x)
        lite.invoke()
    lite.resize_tensor_input(lite.get_input_details()[0]["index"], [1, 3, 20, 12])  # a multiple runs
    lite.allocate_tensors()
    lite.set_tensor(lite.get_input_details()[0]["index"], x[:, :, :12].repeat(2, axis=2)[:, :, :20])
    lite.invoke()
