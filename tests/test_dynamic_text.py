"""Hugging Face BERT and GPT-2 (small configs, random weights), with DistilBERT, RoBERTa, T5's
encoder and GPT-2's LM head, over a dynamic sequence length (issue 14):
one conversion, captured with torch.export (``Dim.AUTO`` on the length), checked against PyTorch at the sample's length
and two others in Keras and in fp32 LiteRT (builtin ops only). Their position ids (BERT's
``position_ids[:, :seq]`` buffer slice, GPT-2's ``arange``), token_type_ids buffer slice and masks
(HF's padding mask indexed with ``arange(T)``, GPT-2's causal mask) are computed at runtime from the
length (tracer/capture/sizes.py, op_rules/sizes.py). Needs transformers (``.venv-zoo``)."""
from __future__ import annotations

import pytest
import torch

from tests.test_dynamic_sizes import assert_parity_at_sizes, size_nodes
from tests.test_text_models import HFText, hf_model, token_inputs
from tracer import convert_model

pytest.importorskip("transformers")


@pytest.mark.parametrize("name", ["gpt2", "gpt2_lm_head", "bert", "distilbert", "roberta", "t5_encoder"])
def test_hugging_face_text_model_over_dynamic_length(name):
    torch.manual_seed(0)
    model = HFText(hf_model(name)).eval()
    ids, mask = token_inputs(length=12, vocab=1000)  # the second sequence padded: the padding mask matters
    result = convert_model(model, (ids, mask), dynamic_shapes=({1: "seq"}, {1: "seq"}), n_random=1,
                           raise_on_mismatch=False, tflite=("fp32",))
    assert result.graph.graph["capture"]["method"] == "torch.export"
    assert [tuple(t.shape) for t in result.keras_model.inputs] == [(None, None), (None, None)]
    errors = assert_parity_at_sizes(result, "seq")
    assert list(errors) == ["sample", "seq=24", "seq=19"]
    assert size_nodes(result)  # the length is computed from the input, not the sample's 12
