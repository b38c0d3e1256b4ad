"""Capture, IR, passes and layout over whole small models."""
from __future__ import annotations

import dataclasses

import networkx as nx
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tracer.op_rules.registry import has_module_rule
from tests.helpers import assert_converts, randomize_bn
from tracer import UnsupportedOpsError, convert_model
from tracer.capture.fx import capture
from tracer.ir import OP, OpNode, Phys, check_integrity, ordered
from tracer.passes.layout import reshape_layout


class Block(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)) + x)


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.blocks = nn.Sequential(Block(8), Block(8))
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        y = self.blocks(self.stem(x))
        return self.fc(y.view(y.size(0), -1))


def test_capture_records_shapes_sources_and_module_paths():
    torch.manual_seed(0)
    graph = capture(SmallCNN().eval(), (torch.randn(2, 3, 8, 8),), has_module_rule)
    check_integrity(graph)
    nodes = {n.name: n for n in ordered(graph)}
    assert all(isinstance(graph.nodes[n][OP], OpNode) for n in graph)
    with pytest.raises(dataclasses.FrozenInstanceError):
        nodes["stem"].shape = (1,)
    assert nodes["stem"].shape == (2, 8, 4, 4) and nodes["stem"].dtype == "float32"
    assert nodes["stem"].module_path == "stem" and isinstance(nodes["stem"].module, nn.Conv2d)
    relu = next(n for n in nodes.values() if n.target is F.relu)
    assert relu.module_path == "blocks.0"
    assert relu.source.file == __file__ and "F.relu(self.bn(self.conv(x)) + x)" in relu.source.code
    view = next(n for n in nodes.values() if n.target == "view")
    assert view.kw["shape"] == (2, -1)  # x.size(0) folded into a constant
    assert not any(n.target == "size" for n in nodes.values())
    assert nx.is_directed_acyclic_graph(graph)


def test_cnn_parity_and_transposes_default_and_channels_last_io():
    torch.manual_seed(0)
    model = randomize_bn(SmallCNN())
    default = assert_converts(model, torch.randn(1, 3, 8, 8))
    assert default.transpose_count == 1  # the NCHW input only; view -> Linear folded into weights
    nhwc = assert_converts(model, torch.randn(1, 3, 8, 8), channels_last_io=True)
    assert nhwc.transpose_count == 0
    assert nhwc.input_layouts == [Phys.channels_last(4)]


def test_several_inputs_and_nested_outputs_keep_order():
    torch.manual_seed(0)
    class TwoInTwoOut(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.fc = nn.Linear(6, 4)

        def forward(self, image, label):
            feat = self.conv(image).mean((2, 3))
            gate = torch.sigmoid(self.fc(label))
            return {"energy": (feat * gate).sum(1, keepdim=True), "parts": [feat, gate]}

    result = assert_converts(TwoInTwoOut(), torch.randn(2, 3, 5, 5), torch.randn(2, 6))
    assert [i.name for i in result.keras_model.inputs] == ["image", "label"]
    assert [tuple(o.shape[1:]) for o in result.keras_model.outputs] == [(1,), (4,), (4,)]


def test_unsupported_ops_collected_into_one_error():
    torch.manual_seed(0)
    class Odd(nn.Module):
        def forward(self, x):
            a = torch.fft.rfft(x).abs()
            b = torch.special.bessel_j0(x)
            return a.sum() + b.sum() + torch.special.bessel_j0(x).sum()

    with pytest.raises(UnsupportedOpsError) as info:
        convert_model(Odd(), torch.randn(2, 8))
    ops = {o["op"]: o for o in info.value.ops}
    assert len(ops) == 2
    assert ops["torch.special.special_bessel_j0" if "torch.special.special_bessel_j0" in ops else
               next(k for k in ops if "bessel_j0" in k)]["count"] == 2
    text = str(info.value)
    assert "fft" in text and __file__ in text and "@rule(" in text and "def " in text


def test_shape_check_names_node_and_both_shapes():
    torch.manual_seed(0)
    from tracer.op_rules.registry import Layout, register, unregister
    from tracer import ConversionError

    class Wrong(nn.Module):
        def forward(self, x):
            return x * 2

    class Bad(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = Wrong()

        def forward(self, x):
            return self.w(x)

    register([Wrong], lambda node, ctx: ctx.input(node, 0)[:, :1], Layout.ANY)
    try:
        with pytest.raises(ConversionError, match=r"w \(.*Wrong\).*expected \(None, 3\)|expected"):
            convert_model(Bad(), torch.randn(2, 3))
    finally:
        unregister(Wrong)


@pytest.mark.parametrize("in_shape, perm, out_shape, req, out", [
    ((2, 8, 4, 4), (0, 2, 3, 1), (2, 8, 16), (0, 2, 3, 1), (0, 2, 1)),  # flatten(2) of NHWC: no move
    ((2, 8, 1, 1), (0, 2, 3, 1), (2, 8), (0, 2, 3, 1), (0, 1)),  # pooled map: plain
    ((2, 8, 4, 4), (0, 1, 2, 3), (2, 2, 4, 4, 4), (0, 1, 2, 3), (0, 1, 2, 3, 4)),
])
def test_reshape_layout_moves_no_data_when_runs_stay_in_order(in_shape, perm, out_shape, req, out):
    got = reshape_layout(in_shape, Phys(perm), out_shape)
    assert got is not None
    assert got[0].perm == req and got[1].perm == out and got[1].flat is None


def test_flatten_of_nhwc_map_is_marked_flat_for_the_linear():
    req, out = reshape_layout((2, 8, 4, 4), Phys((0, 2, 3, 1)), (2, 128))
    assert req.perm == (0, 2, 3, 1)
    assert out.perm == (0, 1) and out.flat == ((8, 4, 4), (1, 2, 0))
