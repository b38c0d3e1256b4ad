"""Modules that have a rule stay one node under torch.export (tracer/capture/leaf_ops.py), as they do as
torch.fx leaves: their rules apply, so nothing is baked at the sample's batch (an RNN's zero h0, an MHA's
``reshape(L * B, E)``), and a user's own module rule is used."""
from __future__ import annotations

import keras
import pytest
import torch
import torch.nn as nn

from tests.helpers import FP32_TOL
from tracer import convert_model
from tracer.capture.export import capture_export
from tracer.capture.leaf_ops import LEAF_OP
from tracer.ir import OP
from tracer.op_rules.registry import Layout, register, unregister


def _converts_export(model: nn.Module, *inputs: torch.Tensor):
    result = convert_model(model.eval(), inputs if len(inputs) > 1 else inputs[0], capture="export",
                           n_random=2, tol=FP32_TOL, raise_on_mismatch=False)
    assert result.graph.graph["capture"]["method"] == "torch.export"
    assert result.report.ok, result.report.summary()
    return result


def _module_nodes(result) -> dict[str, type]:
    nodes = (result.graph.nodes[n][OP] for n in result.graph.graph["order"])
    return {n.module_path: n.target for n in nodes if n.kind == "call_module"}


class MhaGru(nn.Module):
    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(16, 2)
        self.gru = nn.GRU(16, 8)

    def forward(self, x):  # x (L, B, E)
        y, _ = self.mha(x, x, x)
        z, _ = self.gru(y)
        return z


def test_mha_and_gru_stay_modules_with_parity_at_other_batches():
    torch.manual_seed(0)
    result = _converts_export(MhaGru(), torch.randn(5, 2, 16))
    assert _module_nodes(result) == {"mha": nn.MultiheadAttention, "gru": nn.GRU}
    sample = result.report.trials[0].input_shapes[0]
    assert any(t.input_shapes[0][0] != sample[0] for t in result.report.trials)  # the other-batch trial ran
    node = result.graph.nodes["mha"][OP]
    assert node.source.line and "self.mha(x, x, x)" in node.source.code


class Lstm(nn.Module):
    def __init__(self, given: bool):
        super().__init__()
        self.lstm = nn.LSTM(6, 5, num_layers=2)
        self.given = given

    def forward(self, x, h0, c0):
        if self.given:
            out, (h, c) = self.lstm(x, (h0, c0))
        else:
            out, (h, c) = self.lstm(x)
        return out, h + c


@pytest.mark.parametrize("given", [False, True], ids=["zero_state", "given_state"])
def test_lstm_with_and_without_initial_state(given):
    torch.manual_seed(1)
    x, h0, c0 = torch.randn(4, 3, 6), torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    result = _converts_export(Lstm(given), x, h0, c0)
    assert _module_nodes(result) == {"lstm": nn.LSTM}


class Attention(nn.Module):
    def __init__(self, batch_first: bool):
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.mha = nn.MultiheadAttention(8, 2, batch_first=batch_first)

    def forward(self, q, kv):
        q = self.proj(q)
        out, weights = self.mha(q, kv, kv)
        return out, weights


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
def test_mha_batch_first_both_ways(batch_first):
    torch.manual_seed(2)
    q, kv = (torch.randn(3, 4, 8), torch.randn(3, 6, 8)) if batch_first else (
        torch.randn(4, 3, 8), torch.randn(6, 3, 8))
    result = _converts_export(Attention(batch_first), q, kv)
    assert _module_nodes(result) == {"mha": nn.MultiheadAttention}  # the Linear stays aten.linear


class Shrink(nn.Module):
    """Soft shrinkage by a learned threshold; its rule is registered by the test only."""

    def __init__(self):
        super().__init__()
        self.t = nn.Parameter(torch.tensor(0.3))

    def forward(self, x):
        return torch.sign(x) * torch.relu(x.abs() - self.t)


class Halves(nn.Module):
    """Returns views of its input (torch.library: a custom op's outputs must not alias its inputs; copied)."""

    def forward(self, x):
        return x[:, :3], x[:, 3:]


