"""Recurrent state as a model input (streaming RNNs): ``forward(x, h0)`` of an nn.GRU / LSTM / RNN.

torch keeps the batch at axis 1 of a state ``(L*D, B, H)`` (and of a time-major sequence ``(T, B, F)``);
the layout pass gives such an input a Keras Input with the batch first (tracer/passes/layout.py
batch_first_layout), records it in ``input_layouts``, and the tester's other-batch trial resizes each
input's own batch axis (tracer/verify/parity.py batch_axes). Outputs ``h_n`` / ``c_n`` keep torch's layout.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from tests.helpers import FP32_TOL
from tracer import convert_model
from tracer.ir import Phys

F_IN, HID, STEPS, BATCH = 5, 6, 4, 2
STATE = Phys((1, 0, 2))  # torch (L*D, B, H) entered into Keras as (B, L*D, H)


class Streaming(nn.Module):
    """One step of a streaming model: the state comes in and the new one goes out."""

    def __init__(self, rnn: nn.Module):
        super().__init__()
        self.rnn = rnn

    def forward(self, x, h0):
        y, h = self.rnn(x, h0)
        return y, h


class StreamingLSTM(Streaming):
    def forward(self, x, h0, c0):
        y, (h, c) = self.rnn(x, (h0, c0))
        return y, h, c


def _convert(model: nn.Module, *inputs: torch.Tensor, **kw):
    result = convert_model(model.eval(), inputs, n_random=2, raise_on_mismatch=False, **kw)
    assert result.facts()["capture"]["method"] == "fx"  # the RNN stays one node (a module rule)
    assert result.report.ok, result.report.summary()
    return result


def _assert_other_batch(result, inputs: tuple, axes: list[int]) -> None:
    """The other-batch trial ran, each input resized on its own batch axis, every output within FP32_TOL."""
    trial = next(t for t in result.report.trials if "batch" in t.label)
    new = trial.input_shapes[0][axes[0]]
    assert new != inputs[0].shape[axes[0]]
    for x, got, axis in zip(inputs, trial.input_shapes, axes):
        want = list(x.shape)
        want[axis] = new
        assert tuple(got) == tuple(want), (trial.input_shapes, axes)
    assert all(o.max_rel <= FP32_TOL for o in trial.outputs), result.report.summary()


def test_gru_h0_input_enters_keras_batch_first():
    torch.manual_seed(0)
    x, h0 = torch.randn(BATCH, STEPS, F_IN), torch.randn(1, BATCH, HID)
    model = Streaming(nn.GRU(F_IN, HID, batch_first=True)).eval()
    result = _convert(model, x, h0)
    assert result.input_layouts == [Phys.identity(3), STATE]
    assert [tuple(t.shape) for t in result.keras_model.inputs] == [(None, STEPS, F_IN), (None, 1, HID)]
    assert all(p.is_identity for p in result.output_layouts)  # h_n comes out as torch's (L*D, B, H)
    _assert_other_batch(result, (x, h0), [0, 1])
    # the Keras model itself, fed h0 batch first, at a batch the sample did not have
    xs = np.random.default_rng(1).standard_normal((3, STEPS, F_IN)).astype(np.float32)
    hs = np.random.default_rng(2).standard_normal((1, 3, HID)).astype(np.float32)
    y, h = result.keras_model([xs, np.ascontiguousarray(hs.transpose(1, 0, 2))], training=False)
    with torch.no_grad():
        ty, th = model(torch.from_numpy(xs), torch.from_numpy(hs))
    assert np.abs(np.asarray(y) - ty.numpy()).max() <= FP32_TOL * max(1.0, float(ty.abs().max()))
    assert np.asarray(h).shape == (1, 3, HID)
    assert np.abs(np.asarray(h) - th.numpy()).max() <= FP32_TOL * max(1.0, float(th.abs().max()))


def test_lstm_h0_c0_inputs():
    torch.manual_seed(1)
    x = torch.randn(BATCH, STEPS, F_IN)
    h0, c0 = torch.randn(1, BATCH, HID), torch.randn(1, BATCH, HID)
    result = _convert(StreamingLSTM(nn.LSTM(F_IN, HID, batch_first=True)), x, h0, c0)
    assert result.input_layouts == [Phys.identity(3), STATE, STATE]
    assert len(result.report.trials[0].outputs) == 3  # y, h_n, c_n
    _assert_other_batch(result, (x, h0, c0), [0, 1, 1])


def test_two_layer_bidirectional_gru_time_major():
    """A time-major sequence (T, B, F) is read with its batch at axis 1 too: it enters as (B, T, F)."""
    torch.manual_seed(2)
    x, h0 = torch.randn(STEPS, BATCH, F_IN), torch.randn(4, BATCH, HID)
    result = _convert(Streaming(nn.GRU(F_IN, HID, num_layers=2, bidirectional=True)), x, h0)
    assert result.input_layouts == [Phys((1, 0, 2)), STATE]
    assert [tuple(t.shape) for t in result.keras_model.inputs] == [(None, STEPS, F_IN), (None, 4, HID)]
    _assert_other_batch(result, (x, h0), [1, 1])


def test_state_input_also_read_in_torch_order():
    """h0 fed to the GRU and summed over its layer axis: that consumer gets it back in torch's order."""

    class Both(nn.Module):
        def __init__(self):
            super().__init__()
            self.gru = nn.GRU(F_IN, HID, batch_first=True)

        def forward(self, x, h0):
            y, h = self.gru(x, h0)
            return y + h0.sum(0).unsqueeze(1), h

    torch.manual_seed(3)
    x, h0 = torch.randn(BATCH, STEPS, F_IN), torch.randn(1, BATCH, HID)
    result = _convert(Both(), x, h0)
    assert result.input_layouts[1] == STATE
    _assert_other_batch(result, (x, h0), [0, 1])


