"""Parity sweeps for op_rules/tensor_ops.py: expand/repeat/tile, masking and selection, roll,
flip, cumsum, triu/tril, creation ops in forward, casts, unfold/fold; and the layout of
patch-embedding models (tokens from an NHWC map and back, without transposes)."""
from __future__ import annotations

from typing import Callable

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tests.helpers import assert_converts
from tracer import convert_model

B, C, H, W, N = 2, 6, 4, 5, 7


def rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


class Fn(nn.Module):
    """``fn(self, conv(x))`` (``conv=False``: ``fn(self, x)``), with a token ``self.cls`` (1, 1, C),
    a position table ``self.pos`` (1, N + 1, C), index buffers, a conv ``3 -> C`` and ``self.mods``."""

    def __init__(self, fn: Callable, *mods: nn.Module, conv: bool = True):
        super().__init__()
        self.mods = nn.ModuleList(mods)
        torch.manual_seed(0)
        self.fn = fn
        self.conv = nn.Conv2d(3, C, 3, padding=1) if conv else None
        self.cls = nn.Parameter(torch.randn(1, 1, C))
        self.pos = nn.Parameter(torch.randn(1, N + 1, C))
        self.register_buffer("perm", torch.tensor([2, 0, 1, 1]))
        self.register_buffer("mask", torch.rand(N, C, generator=torch.Generator().manual_seed(5)) > 0.5)

    def forward(self, x):
        return self.fn(self, self.conv(x) if self.conv is not None else x)


def case(fn: Callable, id: str) -> pytest.param:
    return pytest.param(fn, id=id)


def converts(fn: Callable, x: torch.Tensor, *mods: nn.Module, conv: bool = False, **kw):
    result = assert_converts(Fn(fn, *mods, conv=conv), x, **kw)
    assert result.facts()["capture"]["method"] == "fx", result.facts()["capture"]
    return result


TOKENS = [  # on tokens (B, N, C)
    case(lambda m, x: torch.cat([m.cls.expand(x.shape[0], -1, -1), x], 1) + m.pos, id="cls_token_pos_embed"),
    case(lambda m, x: torch.cat([m.cls.expand(x.size(0), 1, C), x], dim=1), id="cls_token_sizes"),
    case(lambda m, x: torch.cat([m.cls.repeat(x.shape[0], 1, 1), x], 1), id="cls_token_repeat"),
    case(lambda m, x: x + m.pos[:, 1:].expand(x.shape[0], -1, -1), id="pos_expand_batch"),
    case(lambda m, x: x[:, :1].expand(-1, N, -1) + x, id="expand_tokens"),
    case(lambda m, x: x[:, :1].expand_as(x) * x, id="expand_as"),
    case(lambda m, x: x.repeat(1, 2, 3), id="repeat"),
    case(lambda m, x: x.repeat(2, 1, 1), id="repeat_batch"),
    case(lambda m, x: torch.tile(x, (1, 2)), id="tile"),
    case(lambda m, x: x.tile(1, 1, 2), id="tile_method"),
    case(lambda m, x: x + torch.arange(x.shape[-1]).float(), id="arange_from_shape"),
    case(lambda m, x: x * torch.arange(1, x.shape[1] + 1, dtype=torch.float32)[None, :, None], id="arange_start"),
    case(lambda m, x: x + x.new_ones(x.shape[1], 1) + x.new_zeros(C), id="new_ones_zeros"),
    case(lambda m, x: x + torch.zeros(x.shape[-1]) + torch.full((N, 1), 0.5), id="zeros_full"),
    case(lambda m, x: x + torch.eye(N, C), id="eye"),
    case(lambda m, x: x * torch.ones_like(x) + torch.zeros_like(x) + torch.full_like(x, 2.0), id="like"),
    case(lambda m, x: x.masked_fill(m.mask, -1.5), id="masked_fill_const_mask"),
    case(lambda m, x: x.masked_fill(m.mask[0], float("-inf")).softmax(-1), id="masked_fill_neg_inf_softmax"),
    case(lambda m, x: (x @ x.transpose(1, 2)).masked_fill(torch.triu(torch.ones((N, N), dtype=torch.bool), 1),
                                                           float("-inf")).softmax(-1), id="causal_masked_fill"),
    case(lambda m, x: torch.masked_fill(x, m.mask, 0.0), id="torch_masked_fill"),
    case(lambda m, x: torch.where(m.mask, x, 0.0), id="where_scalar"),
    case(lambda m, x: torch.where(m.mask, x, -x), id="where_tensors"),
    case(lambda m, x: torch.where(m.mask, 1.0, x), id="where_scalar_first"),
    case(lambda m, x: torch.roll(x, 2, 1), id="roll"),
    case(lambda m, x: x.roll((1, -2), (1, 2)), id="roll_two_dims"),
    case(lambda m, x: x.flip(1), id="flip"),
    case(lambda m, x: torch.flip(x, (1, 2)), id="torch_flip_two"),
    case(lambda m, x: x.cumsum(1), id="cumsum"),
    case(lambda m, x: torch.cumsum(x, dim=-1), id="torch_cumsum"),
    case(lambda m, x: torch.triu(x), id="triu"),
    case(lambda m, x: x.tril(-1), id="tril_below"),
    case(lambda m, x: x.triu(diagonal=2), id="triu_above"),
    case(lambda m, x: torch.gather(x, 2, m.perm[None, None, :3].expand_as(x[..., :3])), id="gather"),
    case(lambda m, x: x.gather(1, m.perm[None, :, None].expand_as(x[:, :4])), id="gather_method"),
    case(lambda m, x: x.gather(2, (x[..., :2].abs() * 0.0 + 1).long()), id="gather_computed_index"),
    case(lambda m, x: torch.index_select(x, 1, m.perm), id="index_select"),
    case(lambda m, x: x.index_select(-1, m.perm), id="index_select_last"),
    case(lambda m, x: x[:, m.perm], id="index_tensor"),
    case(lambda m, x: x[..., m.perm], id="index_tensor_ellipsis"),
    case(lambda m, x: x[:, :, m.mask[0]], id="index_bool_mask"),
    case(lambda m, x: x[:, torch.tensor([[0, 1], [2, 3]])], id="index_2d_tensor"),
    case(lambda m, x: x.float() + x.to(torch.float32) + x.type_as(x), id="casts_same_dtype"),
    case(lambda m, x: (x * 3).long().float() + x.double().float(), id="casts_int_round_trip"),
    case(lambda m, x: x + m.mask.float() + m.mask.to(x.dtype), id="bool_to_float"),
]


