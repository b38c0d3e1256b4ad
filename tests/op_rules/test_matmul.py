"""Parity sweeps for op_rules/matmul.py: matmul / @ / bmm / mm and their add forms, einsum."""
from __future__ import annotations

import operator
from typing import Callable

import pytest
import torch
import torch.nn as nn

from tests.helpers import assert_converts
from tracer import convert_model

B, L, D = 2, 5, 6


def rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


class Fn(nn.Module):
    """``fn(self, x)`` with a weight ``self.w`` (D, 4), a vector ``self.v`` (D,) and a conv.

    One input, as torch.fx cannot trace ``forward(self, *xs)``; :class:`Fn2` takes two.
    """

    def __init__(self, fn: Callable):
        super().__init__()
        torch.manual_seed(0)
        self.fn = fn
        self.w = nn.Parameter(torch.randn(D, 4))
        self.v = nn.Parameter(torch.randn(D))
        self.left = nn.Parameter(torch.randn(3, L))
        self.conv = nn.Conv2d(3, D, 3, padding=1)

    def forward(self, x):
        return self.fn(self, x)


class Fn2(Fn):
    def forward(self, a, b):
        return self.fn(self, a, b)


def converts(fn: Callable, shapes: tuple, **kw):
    """Convert ``fn`` on random inputs of ``shapes`` with torch.fx, and check parity."""
    model = (Fn if len(shapes) == 1 else Fn2)(fn)
    result = assert_converts(model, *[rand(*s, seed=k) for k, s in enumerate(shapes)], **kw)
    assert result.facts()["capture"]["method"] == "fx", result.facts()["capture"]
    return result


def case(fn: Callable, *shapes: tuple, id: str) -> pytest.param:
    return pytest.param(fn, shapes, id=id)


PRODUCTS = [
    case(lambda m, a, b: torch.matmul(a, b.transpose(1, 2)), (B, L, D), (B, L, D), id="matmul_transposed"),
    case(lambda m, a, b: a @ b, (B, L, D), (B, D, 3), id="operator_matmul"),
    case(lambda m, a, b: a.matmul(b), (B, 2, L, D), (B, 2, D, L), id="tensor_matmul_4d"),
    case(lambda m, a, b: torch.bmm(a, b), (B, L, D), (B, D, 3), id="bmm"),
    case(lambda m, a, b: a.bmm(b.transpose(-1, -2)), (B, L, D), (B, 4, D), id="bmm_method_transposed"),
    case(lambda m, a, b: torch.baddbmm(a @ b, a, b), (B, D, D), (B, D, D), id="baddbmm"),
    case(lambda m, a, b: torch.baddbmm(a, a, b, beta=0.5, alpha=2.0), (B, D, D), (B, D, D), id="baddbmm_alpha_beta"),
    case(lambda m, a, b: a @ b, (B, 1, L, D), (B, 3, D, 2), id="broadcast_batch"),
    case(lambda m, a, b: torch.addmm(b, a, m.w), (B, D), (B, 4), id="addmm_dynamic_added"),
    case(lambda m, a: a @ a.transpose(-2, -1), (B, L, D), id="gram"),
    case(lambda m, a: a @ a, (B, L, L), id="square"),
    case(lambda m, x: m.conv(x) @ m.conv(x).transpose(-1, -2), (B, 3, 4, 5), id="nhwc_maps"),
    case(lambda m, x: (m.conv(x) @ m.conv(x).transpose(-1, -2)).softmax(-1) @ m.conv(x), (B, 3, 4, 5),
         id="nhwc_maps_chained"),
    case(lambda m, a: a @ m.w, (B, L, D), id="weight_right_dense"),
    case(lambda m, a: a @ m.w, (B, 2, L, D), id="weight_right_4d"),
    case(lambda m, a: torch.matmul(a, m.v), (B, L, D), id="vector_right"),
    case(lambda m, a: m.left @ a, (B, L, D), id="weight_left"),
    case(lambda m, a: torch.addmm(m.w[0], a, m.w), (B, D), id="addmm_weights"),
    case(lambda m, a: torch.mm(a, m.w), (B, D), id="mm_weight"),
]


@pytest.mark.parametrize("fn, shapes", PRODUCTS)
def test_products(fn, shapes):
    converts(fn, shapes)


@pytest.mark.parametrize("channels_last_io", [False, True], ids=["nchw_io", "nhwc_io"])
def test_weight_product_on_nhwc_map_keeps_layout(channels_last_io):
    """``map.permute(0, 2, 3, 1) @ W`` is a Dense on the NHWC tensor: no transpose inside."""
    result = converts(lambda m, x: (m.conv(x).permute(0, 2, 3, 1) @ m.w).permute(0, 3, 1, 2), ((B, 3, 4, 5),),
                      channels_last_io=channels_last_io)
    assert result.transpose_count == (0 if channels_last_io else 2), result.transposes


def test_attention_scores_transpose_nothing():
    result = converts(lambda m, q, k: (q @ k.transpose(-2, -1)).softmax(-1) @ k, ((B, 2, L, D), (B, 2, L, D)))
    assert result.transpose_count == 0, result.transposes


# ---- einsum ------------------------------------------------------------------------------------

