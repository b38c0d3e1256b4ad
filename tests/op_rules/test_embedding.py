"""Parity for op_rules/embedding.py: nn.Embedding, F.embedding and aten.embedding (torch.export),
padding_idx kept through training, max_norm refused, integer inputs (int64 -> int32), random
index inputs in [0, num_embeddings), a tied LM head, and saving."""
from __future__ import annotations

import keras
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tests.helpers import FP32_TOL
from tracer import convert_model
from tracer.verify.parity import int_ranges

V, D = 50, 8


def ids(*shape, high=V, seed=0):
    return torch.randint(0, high, shape, generator=torch.Generator().manual_seed(seed))


class Lookup(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(V, D, **kw)

    def forward(self, i):
        return self.emb(i) * 2.0


class Functional(nn.Module):
    def __init__(self, padding_idx=None, max_norm=None):
        super().__init__()
        torch.manual_seed(0)
        self.weight = nn.Parameter(torch.randn(V, D))
        self.padding_idx, self.max_norm = padding_idx, max_norm

    def forward(self, i):
        return F.embedding(i, self.weight, padding_idx=self.padding_idx, max_norm=self.max_norm)


class TiedLM(nn.Module):
    """GPT-2's pattern: the LM head's weight *is* the token embedding's weight."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.wte = nn.Embedding(V, D)
        self.ln = nn.LayerNorm(D)
        self.head = nn.Linear(D, V, bias=False)
        self.head.weight = self.wte.weight

    def forward(self, i):
        return self.head(self.ln(self.wte(i)))


def convert(model, *inputs, capture="fx", n_random=2):
    result = convert_model(model.eval(), inputs if len(inputs) > 1 else inputs[0], capture=capture,
                           n_random=n_random, tol=FP32_TOL, raise_on_mismatch=False)
    assert result.report is not None and len(result.report.trials) == 1 + n_random
    assert result.report.ok, result.report.summary()
    return result


def embedding_layers(keras_model):
    return [layer for layer in keras_model.layers if isinstance(layer, keras.layers.Embedding)]


@pytest.mark.parametrize("capture", ["fx", "export"])
@pytest.mark.parametrize("model", [Lookup, Functional], ids=["module", "functional"])
def test_lookup(model, capture):
    result = convert(model(), ids(2, 7), capture=capture)
    layers = embedding_layers(result.keras_model)
    assert len(layers) == 1 and layers[0].trainable
    assert result.keras_model.inputs[0].dtype == "int32"  # int64 in PyTorch


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_rank3_indices(capture):
    convert(Lookup(), ids(2, 3, 4), capture=capture)


def test_random_indices_cover_the_table():
    result = convert(Lookup(), ids(2, 6, high=3))  # the sample uses 3 of 50 rows
    assert int_ranges([ids(2, 6, high=3).numpy()], result.graph) == [(0, V)]
    assert int_ranges([np.ones((2, 6), np.int64)]) == [(0, 2)]  # a mask of ones: 0/1


@pytest.mark.parametrize("model", [Lookup, Functional], ids=["module", "functional"])
def test_padding_idx_row_never_trains(model):
    result = convert(model(padding_idx=3), ids(2, 6))
    km = result.keras_model
    layer = embedding_layers(km)[0]
    before = np.array(layer.embeddings)
    km.compile(optimizer=keras.optimizers.SGD(0.5), loss="mse")
    x = np.array([[3, 1, 2, 3, 4, 5]], np.int32)
    km.fit(x, np.ones((1, 6, D), np.float32), epochs=2, verbose=0)
    after = np.array(layer.embeddings)
    assert np.array_equal(after[3], before[3])  # PyTorch's padding row: zero gradient
    assert not np.allclose(after[1], before[1])  # the other looked-up rows train


@pytest.mark.parametrize("capture", ["fx", "export"])
@pytest.mark.parametrize("model", [Lookup, Functional], ids=["module", "functional"])
def test_max_norm_refused(model, capture):
    with pytest.raises(Exception, match="max_norm"):
        convert_model(model(max_norm=1.0).eval(), ids(2, 5), capture=capture)


def test_computed_table_refused():
    class Computed(nn.Module):
        def forward(self, x):
            return F.embedding(torch.tensor([[0, 0, 0]]), x[0:1, 0])

    with pytest.raises(Exception, match="table computed from the inputs"):
        convert_model(Computed().eval(), torch.randn(2, 4, 5, generator=torch.Generator().manual_seed(1)))


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_tied_lm_head(capture):
    """Two Keras weights, equal at conversion (README: "Token models")."""
    result = convert(TiedLM(), ids(2, 5), capture=capture)
    km = result.keras_model
    table = np.array(embedding_layers(km)[0].embeddings)
    dense = [layer for layer in km.layers if isinstance(layer, keras.layers.Dense)]
    assert len(dense) == 1 and np.array_equal(np.array(dense[0].kernel).T, table)


def test_save_and_load(tmp_path):
    result = convert(Lookup(padding_idx=0), ids(2, 6), n_random=1)
    path = tmp_path / "m.keras"
    result.keras_model.save(path)
    loaded = keras.models.load_model(path, safe_mode=True)
    x = ids(3, 6, seed=2).numpy().astype(np.int32)
    np.testing.assert_array_equal(np.asarray(loaded(x)), np.asarray(result.keras_model(x)))
    assert embedding_layers(loaded)[0].embeddings.constraint.index == 0


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_facts_name_integer_inputs_and_tied_weights(capture):
    facts = convert(TiedLM(), ids(2, 5), capture=capture, n_random=1).facts()
    assert facts["input_dtypes"] == [{"torch": "int64", "keras": "int32"}]
    assert len(facts["tied_weights"]) == 1 and "equal at conversion" in facts["tied_weights"][0]
