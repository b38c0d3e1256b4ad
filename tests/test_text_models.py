"""Token models end to end: integer token ids and an attention mask as inputs, embeddings with
positions from ``arange``, padding and causal masks from comparisons, a tied LM head; plain-torch
models in both captures, and Hugging Face models from small configs (random weights) when
transformers is installed (``.venv-zoo``)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from tests.helpers import FP32_TOL
from tracer import convert_model

V, D, T = 100, 32, 8


def token_inputs(batch=2, length=T, vocab=V, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, length - 3:] = 0  # the second sequence is padded
    return ids, mask


class Encoder(nn.Module):
    """BERT-like: token + position embeddings, nn.TransformerEncoder with a key padding mask, tied head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.tok = nn.Embedding(V, D, padding_idx=0)
        self.pos = nn.Embedding(16, D)
        layer = nn.TransformerEncoderLayer(D, 4, 64, dropout=0.0, batch_first=True)
        # enable_nested_tensor=False: torch's nested fast path zeroes padded positions (see report)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(D, V, bias=False)
        self.head.weight = self.tok.weight

    def forward(self, ids, mask):
        pos = torch.arange(ids.shape[1]).unsqueeze(0)
        x = self.tok(ids) + self.pos(pos)
        return self.head(self.enc(x, src_key_padding_mask=mask == 0))


class GPTLike(nn.Module):
    """One causal attention block: mask from tril/ne/bitwise_and, positions from a cumsum of the mask."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.tok = nn.Embedding(V, D)
        self.pos = nn.Embedding(T + 1, D)
        self.qkv = nn.Linear(D, 3 * D)
        self.out = nn.Linear(D, D)
        self.ln = nn.LayerNorm(D)

    def forward(self, ids, mask):
        t = ids.shape[1]
        pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        x = self.tok(ids) + self.pos(pos)
        q, k, v = self.qkv(self.ln(x)).chunk(3, dim=-1)
        causal = torch.tril(ids.new_ones(t, t))
        allowed = (causal[None] != 0) & (mask[:, None, :] != 0)
        scores = (q @ k.transpose(1, 2)) * D ** -0.5
        a = scores.masked_fill(~allowed, torch.finfo(torch.float32).min).softmax(-1)
        return x + self.out(a @ v)


def convert(model, inputs, capture="auto", n_random=2):
    result = convert_model(model.eval(), inputs, capture=capture, n_random=n_random, tol=FP32_TOL,
                           raise_on_mismatch=False)
    assert result.report is not None and len(result.report.trials) == 1 + n_random
    assert result.report.ok, result.report.summary()
    return result


@pytest.mark.parametrize("model,capture", [(Encoder, "fx"), (GPTLike, "fx"), (GPTLike, "export")],
                         ids=["encoder-fx", "gpt-fx", "gpt-export"])
def test_plain_torch_token_model(model, capture):
    """(nn.TransformerEncoder is a leaf with a rule under fx; through torch.export its attention's
    reshapes keep the sample's batch: not converted yet, see the report of issue 11.)"""
    result = convert(model(), token_inputs(), capture=capture)
    assert [t.dtype for t in result.keras_model.inputs] == ["int32", "int32"]


def test_export_nodes_name_the_user_line():
    """torch.export keeps each node's stack trace: every op shows the line of forward() it came from."""
    result = convert(GPTLike(), token_inputs(), capture="export", n_random=1)
    graph = result.graph
    ops = [graph.nodes[n]["op"] for n in graph.graph["order"]]
    computed = [o for o in ops if o.kind == "call_function"]
    assert computed and all(o.source.file == __file__ for o in computed), [str(o.source) for o in computed]
    lines = {o.source.code for o in computed}
    assert "allowed = (causal[None] != 0) & (mask[:, None, :] != 0)" in lines


# ---- Hugging Face (transformers, .venv-zoo): small configs, random weights -------------------

def hf_model(name: str):
    T_ = pytest.importorskip("transformers")
    small = dict(vocab_size=1000)
    bert = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                max_position_embeddings=128)
    gpt2 = dict(n_embd=64, n_layer=2, n_head=4, n_positions=128, use_cache=False)
    return {
        "bert": lambda: T_.BertModel(T_.BertConfig(**small, **bert)),
        "distilbert": lambda: T_.DistilBertModel(T_.DistilBertConfig(**small, dim=64, n_layers=2, n_heads=4,
                                                                     hidden_dim=128, max_position_embeddings=128)),
        "roberta": lambda: T_.RobertaModel(T_.RobertaConfig(**small, **{**bert, "max_position_embeddings": 130})),
        "gpt2": lambda: T_.GPT2Model(T_.GPT2Config(**small, **gpt2)),
        "gpt2_lm_head": lambda: T_.GPT2LMHeadModel(T_.GPT2Config(**small, **gpt2)),
        "t5_encoder": lambda: T_.T5EncoderModel(T_.T5Config(**small, d_model=64, d_kv=16, d_ff=128, num_layers=2,
                                                            num_heads=4)),
    }[name]()


class HFText(nn.Module):
    """(input_ids, attention_mask) -> logits or last hidden state."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, ids, mask):
        out = self.model(input_ids=ids, attention_mask=mask)
        logits = getattr(out, "logits", None)
        return logits if logits is not None else out.last_hidden_state


@pytest.mark.parametrize("name", [
    "gpt2_lm_head",
    pytest.param("bert", marks=pytest.mark.slow), pytest.param("distilbert", marks=pytest.mark.slow),
    pytest.param("roberta", marks=pytest.mark.slow), pytest.param("gpt2", marks=pytest.mark.slow),
    pytest.param("t5_encoder", marks=pytest.mark.slow)])
def test_hugging_face_text_model(name):
    torch.manual_seed(0)
    model = HFText(hf_model(name))
    ids, mask = token_inputs(length=12, vocab=1000)
    result = convert(model, (ids, mask), n_random=3)  # random masks: rows with every key masked too
    assert result.graph.graph["capture"]["method"] == "torch.export"