EINSUMS = [
    case(lambda m, a, b: torch.einsum("bij,bjk->bik", a, b), (B, L, D), (B, D, 3), id="batched_matmul"),
    case(lambda m, a, b: torch.einsum("bhid,bhjd->bhij", a, b), (B, 2, L, D), (B, 2, 4, D), id="attention_scores"),
    case(lambda m, a, b: torch.einsum("bhij,bhjd->bhid", a, b), (B, 2, L, 4), (B, 2, 4, D), id="attention_values"),
    case(lambda m, a, b: torch.einsum("b i d, b j d -> b i j", a, b), (B, L, D), (B, 3, D), id="spaces"),
    case(lambda m, a, b: torch.einsum("bij,bjk", a, b), (B, L, D), (B, D, 3), id="implicit_output"),
    case(lambda m, a, b: torch.einsum("...ij,...jk->...ik", a, b), (B, 2, L, D), (B, 2, D, 3), id="ellipsis"),
    case(lambda m, a, b: torch.einsum("bi,bi->b", a, b), (B, D), (B, D), id="dot"),
    case(lambda m, a, b: torch.einsum("bi,bj->bij", a, b), (B, D), (B, 3), id="outer"),
    case(lambda m, a, b: torch.einsum("bij,bij->bij", a, b), (B, L, D), (B, L, D), id="broadcast_multiply"),
    case(lambda m, a, b: torch.einsum("bij,bik->bjk", [a, b]), (B, L, D), (B, L, 3), id="operand_list"),
    case(lambda m, a: torch.einsum("bld,de->ble", a, m.w), (B, L, D), id="weight"),
    case(lambda m, a: torch.einsum("bld,d->bl", a, m.v), (B, L, D), id="vector_weight"),
    case(lambda m, a: torch.einsum("bij->bji", a), (B, L, D), id="transpose"),
    case(lambda m, a: torch.einsum("bij->b", a), (B, L, D), id="sum"),
    case(lambda m, x: torch.einsum("bchw->bhwc", m.conv(x)), (B, 3, 4, 5), id="map_to_nhwc"),
    case(lambda m, x: torch.einsum("bchw,bc->bhw", m.conv(x), m.conv(x).mean((2, 3))), (B, 3, 4, 5), id="map_gate"),
    case(lambda m, x: torch.einsum("bchw,bcij->bhwij", m.conv(x), m.conv(x)), (B, 3, 3, 2), id="two_maps"),
    # torch takes upper-case labels too (Keras' einsum shape inference only lower case)
    case(lambda m, a, b: torch.einsum("B G P D, B G Q D -> B G P Q", a, b), (B, 2, L, D), (B, 2, 3, D),
         id="upper_case_spaces"),
    case(lambda m, a, b: torch.einsum("BGHID,BGHJD->BGHIJ", a, b), (B, 2, 2, L, 4), (B, 2, 2, 3, 4),
         id="upper_case_maxvit_scores"),
    case(lambda m, a, b: torch.einsum("bIj,bjK", a, b), (B, L, D), (B, D, 3), id="mixed_case_implicit_output"),
    case(lambda m, a: torch.einsum("zAb->bAz", a), (B, L, D), id="mixed_case_transpose"),
    case(lambda m, a: torch.einsum("aZb", a), (B, L, D), id="implicit_ascii_order"),  # torch: upper first, "Zab"
    case(lambda m, a, b: torch.einsum("...IJ,...JK->...IK", a, b), (B, 2, L, D), (B, 2, D, 3),
         id="upper_case_ellipsis"),
    case(lambda m, x: torch.einsum("BCHW,BC->BHW", m.conv(x), m.conv(x).mean((2, 3))), (B, 3, 4, 5),
         id="upper_case_map_gate"),
]


@pytest.mark.parametrize("fn, shapes", EINSUMS)
def test_einsum(fn, shapes):
    converts(fn, shapes)


@pytest.mark.parametrize("channels_last_io", [False, True], ids=["nchw_io", "nhwc_io"])
def test_einsum_reads_nhwc_map_in_place(channels_last_io):
    result = converts(lambda m, x: torch.einsum("bchw,bc->bhw", m.conv(x), m.conv(x).mean((2, 3))), ((B, 3, 4, 5),),
                      channels_last_io=channels_last_io)
    assert result.transpose_count == (0 if channels_last_io else 1), result.transposes


# ---- torch.export path -------------------------------------------------------------------------

@pytest.mark.parametrize("fn, shapes, rule", [
    pytest.param(lambda m, a, b: a @ b.transpose(1, 2), ((B, L, D), (B, L, D)), "aten_as_matmul", id="matmul"),
    pytest.param(lambda m, a, b: torch.bmm(a, b), ((B, L, D), (B, D, 3)), "matrix_product", id="bmm"),
    pytest.param(lambda m, a, b: torch.einsum("bij,bkj->bik", a, b), ((B, L, D), (B, 3, D)), "einsum", id="einsum"),
    pytest.param(lambda m, a, b: torch.einsum("bhid,bhjd->bhij", a, b), ((B, 2, L, D), (B, 2, 3, D)), "einsum",
                 id="einsum_heads"),
    pytest.param(lambda m, a, b: torch.einsum("B H I D, B H J D -> B H I J", a, b), ((B, 2, L, D), (B, 2, 3, D)),
                 "einsum", id="einsum_upper_case"),
])
def test_products_through_torch_export(fn, shapes, rule):
    model = (Fn if len(shapes) == 1 else Fn2)(fn).eval()
    inputs = tuple(rand(*s, seed=k) for k, s in enumerate(shapes))
    result = convert_model(model, inputs, capture="export", n_random=2, raise_on_mismatch=False)
    assert result.report.ok, result.report.summary()
    if rule is not None:
        assert result.facts()["ops_by_rule"].get(rule) == 1, result.facts()["ops_by_rule"]


def test_operator_matmul_is_registered():
    from tracer.op_rules import lookup

    assert lookup(operator.matmul).name == "matmul"
    assert lookup("matmul").name == lookup(torch.bmm).name == "matmul"
