"""Gradient parity of recurrent layers with biases (tracer/verify/gradcheck_params.py's recurrent maps):
the GRU's stacked ``(2, 3H)`` bias split into ``bias_ih`` / ``bias_hh`` with its gates reordered, the one
bias of an LSTM / SimpleRNN holding ``bias_ih + bias_hh``; a wrong map must fail."""
from __future__ import annotations

from dataclasses import replace

import keras
import numpy as np
import pytest
import torch
import torch.nn as nn

import tracer.verify.gradcheck as gradcheck
from tests.op_rules.test_recurrent import Head  # the last time step of a batch-first RNN through a Linear
from tracer import convert_model
from tracer.verify.gradcheck import check_gradients, map_parameters, restore_torch_weights
from tracer.verify.gradcheck_params import ParamMap

F_IN, HID, STEPS, BATCH = 5, 4, 6, 2


def _rnn(kind: str, layers: int, bidir: bool) -> nn.Module:
    cls = {"GRU": nn.GRU, "LSTM": nn.LSTM, "RNN": nn.RNN}[kind]
    return cls(F_IN, HID, num_layers=layers, bidirectional=bidir, batch_first=True)


def _converted(kind: str, layers: int = 1, bidir: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    model = Head(_rnn(kind, layers, bidir)).eval()
    return model, convert_model(model, torch.randn(BATCH, STEPS, F_IN), n_random=1)


def _check(model, result, **kw):
    return check_gradients(model, result, [np.zeros((BATCH, STEPS, F_IN), np.float32)], batch=3, **kw)


@pytest.mark.parametrize("kind, layers, bidir", [("GRU", 2, True), ("LSTM", 1, False), ("RNN", 1, True)])
def test_recurrent_gradient_parity_with_biases(kind, layers, bidir):
    model, result = _converted(kind, layers, bidir)
    maps, unmatched = map_parameters(model, result.keras_model)
    assert not unmatched
    report = _check(model, result)
    assert report.ok, report.summary()
    assert sorted(d.name for d in report.params) == sorted(k for k, _ in model.named_parameters())
    summed = [k for k in report.known_differences if "Keras holds their sum as one bias" in k]
    if kind == "GRU":  # two biases in Keras too: the SGD step matches exactly
        assert not summed and all(d.ok for d in report.steps), report.summary()
        how = {m.how for m in maps if m.torch_name.startswith("rnn.bias")}
        assert how == {f"GRU bias row {k} (gates r, z, n -> z, r, h)" for k in (0, 1)}, how
    else:  # one per layer and direction, its factor checked
        assert len(summed) == layers * (2 if bidir else 1), report.known_differences
        assert all("half PyTorch's rate" in k for k in summed)


def _swap_blocks(m: ParamMap, a: int, b: int, gates: int) -> ParamMap:
    """``m`` with gate blocks ``a`` and ``b`` of its last axis exchanged: a wrong map."""
    h = m.index.shape[-1] // gates
    order = list(range(gates))
    order[a], order[b] = b, a
    return replace(m, index=np.concatenate([m.index[..., g * h:(g + 1) * h] for g in order], axis=-1))


@pytest.mark.parametrize("kind, wrong, gates", [
    ("GRU", "rnn.bias_ih_l0", 3),  # Keras z, r swapped back: the bias's input-side row
    ("GRU", "rnn.bias_hh_l0", 3),
    ("GRU", "rnn.weight_hh_l0", 3),
    ("LSTM", "rnn.bias_ih_l0", 4),  # i and f of the summed bias, for bias_ih only
])
def test_a_wrong_gate_order_in_the_map_fails(monkeypatch, kind, wrong, gates):
    model, result = _converted(kind, seed=1)

    def swapped(model, keras_model):
        maps, unmatched = map_parameters(model, keras_model)
        return [_swap_blocks(m, 0, 1, gates) if m.torch_name == wrong else m for m in maps], unmatched

    monkeypatch.setattr(gradcheck, "map_parameters", swapped)
    report = _check(model, result)
    bad = {m.name for m in report.mismatches if m.kind == "gradient"}
    assert bad == {wrong}, report.summary()


def test_keras_weights_in_another_layout_are_not_claimed():
    """A GRU bias whose gates were not reordered holds no torch tensor in op_rules/recurrent.py's layout."""
    model, result = _converted("GRU", seed=2)
    gru = next(layer for layer in result.keras_model.layers if isinstance(layer, keras.layers.GRU))
    rnn = model.rnn
    gru.cell.bias.assign(np.stack([rnn.bias_ih_l0.detach().numpy(), rnn.bias_hh_l0.detach().numpy()]))
    _, unmatched = map_parameters(model, result.keras_model)
    assert gru.cell.bias.path in unmatched


@pytest.mark.parametrize("kind", ["GRU", "LSTM"])
def test_trained_keras_weights_go_back_into_torch(kind):
    """restore_torch_weights: the GRU's rows to their two biases, an LSTM's summed bias into bias_ih
    (bias_hh kept): the torch model then computes what the changed Keras model computes."""
    model, fresh = _converted(kind, 2, True, seed=3)
    result = convert_model(model, torch.randn(BATCH, STEPS, F_IN), n_random=1)  # to be "trained"
    rng = np.random.default_rng(0)
    for v in result.keras_model.trainable_variables:
        v.assign(keras.ops.convert_to_numpy(v.value) + 0.1 * rng.standard_normal(tuple(v.shape)).astype(np.float32))
    hh_before = model.rnn.bias_hh_l1_reverse.detach().clone()
    done, missing = restore_torch_weights(model, fresh.keras_model, result.keras_model)
    assert not missing and len(done) == len(list(model.parameters()))
    assert (kind == "LSTM") == torch.equal(model.rnn.bias_hh_l1_reverse, hh_before)
    x = np.random.default_rng(1).standard_normal((3, STEPS, F_IN)).astype(np.float32)
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    got = keras.ops.convert_to_numpy(result.keras_model(x))
    assert np.max(np.abs(got - want)) <= 1e-5 * max(1.0, float(np.max(np.abs(want))))
