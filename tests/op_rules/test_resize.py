"""Parity sweeps for op_rules/resize.py: Upsample/interpolate (nearest, nearest-exact, linear,
bilinear), PixelShuffle/PixelUnshuffle, F.pad and the padding modules."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tests.helpers import FP32_TOL, Functional, Wrap, assert_converts
from tracer.api import convert_model
from tracer.errors import ConversionError


def sample(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g)


IMAGE = (1, 3, 5, 6)
SEQ = (1, 3, 7)


class ConvAround(nn.Module):
    """conv -> op -> conv: the op sees (and must keep) a channels-last map."""

    def __init__(self, op: nn.Module, in_ch: int = 3, mid_ch: int = 4, out_ch: int | None = None):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Conv2d(in_ch, mid_ch, 1)
        self.op = op
        self.b = nn.Conv2d(out_ch or mid_ch, 5, 1)

    def forward(self, x):
        return self.b(self.op(self.a(x)))


def layer_names(result) -> list[str]:
    return [type(layer).__name__ for layer in result.keras_model.layers]


def ids(c: dict) -> str:
    return "-".join(f"{k}{v}" for k, v in c.items()).replace(" ", "")


# ---- nearest ---------------------------------------------------------------------------------

NEAREST = [dict(scale_factor=2), dict(scale_factor=3), dict(scale_factor=(2, 1)), dict(scale_factor=1.5),
           dict(scale_factor=(0.5, 1.7)), dict(size=(7, 9)), dict(size=(3, 4)), dict(size=(10, 18)),
           dict(scale_factor=1.5, recompute_scale_factor=True)]


@pytest.mark.parametrize("mode", ["nearest", "nearest-exact"])
@pytest.mark.parametrize("case", NEAREST, ids=ids)
def test_upsample_nearest(case, mode):
    assert_converts(Wrap(nn.Upsample(mode=mode, **case)), sample(*IMAGE))


@pytest.mark.parametrize("case", NEAREST, ids=ids)
def test_interpolate_nearest(case):
    assert_converts(Functional(F.interpolate, **case), sample(*IMAGE))


@pytest.mark.parametrize("mode", ["nearest", "nearest-exact"])
@pytest.mark.parametrize("rank", [3, 4, 5])
@pytest.mark.parametrize("factor", [1.1, 2.1, 0.55], ids=str)
def test_nearest_size_unchanged_or_doubled(factor, rank, mode):
    """A factor that leaves a size unchanged or doubles it (5 -> 5, 5 -> 10, 10 -> 5): PyTorch's
    2-D kernel copies/halves the index whatever the scale, its 1-D and 3-D kernels do not."""
    shape = {3: (1, 3, 5), 4: (1, 3, 5, 10), 5: (1, 3, 5, 10, 4)}[rank]
    assert_converts(Functional(F.interpolate, scale_factor=factor, mode=mode), sample(*shape))


@pytest.mark.parametrize("rank", [3, 4])
@pytest.mark.parametrize("size_in,size_out", [(6, 37), (2, 41), (4, 82), (14, 23)])
def test_nearest_exact_float32_index(size_in, size_out, rank):
    """Sizes where PyTorch's float32 index lands just below an integer (float64 math is off by one)."""
    shape, size = ((1, 3, size_in), size_out) if rank == 3 else ((1, 3, size_in, 3), (size_out, 3))
    for mode in ("nearest-exact", "nearest"):
        assert_converts(Functional(F.interpolate, size=size, mode=mode), sample(*shape))


def test_nearest_integer_factor_is_upsampling_layer():
    result = assert_converts(Wrap(nn.Upsample(scale_factor=(2, 3))), sample(*IMAGE))
    assert layer_names(result) == ["InputLayer", "UpSampling2D"]


@pytest.mark.parametrize("case", [dict(scale_factor=2), dict(scale_factor=1.5), dict(size=11),
                                  dict(size=5, mode="nearest-exact"), dict(scale_factor=2.5, mode="nearest-exact")],
                         ids=ids)
def test_interpolate_nearest_1d(case):
    assert_converts(Functional(F.interpolate, **case), sample(*SEQ))


# ---- (bi)linear ------------------------------------------------------------------------------

LINEAR = [dict(scale_factor=2), dict(scale_factor=1.5), dict(size=(7, 9)), dict(size=(3, 4)),
          dict(scale_factor=(0.5, 3)), dict(scale_factor=1.5, recompute_scale_factor=True),
          dict(scale_factor=(1.7, 2.3), recompute_scale_factor=True)]


