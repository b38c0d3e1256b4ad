"""Recurrent layers (op_rules/recurrent.py, op_rules/recurrent_cells.py): nn.LSTM / GRU / RNN as Keras
LSTM / GRU / SimpleRNN, their cells in a Python loop, the time-axis indexing of their outputs, LiteRT
export and GRU gradients."""
from __future__ import annotations

import re

import keras
import numpy as np
import pytest
import torch
import torch.nn as nn

import tracer  # noqa: F401  (registers the serializable layers for loading)
from tests.helpers import assert_converts
from tracer import convert_model
from tracer.errors import ConversionError
from tracer.verify.gradcheck import check_gradients

F_IN, HID, STEPS, BATCH = 5, 4, 6, 2


def make_rnn(kind: str, **kw) -> nn.Module:
    if kind == "LSTM":
        return nn.LSTM(F_IN, HID, **kw)
    if kind == "GRU":
        return nn.GRU(F_IN, HID, **kw)
    return nn.RNN(F_IN, HID, nonlinearity=kind.split("-")[1], **kw)


class Seq(nn.Module):
    """Takes (B, T, F) and feeds the RNN in its own convention, so the batch is the model's axis 0 either way."""

    def __init__(self, rnn: nn.Module):
        super().__init__()
        self.rnn = rnn

    def forward(self, x):
        x = x if self.rnn.batch_first else x.transpose(0, 1)
        out, state = self.rnn(x)
        return (out, *state) if isinstance(state, tuple) else (out, state)


KINDS = ["LSTM", "GRU", "RNN-tanh", "RNN-relu"]


def _sweep():
    for kind in KINDS:
        for layers in (1, 2):
            for bidir in (False, True):
                for batch_first in (False, True):
                    for bias in (True, False):
                        slow = layers == 2 and bidir and not (bias and batch_first)
                        marks = [pytest.mark.slow] if slow else []
                        yield pytest.param(kind, layers, bidir, batch_first, bias, marks=marks,
                                           id=f"{kind}-L{layers}-{'bi' if bidir else 'uni'}-"
                                              f"{'bf' if batch_first else 'sf'}-{'bias' if bias else 'nobias'}")


@pytest.mark.parametrize("kind,layers,bidir,batch_first,bias", list(_sweep()))
def test_recurrent_sweep(kind, layers, bidir, batch_first, bias):
    """Output and final states at the sample batch and at another batch (the last random trial)."""
    torch.manual_seed(0)
    rnn = make_rnn(kind, num_layers=layers, bidirectional=bidir, batch_first=batch_first, bias=bias)
    result = assert_converts(Seq(rnn).eval(), torch.randn(BATCH, STEPS, F_IN))
    assert any(t.endswith("(batch 4)") for t in [trial.label for trial in result.report.trials])
    want = {"LSTM": "LSTM", "GRU": "GRU"}.get(kind, "SimpleRNN")
    names = [type(layer).__name__ for layer in result.keras_model.layers]
    assert (names.count("Bidirectional") == layers) if bidir else (names.count(want) == layers), names


def test_gru_gates_are_keras_reset_after():
    torch.manual_seed(1)
    result = assert_converts(Seq(nn.GRU(F_IN, HID, batch_first=True)).eval(), torch.randn(3, STEPS, F_IN))
    gru = next(layer for layer in result.keras_model.layers if isinstance(layer, keras.layers.GRU))
    assert gru.cell.reset_after and tuple(gru.cell.bias.shape) == (2, 3 * HID)
    assert gru.trainable


class GivenState(nn.Module):
    """h0 (and c0) computed from the input: (L*D, B, H) through a transpose, as code usually builds them."""

    def __init__(self, kind: str, layers: int, bidir: bool, batch_first: bool):
        super().__init__()
        self.rnn = make_rnn(kind, num_layers=layers, bidirectional=bidir, batch_first=batch_first)
        self.n = layers * (2 if bidir else 1)
        self.init = nn.Linear(F_IN, self.n * HID * 2)

    def forward(self, x):
        s = torch.tanh(self.init(x[:, 0])).reshape(-1, 2 * self.n, HID).transpose(0, 1)
        h0, c0 = s[: self.n], s[self.n:]
        seq = x if self.rnn.batch_first else x.transpose(0, 1)
        if isinstance(self.rnn, nn.LSTM):
            out, (h, c) = self.rnn(seq, (h0, c0))
            return out, h, c
        out, h = self.rnn(seq, h0)
        return out, h


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("batch_first", [False, True])
def test_initial_state_given(kind, batch_first):
    torch.manual_seed(2)
    assert_converts(GivenState(kind, 2, True, batch_first).eval(), torch.randn(BATCH, STEPS, F_IN))