@pytest.mark.parametrize("fn", TOKENS)
def test_tensor_ops_on_tokens(fn):
    converts(fn, rand(B, N, C))


MAPS = [  # on conv outputs (NCHW maps that live NHWC inside the Keras model)
    case(lambda m, y: torch.roll(y, (1, 2), (2, 3)), id="roll_spatial"),
    case(lambda m, y: y.roll(1, 1), id="roll_channels"),
    case(lambda m, y: y.flip(-1), id="flip_width"),
    case(lambda m, y: y.flip(1), id="flip_channels"),
    case(lambda m, y: y.cumsum(2), id="cumsum_height"),
    case(lambda m, y: y.index_select(1, m.perm), id="index_select_channels"),
    case(lambda m, y: y[:, m.perm], id="index_channels"),
    case(lambda m, y: y.expand(-1, -1, -1, W) * y.mean(3, keepdim=True).expand_as(y), id="expand_map"),
    case(lambda m, y: y.repeat(1, 2, 1, 1), id="repeat_channels"),
    case(lambda m, y: y.masked_fill(m.mask[:H, :W].unsqueeze(0), 0.0), id="masked_fill_map"),
]


@pytest.mark.parametrize("channels_last_io", [False, True], ids=["nchw_io", "nhwc_io"])
@pytest.mark.parametrize("fn", MAPS)
def test_tensor_ops_on_image_maps(fn, channels_last_io):
    result = converts(fn, rand(B, 3, H, W), conv=True, channels_last_io=channels_last_io)
    if channels_last_io:
        assert result.transpose_count == 0, result.transposes


class RelativePositionBias(nn.Module):
    """Swin's bias: a learned table indexed by a constant index buffer, added to the scores."""

    def __init__(self, heads: int = 2):
        super().__init__()
        torch.manual_seed(0)
        self.table = nn.Parameter(torch.randn(2 * N - 1, heads))
        coords = torch.arange(N)
        self.register_buffer("index", coords[:, None] - coords[None, :] + N - 1)
        self.heads = heads

    def forward(self, q):  # q (B, heads, N, d)
        bias = self.table[self.index.view(-1)].view(N, N, self.heads).permute(2, 0, 1).contiguous()
        return (q @ q.transpose(-2, -1) + bias.unsqueeze(0)).softmax(-1)


def test_relative_position_bias_table():
    assert_converts(RelativePositionBias(), rand(B, 2, N, C))


