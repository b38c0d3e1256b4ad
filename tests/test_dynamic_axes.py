"""Dynamic axes (issue 14, first version): one converted model for several image sizes and sequence
lengths, checked against PyTorch at the sample's size and two others per dynamic axis, in Keras and
(for two models) fp32 LiteRT; ops that would fix a dynamic size are refused naming the axis and line."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from examples import crnn_kws, repvgg, vit_tiny
from tests.helpers import FP32_TOL, randomize_bn
from tracer import convert_model
from tracer.dynamic import DynamicAxis, parse_dynamic_shapes
from tracer.errors import ConversionError, InputError


class ResNetStyle(nn.Module):
    """Two residual stages (the second strided, with a 1x1 projection), global pooling, a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.a = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                               nn.Conv2d(8, 8, 3, padding=1))
        self.b = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1))
        self.proj = nn.Conv2d(8, 16, 1, stride=2)
        self.pool = nn.MaxPool2d(2, ceil_mode=True)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(x + self.a(x))
        x = torch.relu(self.proj(x) + self.b(x))
        return self.fc(self.gap(self.pool(x)).flatten(1))


class RNNStack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(8, 16, num_layers=2, batch_first=True)
        self.gru = nn.GRU(16, 12, batch_first=True, bidirectional=True)
        self.head = nn.Linear(24, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.lstm(x)
        y, _ = self.gru(y)
        return self.head(y)


class TokenModel(nn.Module):
    """nn.Embedding + learned positions from ``torch.arange(T)`` + nn.TransformerEncoder."""

    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(50, 16)
        self.pos = nn.Embedding(64, 16)
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)  # the position line
        return self.enc(self.tok(ids) + self.pos(positions))


def _convert(model: nn.Module, sample: torch.Tensor, dynamic: dict, tflite: tuple = ()) -> object:
    result = convert_model(model.eval(), sample, dynamic_shapes=(dynamic,), n_random=1, raise_on_mismatch=False,
                           tflite=tflite)
    return result


def _sizes_checked(report, name: str) -> list[str]:
    return [t.label for t in report.trials if t.label.startswith(name + "=")]


def _assert_ok_at_sizes(result, names: list[str], want_sizes: int = 2) -> None:
    assert result.report.ok, result.report.summary()
    for name in names:
        assert len(_sizes_checked(result.report, name)) == want_sizes, result.report.summary()
    for report in result.tflite_reports.values():
        assert report.ok, report.summary()
        for name in names:
            assert len(_sizes_checked(report.parity, name)) == want_sizes, report.summary()
    for t in result.report.trials:  # every trial held to the project's tolerance
        assert all(o.max_rel <= FP32_TOL for o in t.outputs)


def test_resnet_style_dynamic_hw_keras_and_litert():
    torch.manual_seed(0)
    model = randomize_bn(ResNetStyle(), seed=0)
    result = _convert(model, torch.randn(2, 3, 32, 32), {2: "h", 3: "w"}, tflite=("fp32",))
    assert tuple(result.keras_model.inputs[0].shape) == (None, 3, None, None)
    _assert_ok_at_sizes(result, ["h", "w"])
    shapes = {t.label: t.input_shapes[0] for t in result.tflite_reports["fp32"].parity.trials}
    assert shapes["h=64"] == (2, 3, 64, 32) and shapes["w=49"] == (2, 3, 32, 49)
    assert result.graph.graph["dynamic_axes"] == {"x": {2: "h", 3: "w"}}


def test_resnet_style_channels_last_io_shares_one_size_keras_and_litert():
    torch.manual_seed(1)
    model = randomize_bn(ResNetStyle(), seed=1)
    result = convert_model(model.eval(), torch.randn(1, 3, 24, 24), channels_last_io=True, n_random=1,
                           dynamic_shapes=({2: "side", 3: "side"},), raise_on_mismatch=False, tflite=("fp32",))
    assert tuple(result.keras_model.inputs[0].shape) == (None, None, None, 3)  # NHWC: H, W at Keras axes 1, 2
    assert [t.input_shapes[0] for t in result.report.trials if "=" in t.label] == [(1, 3, 48, 48), (1, 3, 37, 37)]
    _assert_ok_at_sizes(result, ["side"])


