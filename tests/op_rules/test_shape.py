"""Parity sweeps for op_rules/shape.py: reshapes, permutes, cat/stack, split/chunk, indexing.

Most cases run on a conv output (an NCHW map that lives NHWC inside the Keras model), where the
layout bookkeeping of tracer/passes/layout.py is exercised; the rest on plain tensors (identity layout).
"""
from __future__ import annotations

from typing import Callable

import pytest
import torch
import torch.nn as nn

from tests.helpers import assert_converts

B, C_IN, H, W = 2, 4, 6, 5


def image(c: int = C_IN, seed: int = 0) -> torch.Tensor:
    return torch.randn(B, c, H, W, generator=torch.Generator().manual_seed(seed))


def plain(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


class ConvThen(nn.Module):
    """``fn(self, conv(x))``: conv ``C_IN -> c`` first (``conv=False``: ``fn(self, x)``).

    Extra submodules are ``self.mods[i]``; a second conv ``c -> c`` is ``self.conv2``.
    """

    def __init__(self, fn: Callable, *mods: nn.Module, c: int = 6, conv: bool = True):
        super().__init__()
        torch.manual_seed(0)
        self.fn = fn
        self.conv = nn.Conv2d(C_IN, c, 3, padding=1) if conv else None
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)
        self.mods = nn.ModuleList(mods)

    def forward(self, x):
        return self.fn(self, self.conv(x) if self.conv is not None else x)


def case(fn: Callable, *mods: nn.Module, id: str, **kw) -> pytest.param:
    return pytest.param(fn, mods, kw, id=id)


# ---- reshapes of conv outputs ------------------------------------------------------------------

MAP_RESHAPES = [
    case(lambda m, y: y.view(y.size(0), -1), id="view_batch_-1"),
    case(lambda m, y: y.reshape(y.shape[0], 6, -1), id="reshape_b_c_hw"),
    case(lambda m, y: y.view(y.size(0), 2, 3, H, W), id="view_split_channels"),
    case(lambda m, y: y.view(y.size(0), 3, 12, W), id="view_merge_channels_into_h"),
    case(lambda m, y: y.view(y.size(0), -1, 2), id="view_trailing_pairs"),
    case(lambda m, y: y.flatten(1), id="flatten_1"),
    case(lambda m, y: y.flatten(2), id="flatten_2"),
    case(lambda m, y: y.flatten(1, 2), id="flatten_1_2"),
    case(lambda m, y: torch.flatten(y, 2, 3), id="torch_flatten_2_3"),
    case(lambda m, y: y.flatten(-3, -2), id="flatten_neg"),
    case(lambda m, y: y.flatten(0, 1), id="flatten_0_1"),
    case(lambda m, y: y.view(-1, W), id="view_-1_w"),
    case(lambda m, y: y.unsqueeze(0), id="unsqueeze_0"),
    case(lambda m, y: m.mods[0](y), nn.Flatten(), id="nn_Flatten"),
    case(lambda m, y: m.mods[0](y), nn.Flatten(2), id="nn_Flatten_2"),
    case(lambda m, y: m.mods[0](y), nn.Flatten(1, 2), id="nn_Flatten_1_2"),
    case(lambda m, y: y.unflatten(1, (2, 3)), id="unflatten_channels"),
    case(lambda m, y: torch.unflatten(y, -1, (W, 1)), id="torch_unflatten_w_unit"),
    case(lambda m, y: m.mods[0](y), nn.Unflatten(1, (3, 2)), id="nn_Unflatten"),
    case(lambda m, y: m.mods[0](y.flatten(2)), nn.Unflatten(2, (H, W)), id="flatten_then_nn_Unflatten"),
    case(lambda m, y: y.unsqueeze(1), id="unsqueeze_1"),
    case(lambda m, y: y.unsqueeze(-1), id="unsqueeze_-1"),
    case(lambda m, y: torch.unsqueeze(y, 2), id="torch_unsqueeze_2"),
    case(lambda m, y: y.mean((2, 3), keepdim=True).squeeze(-1), id="squeeze_-1"),
    case(lambda m, y: y.mean((2, 3), keepdim=True).squeeze(), id="squeeze_all"),
    case(lambda m, y: torch.squeeze(y[:, :, :1], 2), id="torch_squeeze_2"),
    case(lambda m, y: y.permute(0, 2, 3, 1), id="permute_nhwc"),
    case(lambda m, y: y.permute(0, 3, 1, 2), id="permute_0312"),
    case(lambda m, y: y.permute(0, 2, 3, 1).permute(0, 3, 1, 2), id="permute_round_trip"),
    case(lambda m, y: y.transpose(1, 2), id="transpose_1_2"),
    case(lambda m, y: y.transpose(-1, -2), id="transpose_neg"),
    case(lambda m, y: torch.transpose(y, 0, 1), id="torch_transpose_batch"),
    case(lambda m, y: torch.swapaxes(y, 1, 3), id="swapaxes"),
    case(lambda m, y: y.permute(0, 2, 3, 1).contiguous(), id="contiguous"),
    case(lambda m, y: y.permute(0, 2, 3, 1).contiguous().view(y.size(0), -1), id="permute_contiguous_view"),
    case(lambda m, y: y.view_as(y.permute(0, 1, 3, 2)), id="view_as"),
    case(lambda m, y: y.flatten(2).reshape_as(y), id="reshape_as"),
    case(lambda m, y: m.conv2(y.transpose(2, 3)), id="transpose_then_conv"),
    case(lambda m, y: m.conv2(y.view(y.size(0), 6, -1).unsqueeze(-1)), id="view_unsqueeze_then_conv"),
    case(lambda m, y: m.conv2(y.permute(0, 2, 3, 1).permute(0, 3, 1, 2)), id="permute_round_trip_then_conv"),
    case(lambda m, y: y.flatten(1) * 2 + 1, id="flatten_then_arith"),
    case(lambda m, y: torch.softmax(y.flatten(1), -1), id="flatten_then_softmax"),
    case(lambda m, y: y.flatten(1) - y.flatten(1).mean(-1, keepdim=True), id="flatten_then_centered"),
]