@pytest.mark.parametrize("channels_last_io", [False, True], ids=["nchw_io", "nhwc_io"])
def test_linear_and_softmax_on_channels_of_maps(channels_last_io):
    """Linear on (B, H, W, C) and softmax over channels run on the NHWC tensor as it is."""
    result = converts(lambda m, y: m.mods[0](y.permute(0, 2, 3, 1)).softmax(-1).permute(0, 3, 1, 2) + y.softmax(1),
                      rand(B, 3, H, W), nn.Linear(C, C), conv=True, channels_last_io=channels_last_io)
    assert result.transpose_count == (0 if channels_last_io else 2), result.transposes


class Masking(nn.Module):
    def forward(self, x, mask):
        return x.masked_fill(mask, -2.0) + torch.where(mask, x, x * 2) + mask.float()


def test_class_token_traced_with_batch_one():
    """Traced with batch 1, ``cls.expand(x.shape[0], -1, -1)`` still follows the runtime batch."""
    converts(lambda m, x: torch.cat([m.cls.expand(x.shape[0], -1, -1), x], 1) + m.pos, rand(1, N, C))


@pytest.mark.parametrize("batch", [1, B])
@pytest.mark.parametrize("fn", [
    case(lambda m, x: torch.cat([torch.zeros((x.shape[0], 1, C)), x], 1), id="zeros_batch"),
    case(lambda m, x: x * x.new_ones(x.size(0), N, 1) + torch.full((x.shape[0], 1, C), 0.5), id="new_ones_full"),
    case(lambda m, x: x + torch.ones((x.shape[0] * 1, N, C), dtype=torch.float32), id="size_arithmetic"),
    case(lambda m, x: x + torch.zeros(x.shape[:2]).unsqueeze(-1), id="shape_slice"),
])
def test_creation_sized_by_the_batch_follows_it(fn, batch):
    """Traced at one batch size, run at another: the created tensor takes the runtime batch.
    (Sizes as one tuple: torch.fx cannot trace ``torch.zeros(b, 1, C)`` with a traced ``b``.)"""
    converts(fn, rand(batch, N, C))


def test_masking_with_an_input_mask():
    mask = torch.rand(B, N, C, generator=torch.Generator().manual_seed(1)) > 0.5
    assert_converts(Masking(), rand(B, N, C), mask)


# ---- unfold / fold -------------------------------------------------------------------------

@pytest.mark.parametrize("kw", [
    pytest.param({"kernel_size": 2, "stride": 2}, id="patches"),
    pytest.param({"kernel_size": 3, "padding": 1}, id="k3_pad1"),
    pytest.param({"kernel_size": (2, 3), "stride": (1, 2)}, id="rectangular"),
    pytest.param({"kernel_size": 2, "dilation": 2, "padding": 1}, id="dilated"),
])
@pytest.mark.parametrize("channels_last_io", [False, True], ids=["nchw_io", "nhwc_io"])
def test_unfold(kw, channels_last_io):
    converts(lambda m, y: F.unfold(y, **kw), rand(B, 3, H, W), conv=True, channels_last_io=channels_last_io)


def test_unfold_module_then_linear():
    converts(lambda m, y: m.mods[1](m.mods[0](y).transpose(1, 2)), rand(B, 3, H, W), nn.Unfold(2, stride=2),
             nn.Linear(C * 4, 5), conv=True)


@pytest.mark.parametrize("kw", [
    pytest.param({"kernel_size": 2, "stride": 2}, id="patches"),
    pytest.param({"kernel_size": 3, "padding": 1}, id="overlapping"),
    pytest.param({"kernel_size": 2, "stride": 2, "padding": 1}, id="padded"),
    pytest.param({"kernel_size": 3, "stride": 2, "padding": 1}, id="strided_overlap"),
])
def test_fold_of_unfold(kw):
    converts(lambda m, y: F.fold(F.unfold(y, **kw) * 2, (H, W), **kw), rand(B, 3, H, W), conv=True)


