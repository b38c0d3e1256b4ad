"""A representative subset of bench/external.py converts with fp32 parity: a torchvision model with
stochastic depth (dropped, with a note), a Hugging Face text model from its config (int64 token ids;
its wrapper class is named ``_HFTuple``, which the Keras model name must survive) and a recurrent net.

torchvision and transformers are installed only in .venv-zoo: those tests skip in .venv and run in
the CUDA-wheel subset (``bash dev.sh test-cuda``). The recurrent net needs neither.
"""
from __future__ import annotations

import pytest
import torch

from bench.external import MODELS
from bench.zoo import perturb
from tests.helpers import assert_converts, randomize_bn


def build(name: str) -> tuple:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model, sample = MODELS[name][1]()
    return randomize_bn(perturb(model.eval())).eval(), sample


def test_torchvision_efficientnet_b0_with_stochastic_depth():
    pytest.importorskip("torchvision", reason="torchvision is installed only in .venv-zoo")
    model, x = build("efficientnet_b0")
    result = assert_converts(model, x[..., :32, :32], n_random=1)  # 32x32: the smallest map is 1x1
    notes = [n for n in result.facts()["notes"] if "stochastic depth" in n]
    assert len(notes) == 9, notes  # one per MBConv block with a residual connection
    assert result.transpose_count <= 1, result.transposes


def test_hugging_face_bert_from_config():
    pytest.importorskip("transformers", reason="transformers is installed only in .venv-zoo")
    model, tokens = build("hf_bert")
    assert tokens.dtype == torch.int64
    result = assert_converts(model, tokens, n_random=1)
    assert result.keras_model.name == "HFTuple"


def test_recurrent_lstm_batch_first():
    model, x = build("lstm_batch_first")
    assert_converts(model, x, n_random=1)
