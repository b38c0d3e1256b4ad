"""Outputs as the user wrote them: dict keys and nested tuples kept in the Keras model, the
SavedModel signature, LiteRT and the parity lines."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from tests.helpers import assert_converts
from tracer import convert_model
from tracer.emitter.save import output_paths, save_outputs, signature_names


class DictHead(nn.Module):
    """A classifier head that returns logits and a normalized embedding by name (reversed key
    order on purpose: Keras sorts dict keys when it flattens)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(6, 5)
        self.cls = nn.Linear(5, 3)

    def forward(self, x):
        e = self.body(x)
        return {"logits": self.cls(e), "embedding": e / e.norm(dim=-1, keepdim=True)}


class Nested(nn.Module):
    def forward(self, x):
        return x.exp(), (x * 2, {"neg": -x, "sq": x * x})


class DictOfTuple(nn.Module):
    def forward(self, x):
        return {"z_last": x.sum(-1), "a_pair": (x + 1, x - 1)}


def _sample(shape=(2, 6)) -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(*shape)


def _outputs(result, x: torch.Tensor):
    return result.keras_model(x.numpy(), training=False)


def test_dict_outputs_keep_their_keys_in_keras_and_the_parity_lines():
    torch.manual_seed(0)
    model = DictHead().eval()
    x = _sample()
    result = assert_converts(model, x)
    assert list(result.keras_model.output) == ["logits", "embedding"]
    got = _outputs(result, x)
    want = model(x)
    assert list(got) == ["logits", "embedding"]
    for key in want:
        np.testing.assert_allclose(np.asarray(got[key]), want[key].detach().numpy(), atol=1e-5)
    summary = result.report.summary()
    assert "output logits" in summary and "output embedding" in summary, summary
    assert result.report.to_dict()["output_names"] == ["logits", "embedding"]


def test_nested_tuples_keep_their_structure():
    x = _sample((2, 3, 4))
    result = assert_converts(Nested().eval(), x)
    out = result.keras_model.output
    assert isinstance(out, list) and len(out) == 2 and isinstance(out[1], list) and set(out[1][1]) == {"neg", "sq"}
    got = _outputs(result, x)
    np.testing.assert_allclose(np.asarray(got[1][1]["neg"]), -x.numpy(), atol=0)
    assert result.report.output_names == ["0", "1.0", "1.1.neg", "1.1.sq"]
    assert signature_names(out) == ["output_0", "output_1_0", "output_1_1_neg", "output_1_1_sq"]


def test_output_paths_of_plain_structures():
    assert output_paths("t") == ["0"]
    assert output_paths(["a", "b"]) == ["0", "1"]
    assert output_paths({"logits": "a", "aux": ["b", "c"]}) == ["logits", "aux.0", "aux.1"]
    assert signature_names({"logits": "a", "aux": ["b", "c"]}) == ["logits", "aux_0", "aux_1"]
    assert signature_names(["a", "b"]) == ["output_0", "output_1"]


def test_saved_model_signature_uses_the_dict_keys(tmp_path):
    import tensorflow as tf

    torch.manual_seed(0)
    model = DictOfTuple().eval()
    x = _sample((2, 5))
    result = assert_converts(model, x)
    save_outputs(result.keras_model, tmp_path / "out", {"test": True}, keras_file=False)
    serve = tf.saved_model.load(str(tmp_path / "out" / "saved_model")).signatures["serving_default"]
    got = {k: v.numpy() for k, v in serve(tf.constant(x.numpy())).items()}
    assert sorted(got) == ["a_pair_0", "a_pair_1", "z_last"]
    want = model(x)
    np.testing.assert_allclose(got["z_last"], want["z_last"].numpy(), atol=1e-5)
    np.testing.assert_allclose(got["a_pair_1"], want["a_pair"][1].numpy(), atol=1e-6)


def test_tflite_runs_dict_outputs_in_forwards_order():
    torch.manual_seed(0)
    model = DictHead().eval()
    result = convert_model(model, _sample(), tflite=["fp32"], n_random=1)
    report = result.tflite_reports["fp32"]
    assert report.ok, report.summary()
    assert [o.shape for o in report.parity.trials[0].outputs] == [(2, 3), (2, 5)]


@pytest.mark.parametrize("model", [DictHead(), Nested()], ids=["dict", "nested"])
def test_reloaded_model_keeps_the_structure(tmp_path, model):
    import keras

    torch.manual_seed(0)
    x = _sample((2, 6))
    result = assert_converts(model.eval(), x)
    result.keras_model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras", safe_mode=True)
    a, b = _outputs(result, x), loaded(x.numpy(), training=False)
    assert output_paths(a) == output_paths(b)