def test_fold_module():
    converts(lambda m, x: m.mods[0](x), rand(B, 3 * 4, (H // 2) * (W // 2)), nn.Fold((H, W), 2, stride=2))


# ---- patch embedding: tokens from an NHWC map and back, no transposes ------------------------

class PatchEmbedMixer(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Conv2d(3, C, 2, stride=2)
        self.norm = nn.LayerNorm(C)
        self.mix = nn.Linear(C, C)
        self.out = nn.Conv2d(C, 4, 3, padding=1)

    def forward(self, x):
        y = self.embed(x)
        b, c, h, w = y.shape
        tokens = y.flatten(2).transpose(1, 2)  # (B, HW, C)
        tokens = tokens + self.mix(self.norm(tokens))
        return self.out(tokens.transpose(1, 2).reshape(b, c, h, w))


@pytest.mark.parametrize("channels_last_io", [False, True], ids=["nchw_io", "nhwc_io"])
def test_patch_embed_tokens_and_back_move_no_data(channels_last_io):
    result = assert_converts(PatchEmbedMixer(), rand(B, 3, 8, 10), channels_last_io=channels_last_io)
    assert result.transpose_count == (0 if channels_last_io else 2), result.transposes


# ---- torch.export path: the ATen aliases ------------------------------------------------------

EXPORTED = [
    case(lambda m, x: torch.gather(x, 2, m.perm[None, None, :3].expand(x.shape[0], N, 3)), id="gather"),
    case(lambda m, x: torch.index_select(x, 1, m.perm), id="index_select"),
    case(lambda m, x: torch.where(m.mask, x, -x), id="where"),
    case(lambda m, x: x.masked_fill(m.mask, -1.0), id="masked_fill"),
    case(lambda m, x: torch.roll(x, 2, 1).flip(2).cumsum(1), id="roll_flip_cumsum"),
    case(lambda m, x: x.repeat(1, 2, 1) + x[:, :1].expand(-1, 2 * N, -1), id="repeat_expand"),
    case(lambda m, x: x[:, m.perm], id="index_tensor"),
    case(lambda m, x: x.tril(-1) + torch.triu(x, 1) + torch.zeros_like(x) + torch.full_like(x, 0.5), id="tril_like"),
    case(lambda m, x: F.fold(F.unfold(x.unsqueeze(1), (2, 3), padding=1), (N, C), (2, 3), padding=1)[:, 0],
         id="unfold_fold"),
]


@pytest.mark.parametrize("fn", EXPORTED)
def test_tensor_ops_through_torch_export(fn):
    model = Fn(fn, conv=False).eval()
    result = convert_model(model, rand(B, N, C), capture="export", n_random=2, raise_on_mismatch=False)
    assert result.report.ok, result.report.summary()
    assert result.facts()["capture"]["method"] == "torch.export"


# ---- a small ViT with every family: saved, reloaded in safe mode, same numbers -----------------

class TinyVit(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Conv2d(3, C, 2, stride=2)
        self.cls = nn.Parameter(torch.randn(1, 1, C))
        self.pos = nn.Parameter(torch.randn(1, 5, C))
        self.norm = nn.LayerNorm(C)
        self.attn = nn.MultiheadAttention(C, 2, batch_first=True)
        self.register_buffer("causal", torch.triu(torch.ones(5, 5, dtype=torch.bool), 1))
        self.register_buffer("order", torch.tensor([4, 3, 2, 1, 0]))
        self.register_buffer("keep", torch.rand(5, C, generator=torch.Generator().manual_seed(2)) > 0.5)
        self.gn = nn.GroupNorm(2, C)

    def forward(self, x):
        y = self.gn(self.embed(x))
        t = torch.cat([self.cls.expand(y.shape[0], -1, -1), y.flatten(2).transpose(1, 2)], 1) + self.pos
        h = self.norm(t)
        t = t + self.attn(h, h, h, attn_mask=self.causal, need_weights=False)[0]
        scores = torch.einsum("bic,bjc->bij", t, t).masked_fill(self.causal, float("-inf")).softmax(-1)
        t = torch.where(self.keep, t, scores @ t)[:, self.order]
        patches = F.unfold(y, 2, stride=2).transpose(1, 2)
        return t.cumsum(1)[:, 0] + patches.mean((1, 2))[:, None]


def test_tiny_vit_saves_and_reloads_in_safe_mode(tmp_path):
    import keras
    import numpy as np

    model = TinyVit().eval()
    result = assert_converts(model, rand(B, 3, 4, 4))
    path = tmp_path / "vit.keras"
    result.keras_model.save(path)
    loaded = keras.models.load_model(path, safe_mode=True)
    x = rand(3, 3, 4, 4, seed=7)
    with torch.no_grad():
        want = model(x).numpy()
    got = np.asarray(loaded(x.numpy()))
    assert got.shape == want.shape
    assert np.max(np.abs(got - want)) <= 1e-5 * max(1.0, float(np.max(np.abs(want))))
