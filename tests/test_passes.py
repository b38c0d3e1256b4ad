"""Clean-up passes (tracer/passes/optimize.py): each keeps parity and visibly changes the graph or model."""
from __future__ import annotations

import json
import textwrap
from pathlib import Path

import keras
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tests.helpers import FP32_TOL, assert_converts, randomize_bn
from tracer import convert_model
from tracer.cli import EXIT_OK, main
from tracer.op_rules.registry import has_module_rule
from tracer.capture.fx import capture
from tracer.ir import check_integrity, ordered
from tracer.passes.optimize import remove_identities


def _layer_types(result) -> list[str]:
    return [type(layer).__name__ for layer in result.keras_model.layers]


def _call_nodes(result) -> list[str]:
    return [n.name for n in ordered(result.graph) if n.kind.startswith("call")]


class ConvBnStack(nn.Module):
    """conv-BN-relu, a biased depthwise conv-BN-relu6, conv1d-BN and a Linear-BN1d head."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, stride=2, groups=8), nn.BatchNorm2d(8)
        self.c3, self.b3 = nn.Conv1d(8, 6, 1), nn.BatchNorm1d(6, affine=False)
        self.fc, self.b4 = nn.Linear(6, 5), nn.BatchNorm1d(5)

    def forward(self, x):
        y = F.relu6(self.b2(self.c2(torch.relu(self.b1(self.c1(x))))))
        t = self.b3(self.c3(y.flatten(2)))
        return self.b4(self.fc(t.mean(2)))


def _bn_model() -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(ConvBnStack()).eval()


def test_fold_bn_keeps_parity_and_removes_every_batchnorm():
    torch.manual_seed(0)
    model = _bn_model()
    x = torch.randn(2, 3, 9, 9)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    unfolded = assert_converts(model, x)
    folded = convert_model(model, x, fold_bn=True, n_random=2, tol=FP32_TOL, raise_on_mismatch=False)
    assert folded.report.ok, folded.report.summary()
    assert _layer_types(unfolded).count("BatchNormalization") == 4
    assert "BatchNormalization" not in _layer_types(folded)
    assert len(folded.keras_model.layers) < len(unfolded.keras_model.layers)
    assert len(_call_nodes(folded)) == len(_call_nodes(unfolded)) - 4 - 2  # 4 BN folded, relu and relu6 fused
    assert sum("folded into this layer" in n for n in folded.facts()["notes"]) == 4
    for k, v in model.state_dict().items():  # the user's model is not touched
        assert torch.equal(v, before[k]), k


def test_default_conversion_keeps_batchnorm_trainable():
    torch.manual_seed(0)
    result = assert_converts(_bn_model(), torch.randn(1, 3, 9, 9))
    bns = [layer for layer in result.keras_model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert len(bns) == 4 and all(layer.trainable for layer in bns)


def test_fold_bn_skips_a_conv_with_other_users():
    torch.manual_seed(0)
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.c, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.c(x)
            return self.bn(y) + y

    model = randomize_bn(Shared()).eval()
    result = convert_model(model, torch.randn(1, 3, 8, 8), fold_bn=True, n_random=1, raise_on_mismatch=False)
    assert result.report.ok, result.report.summary()
    assert _layer_types(result).count("BatchNormalization") == 1


def test_cli_fold_bn(tmp_path: Path):
    src = tmp_path / "net.py"
    src.write_text(textwrap.dedent('''
        import torch.nn as nn
        def build():
            return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(144, 2))
    '''))
    out = tmp_path / "out"
    code = main(["convert", f"{src}:build", "--input-shape", "1,3,8,8", "--fold-bn", "--no-saved-model",
                 "-o", str(out), "-q"])
    assert code == EXIT_OK
    facts = json.loads((out / "report.json").read_text())["conversion"]
    assert "batch_norm" not in facts["ops_by_rule"] and "activation_ReLU" not in facts["ops_by_rule"]
    assert any("folded" in n for n in facts["notes"]) and any("fused" in n for n in facts["notes"])


class WithNoOps(nn.Module):
    def __init__(self):
        super().__init__()
        self.c, self.drop, self.ident = nn.Conv2d(3, 4, 3), nn.Dropout(0.3), nn.Identity()

    def forward(self, x):
        y = self.ident(self.drop(self.c(x))).contiguous()
        y = (y * 1) + 0
        y = y.view(y.shape).permute(0, 1, 2, 3) / 1
        return F.dropout(y, 0.5, training=False) - 0


def test_identity_and_noop_removal():
    torch.manual_seed(0)
    result = assert_converts(WithNoOps().eval(), torch.randn(1, 3, 8, 8))
    assert _call_nodes(result) == ["c"]
    assert [t for t in _layer_types(result) if t != "InputLayer"] == ["Conv2D"]


def test_noop_that_changes_dtype_is_kept():
    torch.manual_seed(0)
    class Promote(nn.Module):
        def forward(self, x):
            return (x > 0).sum(1) * 1 + (x > 0).sum(1) * 1.0  # int * 1 is a no-op, int * 1.0 a cast

    graph = remove_identities(capture(Promote().eval(), (torch.randn(1, 4, 5),), has_module_rule))
    check_integrity(graph)
    muls = [n for n in ordered(graph) if n.name.startswith("mul")]
    assert [n.dtype for n in muls] == ["float32"]


def test_floor_division_by_one_is_kept():
    torch.manual_seed(0)
    class Floor(nn.Module):
        def forward(self, x):
            return torch.div(x, 1, rounding_mode="floor") + torch.div(x, 1)

    graph = remove_identities(capture(Floor().eval(), (torch.randn(1, 4),), has_module_rule))
    assert [n.name for n in ordered(graph) if n.kind.startswith("call")] == ["div", "add"]


def test_shape_arithmetic_is_folded_at_capture():
    torch.manual_seed(0)
    class Shapes(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(12, 3)
            self.scale = nn.Parameter(torch.full((12,), 2.0))

        def forward(self, x):
            n, c = x.size(0), x.shape[1] * x.shape[2]
            return self.fc(x.view(n, c) * (self.scale.exp() + 1) / (x.size(-1) * 2))

    result = assert_converts(Shapes().eval(), torch.randn(2, 3, 4))
    rules = result.facts()["ops_by_rule"]
    assert set(rules) == {"reshape", "binary_multiply", "binary_divide", "linear"}, rules
    assert not any(n.target in ("size", getattr) for n in ordered(result.graph))


@pytest.mark.parametrize("act,keras_name", [
    (nn.ReLU(), "relu"), (nn.ReLU6(), "relu6"), (nn.Sigmoid(), "sigmoid"), (nn.Tanh(), "tanh"),
    (nn.SiLU(), "silu"), (nn.GELU(), "gelu")])
def test_activation_fused_into_conv_and_dense(act, keras_name):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), act, nn.Flatten(), nn.Linear(4 * 6 * 6, 5), act).eval()
    result = assert_converts(model, torch.randn(2, 3, 8, 8))
    conv, dense = (layer for layer in result.keras_model.layers if type(layer).__name__ in ("Conv2D", "Dense"))
    assert conv.get_config()["activation"] == keras_name == dense.get_config()["activation"]
    assert len(_call_nodes(result)) == 3  # conv, flatten, linear


def test_activation_not_fused_when_conv_output_has_other_users_or_is_approximate():
    torch.manual_seed(0)
    class TwoUsers(nn.Module):
        def __init__(self):
            super().__init__()
            self.c, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4, 4)

        def forward(self, x):
            y = self.c(x)
            t = self.fc(y.mean((2, 3)))
            return torch.relu(y) + y, F.gelu(t, approximate="tanh")

    result = assert_converts(TwoUsers().eval(), torch.randn(1, 3, 8, 8))
    layers = [layer for layer in result.keras_model.layers if type(layer).__name__ in ("Conv2D", "Dense")]
    assert [layer.get_config()["activation"] for layer in layers] == ["linear", "linear"]


def test_deep_chain_builds():
    """Keras builds the functional node map recursively (fixes/deep_graphs.py): 1100 chained ops."""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Tanh() if k % 2 else nn.ReLU() for k in range(1100)]).eval()
    result = assert_converts(model, torch.randn(2, 5), n_random=1)
    assert len(_call_nodes(result)) == 1100