class LastStep(nn.Module):
    """The usual heads: ``out[:, -1]`` after a batch-first GRU, ``out[-1]`` / ``h_n[-1]`` / ``unbind(0)``
    after a seq-first LSTM."""

    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = pattern
        self.gru = nn.GRU(F_IN, HID, batch_first=True, num_layers=2)
        self.lstm = nn.LSTM(F_IN, HID, bidirectional=True)
        self.fc = nn.Linear(2 * HID, 3)

    def forward(self, x):
        if self.pattern == "bf[:, -1]":
            y, _ = self.gru(x)
            return y[:, -1]
        if self.pattern == "bf h_n[-1]":
            _, h = self.gru(x)
            return h[-1]
        out, (h, c) = self.lstm(x.transpose(0, 1))
        if self.pattern == "sf[-1]":
            return self.fc(out[-1])
        if self.pattern == "sf h_n[-1]":
            return h[-1] + c[-2]
        steps = out.unbind(0)  # "sf unbind(0)"
        return steps[0] * steps[-1]


@pytest.mark.parametrize("pattern", ["bf[:, -1]", "bf h_n[-1]", "sf[-1]", "sf h_n[-1]", "sf unbind(0)"])
def test_time_axis_indexing(pattern):
    torch.manual_seed(3)
    result = assert_converts(LastStep(pattern).eval(), torch.randn(BATCH, STEPS, F_IN))
    if pattern != "sf unbind(0)":
        assert result.transpose_count == 0, result.facts()["layout_conversions"]


class CellLoop(nn.Module):
    """A cell stepped over time in Python (fx traces it unrolled); the first step without a state."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        cls = {"LSTMCell": nn.LSTMCell, "GRUCell": nn.GRUCell}.get(kind, nn.RNNCell)
        extra = {"nonlinearity": kind.split("-")[1]} if kind.startswith("RNNCell") else {}
        self.cell = cls(F_IN, HID, **extra)

    def forward(self, x):
        state, outs = None, []
        for t in range(STEPS):  # a Python loop over a known length: fx unrolls it
            x_t = x[:, t]
            state = self.cell(x_t) if state is None else self.cell(x_t, state)
            outs.append(state[0] if self.kind == "LSTMCell" else state)
        return torch.stack(outs, dim=1)


@pytest.mark.parametrize("kind", ["LSTMCell", "GRUCell", "RNNCell-tanh", "RNNCell-relu"])
def test_cells_in_a_loop_share_their_weights(kind):
    torch.manual_seed(4)
    result = assert_converts(CellLoop(kind).eval(), torch.randn(BATCH, STEPS, F_IN))
    assert result.facts()["capture"]["method"] == "fx"
    dense = [layer for layer in result.keras_model.layers if isinstance(layer, keras.layers.Dense)]
    assert len(dense) == 2, [layer.name for layer in dense]  # W_ih and W_hh, shared by every step


@pytest.mark.parametrize("bidir", [False, True])
def test_lstm_proj_size_unrolled(bidir):
    torch.manual_seed(5)
    rnn = nn.LSTM(F_IN, HID, num_layers=2, proj_size=3, bidirectional=bidir, batch_first=True)
    assert_converts(Seq(rnn).eval(), torch.randn(BATCH, STEPS, F_IN))


def test_dropout_is_noted():
    torch.manual_seed(6)
    result = assert_converts(Seq(nn.GRU(F_IN, HID, num_layers=2, dropout=0.3, batch_first=True)).eval(),
                             torch.randn(BATCH, STEPS, F_IN))
    assert any("inter-layer dropout p=0.3" in n for n in result.facts()["notes"]), result.facts()["notes"]


def test_unbatched_input_is_refused_with_the_reason():
    torch.manual_seed(7)

    class Unbatched(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.GRU(F_IN, HID)

        def forward(self, x):
            return self.rnn(x)[0]

    with pytest.raises(ConversionError, match="unbatched 2-D input"):
        convert_model(Unbatched().eval(), torch.randn(STEPS, F_IN))


class Head(nn.Module):
    def __init__(self, rnn: nn.Module):
        super().__init__()
        self.rnn = rnn
        self.fc = nn.Linear(rnn.hidden_size * (2 if rnn.bidirectional else 1), 3)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.fc(out[:, -1])


@pytest.mark.parametrize("kind", ["LSTM", "GRU-bi"])
def test_tflite_fp32_builtin_ops(kind):
    torch.manual_seed(8)
    rnn = nn.LSTM(F_IN, HID, batch_first=True) if kind == "LSTM" else nn.GRU(F_IN, HID, batch_first=True,
                                                                              bidirectional=True)
    result = convert_model(Head(rnn).eval(), torch.randn(BATCH, STEPS, F_IN), n_random=2, tflite=("fp32",),
                           raise_on_mismatch=False)
    assert result.report.ok, result.report.summary()
    report = result.tflite_reports["fp32"]
    assert report.ok, report.summary()
    assert not [op for op in report.ops if op.startswith("Flex")], report.ops
    assert "FULLY_CONNECTED" in report.ops and "WHILE" not in report.ops, report.ops


def test_gru_gradient_parity_bias_free():
    """Training mode: every GRU weight (gates reordered) and the input get PyTorch's gradient."""
    torch.manual_seed(9)
    model = Head(nn.GRU(F_IN, HID, batch_first=True, bias=False)).eval()
    result = assert_converts(model, torch.randn(BATCH, STEPS, F_IN))
    report = check_gradients(model, result, [np.zeros((BATCH, STEPS, F_IN), np.float32)], batch=3)
    assert report.ok, report.summary()
    assert {d.name for d in report.params} >= {"rnn.weight_ih_l0", "rnn.weight_hh_l0"}