def test_repvgg_a0_dynamic_hw_keras_and_litert():
    model = randomize_bn(repvgg.build_a0(num_classes=10), seed=3)
    torch.manual_seed(3)
    result = _convert(model, torch.randn(1, 3, 32, 32), {2: "h", 3: "w"}, tflite=("fp32",))
    _assert_ok_at_sizes(result, ["h", "w"])


def test_lstm_gru_stack_dynamic_time_keras():
    torch.manual_seed(4)
    result = _convert(RNNStack(), torch.randn(2, 20, 8), {1: "time"})
    assert tuple(result.keras_model.inputs[0].shape) == (None, None, 8)
    _assert_ok_at_sizes(result, ["time"])
    assert [t.input_shapes[0][1] for t in result.report.trials if t.label.startswith("time=")] == [40, 31]


@pytest.mark.parametrize("pool", ["last", pytest.param("mean", marks=pytest.mark.slow)])
def test_crnn_dynamic_time(pool):
    """CRNN's ``x.permute(0, 3, 1, 2).flatten(2)`` keeps time as the one reshape axis Keras infers (-1)."""
    torch.manual_seed(5)
    model = randomize_bn(crnn_kws.build(pool=pool), seed=5)
    result = _convert(model, torch.randn(1, 1, 40, 100), {3: "time"})
    assert tuple(result.keras_model.inputs[0].shape) == (None, 1, 40, None)
    _assert_ok_at_sizes(result, ["time"])


class FoldsTimeIntoBatch(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1, x.shape[-1]).relu()


def test_reshape_folding_a_dynamic_size_into_the_batch_converts():
    torch.manual_seed(10)
    result = _convert(FoldsTimeIntoBatch(), torch.randn(2, 5, 3), {1: "t"})
    _assert_ok_at_sizes(result, ["t"])
    assert [t.outputs[0].shape for t in result.report.trials if "=" in t.label] == [(20, 3), (14, 3)]


def test_token_model_arange_positions_convert():
    """``torch.arange(ids.shape[1])`` is computed at runtime (tests/test_dynamic_sizes.py has LiteRT too)."""
    torch.manual_seed(6)
    ids = torch.randint(0, 50, (2, 12))
    result = _convert(TokenModel(), ids, {1: "seq"})
    _assert_ok_at_sizes(result, ["seq"])


class LinearOverTime(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mix = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mix(x.transpose(1, 2))  # the time-mixing line


def test_linear_over_a_dynamic_axis_refused():
    """A weight sized by the sample's length cannot follow another length: PyTorch itself fails there."""
    torch.manual_seed(6)
    with pytest.raises(ConversionError) as err:
        _convert(LinearOverTime(), torch.randn(2, 6, 3), {1: "t"})
    text = str(err.value)
    assert "dynamic axis 't'" in text and "fails in PyTorch at t=12" in text and "the time-mixing line" in text


def test_vit_other_sizes_refused():
    model = vit_tiny.build(img_size=32, num_classes=10, depth=1)
    torch.manual_seed(7)
    with pytest.raises(ConversionError) as err:
        _convert(model, torch.randn(1, 3, 32, 32), {2: "h", 3: "w"})
    text = str(err.value)
    assert "dynamic axis 'h'" in text and "fails in PyTorch at h=64" in text and "vit_tiny.py" in text


def test_adaptive_pool_to_fixed_size_refused():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(3), nn.Flatten(), nn.Linear(36, 2))
    torch.manual_seed(8)
    with pytest.raises(ConversionError, match=r"adaptive pooling to the fixed size \(3, 3\)"):
        _convert(model, torch.randn(1, 3, 16, 16), {2: "h"})


def test_parse_dynamic_shapes_checks_the_spec():
    x = torch.zeros(2, 3, 8, 10)
    dims = parse_dynamic_shapes(({2: "h", -1: "w"},), (x,))
    assert dims == [DynamicAxis("h", ((0, 2),), 8), DynamicAxis("w", ((0, 3),), 10)]
    assert dims[0].others() == [16, 13]  # 2x and 1.5x + 1: one of them odd
    limited = parse_dynamic_shapes(({2: torch.export.Dim("h", min=4, max=12)},), (x,))[0]
    assert (limited.low, limited.high, limited.others()) == (4, 12, [11, 12])
    for bad, message in [(({4: "h"},), "not an axis"), (({2: "a b"},), "identifier"),
                         (({2: "s", 3: "s"},), "one size"), ([{2: "h"}, {1: "t"}], "one dict per input")]:
        with pytest.raises(InputError, match=message):
            parse_dynamic_shapes(bad, (x,))
    assert parse_dynamic_shapes(None, (x,)) == []


