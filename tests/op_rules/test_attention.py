"""Parity sweeps for op_rules/attention.py: scaled_dot_product_attention, MultiheadAttention,
TransformerEncoderLayer / TransformerEncoder."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tests.helpers import assert_converts
from tracer import ConversionError, convert_model

B, HEADS, L, S, E = 2, 2, 5, 4, 8


def rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


CAUSAL = torch.triu(torch.ones(L, L, dtype=torch.bool), 1)  # True: not allowed (MultiheadAttention)
ALLOWED = torch.rand(L, S, generator=torch.Generator().manual_seed(3)) > 0.3  # True: allowed (SDPA)
ALLOWED[:, 0] = True  # no row fully masked
ADDITIVE = torch.randn(L, S, generator=torch.Generator().manual_seed(4))


def converts(model: nn.Module, *inputs: torch.Tensor, **kw):
    """assert_converts, and the model was captured by torch.fx (MultiheadAttention a leaf)."""
    result = assert_converts(model, *inputs, **kw)
    assert result.facts()["capture"]["method"] == "fx", result.facts()["capture"]
    return result


# ---- scaled_dot_product_attention --------------------------------------------------------------

class Sdpa(nn.Module):
    def __init__(self, mask: torch.Tensor | None = None, **kw):
        super().__init__()
        self.register_buffer("mask", mask)
        self.kw = kw

    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask, **self.kw)


SDPA_CASES = [
    pytest.param(None, {}, S, id="plain"),
    pytest.param(None, {"scale": 0.3}, S, id="scale"),
    pytest.param(None, {"is_causal": True}, L, id="causal"),
    pytest.param(None, {"is_causal": True}, S, id="causal_rectangular"),
    pytest.param(ALLOWED, {}, S, id="bool_mask"),
    pytest.param(ADDITIVE, {}, S, id="float_mask"),
]
PER_HEAD_MASKS = [
    pytest.param(ALLOWED[None, None], {}, S, id="bool_mask_4d"),
    pytest.param(ADDITIVE[None].expand(HEADS, L, S).clone(), {"scale": 0.5}, S, id="float_mask_per_head"),
]


@pytest.mark.parametrize("mask, kw, lk", SDPA_CASES)
def test_sdpa_3d(mask, kw, lk):
    q, k, v = rand(B, L, E), rand(B, lk, E, seed=1), rand(B, lk, 6, seed=2)
    converts(Sdpa(mask, **kw), q, k, v)


@pytest.mark.parametrize("mask, kw, lk", SDPA_CASES + PER_HEAD_MASKS)
def test_sdpa_heads(mask, kw, lk):
    q, k, v = rand(B, HEADS, L, E), rand(B, HEADS, lk, E, seed=1), rand(B, HEADS, lk, 6, seed=2)
    converts(Sdpa(mask, **kw), q, k, v)


class SdpaDynamicMask(nn.Module):
    def forward(self, q, k, mask):
        return F.scaled_dot_product_attention(q, k, k, attn_mask=mask)


def test_sdpa_with_computed_float_mask():
    converts(SdpaDynamicMask(), rand(B, HEADS, L, E), rand(B, HEADS, S, E, seed=1), rand(B, 1, L, S, seed=2))


def test_sdpa_through_torch_export():
    model = Sdpa(ALLOWED, scale=0.4).eval()
    result = convert_model(model, (rand(B, HEADS, L, E), rand(B, HEADS, S, E, seed=1), rand(B, HEADS, S, E, seed=2)),
                           capture="export", n_random=2, raise_on_mismatch=False)
    assert result.report.ok, result.report.summary()
    assert result.facts()["ops_by_rule"].get("aten_as_scaled_dot_product_attention") == 1


# ---- nn.MultiheadAttention -------------------------------------------------------------------

class Mha(nn.Module):
    def __init__(self, batch_first: bool, cross: bool = False, attn_mask=None, key_padding_mask=None,
                 need_weights: bool = False, average: bool = True, **kw):
        super().__init__()
        torch.manual_seed(0)
        self.attn = nn.MultiheadAttention(E, HEADS, batch_first=batch_first, **kw)
        if self.attn.in_proj_bias is not None:
            with torch.no_grad():
                self.attn.in_proj_bias.normal_()
        self.cross, self.need_weights, self.average = cross, need_weights, average
        self.register_buffer("attn_mask", attn_mask)
        self.register_buffer("key_padding_mask", key_padding_mask)

    def forward(self, x, memory):
        kv = memory if self.cross else x
        out, weights = self.attn(x, kv, kv, attn_mask=self.attn_mask, key_padding_mask=self.key_padding_mask,
                                 need_weights=self.need_weights, average_attn_weights=self.average)
        return (out, weights) if self.need_weights else out


def mha_inputs(batch_first: bool, lk: int = L) -> tuple[torch.Tensor, torch.Tensor]:
    if batch_first:
        return rand(B, L, E), rand(B, lk, E, seed=1)
    return rand(L, B, E), rand(lk, B, E, seed=1)


@pytest.mark.parametrize("kw", [
    pytest.param({}, id="plain"),
    pytest.param({"need_weights": True}, id="weights_averaged"),
    pytest.param({"need_weights": True, "average": False}, id="weights_per_head"),
    pytest.param({"attn_mask": CAUSAL}, id="bool_causal_mask"),
    pytest.param({"attn_mask": ADDITIVE[:, :1].expand(L, L).clone(), "need_weights": True}, id="float_mask"),
    pytest.param({"attn_mask": CAUSAL[None].expand(B * HEADS, L, L).clone()}, id="mask_per_batch_and_head"),
    pytest.param({"bias": False}, id="no_bias"),
])
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
def test_multihead_self_attention(kw, batch_first):
    # a mask fixes the sequence length, and with seq_first inputs the batch size too: the
    # Keras batch axis is axis 0, so the trial with another batch size would not run in torch
    fixed = kw.get("attn_mask") is not None and (not batch_first or kw["attn_mask"].dim() == 3)
    result = converts(Mha(batch_first, **kw), *mha_inputs(batch_first), n_random=0 if fixed else 2)
    assert result.transpose_count == 0  # heads are split by reshapes, the einsums do the rest


@pytest.mark.parametrize("kw", [
    pytest.param({}, id="plain"),
    pytest.param({"need_weights": True}, id="weights"),
])
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
def test_multihead_cross_attention(kw, batch_first):
    converts(Mha(batch_first, cross=True, **kw), *mha_inputs(batch_first, lk=S))


class KeyValueWidths(nn.Module):
    """Key and value of their own widths (kdim, vdim): separate projection weights."""

    def __init__(self, batch_first: bool):
        super().__init__()
        torch.manual_seed(0)
        self.attn = nn.MultiheadAttention(E, HEADS, kdim=6, vdim=5, batch_first=batch_first)

    def forward(self, x, k, v):
        return self.attn(x, k, v)


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
def test_multihead_attention_kdim_vdim(batch_first):
    x, memory = mha_inputs(batch_first, lk=S)
    converts(KeyValueWidths(batch_first), x, memory[..., :6], rand(*memory.shape[:2], 5, seed=2))


class Padded(nn.Module):
    """Self-attention with the key padding mask as a second input (and ``options`` for the call)."""

    def __init__(self, **options):
        super().__init__()
        torch.manual_seed(0)
        self.attn = nn.MultiheadAttention(E, HEADS, batch_first=True)
        self.options = options

    def forward(self, x, pad):
        return self.attn(x, x, x, key_padding_mask=pad, **self.options)[0]


def test_multihead_attention_key_padding_mask():
    """A boolean padding mask as an input: compared on the sample only, where no row is fully masked."""
    pad = torch.tensor([[False] * (L - 2) + [True] * 2, [False] * L])
    converts(Padded(attn_mask=CAUSAL, need_weights=False), rand(B, L, E), pad, n_random=0)


def test_multihead_attention_float_padding_mask():
    converts(Padded(), rand(B, L, E), rand(B, L, seed=5))


def test_add_bias_kv_is_refused_clearly():
    with pytest.raises(ConversionError, match="add_bias_kv"):
        assert_converts(Mha(True, add_bias_kv=True), *mha_inputs(True))


# ---- Transformer encoder layers ----------------------------------------------------------------

class Encoder(nn.Module):
    def __init__(self, layer: nn.Module, mask: torch.Tensor | None = None):
        super().__init__()
        torch.manual_seed(0)
        self.layer = layer
        self.register_buffer("mask", mask)

    def forward(self, x):
        if self.mask is None:
            return self.layer(x)
        key = "mask" if isinstance(self.layer, nn.TransformerEncoder) else "src_mask"
        return self.layer(x, **{key: self.mask})


def encoder_layer(batch_first: bool, **kw) -> nn.TransformerEncoderLayer:
    torch.manual_seed(0)
    return nn.TransformerEncoderLayer(E, HEADS, 16, dropout=0.1, batch_first=batch_first, **kw)


@pytest.mark.parametrize("kw", [
    pytest.param({}, id="post_norm_relu"),
    pytest.param({"norm_first": True, "activation": "gelu"}, id="pre_norm_gelu"),
    pytest.param({"layer_norm_eps": 1e-3, "bias": False}, id="eps_no_bias"),
])
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
def test_transformer_encoder_layer(kw, batch_first):
    x = rand(B, L, E) if batch_first else rand(L, B, E)
    converts(Encoder(encoder_layer(batch_first, **kw)), x)


@pytest.mark.parametrize("mask", [None, CAUSAL], ids=["no_mask", "causal_mask"])
def test_transformer_encoder_stack(mask):
    stack = nn.TransformerEncoder(encoder_layer(True, norm_first=True), 2, norm=nn.LayerNorm(E),
                                  enable_nested_tensor=False)
    converts(Encoder(stack, mask), rand(B, L, E))


class Decoder(nn.Module):
    def __init__(self, batch_first: bool):
        super().__init__()
        torch.manual_seed(0)
        self.layer = nn.TransformerDecoderLayer(E, HEADS, 16, batch_first=batch_first, norm_first=not batch_first)
        self.register_buffer("causal", CAUSAL)

    def forward(self, x, memory):
        return self.layer(x, memory, tgt_mask=self.causal)


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
def test_transformer_decoder_layer_traces_through(batch_first):
    """fx traces TransformerDecoderLayer; its two MultiheadAttention calls stay leaves."""
    result = converts(Decoder(batch_first), *mha_inputs(batch_first, lk=S), n_random=2 if batch_first else 0)
    assert result.facts()["ops_by_rule"]["multihead_attention"] == 2
    assert result.transpose_count == 0, result.transposes


# ---- timm-style attention: fused qkv, heads by reshape/permute, q, k, v = qkv[0], qkv[1], qkv[2] --

class FusedQkvAttention(nn.Module):
    def __init__(self, sdpa: bool):
        super().__init__()
        torch.manual_seed(0)
        self.qkv, self.proj, self.sdpa = nn.Linear(E, 3 * E), nn.Linear(E, E), sdpa

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, HEADS, c // HEADS).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # int index on torch axis 0, which is not the batch axis
        if self.sdpa:
            y = F.scaled_dot_product_attention(q, k, v)
        else:
            y = ((q * (c // HEADS) ** -0.5) @ k.transpose(-2, -1)).softmax(-1) @ v
        return self.proj(y.transpose(1, 2).reshape(b, n, c))


@pytest.mark.parametrize("sdpa", [False, True], ids=["explicit", "sdpa"])
@pytest.mark.parametrize("capture", ["fx", "export"])
def test_fused_qkv_attention(sdpa, capture):
    model = FusedQkvAttention(sdpa).eval()
    result = convert_model(model, rand(B, L, E), capture=capture, n_random=2, raise_on_mismatch=False)
    assert result.report.ok, result.report.summary()
    # the head split (permute) and merge (transpose + reshape) move no data: q, k, v and the
    # attention output stay in the (B, N, heads, d) order the qkv Linear made
    assert result.transpose_count == 0, result.transposes
