"""Gradient parity: training-mode gradients, one SGD step and BatchNorm statistics, by parameter name."""
from __future__ import annotations

import re

from contextlib import contextmanager
from pathlib import Path

import keras
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tracer.op_rules import Layout
from tracer.op_rules.common import call_with_weights
from tests.helpers import randomize_bn
from tests.test_verify import broken
from tracer import convert_model
from tracer.verify.gradcheck import check_gradients, map_parameters
from tracer.verify.kinks import TIE, GatedRun, find_kinks


class ConvBN(nn.Sequential):
    def __init__(self, cin, cout, k, stride=1, groups=1):
        super().__init__(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout))


class RepVGGBlock(nn.Module):
    """RepVGG's training-time block: 3x3 conv-BN + 1x1 conv-BN (+ identity BN), ReLU."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.dense, self.one = ConvBN(cin, cout, 3, stride), ConvBN(cin, cout, 1, stride)
        self.identity = nn.BatchNorm2d(cin) if cin == cout and stride == 1 else None
        self.act = nn.ReLU()

    def forward(self, x):
        y = self.dense(x) + self.one(x)
        if self.identity is not None:
            y = y + self.identity(x)
        return self.act(y)


class RepVGGish(nn.Module):
    def __init__(self, classes=5):
        super().__init__()
        self.stages = nn.Sequential(RepVGGBlock(3, 8, 2), RepVGGBlock(8, 8), RepVGGBlock(8, 16, 2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(16, classes)

    def forward(self, x):
        return self.head(torch.flatten(self.pool(self.stages(x)), 1))


class RepVGGDW(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv, self.conv1 = ConvBN(c, c, 3, groups=c), nn.Conv2d(c, c, 1, groups=c)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        return self.bn(self.conv(x) + self.conv1(x) + x)


class SqueezeExcite(nn.Module):
    def __init__(self, c, r=4):
        super().__init__()
        self.reduce, self.expand = nn.Conv2d(c, c // r, 1), nn.Conv2d(c // r, c, 1)

    def forward(self, x):
        s = x.mean((2, 3), keepdim=True)
        return x * torch.sigmoid(self.expand(torch.relu(self.reduce(s))))


class RepViTBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.token_mixer = nn.Sequential(RepVGGDW(c), SqueezeExcite(c))
        self.channel_mixer = nn.Sequential(ConvBN(c, 2 * c, 1), nn.GELU(), ConvBN(2 * c, c, 1))

    def forward(self, x):
        x = self.token_mixer(x)
        return x + self.channel_mixer(x)


class RepViTKWSish(nn.Module):
    """A keyword-spotting RepViT in miniature: (N, frames, mels) log-mel input, 12 classes."""

    def __init__(self, classes=12):
        super().__init__()
        self.stem = nn.Sequential(ConvBN(1, 8, 3, 2), nn.GELU(), ConvBN(8, 16, 3, 2))
        self.blocks = nn.Sequential(RepViTBlock(16), RepViTBlock(16))
        self.norm = nn.BatchNorm1d(16)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(16, classes)

    def forward(self, x):
        x = self.blocks(self.stem(x.unsqueeze(1)))
        return self.head(self.drop(self.norm(x.mean((2, 3)))))


def _converted(model: nn.Module, *shape: int):
    torch.manual_seed(0)
    model = randomize_bn(model).eval()
    sample = torch.randn(*shape, generator=torch.Generator().manual_seed(2))
    return model, convert_model(model, sample, n_random=1)


def _bn_count(model: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@pytest.mark.parametrize("make, shape", [(RepVGGish, (2, 3, 16, 16)), (RepViTKWSish, (2, 20, 16))],
                         ids=["repvgg", "repvit_kws"])
def test_gradient_parity_on_reparameterizable_cnns(make, shape):
    model, result = _converted(make(), *shape)
    report = check_gradients(model, result, [np.zeros(shape, np.float32)], batch=4)
    assert report.ok, report.summary()
    trainable = [k for k, p in model.named_parameters() if p.requires_grad]
    assert sorted(d.name for d in report.params) == sorted(trainable)  # every parameter, by name
    assert len(report.steps) == len(trainable) and all(d.ok for d in report.steps)
    assert report.inputs and report.inputs[0].ok
    assert abs(report.loss_torch - report.loss_keras) < 1e-4 * max(1.0, abs(report.loss_torch))
    # BatchNorm moving mean: identical; moving variance: exactly PyTorch's unbiased-variance factor apart
    means = [d for d in report.bn_stats if d.name.endswith("moving_mean")]
    assert len(means) == _bn_count(model) and all(d.ok for d in means)
    assert len(report.known_differences) == _bn_count(model)
    assert all("unbiased batch variance" in k and "n/(n-1)" in k for k in report.known_differences)


# gradient parity of the RepViT KWS and RepVGG-A0 examples: tests/test_examples_cnn.py


def test_known_difference_names_the_exact_factor():
    model, result = _converted(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), 1, 3, 6, 6)
    report = check_gradients(model, result, [np.zeros((1, 3, 6, 6), np.float32)], batch=2)
    (known,) = report.known_differences
    assert known.startswith("1.running_var:") and "32/31" in known  # 2 samples x 4 x 4 positions


def test_state_is_restored():
    model, result = _converted(RepVGGish(), 2, 3, 16, 16)
    before_t = {k: v.clone() for k, v in model.state_dict().items()}
    before_k = result.keras_model.get_weights()
    check_gradients(model, result, [np.zeros((2, 3, 16, 16), np.float32)])
    assert not model.training and all(not m.training for m in model.modules())
    assert all(torch.equal(before_t[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert all(np.array_equal(a, b) for a, b in zip(before_k, result.keras_model.get_weights()))


def test_parameter_map_covers_kernel_layouts():
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 6, 3)
            self.dw = nn.Conv2d(6, 12, 3, groups=6)
            self.up = nn.ConvTranspose2d(12, 4, 2, stride=2)
            self.fc = nn.Linear(4 * 4 * 4, 3)

        def forward(self, x):
            return self.fc(self.up(self.dw(self.conv(x))).flatten(1))

    model, result = _converted(Mixed(), 1, 3, 6, 6)
    maps, unmatched = map_parameters(model, result.keras_model)
    how = {m.torch_name: m.how for m in maps}
    assert not unmatched
    assert how["conv.weight"].startswith("conv") and how["dw.weight"].startswith("depthwise")
    assert how["fc.weight"] == "by value"  # the NHWC flattening order is folded into the kernel
    report = check_gradients(model, result, [np.zeros((1, 3, 6, 6), np.float32)], batch=2)
    assert report.ok, report.summary()


def test_shared_module_trains_differently_and_is_named():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            return self.conv(torch.relu(self.conv(x)))

    model, result = _converted(Shared(), 1, 4, 5, 5)
    report = check_gradients(model, result, [np.zeros((1, 4, 5, 5), np.float32)], batch=2)
    assert all(d.ok for d in report.params), "the gradient is the sum over both Keras copies"
    steps = {m.name for m in report.mismatches if m.kind == "sgd_step"}
    assert steps == {"conv.weight", "conv.bias"}
    assert "shares it between 2 calls" in report.mismatches[0].message


def test_gradient_bug_invisible_in_forward_is_caught():
    """A rule whose forward is right but blocks the gradient: only gradient parity can see it."""
    def gelu_no_grad(node, ctx):
        return keras.ops.stop_gradient(keras.activations.gelu(ctx.input(node, 0), approximate=False))

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GELU(), nn.Conv2d(4, 2, 1))
    with broken((nn.GELU,), gelu_no_grad, Layout.ANY):
        model, result = _converted(model, 1, 3, 6, 6)
    report = check_gradients(model, result, [np.zeros((1, 3, 6, 6), np.float32)], batch=2)
    bad = {m.name for m in report.mismatches if m.kind == "gradient"}
    assert bad == {"input 0", "0.weight", "0.bias"}, report.summary()  # upstream of the GELU only


def test_frozen_batchnorm_in_keras_is_named():
    def bn_frozen(node, ctx):
        m = node.module
        layer = keras.layers.BatchNormalization(axis=-1, epsilon=m.eps, momentum=0.9, name=ctx.name(node))
        y = layer(ctx.input(node, 0))
        layer.set_weights([t.detach().numpy() for t in (m.weight, m.bias, m.running_mean, m.running_var)])
        layer.trainable = False
        return y

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    with broken((nn.BatchNorm2d,), bn_frozen, Layout.CHANNELS_LAST):
        model, result = _converted(model, 1, 3, 6, 6)
    report = check_gradients(model, result, [np.zeros((1, 3, 6, 6), np.float32)], batch=2)
    named = {m.name: m.message for m in report.mismatches}
    assert "not trainable" in named["1.weight"] and "not trainable" in named["1.bias"]


def test_cumulative_momentum_is_reported():
    model, result = _converted(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=None)), 1, 3, 6, 6)
    report = check_gradients(model, result, [np.zeros((1, 3, 6, 6), np.float32)], batch=2)
    assert any(m.kind == "bn_stats" and "momentum=None" in m.message for m in report.mismatches)


def test_keras_weight_holding_no_torch_tensor_is_named():
    """A rule that transfers a kernel wrongly (doubled): that Keras kernel matches no PyTorch tensor."""
    def linear_doubled(node, ctx):
        m = node.module
        layer = keras.layers.Dense(m.out_features, name=ctx.name(node))
        kernel = 2 * m.weight.detach().numpy().T
        return call_with_weights(layer, ctx.input(node, 0), [kernel, m.bias.detach().numpy()])

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3)).eval()
    with broken((nn.Linear,), linear_doubled, Layout.TORCH):
        result = convert_model(model, torch.randn(2, 6), n_random=1, raise_on_mismatch=False)
    report = check_gradients(model, result, [np.zeros((2, 6), np.float32)], batch=2)
    kernels = {v.path for v in result.keras_model.trainable_variables if v.path.endswith("kernel")}
    assert len(kernels) == 2
    assert {m.name for m in report.mismatches if m.kind == "unmapped"} == kernels, report.summary()
    untrained = {m.name: m.message for m in report.mismatches if m.kind == "gradient"}
    assert "no Keras weight holds it" in untrained["0.weight"] and "no Keras weight holds it" in untrained["2.weight"]
    # gradients that flow back through the doubled kernel 2 differ; 2.bias's does not depend on any kernel
    assert set(untrained) == {"0.weight", "2.weight", "0.bias", "input 0"}
    assert {d.name: d.ok for d in report.params} == {"0.bias": False, "2.bias": True}


class Gain(nn.Module):
    def __init__(self):
        super().__init__()
        self.gain = nn.Parameter(torch.tensor(1.5))

    def forward(self, x):
        return x * self.gain


class GainNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.scale = nn.Linear(4, 3), Gain()

    def forward(self, x):
        return self.scale(self.fc(x))  # <- gain


def test_parameter_a_rule_made_constant_is_named_with_rule_and_line():
    def gain_as_constant(node, ctx):
        return keras.ops.multiply(ctx.input(node, 0), float(node.module.gain.detach()))

    with broken((Gain,), gain_as_constant, Layout.ANY):
        model, result = _converted(GainNet(), 2, 4)
        report = check_gradients(model, result, [np.zeros((2, 4), np.float32)], batch=2)
    (m,) = report.mismatches
    line = next(i + 1 for i, t in enumerate(Path(__file__).read_text().splitlines()) if t.endswith("# <- gain"))
    assert m.name == "scale.gain" and "rule gain_as_constant of node scale" in m.message, m.message
    assert f"{Path(__file__).resolve()}:{line}" in m.message and "made it a constant" in m.message


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(7, 4)

    def forward(self, x, counts):
        return self.fc(torch.cat([x, counts.float()], 1))  # the batch sizes must agree


def test_integer_inputs_follow_the_batch():
    """Integer inputs keep their values (the sample's rows, repeated to the batch); floats are drawn."""
    model = TwoInputs().eval()
    counts = torch.tensor([[1, 4, 7]])
    result = convert_model(model, (torch.randn(1, 4), counts), n_random=1)
    report = check_gradients(model, result, [np.zeros((1, 4), np.float32), counts.numpy()], batch=3)
    assert report.ok and report.batch == 3, report.summary()
    assert [d.name for d in report.inputs] == ["input 0"]  # integers have no gradient
    assert {d.name for d in report.params} == {"fc.weight", "fc.bias"}


# ---- the float64 reference on Keras's branches ---------------------------------------------------
class Kinks(nn.Module):
    def forward(self, x):
        return (torch.relu(x), x.clamp(-1.0, 1.0), F.hardswish(3 * x), torch.abs(x), torch.maximum(x, 0.5 * x.flip(-1)),
                F.max_pool2d(x.reshape(1, 1, 2, 4), 2))


def test_gated_run_takes_the_given_branch_and_classifies_flips():
    """Keras's decision replaces float64's at each kink; value and gradient follow it; flips are classified."""
    gm = torch.fx.symbolic_trace(Kinks())
    kinks = find_kinks(gm)
    assert sorted(k.kind for k in kinks.values()) == ["abs", "clip", "hardswish", "max", "pool", "relu"]
    x = torch.tensor([-1e-6, 0.5, -0.3, 2.0, 1.0 + 1e-7, 1.0, -3.0 / 3, 0.1], dtype=torch.float64, requires_grad=True)
    natural = GatedRun(gm, kinks, {}).run(x.detach())
    by_kind = {k.kind: name for name, k in kinks.items()}
    branches = {
        by_kind["relu"]: (x.detach() > 0).numpy() | np.eye(1, 8, 0, dtype=bool)[0] | np.eye(1, 8, 2, dtype=bool)[0],
        by_kind["clip"]: ((x.detach() <= -1).numpy(), (x.detach() >= 1).numpy() & (np.arange(8) != 4)),  # 1 + 1e-7
        # taken as inside: a tie
        by_kind["pool"]: torch.tensor([[[[5, 3]]]]),  # window 1 holds 1e-7 less at index 5 (max: 4): a tie
    }
    run = GatedRun(gm, kinks, branches)
    relu, clip, _, _, _, pool = run.run(x)
    assert relu[0] == x[0] and relu[2] == x[2] and torch.equal(clip[4], x[4])
    (gate,) = torch.autograd.grad(relu.sum(), x, retain_graph=True)
    assert gate.tolist() == [1, 1, 1, 1, 1, 1, 0, 1]  # relu's gate open where Keras opened it
    assert pool.flatten()[0] == x[5] and pool.flatten()[1] == x[3]  # window 2 as PyTorch: no decision
    (inside,) = torch.autograd.grad(clip.sum(), x, retain_graph=True)
    assert inside[4] == 1 and inside[6] == 0
    (picked,) = torch.autograd.grad(pool.sum(), x)
    assert picked.nonzero().flatten().tolist() == [3, 5]  # Keras's argmax in window 1, PyTorch's in window 2
    flips = {f.what: f for f in run.flips}
    assert (flips["relu"].count, flips["relu"].ties, flips["relu"].tie) == (2, 1, False)  # -0.3 is no tie
    assert flips["clamp"].tie and flips["max_pool2d"].tie and flips["max_pool2d"].count == 1
    assert all(torch.equal(a, b) for a, b in zip(natural[3:5], run.run(x.detach())[3:5]))  # ungated kinks as PyTorch


# RepVGG-A0 (examples/repvgg.py, CIFAR variant): its ReLUs see pre-activations within rounding of 0
# at some batches (ties), which fp32 gradients alone cannot tell from bugs.
A0_DEFAULT = [(s, 4) for s in range(5)] + [(0, 2), (0, 16)]
A0_SLOW = [(s, b) for b in (2, 16) for s in range(1, 5) if (s, b) != (1, 16)]  # (1, 16): the ties test


@pytest.fixture(scope="module")
def a0():
    from examples import repvgg
    from examples.common import randomize_bn_stats
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the float64 training-mode BatchNorm of many threads on a busy 2-core machine: ~50x slower
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = randomize_bn_stats(repvgg.build_a0(), seed=1).eval()
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    yield model, convert_model(model, x, n_random=1), [x.numpy()]
    torch.set_num_threads(threads)


def _a0_passes(a0, seed: int, batch: int) -> None:
    model, result, sample = a0
    report = check_gradients(model, result, sample, batch=batch, seed=seed)
    assert report.ok, report.summary()
    assert report.reference == "float64" and report.gated == report.kinks == 22  # every block's ReLU
    assert sorted(d.name for d in report.params) == sorted(k for k, _ in model.named_parameters())
    assert 0 < report.noise_floor < report.tolerance and report.max_error < report.tolerance
    assert all(f["tie"] for f in report.flips), report.flips


@pytest.mark.parametrize("seed, batch", A0_DEFAULT, ids=[f"seed{s}-batch{b}" for s, b in A0_DEFAULT])
def test_repvgg_a0_gradient_parity(a0, seed, batch):
    _a0_passes(a0, seed, batch)


@pytest.mark.slow
@pytest.mark.parametrize("seed, batch", A0_SLOW, ids=[f"seed{s}-batch{b}" for s, b in A0_SLOW])
def test_repvgg_a0_gradient_parity_more_seeds(a0, seed, batch):
    _a0_passes(a0, seed, batch)


def test_repvgg_a0_ties_are_notes_with_their_location(a0):
    model, result, sample = a0
    report = check_gradients(model, result, sample, batch=16, seed=1)  # 3 ReLUs flip at ties here
    assert report.ok and len(report.flips) >= 1, report.summary()
    assert all(f["tie"] and f["worst"] <= TIE and "repvgg.py:" in f["source"] for f in report.flips), report.flips
    assert len(report.ties) == len(report.flips) and all(f["node"] in t and f["source"] in t and "at a tie" in t
                                                         for f, t in zip(report.flips, report.ties))
    assert "  tie: ReLU" in report.summary()


BN = "stage2.1.rbr_dense.bn"  # a BatchNorm in the middle of RepVGG-A0


@contextmanager
def _bug(result, kind: str):
    """One bug injected into the converted Keras model's BatchNormalization ``BN``."""
    # Keras makes layer names unique per process: another model converted earlier in this worker
    # may already hold the name, and this one then carries a "_<n>" suffix
    (layer,) = [lay for lay in result.keras_model.layers if re.fullmatch(re.escape(BN) + r"(_\d+)?", lay.name)]
    call = layer.call
    if kind == "eps":
        layer.epsilon = 1e-3
    elif kind == "scaled":
        layer.call = lambda inputs, training=None, mask=None: call(inputs, training=training, mask=mask) * 1.001
    else:  # moving statistics used in training mode
        layer.call = lambda inputs, training=None, mask=None: call(inputs, training=False, mask=mask)
    try:
        yield
    finally:
        layer.epsilon = 1e-5
        layer.__dict__.pop("call", None)


@pytest.mark.parametrize("kind", ["eps", "scaled", "moving"])
def test_repvgg_a0_training_bugs_are_caught_and_named(a0, kind):
    model, result, sample = a0
    with _bug(result, kind):
        report = check_gradients(model, result, sample, batch=2, seed=0)
    first = report.mismatches[0]
    assert first.kind == "forward" and first.name == BN.replace(".", "_"), report.summary()
    assert f"module {BN}" in first.message and "repvgg.py:" in first.message and "rule batch_norm" in first.message
    assert any(m.kind == "gradient" for m in report.mismatches) and report.max_error > report.tolerance
    if kind == "moving":
        assert {m.name for m in report.mismatches if m.kind == "bn_stats"} >= {f"{BN}.running_mean"}


@pytest.mark.slow
def test_tracer_verify_reports_gradient_parity_ok_on_repvgg_a0(tmp_path, capsys):
    """The command line end to end: convert RepVGG-A0, then `tracer verify` (deep checks, gradients)."""
    import json

    from tracer.cli import main
    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "a0"
    assert main(["convert", f"{root}/examples/repvgg.py:build_a0", "--input-shape", "1,3,32,32", "-o", str(out),
                 "-q"]) == 0
    capsys.readouterr()
    assert main(["verify", str(out)]) == 0
    assert "gradient parity: OK" in capsys.readouterr().out
    grads = json.loads((out / "report.json").read_text())["verify"]["gradients"]
    assert grads["ok"] and grads["reference"] == "float64" and grads["gated"] == 22
