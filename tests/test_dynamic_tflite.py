"""Dynamic axes in LiteRT (issue 14): recurrent nets over a dynamic time axis as builtin WHILE loops
(fixes/tflite_rnn_while.py), fp16 / int8 files with dynamic H and W, each run in LiteRT at the sample's
size and two others per dynamic axis (inputs resized) against PyTorch."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from examples import crnn_kws
from tests.helpers import FP32_TOL, randomize_bn
from tests.test_dynamic_axes import CLI_MODEL, ResNetStyle, RNNStack
from tracer import convert_model
from tracer.emitter.tflite import op_counts, with_export_fixes
from tracer.fixes.tflite_rnn_while import rnn_while_loop_int8
from tracer.verify.litert import QUALITY


def _signature(model_bytes: bytes) -> list[int]:
    from ai_edge_litert.interpreter import Interpreter
    return Interpreter(model_content=model_bytes).get_input_details()[0]["shape_signature"].tolist()


def _builtin_only(model_bytes: bytes) -> dict[str, int]:
    """The op counts of every subgraph, none of them Select TF (Flex) or custom."""
    ops = op_counts(model_bytes)
    assert not [op for op in ops if op.startswith("Flex") or not op.isupper()], ops
    return ops


def _sized(report, name: str) -> list:
    return [t for t in report.parity.trials if t.label.startswith(name + "=")]


def _fp32_litert_at_sizes(result, name: str) -> None:
    report = result.tflite_reports["fp32"]
    assert report.ok, report.summary()
    assert len(_sized(report, name)) == 2, report.summary()
    assert all(o.max_rel <= FP32_TOL for t in report.parity.trials for o in t.outputs), report.summary()
    assert list(report.errors_by_size())[1:] == [t.label for t in _sized(report, name)]
    assert "per size: sample max abs" in report.summary()


def test_lstm_gru_stack_over_dynamic_time_runs_as_builtin_while():
    torch.manual_seed(9)
    result = convert_model(RNNStack().eval(), torch.randn(2, 12, 8), dynamic_shapes=({1: "time"},), n_random=1,
                           raise_on_mismatch=False, tflite=("fp32",))
    model_bytes = result.tflite["fp32"]
    assert _signature(model_bytes) == [-1, -1, 8]
    ops = _builtin_only(model_bytes)
    assert ops["WHILE"] == 4 and ops["DYNAMIC_UPDATE_SLICE"] == 4  # 2 LSTM layers, GRU forward and backward
    _fp32_litert_at_sizes(result, "time")
    assert [t.input_shapes[0][1] for t in _sized(result.tflite_reports["fp32"], "time")] == [24, 19]


def test_crnn_over_dynamic_time_litert():
    torch.manual_seed(5)
    model = randomize_bn(crnn_kws.build(), seed=5)
    result = convert_model(model, torch.randn(1, 1, 40, 48), dynamic_shapes=({3: "time"},), n_random=1,
                           raise_on_mismatch=False, tflite=("fp32",))
    assert _signature(result.tflite["fp32"]) == [-1, 1, 40, -1]
    assert _builtin_only(result.tflite["fp32"])["WHILE"] == 4  # 2 bidirectional GRU layers
    _fp32_litert_at_sizes(result, "time")


class SmallGRU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(4, 6, batch_first=True, bidirectional=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gru(x)[0]


def test_fixed_length_keeps_the_unrolled_loop():
    """Without a dynamic time axis the export unrolls (no WHILE) and the length stays fixed."""
    torch.manual_seed(2)
    result = convert_model(SmallGRU().eval(), torch.randn(1, 5, 4), n_random=1, tflite=("fp32",))
    assert _signature(result.tflite["fp32"]) == [-1, 5, 4]
    assert "WHILE" not in _builtin_only(result.tflite["fp32"])
    _, applied = with_export_fixes(result.keras_model)
    assert [note.split(": ")[1] for note in applied] == ["rnn_unrolled"]
    dynamic = convert_model(SmallGRU().eval(), torch.randn(1, 5, 4), dynamic_shapes=({1: "t"},), check=False)
    _, applied = with_export_fixes(dynamic.keras_model)
    assert [note.split(": ")[1] for note in applied] == ["rnn_while_loop"]


def test_resnet_style_fp16_int8_dynamic_hw():
    torch.manual_seed(0)
    model = randomize_bn(ResNetStyle(), seed=0)
    calib = np.random.default_rng(1).standard_normal((16, 3, 32, 32)).astype(np.float32)
    result = convert_model(model.eval(), torch.randn(2, 3, 32, 32), dynamic_shapes=({2: "h", 3: "w"},), n_random=1,
                           tflite=("fp16", "int8"), calib=calib)
    for kind, report in result.tflite_reports.items():
        assert _signature(result.tflite[kind]) == [-1, 3, -1, -1]
        _builtin_only(result.tflite[kind])
        assert [t.label for t in report.parity.trials if "=" in t.label] == ["h=64", "h=49", "w=64", "w=49"]
        good = QUALITY[kind][0]
        for t in report.parity.trials:  # every size within the kind's 'good' error
            assert all(o.max_abs <= good * o.max_ref for o in t.outputs), report.summary()
        assert report.judgement()[0] == "good" and len(report.errors_by_size()) == 5
        assert "h=49 max abs" in report.summary()


def test_random_int8_calibration_over_dynamic_axes_uses_the_sample_size():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with pytest.warns(UserWarning, match="random normal inputs"):
        result = convert_model(model.eval(), torch.randn(1, 3, 12, 12), dynamic_shapes=({2: "h"},), n_random=1,
                               tflite=("int8",), random_calibration=True)
    assert _signature(result.tflite["int8"]) == [-1, 3, -1, 12]
    assert list(result.tflite_reports["int8"].errors_by_size()) == ["sample", "h=24", "h=19"]


def test_cli_verify_checks_each_size_of_the_dynamic_axes(tmp_path, capsys):
    import json

    from tracer.cli import EXIT_INPUT, EXIT_OK, main
    path = tmp_path / "net.py"
    path.write_text(CLI_MODEL)
    out = tmp_path / "out"
    assert main(["convert", f"{path}:Net", "--input-shape", "1,3,12,12", "--dynamic-axis", "0:2=h",
                 "--random-inputs", "1", "--tflite", "fp32", "-o", str(out), "-q"]) == EXIT_OK, capsys.readouterr()
    capsys.readouterr()
    # the axes convert was given (report.json), then others asked for on the command line: the saved files
    # are fixed on w, so w is checked on the fresh conversion only
    for flags, names, saved in [([], ["h=24", "h=19"], ["h=24", "h=19"]),
                                (["--dynamic-axis", "0:2=h", "--dynamic-axis", "0:3=w"],
                                 ["h=24", "h=19", "w=24", "w=19"], ["h=24", "h=19"])]:
        code = main(["verify", str(out), "--no-gradients", "--random-inputs", "1", "-q", *flags])
        captured = capsys.readouterr()
        assert code == EXIT_OK, captured
        verify = json.loads((out / "report.json").read_text())["verify"]
        for key, want in [("conversion_dynamic_sizes", names), ("saved_model_parity", saved),
                          ("tflite_dynamic_sizes", saved)]:
            labels = [t["label"] for t in verify["facts"][key]["trials"] if "=" in t["label"]]
            assert labels == want and verify["facts"][key]["ok"], (key, labels)
        for what, want in [("the fresh conversion", names), ("model.keras", saved), ("model_fp32.tflite", saved)]:
            line = next(ln for ln in captured.out.splitlines() if ln.strip().startswith(what + " sample"))
            assert all(f"{n} " in line for n in want) and "FAIL" not in line, captured.out
        assert any("fixed size on w" in w for w in verify["warnings"]) == (len(names) > 2)
    assert main(["verify", str(out), "--dynamic-axis", "0:0", "-q"]) == EXIT_INPUT
    assert "batch axis" in capsys.readouterr().err


def test_rnn_over_dynamic_time_fp16_and_int8_keep_the_while_loop():
    """fp16 and int8 keep the WHILE loops; int8's loop passes no variable through unchanged, which
    TensorFlow's calibrator needs (tensorflow/tensorflow#75140: it segfaults otherwise)."""
    torch.manual_seed(7)
    model, x = SmallGRU().eval(), torch.randn(2, 6, 4)
    calib = np.random.default_rng(7).standard_normal((16, 6, 4)).astype(np.float32)
    result = convert_model(model, x, dynamic_shapes=({1: "t"},), n_random=1, tflite=("fp16", "int8"), calib=calib)
    _, applied = with_export_fixes(result.keras_model, [rnn_while_loop_int8])
    assert [note.split(": ")[1] for note in applied] == ["rnn_while_loop_int8"]
    for kind, report in result.tflite_reports.items():
        assert _signature(result.tflite[kind]) == [-1, -1, 4]
        assert _builtin_only(result.tflite[kind])["WHILE"] == 2, kind
        assert list(report.errors_by_size()) == ["sample", "t=12", "t=9"]
        fair = QUALITY[kind][1]
        for t in report.parity.trials:  # every size within the kind's 'fair' error
            assert all(o.max_abs <= fair * o.max_ref for o in t.outputs), report.summary()
    assert result.tflite_reports["fp16"].judgement()[0] == "good"