@pytest.mark.parametrize("align_corners", [False, True], ids=["noalign", "align"])
@pytest.mark.parametrize("case", LINEAR, ids=ids)
def test_upsample_bilinear(case, align_corners):
    assert_converts(Wrap(nn.Upsample(mode="bilinear", align_corners=align_corners, **case)), sample(*IMAGE))


@pytest.mark.parametrize("align_corners", [False, True], ids=["noalign", "align"])
@pytest.mark.parametrize("case", [dict(scale_factor=2), dict(scale_factor=1.5), dict(size=(7, 9))], ids=ids)
def test_interpolate_bilinear(case, align_corners):
    assert_converts(Functional(F.interpolate, mode="bilinear", align_corners=align_corners, **case),
                    sample(*IMAGE))


@pytest.mark.parametrize("align_corners", [False, True], ids=["noalign", "align"])
@pytest.mark.parametrize("case", [dict(scale_factor=2), dict(scale_factor=1.5), dict(size=11), dict(size=4),
                                  dict(scale_factor=1.5, recompute_scale_factor=True)], ids=ids)
def test_interpolate_linear_1d(case, align_corners):
    assert_converts(Functional(F.interpolate, mode="linear", align_corners=align_corners, **case), sample(*SEQ))


@pytest.mark.parametrize("mode,shape", [("linear", (1, 3, 5)), ("bilinear", (1, 3, 5, 6)),
                                        ("trilinear", (1, 3, 5, 6, 4))], ids=["linear", "bilinear", "trilinear"])
def test_linear_factor_keeping_size(mode, shape):
    """scale_factor=1.1 on size 5 gives size 5: PyTorch copies the axis instead of using the factor."""
    assert_converts(Functional(F.interpolate, scale_factor=1.1, mode=mode), sample(*shape))


@pytest.mark.parametrize("capture", ["fx", "export"])
@pytest.mark.parametrize("align_corners", [False, True], ids=["noalign", "align"])
@pytest.mark.parametrize("case", [dict(scale_factor=2), dict(scale_factor=1.5), dict(size=(7, 9)), dict(size=(3, 4)),
                                  dict(size=(5, 13))], ids=ids)
def test_interpolate_bicubic(case, align_corners, capture):
    """Keys' cubic weights (A = -0.75), taps clamped at the border; CrossViT scales 240 px to 224 so."""
    model = Functional(F.interpolate, mode="bicubic", align_corners=align_corners, **case).eval()
    result = convert_model(model, sample(*IMAGE), capture=capture, n_random=2, raise_on_mismatch=False)
    assert result.report.ok, result.report.summary()


@pytest.mark.parametrize("align_corners", [False, True], ids=["noalign", "align"])
def test_interpolate_trilinear(align_corners):
    assert_converts(Functional(F.interpolate, scale_factor=(1, 2, 1.5), mode="trilinear",
                               align_corners=align_corners), sample(1, 2, 3, 4, 5))


@pytest.mark.parametrize("layer", [nn.UpsamplingNearest2d(scale_factor=2), nn.UpsamplingNearest2d(size=(7, 9)),
                                   nn.UpsamplingBilinear2d(scale_factor=2), nn.UpsamplingBilinear2d(size=(7, 9))],
                         ids=["nearest-x2", "nearest-7x9", "bilinear-x2", "bilinear-7x9"])
def test_upsampling_modules(layer):
    assert_converts(Wrap(layer), sample(*IMAGE))


def test_upsample_between_convs_stays_channels_last():
    result = assert_converts(ConvAround(nn.Upsample(scale_factor=1.5, mode="bilinear")), sample(*IMAGE),
                             channels_last_io=True)
    assert result.transpose_count == 0


@pytest.mark.parametrize("mode", ["area"])
def test_unsupported_interpolation_mode_raises(mode):
    with pytest.raises(ConversionError, match=mode):
        assert_converts(Functional(F.interpolate, scale_factor=2, mode=mode), sample(*IMAGE))


def test_antialias_raises():
    with pytest.raises(ConversionError, match="antialias"):
        assert_converts(Functional(F.interpolate, scale_factor=0.5, mode="bilinear", antialias=True),
                        sample(1, 3, 8, 8))


# ---- pixel shuffle ---------------------------------------------------------------------------

@pytest.mark.parametrize("r", [2, 3])
def test_pixel_shuffle(r):
    assert_converts(Wrap(nn.PixelShuffle(r)), sample(1, 2 * r * r, 3, 4))