@pytest.mark.parametrize("fn, mods, kw", MAP_RESHAPES)
def test_reshape_of_conv_output(fn, mods, kw):
    assert_converts(ConvThen(fn, *mods, **kw), image())


PLAIN_RESHAPES = [
    case(lambda m, x: x.view(x.size(0), 3, 20), id="view_split"),
    case(lambda m, x: x.reshape(x.size(0), -1), id="reshape_flat"),
    case(lambda m, x: x.permute(0, 2, 1), id="permute"),
    case(lambda m, x: x.transpose(1, 2).reshape(x.size(0), -1), id="transpose_reshape"),
    case(lambda m, x: x.flatten(), id="flatten_all"),
    case(lambda m, x: x.unflatten(-1, (2, 5)), id="unflatten"),
    case(lambda m, x: m.mods[0](x), nn.Flatten(), id="nn_Flatten"),
    case(lambda m, x: x.unsqueeze(0).squeeze(0), id="unsqueeze_squeeze"),
    case(lambda m, x: x.unsqueeze(0), id="unsqueeze_0"),
    case(lambda m, x: x[:, :1].squeeze(1), id="squeeze_1"),
    case(lambda m, x: x.unsqueeze(2).contiguous(), id="unsqueeze_contiguous"),
]


@pytest.mark.parametrize("fn, mods, kw", PLAIN_RESHAPES)
def test_reshape_of_plain_tensor(fn, mods, kw):
    assert_converts(ConvThen(fn, *mods, conv=False), plain(B, 6, 10))


# ---- layouts: transposes that must not appear --------------------------------------------------

class ConvFlattenLinear(nn.Module):
    def __init__(self, flatten: Callable):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(C_IN, 6, 3, padding=1)
        self.fc = nn.Linear(6 * H * W, 7)
        self.flatten = flatten

    def forward(self, x):
        return self.fc(self.flatten(self.conv(x)))


@pytest.mark.parametrize("flatten", [
    pytest.param(lambda y: y.view(y.size(0), -1), id="view_size0_-1"),
    pytest.param(lambda y: y.reshape(y.shape[0], -1), id="reshape"),
    pytest.param(lambda y: torch.flatten(y, 1), id="torch_flatten_1"),
    pytest.param(nn.Flatten(), id="nn_Flatten"),
    pytest.param(nn.Sequential(nn.Flatten(), nn.Dropout(0.2)), id="flatten_dropout"),
    pytest.param(lambda y: torch.relu(y.flatten(1)) * 2, id="flatten_relu_scale"),
])
@pytest.mark.parametrize("channels_last_io", [False, True], ids=["nchw_io", "nhwc_io"])
def test_flatten_into_linear_folds_into_weights(flatten, channels_last_io):
    result = assert_converts(ConvFlattenLinear(flatten), image(), channels_last_io=channels_last_io)
    assert result.transpose_count == (0 if channels_last_io else 1), result.transposes


