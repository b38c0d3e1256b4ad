"""Parity for op_rules/logic.py (comparisons, bitwise and logical ops), the masks built from them
(where / masked_fill, tril/triu causal masks, cumsum position ids) and op_rules/indexing.py
(Hugging Face's ``mask[batch_idx, kv_idx]``), each through torch.fx and torch.export."""
from __future__ import annotations

import operator

import numpy as np
import pytest
import torch
import torch.nn as nn

from tests.helpers import FP32_TOL
from tracer import convert_model

CAPTURES = ("fx", "export")


class Fn(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


class Fn2(Fn):
    def forward(self, x, y):
        return self.fn(x, y)


def check(fn, *inputs, capture: str = "fx", n_random: int = 2):
    """Convert ``fn`` as a model and assert parity (the batch-3 random input included)."""
    result = convert_model((Fn if len(inputs) == 1 else Fn2)(fn).eval(), inputs if len(inputs) > 1 else inputs[0], capture=capture,
                           n_random=n_random, tol=FP32_TOL, raise_on_mismatch=False)
    assert result.report is not None and len(result.report.trials) == 1 + n_random
    assert result.report.ok, result.report.summary()
    return result


def floats(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def ints(*shape, high=5, seed=0):
    return torch.randint(0, high, shape, generator=torch.Generator().manual_seed(seed))


COMPARE = [operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge]


@pytest.mark.parametrize("capture", CAPTURES)
@pytest.mark.parametrize("op", COMPARE, ids=lambda o: o.__name__)
def test_compare_tensor_scalar_int(op, capture):
    check(lambda x: op(x, 2), ints(2, 6), capture=capture)


@pytest.mark.parametrize("capture", CAPTURES)
@pytest.mark.parametrize("op", COMPARE, ids=lambda o: o.__name__)
def test_compare_tensor_tensor_float(op, capture):
    # a half-filled copy, so equality is hit as well
    check(lambda x, y: op(x, torch.where(y > 0, x, y)), floats(2, 3, 4), floats(2, 3, 4, seed=1), capture=capture)


@pytest.mark.parametrize("name", ["eq", "ne", "lt", "le", "gt", "ge", "greater", "less_equal", "not_equal"])
def test_compare_torch_functions_and_methods(name):
    check(lambda x, y: getattr(torch, name)(x, 0.5) & getattr(x, name)(y), floats(2, 5), floats(2, 5, seed=1))


def test_compare_int_tensor_with_float_number_promotes():
    check(lambda x: (x < 2.5) | (x == 3.0), ints(2, 7))


def test_compare_with_constant_tensor():
    table = torch.arange(6) % 3

    def fn(x):
        return (x == table) | (table > x)
    check(fn, ints(2, 6, high=3))


@pytest.mark.parametrize("capture", CAPTURES)
def test_bitwise_on_bool(capture):
    check(lambda x, y: ((x > 0) & (y > 0)) | ((x < 0) ^ (y < -0.5)) | ~(x > 1), floats(2, 8), floats(2, 8, seed=1),
          capture=capture)


@pytest.mark.parametrize("capture", CAPTURES)
def test_bitwise_on_int(capture):
    check(lambda x, y: (x & y) + (x | 6) - (x ^ y) + torch.bitwise_and(y, 3), ints(2, 8, high=16),
          ints(2, 8, high=16, seed=1), capture=capture)


@pytest.mark.parametrize("capture", CAPTURES)
def test_logical_any_dtype(capture):
    def fn(x, m):
        return (torch.logical_and(x, m) | torch.logical_or(x > 1, m == 0)) ^ torch.logical_xor(m, x < 0)
    check(fn, floats(2, 6), ints(2, 6, high=2), capture=capture)


@pytest.mark.parametrize("capture", CAPTURES)
def test_masked_fill_and_where_from_comparisons(capture):
    def fn(x, mask):
        y = x.masked_fill(mask[:, None, :] == 0, -1e4)
        return torch.where(mask[:, :, None] != 0, y.softmax(-1), 0.0)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 4:] = 0
    check(fn, floats(2, 6, 6), mask, capture=capture)


@pytest.mark.parametrize("capture", CAPTURES)
def test_causal_mask_from_tril_ne_bitwise_and(capture):
    """GPT-style: a constant lower triangle (folded), and-ed with a padding mask given as an input."""
    def fn(scores, mask):
        t = scores.shape[-1]
        causal = torch.tril(scores.new_ones(t, t, dtype=torch.bool))
        allowed = causal[None] & (mask[:, None, :] != 0)
        return scores.masked_fill(~allowed, torch.finfo(torch.float32).min).softmax(-1)
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[0, 3:] = 0
    check(fn, floats(2, 5, 5), mask, capture=capture)


@pytest.mark.parametrize("capture", CAPTURES)
def test_triu_of_computed_scores_and_le(capture):
    def fn(x):
        i = torch.arange(x.shape[-1])
        upper = i[None, :] <= i[:, None]  # position ids from arange, compared
        return torch.triu(x, diagonal=1) + upper * x
    check(fn, floats(2, 4, 4), capture=capture)


@pytest.mark.parametrize("capture", CAPTURES)
def test_cumsum_of_int_mask_position_ids(capture):
    """RoBERTa's position ids: ``cumsum(ids != pad) * (ids != pad) + pad``, integers throughout."""
    def fn(ids):
        m = ids.ne(1).int()
        return (torch.cumsum(m, dim=1).type_as(m) * m).long() + 1
    ids = ints(2, 7, high=6)
    ids[0, 5:] = 1
    result = check(fn, ids, capture=capture)
    assert result.report.max_abs == 0.0


def test_outer_index_of_padding_mask():
    """Hugging Face's padding mask function: ``mask[arange(B)[:, None, None, None], arange(K)[None, None, None, :]]``;
    the batch arange follows the runtime batch (the random input with batch 3 checks it)."""
    def fn(x, mask):
        b, k = x.shape[0], x.shape[-1]
        bi = torch.arange(b)[:, None, None, None]
        ki = torch.arange(k)[None, None, None, :]
        qi = torch.arange(x.shape[-2])[None, None, :, None]
        allowed = mask.bool()[bi, ki] & (qi >= ki)
        return torch.where(allowed, x, -1.0)
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1, 3:] = 0
    check(fn, floats(2, 1, 5, 5), mask, capture="export")  # fx: torch.arange(batch) has no rule


def test_outer_index_takes_entries():
    table = torch.tensor([4, 0, 2])

    def fn(x):
        return x[:, table[:, None], torch.tensor([1, 3])[None, :]]
    check(fn, floats(2, 5, 4))


def test_outer_index_on_batch_refused_unless_arange():
    def fn(x):
        return x[torch.tensor([1, 0])[:, None], torch.tensor([0, 2])[None, :]]
    with pytest.raises(Exception, match="batch axis"):
        convert_model(Fn(fn).eval(), floats(2, 4), capture="fx")


def test_bool_output_values():
    result = check(lambda x: x > 0, floats(3, 4))
    out = np.asarray(result.keras_model(floats(3, 4).numpy()))
    assert out.dtype == bool and np.array_equal(out, (floats(3, 4) > 0).numpy())