@pytest.mark.parametrize("r", [2, 3])
def test_pixel_unshuffle(r):
    assert_converts(Wrap(nn.PixelUnshuffle(r)), sample(1, 2, 2 * r, 3 * r))


def test_pixel_shuffle_5d_raises():
    with pytest.raises(ConversionError, match="4-D"):
        assert_converts(Wrap(nn.PixelShuffle(2)), sample(1, 2, 8, 3, 4))


def test_pixel_shuffle_functional_between_convs():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(2, 8, 1)

        def forward(self, x):
            return F.pixel_unshuffle(self.b(F.pixel_shuffle(self.a(x), 2)), 2)

    result = assert_converts(Model(), sample(*IMAGE), channels_last_io=True)
    assert result.transpose_count == 2  # the shuffles' own transposes, no layout conversions
    assert not result.transposes


# ---- padding ---------------------------------------------------------------------------------

MODES = ["constant", "reflect", "replicate", "circular"]
PADS = {4: [(1, 2), (0, 1, 2, 0), (2, 1, 1, 3), (1, 0, 0, 2, 1, 1)], 3: [(1, 2), (3, 0), (2, 1, 1, 0)]}
# torch pads any dims in constant mode; in the others only the last rank-2 (batched) or
# rank-1 (unbatched) dims
PAD_CASES = [(rank, pads, mode) for rank, cases in PADS.items() for pads in cases for mode in MODES
             if mode == "constant" or len(pads) // 2 in (rank - 2, rank - 1)]


@pytest.mark.parametrize("rank,pads,mode", PAD_CASES, ids=[f"{r}d-{p}-{m}".replace(" ", "") for r, p, m in PAD_CASES])
def test_pad(rank, pads, mode):
    x = sample(1, 3, 4, 5) if rank == 4 else sample(1, 3, 5)
    assert_converts(Functional(F.pad, pads, mode=mode), x)


@pytest.mark.parametrize("value", [0.0, 1.5, -2.0])
def test_pad_constant_value(value):
    assert_converts(Functional(F.pad, (1, 2, 0, 1), value=value), sample(1, 3, 4, 5))


def test_pad_positional_args():
    assert_converts(Functional(F.pad, (1, 2, 2, 1), "constant", 0.5), sample(1, 3, 4, 5))


NEGATIVE = [(-1, 2), (1, -2, -1, 0), (-2, 3), (2, -3, 0, 1)]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("pads", NEGATIVE, ids=str)
def test_pad_negative_crops(pads, mode):
    """Negative pads crop; torch crops after padding, except in circular mode."""
    x = sample(1, 3, 4, 5) if len(pads) == 4 else sample(1, 3, 5)  # non-constant modes: pads for rank - 2 dims
    assert_converts(Functional(F.pad, pads, mode=mode), x)


@pytest.mark.parametrize("mode", MODES)
def test_pad_between_convs_stays_channels_last(mode):
    result = assert_converts(ConvAround(Functional(F.pad, (2, 1, 0, 3), mode=mode)), sample(*IMAGE),
                             channels_last_io=True)
    assert result.transpose_count == 0


@pytest.mark.parametrize("layer,shape", [
    (nn.ZeroPad2d((1, 2, 3, 0)), IMAGE), (nn.ZeroPad2d(2), IMAGE),
    (nn.ReflectionPad2d((1, 2, 2, 0)), IMAGE), (nn.ReflectionPad2d(1), IMAGE),
    (nn.ReplicationPad2d((0, 3, 1, 2)), IMAGE), (nn.ReplicationPad2d(2), IMAGE),
    (nn.ConstantPad1d((2, 1), 0.7), SEQ), (nn.ConstantPad1d(3, -1.0), SEQ),
    (nn.ConstantPad2d((1, 0, 2, 1), 2.0), IMAGE),
    (nn.ReflectionPad1d((2, 1)), SEQ), (nn.ReplicationPad1d((0, 2)), SEQ), (nn.CircularPad2d((1, 2, 0, 1)), IMAGE),
    (nn.ZeroPad1d((1, 2)), SEQ),
], ids=lambda v: repr(v).replace(" ", "") if isinstance(v, nn.Module) else "")
def test_pad_modules(layer, shape):
    assert_converts(Wrap(layer), sample(*shape))


# ---- dynamic spatial axes --------------------------------------------------------------------

class ResizeToInput(nn.Module):
    """DeepLabV3/LR-ASPP's head: resize a pooled map back to the input's (dynamic) size."""

    def __init__(self, mode: str = "bilinear", align_corners: bool | None = None):
        super().__init__()
        self.mode, self.align_corners = mode, align_corners

    def forward(self, x):
        return F.interpolate(F.avg_pool2d(x, 2), size=x.shape[-2:], mode=self.mode, align_corners=self.align_corners)


def convert_dynamic(model: nn.Module, x: torch.Tensor, tflite: tuple = ()):
    return convert_model(model.eval(), x, dynamic_shapes=({2: "h", 3: "w"},), n_random=1, raise_on_mismatch=False,
                         tflite=tflite)


def assert_dynamic_ok(result, sample_hw: tuple[int, int]) -> None:
    """Parity held at the sample's size and two others per dynamic axis, one of them odd."""
    for report in [result.report] + [r.parity for r in result.tflite_reports.values()]:
        assert report.ok, report.summary()
        assert all(o.max_rel <= FP32_TOL for t in report.trials for o in t.outputs), report.summary()
        for name, s in zip("hw", sample_hw):
            sizes = [int(t.label.split("=")[1]) for t in report.trials if t.label.startswith(name + "=")]
            assert len(sizes) == 2 and s not in sizes and any(v % 2 for v in sizes), report.summary()


@pytest.mark.parametrize("case", [dict(mode="bilinear", align_corners=False), dict(mode="bilinear", align_corners=True),
                                  dict(mode="bilinear", recompute_scale_factor=True), dict(mode="bicubic"),
                                  dict(mode="nearest-exact")], ids=ids)
def test_scale_factor_2_dynamic_hw(case):
    model = Functional(F.interpolate, scale_factor=2.0, **case)
    result = convert_dynamic(model, sample(1, 3, 5, 6))  # h: 10, 7; w: 12, 9
    assert tuple(result.keras_model.inputs[0].shape) == (None, 3, None, None)
    assert_dynamic_ok(result, (5, 6))


@pytest.mark.parametrize("mode,align_corners", [("bilinear", None), ("bilinear", True), ("bicubic", False),
                                                ("nearest", None), ("nearest-exact", None)])
def test_resize_to_dynamic_input_size(mode, align_corners):
    result = convert_dynamic(ResizeToInput(mode, align_corners), sample(1, 3, 6, 10))  # h: 12, 9; w: 20, 15
    assert_dynamic_ok(result, (6, 10))


@pytest.mark.parametrize("mode,align_corners", [("bilinear", False), ("bicubic", True), ("nearest", None)])
def test_fixed_size_from_dynamic_hw(mode, align_corners):
    """A fixed output size from dynamic H, W: the scale li / o is computed from the runtime input size."""
    model = Functional(F.interpolate, size=(7, 4), mode=mode, align_corners=align_corners)
    result = convert_dynamic(model, sample(1, 3, 5, 6))
    assert tuple(result.keras_model.outputs[0].shape) == (None, 3, 7, 4)
    assert_dynamic_ok(result, (5, 6))


def test_bilinear_dynamic_hw_litert_fp32():
    result = convert_dynamic(ResizeToInput(), sample(1, 3, 6, 10, seed=1), tflite=("fp32",))
    assert_dynamic_ok(result, (6, 10))
    result = convert_dynamic(Functional(F.interpolate, scale_factor=2, mode="bilinear"), sample(1, 3, 5, 6, seed=2),
                             tflite=("fp32",))
    assert_dynamic_ok(result, (5, 6))


@pytest.mark.parametrize("model", [Functional(F.interpolate, scale_factor=1.5, mode="bilinear"),
                                   Functional(F.interpolate, scale_factor=(2, 1.5)),
                                   Functional(F.interpolate, size=7, mode="nearest-exact")],
                         ids=["bilinear-x1.5", "nearest-x1.5", "nearest-exact-1d"])
def test_dynamic_resize_not_converted_is_refused(model):
    """Refused naming the op, the line, the axis and what to do, never with the sample's size."""
    x = sample(1, 3, 6) if model.kw.get("mode") == "nearest-exact" else sample(1, 3, 6, 8)
    with pytest.raises(ConversionError, match=r"(?s)interpolate.*\.py:\d+.*torch axis \d, whose size follows a "
                                              r"dynamic axis \(the model's: .*\).*integer scale_factor"):
        convert_model(model.eval(), x, dynamic_shapes=({2: "h"} if x.dim() == 3 else {2: "h", 3: "w"},), n_random=1)