class Tokens(nn.Module):
    """Patch tokens (B, HW, C) from an NCHW map, then a Linear on the channels."""

    def __init__(self, linear: bool):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(C_IN, 6, 3, padding=1)
        self.fc = nn.Linear(6, 8) if linear else nn.Identity()

    def forward(self, x):
        return self.fc(self.conv(x).flatten(2).transpose(1, 2))


@pytest.mark.parametrize("linear", [False, True], ids=["tokens", "tokens_linear"])
@pytest.mark.parametrize("channels_last_io", [False, True], ids=["nchw_io", "nhwc_io"])
def test_token_reshape_moves_no_data(linear, channels_last_io):
    result = assert_converts(Tokens(linear), image(), channels_last_io=channels_last_io)
    assert result.transpose_count == (0 if channels_last_io else 1), result.transposes


class ChannelShuffle(nn.Module):
    def __init__(self, groups: int, c: int = 12):
        super().__init__()
        torch.manual_seed(0)
        self.groups = groups
        self.conv1 = nn.Conv2d(C_IN, c, 1)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, groups=groups)

    def forward(self, x):
        y = self.conv1(x)
        b, c, h, w = y.shape
        y = y.view(b, self.groups, c // self.groups, h, w).transpose(1, 2).reshape(b, c, h, w)
        return self.conv2(y)


@pytest.mark.parametrize("groups", [2, 3, 4])
@pytest.mark.parametrize("channels_last_io", [False, True], ids=["nchw_io", "nhwc_io"])
def test_channel_shuffle_between_convs(groups, channels_last_io):
    result = assert_converts(ChannelShuffle(groups), image(), channels_last_io=channels_last_io)
    # the shuffle itself is one real transpose of the (g, C/g) channel axes, inside NHWC;
    # default I/O adds the input's and the output's
    assert result.transpose_count == (1 if channels_last_io else 3), result.transposes


class SqueezeExcite(nn.Module):
    def __init__(self, c: int = 8):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(C_IN, c, 3, padding=1)
        self.fc1 = nn.Linear(c, 4)
        self.fc2 = nn.Linear(4, c)

    def forward(self, x):
        y = self.conv(x)
        b, c = y.shape[:2]
        gate = torch.sigmoid(self.fc2(torch.relu(self.fc1(y.mean((2, 3))))))
        return y * gate.view(b, c, 1, 1)


@pytest.mark.parametrize("channels_last_io", [False, True], ids=["nchw_io", "nhwc_io"])
def test_squeeze_excite_gating(channels_last_io):
    result = assert_converts(SqueezeExcite(), image(), channels_last_io=channels_last_io)
    # default I/O: the input and the output conversion; the gate broadcast moves only unit axes
    assert result.transpose_count == (0 if channels_last_io else 2), result.transposes


SIZE_ARITHMETIC = [
    case(lambda m, y: y.view(y.size(0), y.size(1), y.shape[2] // 2, -1), id="half_height"),
    case(lambda m, y: y.reshape(y.shape[0], y.shape[1] * y.shape[2], -1), id="product_of_sizes"),
    case(lambda m, y: y.view(*y.shape[:2], y.shape[-2] * y.shape[-1]).permute(0, 2, 1), id="unpacked_shape"),
    case(lambda m, y: y.view(-1, y.size(1) // 3, y.size(2) * y.size(3)), id="batch_from_minus_one"),
]


@pytest.mark.parametrize("fn, mods, kw", SIZE_ARITHMETIC)
def test_size_arithmetic_in_view(fn, mods, kw):
    assert_converts(ConvThen(fn, *mods, **kw), image())


# ---- cat / stack -------------------------------------------------------------------------------

@pytest.mark.parametrize("dim", [0, 1, 2, 3, -1, -2, -3])
def test_cat_conv_outputs(dim):
    assert_converts(ConvThen(lambda m, y: torch.cat([y, m.conv2(y)], dim)), image())


@pytest.mark.parametrize("fn", [
    pytest.param(lambda m, y: torch.cat([y, y], 1), id="same_twice"),
    pytest.param(lambda m, y: torch.cat((y, m.conv2(y), y), dim=-3), id="same_around_other"),
    pytest.param(lambda m, y: torch.cat([y], 1), id="single"),
    pytest.param(lambda m, y: torch.concat([y, y * 2], dim=2), id="concat_alias"),
    pytest.param(lambda m, y: m.conv2(torch.cat([y[:, :3], y[:, 3:]], 1)), id="split_and_rejoin_then_conv"),
    pytest.param(lambda m, y: torch.cat([y.flatten(2), y.mean((2, 3)).unsqueeze(-1)], 2), id="flat_tokens_and_pooled"),
    pytest.param(lambda m, y: torch.cat([y, y.transpose(2, 3).transpose(2, 3)], 1), id="transposed_back"),
    pytest.param(lambda m, y: torch.cat([y.flatten(1), (y * 2).flatten(1)], 1), id="flattened_maps"),
    pytest.param(lambda m, y: torch.cat([y.flatten(1), (y * 2).flatten(1)], 0), id="flattened_maps_dim0"),
    pytest.param(lambda m, y: torch.cat([y.flatten(1), y.mean((2, 3))], -1), id="flattened_and_pooled"),
])
def test_cat_variants(fn):
    assert_converts(ConvThen(fn), image())


def test_cat_of_flattened_maps_into_linear():
    fc = nn.Linear(2 * 6 * H * W, 3)
    assert_converts(ConvThen(lambda m, y: m.mods[0](torch.cat([y.flatten(1), (y * 2).flatten(1)], 1)), fc), image())


@pytest.mark.parametrize("dim", [0, 1, 2, -1])
def test_cat_plain(dim):
    assert_converts(ConvThen(lambda m, x: torch.cat([x, x * 3, -x], dim=dim), conv=False), plain(B, 3, 5))


@pytest.mark.parametrize("dim", [0, 1, 2, 4, -1, -2])
def test_stack_conv_outputs(dim):
    assert_converts(ConvThen(lambda m, y: torch.stack([y, m.conv2(y)], dim)), image())


@pytest.mark.parametrize("dim", [0, 1, -1])
def test_stack_plain(dim):
    assert_converts(ConvThen(lambda m, x: torch.stack((x, x + 1), dim=dim), conv=False), plain(B, 3, 5))


# ---- chunk / split -----------------------------------------------------------------------------

SPLITS = [
    case(lambda m, y: y.chunk(2, 1), id="chunk_2"),
    case(lambda m, y: y.chunk(3, dim=1), id="chunk_3_uneven"),
    case(lambda m, y: torch.chunk(y, 4, dim=-3), id="torch_chunk_neg_dim"),
    case(lambda m, y: y.split(3, dim=1), id="split_3_uneven"),
    case(lambda m, y: y.split([2, 5, 1], 1), id="split_sizes"),
    case(lambda m, y: torch.split(y, [4, 4], dim=1), id="torch_split_sizes"),
    case(lambda m, y: torch.tensor_split(y, 3, dim=1), id="tensor_split"),
    case(lambda m, y: y.chunk(4, 2), id="chunk_height"),
    case(lambda m, y: y.chunk(2, -1), id="chunk_width_uneven"),
    case(lambda m, y: (lambda a, b: a * torch.sigmoid(b))(*y.chunk(2, 1)), id="glu_style"),
    case(lambda m, y: y.split([3, 5], 1)[1], id="split_take_one"),
    case(lambda m, y: y.flatten(1).chunk(2, 1), id="chunk_flattened"),
    case(lambda m, y: m.mods[0](y.flatten(1).chunk(3, -1)[1]), nn.Linear(8 * H * W // 3, 3),
         id="chunk_flattened_linear"),
]


@pytest.mark.parametrize("fn, mods, kw", SPLITS)
def test_split_conv_output(fn, mods, kw):
    assert_converts(ConvThen(fn, *mods, c=8, **kw), image())


@pytest.mark.parametrize("fn", [
    pytest.param(lambda m, x: x.chunk(3, -1), id="chunk_last"),
    pytest.param(lambda m, x: x.split([1, 2], 1), id="split_sizes"),
])
def test_split_plain(fn):
    assert_converts(ConvThen(fn, conv=False), plain(B, 3, 7))


# ---- indexing ----------------------------------------------------------------------------------

INDEXES = [
    case(lambda m, y: y[:, 1:3], id="channels_1_3"),
    case(lambda m, y: y[..., ::2], id="ellipsis_step"),
    case(lambda m, y: y[:, 0], id="channel_int"),
    case(lambda m, y: y[:, :, -1], id="row_minus_one"),
    case(lambda m, y: y[:, None], id="none_axis"),
    case(lambda m, y: y[:, :, None], id="none_after_channels"),
    case(lambda m, y: y[:, -2:], id="last_two_channels"),
    case(lambda m, y: y[:, :, 1:-1, ::2], id="crop_and_step"),
    case(lambda m, y: y[..., 0], id="ellipsis_int"),
    case(lambda m, y: y[:, 1:3, 2], id="slice_and_int"),
    case(lambda m, y: y[:, :, -1, -1], id="two_negative_ints"),
    case(lambda m, y: m.conv2(y[:, :, 1:, :-1]), id="crop_then_conv"),
    case(lambda m, y: y[:1], id="batch_slice"),
    case(lambda m, y: y[None], id="none_before_batch"),
    case(lambda m, y: y[:, None, 1:, None], id="two_nones"),
]


@pytest.mark.parametrize("fn, mods, kw", INDEXES)
def test_getitem_conv_output(fn, mods, kw):
    assert_converts(ConvThen(fn, *mods, **kw), image())


@pytest.mark.parametrize("fn", [
    pytest.param(lambda m, x: x[:, 1:3], id="slice"),
    pytest.param(lambda m, x: x[..., ::2], id="ellipsis_step"),
    pytest.param(lambda m, x: x[:, 0], id="int"),
    pytest.param(lambda m, x: x[:, :, -1], id="last"),
    pytest.param(lambda m, x: x[:, None], id="none"),
    pytest.param(lambda m, x: x[:, -1:, 1::3], id="mixed"),
])
def test_getitem_plain(fn):
    assert_converts(ConvThen(fn, conv=False), plain(B, 3, 7))


def test_int_index_on_batch_axis_raises_clear_error():
    from tracer import ConversionError

    with pytest.raises(ConversionError, match=r"batch axis.*x\[0:1\]"):
        assert_converts(ConvThen(lambda m, y: y[0]), image())


def test_reshape_moving_the_batch_axis_raises_clear_error():
    from tracer import ConversionError

    with pytest.raises(ConversionError, match="moves the batch axis"):
        assert_converts(ConvThen(lambda m, y: y.reshape(1, -1)), image())


def test_split_of_the_batch_axis_raises_clear_error():
    from tracer import ConversionError

    with pytest.raises(ConversionError, match="batch axis"):
        assert_converts(ConvThen(lambda m, y: y.chunk(2, 0)[0]), image())


def test_advanced_indexing_raises_clear_error():
    from tracer import ConversionError

    index = torch.tensor([0, 2])
    with pytest.raises(ConversionError, match="several index tensors are converted when they are adjacent"):
        assert_converts(ConvThen(lambda m, y: y[:, index, :, index]), image())  # two index tensors


# ---- channel shuffle --------------------------------------------------------------------------

class ShuffleBlock(nn.Module):
    """conv -> shuffle -> conv, so the shuffle runs on a channels-last map between two convs."""

    def __init__(self, shuffle: Callable):
        super().__init__()
        self.a, self.b, self.shuffle = nn.Conv2d(3, 12, 1), nn.Conv2d(12, 5, 3, padding=1), shuffle

    def forward(self, x):
        return self.b(self.shuffle(self.a(x)))


@pytest.mark.parametrize("shuffle", [nn.ChannelShuffle(3), nn.ChannelShuffle(4),
                                     lambda y: torch.nn.functional.channel_shuffle(y, 2),
                                     lambda y: torch.channel_shuffle(y, 6)],
                         ids=["module-g3", "module-g4", "functional-g2", "torch-g6"])
def test_channel_shuffle(shuffle):
    result = assert_converts(ShuffleBlock(shuffle), torch.randn(1, 3, 6, 7, generator=torch.Generator().manual_seed(3)))
    assert result.transpose_count == 2  # the NCHW input and output only: the shuffle is a gather


def test_channel_shuffle_of_a_sequence():
    seq = nn.Sequential(nn.Conv1d(4, 8, 3), nn.ChannelShuffle(2))
    assert_converts(seq, torch.randn(2, 4, 9, generator=torch.Generator().manual_seed(4)))


class EmptyCache(nn.Module):
    """GPT-2's key/value cache starts empty: cat of an empty constant adds nothing (torch also takes
    a 1-D empty tensor beside any shape)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("cache", torch.zeros(0))

    def forward(self, x):
        return torch.cat([self.cache, x * 2.0], dim=2)


def test_cat_skips_an_empty_constant():
    torch.manual_seed(0)
    assert_converts(EmptyCache().eval(), torch.randn(2, 3, 5, 4))