class WithShrink(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.shrink = Shrink()
        self.halves = Halves()

    def forward(self, x):
        a, b = self.halves(self.shrink(self.fc(x)))
        return a * b


def test_user_module_rule_is_kept_under_export():
    calls = []

    def shrink(node, ctx):
        calls.append(node.module_path)
        x, t = ctx.input(node, 0), float(node.module.t.detach())
        return keras.ops.sign(x) * keras.ops.relu(keras.ops.abs(x) - t)

    def halves(node, ctx):
        calls.append(node.module_path)
        x = ctx.input(node, 0)
        return x[:, :3], x[:, 3:]

    register([Shrink], shrink, Layout.ANY)
    register([Halves], halves, Layout.TORCH)
    try:
        torch.manual_seed(3)
        result = _converts_export(WithShrink(), torch.randn(2, 6))
        assert _module_nodes(result) == {"shrink": Shrink, "halves": Halves}
        assert calls == ["shrink", "halves"]
    finally:
        unregister(Shrink, Halves)


def test_modules_are_restored_and_no_leaf_op_remains():
    model = MhaGru().eval()
    torch.manual_seed(4)
    graph = capture_export(model, (torch.randn(5, 2, 16),), reason="test")
    assert "forward" not in model.mha.__dict__ and "forward" not in model.gru.__dict__
    assert all(graph.nodes[n][OP].target is not LEAF_OP for n in graph.nodes)
    # the modules' weights are read by their rules, not left behind as graph constants
    assert not [n for n in graph.nodes if graph.nodes[n][OP].kind in ("get_attr", "constant")]


def test_forward_is_restored_when_export_fails():
    class Fails(nn.Module):
        def __init__(self):
            super().__init__()
            self.gru = nn.GRU(4, 4)

        def forward(self, x):
            y, _ = self.gru(x)
            if y.sum() > 0:  # value-dependent control flow: torch.export refuses it
                return y
            return -y

    model = Fails().eval()
    with pytest.raises(Exception, match="torch.export could not capture"):
        capture_export(model, (torch.randn(3, 2, 4),), reason="test")
    assert "forward" not in model.gru.__dict__


class BatchFirstGruAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.gru = nn.GRU(8, 8, batch_first=True)
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x):  # x (B, T, F)
        y, _ = self.gru(x)
        z, _ = self.mha(y, y, y, need_weights=False)
        return z


def test_dynamic_time_under_export_keeps_the_modules():
    """torch.export.Dim on the time axis: the leaf op's fake kernel gives symbolic output shapes."""
    torch.manual_seed(5)
    result = convert_model(BatchFirstGruAttention().eval(), torch.randn(2, 6, 8), capture="export",
                           dynamic_shapes=({1: "time"},), n_random=1, raise_on_mismatch=False)
    assert result.graph.graph["capture"]["method"] == "torch.export"
    assert _module_nodes(result) == {"gru": nn.GRU, "mha": nn.MultiheadAttention}
    assert tuple(result.keras_model.inputs[0].shape) == (None, None, 8)
    assert result.report.ok, result.report.summary()
    assert len([t for t in result.report.trials if t.label.startswith("time=")]) == 2, result.report.summary()


class SharedGru(nn.Module):
    """One GRU called twice (and held under two names): one module path, two nodes, as under torch.fx."""

    def __init__(self):
        super().__init__()
        self.gru = nn.GRU(6, 6, batch_first=True)
        self.again = self.gru

    def forward(self, x):
        y, h = self.gru(x)
        z, _ = self.again(y, h)
        return z


def test_shared_module_called_twice():
    torch.manual_seed(6)
    result = _converts_export(SharedGru(), torch.randn(2, 4, 6))
    nodes = [result.graph.nodes[n][OP] for n in result.graph.graph["order"]]
    assert [(n.module_path, n.target) for n in nodes if n.kind == "call_module"] == [("gru", nn.GRU)] * 2


def test_core_aten_decomposition_keeps_the_modules():
    """run_decompositions retraces the program: the leaf op's fake kernel runs on the real module's weights."""
    torch.manual_seed(7)
    model = MhaGru().eval()
    graph = capture_export(model, (torch.randn(5, 2, 16),), reason="test", core_aten=True)
    nodes = [graph.nodes[n][OP] for n in graph.graph["order"]]
    assert [(n.module_path, n.target) for n in nodes if n.kind == "call_module"] == [
        ("mha", nn.MultiheadAttention), ("gru", nn.GRU)]
    assert graph.graph["capture"]["decomposed"] == ["all (core ATen)"]