class PoolStack(nn.Module):
    """Pooling whose windows and divisors depend on the size's parity: ceil_mode, count_include_pad=False."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.max = nn.MaxPool2d(3, 2, 1, ceil_mode=True)
        self.avg = nn.AvgPool2d(3, 2, 1, count_include_pad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.avg(self.max(self.conv(x)))


def test_pooling_over_dynamic_hw_exact_at_odd_sizes_in_litert():
    """The runtime divisor (average pooling of ones) and border-copy padding are builtin ops; fp32 LiteRT
    matches PyTorch at h, w = 64 and the odd 49 as well as the sample's 32; int8 keeps finite ranges."""
    torch.manual_seed(12)
    calib = np.random.default_rng(12).standard_normal((8, 3, 32, 32)).astype(np.float32)
    result = convert_model(PoolStack().eval(), torch.randn(1, 3, 32, 32), dynamic_shapes=({2: "h", 3: "w"},),
                           n_random=1, raise_on_mismatch=False, tflite=("fp32", "int8"), calib=calib)
    assert result.report.ok, result.report.summary()
    assert _signature(result.tflite["fp32"]) == [-1, 3, -1, -1]
    _builtin_only(result.tflite["fp32"])
    fp32 = result.tflite_reports["fp32"]
    assert fp32.ok and list(fp32.errors_by_size()) == ["sample", "h=64", "h=49", "w=64", "w=49"], fp32.summary()
    assert all(o.max_rel <= FP32_TOL for t in fp32.parity.trials for o in t.outputs), fp32.summary()
    assert result.tflite_reports["int8"].judgement()[0] == "good", result.tflite_reports["int8"].summary()
