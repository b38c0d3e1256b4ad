"""LiteRT / TFLite export: fp32 parity through the LiteRT interpreter, fp16/dynamic/int8 reported,
calibration rules, the export fixes (each fails without its fix) and CLI files. The examples and
the digits accuracy table: tests/test_tflite_examples.py."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn as nn

from tracer.emitter.save import save_outputs
from tracer.emitter.layers import pad
from tracer.emitter.tflite import (EXPORT_FIXES, KINDS, CalibrationError, TFLiteExportError, calibration_dataset,
                            export_tflite, op_counts, with_export_fixes)
from tracer.fixes.tflite_axis_linear_map import axis_linear_map_matmul
from tracer.fixes.tflite_conv3d import conv3d_for_litert
from tracer.fixes.tflite_dilated_conv_transpose import dilated_conv_transpose_as_conv
from tracer.fixes.tflite_erf import erf_builtin
from tracer.fixes.tflite_high_rank_pad import high_rank_pad_as_3d
from tests.helpers import randomize_bn
from tracer import convert_model
from tracer.errors import InputError
from tracer.verify.litert import LiteRTRunner, check_litert, keras_input_names
from tracer.verify.parity import run_keras



def tflite_parity(model: nn.Module, *inputs: torch.Tensor, kinds=("fp32",), **options):
    """Convert with TFLite export and assert fp32 LiteRT parity (the others are only reported)."""
    model.eval()
    result = convert_model(model, inputs if len(inputs) > 1 else inputs[0], n_random=2, tflite=kinds,
                           raise_on_mismatch=False, **options)
    assert result.report.ok, result.report.summary()
    for kind in kinds:
        report = result.tflite_reports[kind]
        assert report.ok, report.summary()
        assert not [op for op in report.ops if op.startswith("Flex")], report.ops
    return result


class Fn(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x, y):
        z = self.conv(x)
        return z.mean((2, 3)) + self.fc(y), z


def _small_cnn():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.ReLU(), nn.AvgPool2d(2),
                         nn.Flatten(), nn.Linear(8 * 2 * 2, 10))


FP32_CASES = {
    "conv_bn_relu_pool_linear": (_small_cnn, (1, 3, 8, 8)),
    "grouped_conv": (lambda: nn.Conv2d(8, 16, 3, padding=1, groups=4), (1, 8, 7, 7)),
    "grouped_conv_stride": (lambda: nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2), (1, 8, 9, 9)),
    "depthwise": (lambda: nn.Conv2d(8, 8, 3, padding=1, groups=8), (1, 8, 6, 6)),
    "depthwise_multiplier": (lambda: nn.Conv2d(4, 8, 3, stride=2, padding=1, groups=4), (1, 4, 8, 8)),
    "conv1d_grouped": (lambda: nn.Conv1d(8, 8, 3, padding=1, groups=2), (1, 8, 16)),
    "conv1d_depthwise": (lambda: nn.Conv1d(4, 8, 3, padding=1, groups=4), (1, 4, 16)),
    "conv_dilated": (lambda: nn.Conv2d(4, 4, 3, dilation=2, padding=2, groups=2), (1, 4, 9, 9)),
    "conv3d_grouped_dilated": (lambda: nn.Conv3d(4, 4, 3, dilation=(1, 2, 2), groups=2), (1, 4, 5, 6, 6)),
    "conv_transpose_grouped": (lambda: nn.ConvTranspose2d(4, 4, 3, stride=2, padding=1, groups=2), (1, 4, 5, 5)),
    "conv_transpose_dilated": (lambda: nn.ConvTranspose2d(3, 4, 3, dilation=2, padding=1), (1, 3, 5, 5)),
    "conv_transpose_strided_dilated": (lambda: nn.ConvTranspose2d(3, 4, 3, stride=2, dilation=2, padding=1,
                                                                  output_padding=1), (1, 3, 5, 5)),
    "conv_transpose3d_dilated": (lambda: nn.ConvTranspose3d(2, 3, 3, dilation=2), (1, 2, 3, 4, 4)),
    "resize_nearest": (lambda: nn.Upsample(scale_factor=2), (1, 3, 5, 5)),
    "resize_bilinear": (lambda: nn.Upsample(scale_factor=2, mode="bilinear"), (1, 3, 5, 5)),
    "resize_bilinear_align": (lambda: nn.Upsample(size=(7, 9), mode="bilinear", align_corners=True), (1, 3, 4, 5)),
    "pad_asymmetric": (lambda: nn.ZeroPad2d((1, 2, 3, 0)), (1, 3, 5, 5)),
    "pad_large": (lambda: nn.ZeroPad2d(40), (1, 3, 5, 5)),
    "pad_reflect_replicate": (lambda: nn.Sequential(nn.ReflectionPad2d(2), nn.ReplicationPad2d(1)), (1, 3, 5, 5)),
    "pixel_shuffle_6d_transpose": (lambda: nn.Sequential(nn.PixelShuffle(2), nn.PixelUnshuffle(2)), (1, 8, 4, 4)),
    "gelu_exact": (lambda: nn.GELU(), (1, 3, 5, 5)),
    "erf": (lambda: Fn(torch.erf), (1, 3, 5, 5)),
    "adaptive_pool_ceil": (lambda: nn.Sequential(nn.MaxPool2d(3, 2, 1, ceil_mode=True), nn.AdaptiveAvgPool2d(3)),
                           (1, 3, 9, 9)),
}


@pytest.mark.parametrize("name", sorted(FP32_CASES))
def test_fp32_parity_through_litert(name):
    make, shape = FP32_CASES[name]
    torch.manual_seed(0)
    model = randomize_bn(make())
    result = tflite_parity(model, torch.randn(*shape))
    trials = [t.label for t in result.tflite_reports["fp32"].parity.trials]
    assert any("batch" in t for t in trials), "the dynamic batch was not exercised"


def test_two_inputs_two_outputs_all_kinds():
    """Inputs matched by signature name (LiteRT orders them y, x), calibration fed by name."""
    torch.manual_seed(0)
    calib = [np.random.default_rng(0).standard_normal((16, *s)).astype(np.float32) for s in [(3, 4, 4), (6,)]]
    result = tflite_parity(TwoInputs(), torch.randn(1, 3, 4, 4), torch.randn(1, 6), kinds=KINDS, calib=calib)
    assert set(result.tflite) == set(KINDS)
    int8 = result.tflite_reports["int8"]
    assert int8.top1_agreement[1] is None and int8.top1_agreement[0] is not None
    assert int8.calib_trial in int8.top1_by_trial


def test_channels_last_io_calibration_is_permuted():
    """Calibration is given in PyTorch layout; the Keras input is NHWC here."""
    torch.manual_seed(0)
    model = _small_cnn().eval()
    calib = np.random.default_rng(1).standard_normal((32, 3, 8, 8)).astype(np.float32)
    result = tflite_parity(model, torch.randn(1, 3, 8, 8), kinds=("fp32", "int8"), calib=calib,
                           channels_last_io=True)
    assert result.input_layouts[0].perm == (0, 2, 3, 1)
    assert result.tflite_reports["int8"].parity.max_abs < 0.5


def test_int8_io_quantized_tensors_and_reported_diffs():
    torch.manual_seed(0)
    model = randomize_bn(_small_cnn()).eval()
    calib = np.random.default_rng(1).standard_normal((64, 3, 8, 8)).astype(np.float32)
    result = tflite_parity(model, torch.randn(1, 3, 8, 8), kinds=("int8",), calib=calib, int8_io=True)
    runner = LiteRTRunner(result.tflite["int8"], keras_input_names(result.keras_model))
    assert runner.inputs[0]["dtype"] == np.int8 and runner.outputs[0]["dtype"] == np.int8
    float_tensors = [t["name"] for t in runner.interpreter.get_tensor_details() if t["dtype"] == np.float32]
    assert float_tensors == [], f"not fully integer: {float_tensors}"
    report = result.tflite_reports["int8"]
    assert not report.strict and report.ok  # reported, never failed
    assert 0 < report.parity.max_abs < 0.5
    assert report.top1_by_trial[report.calib_trial][0] >= 0.75


# --- calibration rules ---------------------------------------------------------------------------

def test_int8_without_calibration_is_refused_before_converting():
    torch.manual_seed(0)
    with pytest.raises(CalibrationError, match="needs calibration data"):
        convert_model(_small_cnn(), torch.randn(1, 3, 8, 8), tflite=("int8",))


def test_export_int8_without_calibration_raises_and_random_warns():
    torch.manual_seed(0)
    result = convert_model(_small_cnn(), torch.randn(1, 3, 8, 8), n_random=1)
    with pytest.raises(CalibrationError, match="random_calibration=True"):
        export_tflite(result.keras_model, "int8")
    with pytest.warns(UserWarning, match="accuracy is meaningless"):
        data = export_tflite(result.keras_model, "int8", random_calibration=True)
    assert "QUANTIZE" in op_counts(data)


def test_bad_options_are_input_errors():
    torch.manual_seed(0)
    result = convert_model(nn.Conv2d(3, 4, 1), torch.randn(1, 3, 4, 4), n_random=1)
    with pytest.raises(InputError, match="unknown TFLite kind"):
        export_tflite(result.keras_model, "int4")
    with pytest.raises(InputError, match="int8 I/O"):
        export_tflite(result.keras_model, "fp16", int8_io=True)
    with pytest.raises(CalibrationError, match="does not fit"):
        export_tflite(result.keras_model, "int8", calib=np.zeros((4, 5, 4, 4), np.float32))


def test_calibration_sources(tmp_path):
    """A folder of .npy files, a .npy path and a callable all give the same samples, permuted."""
    model = nn.Conv2d(3, 4, 1).eval()
    result = convert_model(model, torch.randn(1, 3, 4, 4), n_random=1, channels_last_io=True)
    data = np.random.default_rng(0).standard_normal((6, 3, 4, 4)).astype(np.float32)
    (tmp_path / "folder").mkdir()
    np.save(tmp_path / "folder" / "a.npy", data[:3])
    np.save(tmp_path / "folder" / "b.npy", data[3:])
    np.save(tmp_path / "all.npy", data)
    sources = [data, str(tmp_path / "folder"), tmp_path / "all.npy", lambda: ([x] for x in data)]
    name = result.keras_model.inputs[0].name
    for source in sources:
        got = [d[name] for d in calibration_dataset(result.keras_model, source, result.input_layouts, False)()]
        assert len(got) == 6
        np.testing.assert_array_equal(np.concatenate(got), np.transpose(data, (0, 2, 3, 1)))


def test_calibration_from_image_folder(tmp_path):
    import tensorflow as tf

    rng = np.random.default_rng(0)
    for k in range(4):
        png = tf.io.encode_png(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).numpy()
        (tmp_path / f"img{k}.png").write_bytes(png)
    result = convert_model(nn.Conv2d(3, 4, 3), torch.randn(1, 3, 8, 8), n_random=1)
    name = result.keras_model.inputs[0].name
    got = [d[name] for d in calibration_dataset(result.keras_model, tmp_path, result.input_layouts, False)()]
    assert len(got) == 4 and got[0].shape == (1, 3, 8, 8)
    assert 0.0 <= min(g.min() for g in got) and max(g.max() for g in got) <= 1.0


# --- export fixes: each test fails without its fix -----------------------------------------------

def test_erf_fix_builtin_only_and_keras_model_untouched():
    torch.manual_seed(0)
    model = Fn(lambda x: torch.erf(3 * x)).eval()
    result = convert_model(model, torch.randn(1, 3, 5, 5), n_random=1)
    keras_before = run_keras(result.keras_model, [np.linspace(-5, 5, 75, dtype=np.float32).reshape(1, 3, 5, 5)],
                             result.input_layouts, result.output_layouts)[0]
    with pytest.raises(TFLiteExportError, match=r"Select TF \(Flex\) ops: Erf"):
        export_tflite(result.keras_model, "fp32", fixes=())
    assert "FlexErf" in op_counts(export_tflite(result.keras_model, "fp32", allow_flex=True, fixes=()))
    data = export_tflite(result.keras_model, "fp32")
    assert "FlexErf" not in op_counts(data)
    report = check_litert(model, data, "fp32", [np.linspace(-5, 5, 75, dtype=np.float32).reshape(1, 3, 5, 5)],
                          result.input_layouts, result.output_layouts, keras_input_names(result.keras_model))
    assert report.ok, report.summary()
    assert report.parity.max_abs < 5e-7
    # the Keras model still computes keras.ops.erf
    assert any(type(op).__name__ == "Erf" for op in result.keras_model.operations)
    keras_after = run_keras(result.keras_model, [np.linspace(-5, 5, 75, dtype=np.float32).reshape(1, 3, 5, 5)],
                            result.input_layouts, result.output_layouts)[0]
    np.testing.assert_array_equal(keras_before, keras_after)


def test_bilinear_export_multiplies_w_from_the_left():
    """The W axis of an NHWC map is second-to-last: the fix exports it as one BATCH_MATMUL, never
    with more TRANSPOSE ops than the converter's einsum lowering; H stays an einsum."""
    torch.manual_seed(0)
    model = nn.Upsample(scale_factor=2, mode="bilinear").eval()
    result = convert_model(model, torch.randn(1, 3, 5, 5), n_random=1)
    plain = op_counts(export_tflite(result.keras_model, "fp32", fixes=()))
    exported, applied = with_export_fixes(result.keras_model)
    assert exported is not result.keras_model and len(applied) == 1 and "axis_linear_map_matmul" in applied[0]
    fixed = export_tflite(result.keras_model, "fp32", fixes=(axis_linear_map_matmul,))
    assert op_counts(fixed).get("TRANSPOSE", 0) <= plain["TRANSPOSE"] and op_counts(fixed)["BATCH_MATMUL"] == 1
    _check_fp32(model, result, fixed, (1, 3, 5, 5))