def test_cell_gradient_parity():
    """A GRUCell loop keeps torch's two biases as Dense biases: gradients and the SGD step match exactly."""
    torch.manual_seed(10)
    model = CellLoop("GRUCell").eval()
    result = assert_converts(model, torch.randn(BATCH, STEPS, F_IN))
    report = check_gradients(model, result, [np.zeros((BATCH, STEPS, F_IN), np.float32)], batch=3)
    assert report.ok, report.summary()


class EncoderDecoder(nn.Module):
    """The state tuple one LSTM returns fed to another as is: ``dec(y, enc_state)``."""

    def __init__(self, batch_first: bool):
        super().__init__()
        self.enc = nn.LSTM(F_IN, HID, num_layers=2, batch_first=batch_first)
        self.dec = nn.LSTM(F_IN, HID, num_layers=2, batch_first=batch_first)

    def forward(self, x):
        seq = x if self.enc.batch_first else x.transpose(0, 1)
        _, state = self.enc(seq)
        out, _ = self.dec(seq.flip(1 if self.enc.batch_first else 0), state)
        return out


@pytest.mark.parametrize("batch_first", [False, True])
def test_state_tuple_of_another_lstm(batch_first):
    torch.manual_seed(11)
    assert_converts(EncoderDecoder(batch_first).eval(), torch.randn(BATCH, STEPS, F_IN))


class Whole(nn.Module):
    """``return self.rnn(x)``: the RNN's result returned as is, ``(output, (h_n, c_n))`` nested for an LSTM."""

    def __init__(self, rnn: nn.Module):
        super().__init__()
        self.rnn = rnn

    def forward(self, x):
        return self.rnn(x if self.rnn.batch_first else x.transpose(0, 1))


@pytest.mark.parametrize("kind, kw", [
    pytest.param("LSTM", {"batch_first": True}, id="LSTM-bf"),
    pytest.param("LSTM", {"num_layers": 2, "bidirectional": True}, id="LSTM-L2-bi-sf"),
    pytest.param("LSTM", {"proj_size": 3, "batch_first": True}, id="LSTM-proj-bf"),
    pytest.param("GRU", {"batch_first": True, "bidirectional": True}, id="GRU-bi-bf"),
    pytest.param("RNN-tanh", {"num_layers": 2}, id="RNN-L2-sf"),
])
def test_whole_result_returned(kind, kw):
    """The nested result is the model's output: Keras outputs flattened in torch's order, each compared."""
    torch.manual_seed(12)
    model = Whole(make_rnn(kind, **kw)).eval()
    x = torch.randn(BATCH, STEPS, F_IN)
    result = assert_converts(model, x)
    with torch.no_grad():
        out, state = model(x)
    want = [out, *state] if isinstance(state, tuple) else [out, state]
    got = [tuple(t.shape) for t in result.keras_model.outputs]
    assert len(got) == len(want) == len(result.output_layouts), got
    for g, w, layout in zip(got, want, result.output_layouts):  # None: the batch axis, wherever it is
        assert all(a is None or a == b for a, b in zip(g, layout.keras_shape(tuple(w.shape)))), (g, w.shape)
    labels = set(re.findall(r" output (\S+) \(", result.report.summary()))
    assert labels == ({"0", "1.0", "1.1"} if kind == "LSTM" else {"0", "1"}), result.report.summary()