def test_cli_dynamic_axis_parsed_before_torch():
    from tracer.cli import parse_dynamic_axes
    assert parse_dynamic_axes(["0:3=time", "1:1"], [[1, 1, 40, 100], [1, 5]]) == ({3: "time"}, {1: "input1_axis1"})
    assert parse_dynamic_axes([], [[1, 3]]) is None
    for bad, message in [("0", "INPUT:AXIS"), ("2:1", "no input 2"), ("0:0", "batch axis"), ("0:1=a-b", "identifier")]:
        with pytest.raises(InputError, match=message):
            parse_dynamic_axes([bad], [[1, 3, 8]])


def test_batch_manifest_takes_dynamic_axis_option():
    from tracer.batch.manifest import _check_options, convert_actions
    got = _check_options({"dynamic_axis": ["0:2=h"]}, convert_actions(), lambda f, m: ValueError(f"{f}: {m}"))
    assert got == {"dynamic_axis": ["0:2=h"]}


CLI_MODEL = '''
import torch
import torch.nn as nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))
'''


def test_cli_convert_with_dynamic_axes(tmp_path, capsys):
    import json

    import tensorflow as tf

    from tracer.cli import EXIT_INPUT, EXIT_OK, main
    path = tmp_path / "net.py"
    path.write_text(CLI_MODEL)
    out = tmp_path / "out"
    code = main(["convert", f"{path}:Net", "--input-shape", "1,3,16,16", "--dynamic-axis", "0:2=h",
                 "--dynamic-axis", "0:3=w", "--random-inputs", "1", "-o", str(out), "-q"])
    assert code == EXIT_OK, capsys.readouterr()
    report = json.loads((out / "report.json").read_text())
    labels = [t["label"] for t in report["parity"]["trials"]]
    assert report["parity"]["ok"] and labels[-4:] == ["h=32", "h=25", "w=32", "w=25"]
    signature = tf.saved_model.load(str(out / "saved_model")).signatures["serving_default"]
    assert [tuple(s.shape) for s in signature.structured_input_signature[1].values()] == [(None, 3, None, None)]
    bad = main(["convert", f"{path}:Net", "--input-shape", "1,3,16,16", "--dynamic-axis", "0:0", "-o",
                str(tmp_path / "bad")])
    assert bad == EXIT_INPUT and "batch axis" in capsys.readouterr().err


class TimeMajor(nn.Module):
    """An RNN on (T, B, F) (batch_first=False): its input enters Keras as (B, T, F), so torch axis 0 is time."""

    def __init__(self, cell: type) -> None:
        super().__init__()
        self.rnn = cell(8, 16)
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.rnn(x)
        return self.fc(y)


@pytest.mark.parametrize("cell,tflite", [(nn.LSTM, ("fp32",)), (nn.GRU, ())])
def test_time_major_rnn_dynamic_time_on_torch_axis_0(cell, tflite):
    torch.manual_seed(4)
    result = _convert(TimeMajor(cell), torch.randn(20, 2, 8), {0: "time"}, tflite=tflite)
    assert result.input_layouts[0].perm[0] == 1  # Keras (B, T, F): the batch is torch axis 1
    assert tuple(result.keras_model.inputs[0].shape) == (None, None, 8)
    _assert_ok_at_sizes(result, ["time"])
    shapes = [t.input_shapes[0] for t in result.report.trials if t.label.startswith("time=")]
    others = DynamicAxis("time", ((0, 0),), 20).others()
    assert shapes == [(t, 2, 8) for t in others] and 20 not in others  # torch axis 0 resized, the batch stays 2
    assert result.report.trials[0].outputs[0].shape == (20, 2, 4)


def test_dynamic_axis_on_a_real_batch_axis_refused():
    with pytest.raises(InputError, match="axis 0 .'b'. is input 0's batch axis"):
        _convert(nn.Linear(8, 4), torch.randn(2, 5, 8), {0: "b"})