def _without(fix):
    return tuple(f for f in EXPORT_FIXES if f is not fix)


def _check_fp32(model, result, data, shape):
    sample = [np.random.default_rng(0).standard_normal(shape, np.float32)]
    report = check_litert(model, data, "fp32", sample, result.input_layouts, result.output_layouts,
                          keras_input_names(result.keras_model))
    assert report.ok, report.summary()


@pytest.mark.parametrize("dilation", [2, (1, 2)])
def test_dilated_conv_transpose_fix(dilation):
    torch.manual_seed(0)
    model = nn.ConvTranspose2d(3, 4, 3, dilation=dilation, padding=1).eval()
    result = convert_model(model, torch.randn(1, 3, 5, 5), n_random=1)
    with pytest.raises(TFLiteExportError, match="Conv2DBackpropInput"):
        export_tflite(result.keras_model, "fp32", fixes=_without(dilated_conv_transpose_as_conv))
    _check_fp32(model, result, export_tflite(result.keras_model, "fp32"), (1, 3, 5, 5))


def test_conv3d_fix_grouped_and_dilated():
    torch.manual_seed(0)
    grouped = nn.Conv3d(4, 6, 3, padding=1, groups=2).eval()
    result = convert_model(grouped, torch.randn(1, 4, 4, 5, 5), n_random=1)
    broken = export_tflite(result.keras_model, "fp32", fixes=_without(conv3d_for_litert))
    with pytest.raises(RuntimeError, match="conv3d"):
        LiteRTRunner(broken)(np.zeros((1, 4, 4, 5, 5), np.float32))
    _check_fp32(grouped, result, export_tflite(result.keras_model, "fp32"), (1, 4, 4, 5, 5))
    dilated = nn.Conv3d(2, 3, 3, dilation=2, padding=2).eval()
    result = convert_model(dilated, torch.randn(1, 2, 5, 5, 5), n_random=1)
    with pytest.raises(TFLiteExportError, match="SpaceToBatchND"):
        export_tflite(result.keras_model, "fp32", fixes=_without(conv3d_for_litert))
    _check_fp32(dilated, result, export_tflite(result.keras_model, "fp32"), (1, 2, 5, 5, 5))