def test_gru_state_input_tflite_fp32():
    torch.manual_seed(4)
    x, h0 = torch.randn(BATCH, STEPS, F_IN), torch.randn(1, BATCH, HID)
    result = _convert(Streaming(nn.GRU(F_IN, HID, batch_first=True)), x, h0, tflite=("fp32",))
    report = result.tflite_reports["fp32"]
    assert report.ok, report.summary()
    assert any("batch" in t.label for t in report.parity.trials)
    assert not [op for op in report.ops if op.startswith("Flex")], report.ops


@pytest.mark.parametrize("kind", ["RNNCell", "GRUCell", "LSTMCell"])
def test_cell_loop_state_input(kind):
    """A cell's state (B, H) already has its batch at axis 0: it enters Keras as it is."""

    class Loop(nn.Module):
        def __init__(self):
            super().__init__()
            self.cell = getattr(nn, kind)(F_IN, HID)

        def forward(self, x, h0):
            state, outs = h0, []
            for t in range(STEPS):
                state = self.cell(x[:, t], state)
                outs.append(state)
            return torch.stack(outs, dim=1)

    class LSTMLoop(Loop):
        def forward(self, x, h0, c0):
            state, outs = (h0, c0), []
            for t in range(STEPS):
                state = self.cell(x[:, t], state)
                outs.append(state[0])
            return torch.stack(outs, dim=1)

    torch.manual_seed(5)
    x = torch.randn(BATCH, STEPS, F_IN)
    states = [torch.randn(BATCH, HID) for _ in range(2 if kind == "LSTMCell" else 1)]
    result = _convert(LSTMLoop() if kind == "LSTMCell" else Loop(), x, *states)
    assert all(p.is_identity for p in result.input_layouts)
    _assert_other_batch(result, (x, *states), [0] * (1 + len(states)))


def test_projected_lstm_and_time_major_rnn_states():
    """proj_size (unrolled cells: h0 (L, B, P), c0 (L, B, H)) and a time-major nn.RNN indexed on time."""

    class LastStep(Streaming):
        def forward(self, x, h0):
            y, h = self.rnn(x, h0)
            return y[-1], h[-1]

    torch.manual_seed(6)
    x, h0, c0 = torch.randn(BATCH, STEPS, F_IN), torch.randn(2, BATCH, 3), torch.randn(2, BATCH, HID)
    lstm = StreamingLSTM(nn.LSTM(F_IN, HID, num_layers=2, proj_size=3, batch_first=True))
    result = _convert(lstm, x, h0, c0)
    assert result.input_layouts == [Phys.identity(3), STATE, STATE]
    _assert_other_batch(result, (x, h0, c0), [0, 1, 1])
    x, h0 = torch.randn(STEPS, BATCH, F_IN), torch.randn(2, BATCH, HID)
    result = _convert(LastStep(nn.RNN(F_IN, HID, num_layers=2)), x, h0)
    assert result.input_layouts == [Phys((1, 0, 2)), STATE]
    _assert_other_batch(result, (x, h0), [1, 1])


def test_gru_state_input_gradient_parity():
    """Gradient parity draws its batch on each input's own batch axis (h0: torch axis 1)."""
    from tracer.verify.gradcheck import check_gradients
    torch.manual_seed(21)
    model = Streaming(nn.GRU(4, 6, batch_first=True))
    x, h0 = torch.randn(2, 5, 4), torch.randn(1, 2, 6)
    result = _convert(model, x, h0)
    report = check_gradients(model, result, [x.numpy(), h0.numpy()], batch=3)
    assert report.ok, report.summary()
    assert report.batch == 3


def test_gru_state_input_int8_calibration_splits_on_each_batch_axis():
    """int8 calibration data for an h0 input is split on its batch axis (torch axis 1), not axis 0."""
    from tracer.emitter.tflite import calibration_dataset
    torch.manual_seed(22)
    model = Streaming(nn.GRU(4, 6, batch_first=True))
    x, h0 = torch.randn(2, 5, 4), torch.randn(1, 2, 6)
    result = _convert(model, x, h0)
    xs, hs = np.random.default_rng(0).standard_normal((3, 5, 4), np.float32), np.arange(18, dtype=np.float32)
    hs = hs.reshape(1, 3, 6)  # three samples along the state's batch axis
    names = [t.name for t in result.keras_model.inputs]
    got = list(calibration_dataset(result.keras_model, [xs, hs], result.input_layouts, False)())
    assert len(got) == 3
    for k, sample in enumerate(got):
        assert sample[names[0]].shape == (1, 5, 4) and sample[names[1]].shape == (1, 1, 6)  # Keras (B, L*D, H)
        np.testing.assert_array_equal(sample[names[1]][0, 0], hs[0, k])
    converted = convert_model(model.eval(), (x, h0), n_random=1, tflite=("int8",), calib=[xs, hs],
                              raise_on_mismatch=False)
    assert converted.tflite_reports["int8"].parity.trials
