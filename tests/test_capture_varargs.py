"""``forward(self, *xs)`` and ``forward(self, x, *rest, **kw)`` models: torch.fx's one ``*xs`` placeholder
becomes one input per tensor it collects (tracer/capture/fx.py), and torch.export's dynamic_shapes nest the
specs of a ``*args`` parameter in one tuple (tracer/capture/export.py export_dims); Keras parity both ways."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from tests.helpers import FP32_TOL
from tracer import convert_model
from tracer.capture.export import export_dims
from tracer.dynamic import parse_dynamic_shapes


class Unpack(nn.Module):
    def forward(self, *xs):
        (x,) = xs
        return x.relu()


class Cat(nn.Module):
    def forward(self, *xs):
        return torch.cat(xs, 1).tanh()


class Rest(nn.Module):
    def forward(self, x, *rest, **kw):
        return x * rest[0] + rest[1:][0]


class ListUnpack(nn.Module):  # list(xs): fx cannot trace it, torch.export can
    def forward(self, *xs):
        x, = list(xs)
        return x.relu()


def _check(result, n_inputs: int) -> None:
    report = result.report
    assert report.ok and report.trials, report.summary()
    assert all(o.max_rel <= FP32_TOL for t in report.trials for o in t.outputs)
    assert len(result.keras_model.inputs) == n_inputs


@pytest.mark.parametrize("capture", ["fx", "export"])
@pytest.mark.parametrize("model,n", [(Unpack(), 1), (Cat(), 2), (Rest(), 3)])
def test_varargs_forward_converts(model, n, capture):
    torch.manual_seed(0)
    inputs = tuple(torch.randn(2, 5, 3) for _ in range(n))
    result = convert_model(model.eval(), inputs if n > 1 else inputs[0], capture=capture, n_random=1,
                           raise_on_mismatch=False)
    assert result.graph.graph["capture"]["method"] == ("fx" if capture == "fx" else "torch.export")
    _check(result, n)


@pytest.mark.parametrize("capture", ["auto", "export"])  # auto: fx for Rest, torch.export for ListUnpack
@pytest.mark.parametrize("model,n", [(ListUnpack(), 1), (Rest(), 3)])
def test_varargs_forward_dynamic_axis(model, n, capture):
    torch.manual_seed(1)
    inputs = tuple(torch.randn(2, 6, 3) for _ in range(n))
    result = convert_model(model.eval(), inputs if n > 1 else inputs[0], capture=capture, n_random=1,
                           dynamic_shapes=tuple({1: "t"} for _ in range(n)), raise_on_mismatch=False)
    _check(result, n)
    assert [t.input_shapes[0][1] for t in result.report.trials if t.label.startswith("t=")] == [12, 9]
    assert tuple(result.keras_model.inputs[0].shape) == (None, None, 3)


def test_export_dims_nest_a_varargs_parameter():
    xs = tuple(torch.zeros(2, 4, 3) for _ in range(3))
    dims = parse_dynamic_shapes(({1: "t"}, None, {2: "c"}), xs)
    auto = torch.export.Dim.AUTO
    assert export_dims(xs, dims, Rest()) == ({1: auto}, (None, {2: auto}))
    assert export_dims(xs, dims, Cat()) == (({1: auto}, None, {2: auto}),)
    assert export_dims(xs, dims) == ({1: auto}, None, {2: auto})