def test_high_rank_pad_fix_is_bit_exact():
    import keras

    x = keras.Input((3, 1, 4, 1, 2))
    y = pad(x, [(0, 0), (0, 0), (0, 2), (1, 0), (0, 1), (0, 0)], mode="constant", value=0.5)
    model = keras.Model(x, y)
    with pytest.raises(TFLiteExportError, match="PadV2"):
        export_tflite(model, "fp32", fixes=_without(high_rank_pad_as_3d))
    data = export_tflite(model, "fp32")
    assert "PADV2" in op_counts(data) or "PAD" in op_counts(data)
    x_in = np.random.default_rng(0).standard_normal((2, 3, 1, 4, 1, 2)).astype(np.float32)
    np.testing.assert_array_equal(LiteRTRunner(data)(x_in)[0], np.asarray(model(x_in)))


def test_fixes_leave_models_without_those_ops_alone():
    torch.manual_seed(0)
    result = convert_model(nn.Conv2d(3, 4, 1), torch.randn(1, 3, 4, 4), n_random=1)
    exported, applied = with_export_fixes(result.keras_model, (erf_builtin, axis_linear_map_matmul))
    assert exported is result.keras_model and applied == []


# --- files: API, atomic save, CLI ------------------------------------------------------------------

def test_save_outputs_writes_extra_files(tmp_path):
    torch.manual_seed(0)
    result = convert_model(nn.Conv2d(3, 4, 1), torch.randn(1, 3, 4, 4), n_random=1, tflite=("fp32",))
    out = tmp_path / "out"
    save_outputs(result.keras_model, out, {"x": 1}, saved_model=False,
                 extra_files={"model_fp32.tflite": result.tflite["fp32"]})
    assert (out / "model_fp32.tflite").read_bytes() == result.tflite["fp32"]
    with pytest.raises(ValueError, match="plain file name"):
        save_outputs(result.keras_model, tmp_path / "o2", {}, saved_model=False, extra_files={"../x.tflite": b""})
    assert not (tmp_path / "o2").exists()


CLI_MODEL = '''
import torch.nn as nn

def build():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
'''


def test_cli_tflite_files_and_report(tmp_path, capsys):
    from tracer.cli import EXIT_INPUT, EXIT_OK, main

    (tmp_path / "net.py").write_text(CLI_MODEL)
    np.save(tmp_path / "calib.npy", np.random.default_rng(0).random((16, 3, 12, 12), dtype=np.float32))
    base = ["convert", f"{tmp_path / 'net.py'}:build", "--input-shape", "1,3,12,12", "--no-saved-model", "-q"]
    assert main([*base, "-o", str(tmp_path / "bad"), "--tflite", "int8"]) == EXIT_INPUT
    assert "needs calibration data" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    assert main([*base, "-o", str(tmp_path / "bad"), "--tflite", "int8", "--calib", str(tmp_path / "no.npy")]) \
        == EXIT_INPUT
    assert "no.npy does not exist" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    out = tmp_path / "out"
    code = main([*base, "-o", str(out), "--tflite", "fp32", "--tflite", "fp16", "--tflite", "int8",
                 "--calib", str(tmp_path / "calib.npy"), "--int8-io"])
    assert code == EXIT_OK
    assert "tflite fp32: OK" in capsys.readouterr().out
    for kind in ("fp32", "fp16", "int8"):
        assert (out / f"model_{kind}.tflite").stat().st_size > 1000
    report = json.loads((out / "report.json").read_text())
    assert report["tflite"]["fp32"]["ok"] and report["tflite"]["fp32"]["file"] == "model_fp32.tflite"
    assert report["tflite"]["int8"]["strict"] is False and report["tflite"]["int8"]["max_abs"] > 0


def test_cli_random_calibration_warns_in_one_line(tmp_path, capsys):
    from tracer.cli import EXIT_OK, main

    (tmp_path / "net.py").write_text(CLI_MODEL)
    code = main(["convert", f"{tmp_path / 'net.py'}:build", "--input-shape", "1,3,12,12", "--no-saved-model", "-q",
                 "-o", str(tmp_path / "out"), "--tflite", "int8", "--random-calibration"])
    err = capsys.readouterr().err
    assert code == EXIT_OK and (tmp_path / "out" / "model_int8.tflite").is_file()
    assert "tracer: warning: int8 calibration on random normal inputs" in err and "accuracy is meaningless" in err
    assert "UserWarning" not in err, err
