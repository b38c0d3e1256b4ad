"""The CNN examples (RepViT keyword spotter, RepVGG-A0 / B1g4, FBNet-A): parameter counts, fp32
parity with default and channels-last I/O, Transpose counts, `.keras` reload in a fresh process
with safe mode, RepVGG's fused form, and gradient parity in training mode."""
from __future__ import annotations

import copy
import functools
import subprocess
import sys

import keras
import numpy as np
import pytest
import torch
import torch.nn as nn

from examples import fbnet_a, repvgg, repvit_kws
from examples.common import count_parameters, randomize_bn_stats
from tests.helpers import FP32_TOL, assert_converts
from tracer.verify.gradcheck import check_gradients
from tracer.ir import op, ordered


def _a0_fused() -> nn.Module:
    """RepVGG-A0 fused from a training-form model with non-default BatchNorm statistics."""
    return randomize_bn_stats(repvgg.build_a0(), seed=3).switch_to_deploy()


# name -> (factory, sample shape, Transposes with default I/O, Transposes with channels-last I/O)
EXAMPLES = {
    # (B, 100, 40) -> unsqueeze(1): a one-channel NCHW map is already NHWC, nothing to transpose
    "repvit_kws": (repvit_kws.build, (1, 100, 40), 0, 0),
    "repvgg_a0": (repvgg.build_a0, (1, 3, 32, 32), 1, 0),  # default I/O: the NCHW input only
    "repvgg_a0_deploy": (_a0_fused, (1, 3, 32, 32), 1, 0),
    "repvgg_b1g4": (repvgg.build_b1g4, (1, 3, 32, 32), 1, 0),
    # FBNet-A works at any multiple of 32; each of its 3 channel shuffles is one inherent Transpose
    "fbnet_a": (fbnet_a.build, (1, 3, 96, 96), 1 + 3, 3),
}
SHUFFLE_AXES = [0, 1, 2, 4, 3]  # (N, H, W, g, C/g) -> (N, H, W, C/g, g)


@functools.lru_cache(maxsize=None)
def _model(name: str) -> nn.Module:
    with torch.random.fork_rng():  # the default initialisation, drawn the same way every run
        torch.manual_seed(0)
        model = EXAMPLES[name][0]()
    return randomize_bn_stats(model, seed=1).eval()


def _sample(name: str) -> torch.Tensor:
    return torch.randn(*EXAMPLES[name][1], generator=torch.Generator().manual_seed(7))


@functools.lru_cache(maxsize=None)
def _converted(name: str, channels_last_io: bool):
    return assert_converts(_model(name), _sample(name), channels_last_io=channels_last_io)


def test_repvit_kws_matches_the_seed_parameter_counts():
    model = repvit_kws.build()
    assert count_parameters(model) == 214_222
    assert count_parameters(model, trainable_only=False) == 214_222
    bn_channels = sum(m.num_features for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert bn_channels == 3_444  # the seed's 6,888 non-trainable Keras weights
    x = torch.zeros(2, 100, 40)
    shapes = []
    for layer in model.features:
        x = layer(x.unsqueeze(1) if x.dim() == 3 else x)
        shapes.append(tuple(x.shape[1:]))
    assert shapes[0] == (24, 25, 10) and shapes[3] == (24, 25, 10)
    assert shapes[4] == (48, 13, 10) and shapes[10] == (48, 13, 10)
    assert shapes[11] == (96, 7, 10) and shapes[13] == (96, 7, 10) and len(shapes) == 14
    assert model(torch.zeros(3, 100, 40)).shape == (3, 2)
    assert count_parameters(repvit_kws.build(num_classes=12)) == 214_222 + 10 * 97


def test_repvit_kws_keras_weights_match_the_seed():
    keras_model = _converted("repvit_kws", False).keras_model
    trainable = sum(int(np.prod(v.shape)) for v in keras_model.trainable_variables)
    assert trainable == 214_222
    assert keras_model.count_params() == 221_110  # + BatchNorm moving mean and variance


@pytest.mark.parametrize("factory, train, deploy", [
    (repvgg.build_a0, 2_027_412, 1_822_644),  # the seed's table: 2.03M -> 1.82M
    (repvgg.build_b1g4, 9_599_268, 8_625_124),  # 9.60M -> 8.63M
])
def test_repvgg_parameter_counts_train_and_fused(factory, train, deploy):
    model = factory()
    assert count_parameters(model) == train
    assert count_parameters(model.switch_to_deploy()) == deploy
    if factory is repvgg.build_a0:
        assert count_parameters(repvgg.build_a0_deploy()) == deploy


def test_repvgg_b1g4_groups_on_even_layers():
    blocks = [m for m in repvgg.build_b1g4().modules() if isinstance(m, repvgg.RepVGGBlock)]
    assert len(blocks) == 28
    assert [i for i, b in enumerate(blocks) if b.groups == 4] == list(range(2, 27, 2))
    assert all(b.rbr_dense.c.groups == b.rbr_1x1.c.groups == b.groups for b in blocks)


def test_fbnet_a_parameters_and_structure():
    model = fbnet_a.build()
    assert count_parameters(model) == 4_321_232  # FBNet-A: 4.3M
    stages = model.backbone.stages
    assert len(stages) == 24 and isinstance(stages.xif1_0, nn.Identity)
    assert [n for n, m in model.named_modules() if isinstance(m, fbnet_a.ChannelShuffle)] == [
        "backbone.stages.xif4_2.shuffle", "backbone.stages.xif4_5.shuffle", "backbone.stages.xif4_7.shuffle"]
    assert stages.xif4_2.pwl.conv.groups == 2 and stages.xif4_2.pw is None
    assert stages.xif2_0.pw.conv.out_channels == 48 and stages.xif2_0.dw.conv.stride == (2, 2)
    assert model(torch.zeros(1, 3, 224, 224)).shape == (1, 1000)


@pytest.mark.parametrize("factory", [repvgg.build_a0, repvgg.build_b1g4], ids=["a0", "b1g4"])
def test_repvgg_fused_form_equals_training_form(factory):
    with torch.random.fork_rng():
        torch.manual_seed(5)
        model = randomize_bn_stats(factory(), seed=5)
    fused = copy.deepcopy(model).switch_to_deploy()
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = model(x), fused(x)
    assert torch.max(torch.abs(want - got)) <= FP32_TOL * max(1.0, float(torch.max(torch.abs(want))))


@pytest.mark.parametrize("channels_last_io", [False, True], ids=["nchw_io", "nhwc_io"])
@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_parity_and_transposes(name, channels_last_io):
    result = _converted(name, channels_last_io)  # asserts fp32 parity on the sample and 2 random inputs
    expected = EXAMPLES[name][3 if channels_last_io else 2]
    assert result.transpose_count == expected, result.transposes
    shuffles = [o for o in result.keras_model.operations if type(o).__name__ == "Transpose"
                and list(o.axes) == SHUFFLE_AXES]
    assert len(shuffles) == (3 if name == "fbnet_a" else 0)
    io_moves = result.transpose_count - len(shuffles)  # at most one per input and per output
    assert io_moves <= (0 if channels_last_io else len(result.input_layouts) + len(result.output_layouts))


@pytest.mark.parametrize("channels_last_io", [False, True], ids=["nchw_io", "nhwc_io"])
@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_inference_conversion_moves_data_only_at_the_io(name, channels_last_io):
    """fold_bn: BatchNorm folded, branches merged, FBNet-A's shuffles absorbed into the weights:
    no Transpose with channels-last I/O, at most the input's with PyTorch-layout I/O."""
    result = assert_converts(_model(name), _sample(name), channels_last_io=channels_last_io, fold_bn=True)
    assert result.transpose_count == (0 if channels_last_io else EXAMPLES[name][2] - (3 if name == "fbnet_a" else 0))
    assert not [layer for layer in result.keras_model.layers if "BatchNorm" in type(layer).__name__]


@pytest.mark.slow
@pytest.mark.parametrize("channels_last_io", [False, True], ids=["nchw_io", "nhwc_io"])
def test_fbnet_a_at_224(channels_last_io):
    model = _model("fbnet_a")
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    result = assert_converts(model, x, channels_last_io=channels_last_io, n_random=1)
    assert result.transpose_count == EXAMPLES["fbnet_a"][3 if channels_last_io else 2]


def test_keras_files_reload_in_fresh_process_with_safe_mode(tmp_path):
    names = ["repvit_kws", "repvgg_a0", "repvgg_a0_deploy", "fbnet_a"]
    expected = {}
    for name in names:
        result = _converted(name, name == "fbnet_a")  # FBNet-A with NHWC I/O, the others NCHW
        result.keras_model.save(tmp_path / f"{name}.keras")
        x = np.random.default_rng(1).standard_normal((2, *EXAMPLES[name][1][1:])).astype(np.float32)
        with torch.no_grad():
            expected[name] = _model(name)(torch.from_numpy(x)).numpy()
        np.save(tmp_path / f"{name}_x.npy", np.transpose(x, result.input_layouts[0].perm))
    script = (
        "import sys, numpy as np, tracer, keras\n"
        "d = sys.argv[1]\n"
        "for n in sys.argv[2:]:\n"
        "    m = keras.models.load_model(f'{d}/{n}.keras', safe_mode=True)\n"
        "    np.save(f'{d}/{n}_y.npy', np.asarray(m(np.load(f'{d}/{n}_x.npy'))))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path), *names], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in names:
        got, want = np.load(tmp_path / f"{name}_y.npy"), expected[name]
        assert got.shape == want.shape
        assert np.max(np.abs(got - want)) <= FP32_TOL * max(1.0, float(np.max(np.abs(want)))), name


def _bn_count(model: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _relu_gate_flips(model: nn.Module, result, x: np.ndarray) -> list[str]:
    """ReLUs whose gate (input > 0) differs between Keras (fp32) and PyTorch (fp64), training mode.

    A ReLU input within fp32 rounding of 0 may open the gate in one framework and not in the other
    (their convolutions sum in different orders); training-mode BatchNorm then spreads that one
    element's gradient over its whole channel upstream, and no fp32 tolerance can hold. Gradient
    parity is only defined where the gates agree.
    """
    relus = [n for n in ordered(result.graph) if isinstance(n.module, nn.ReLU)]  # fused ones are gone
    if not relus:
        return []
    probe = keras.Model(result.keras_model.inputs, [result.node_tensors[n.inputs[0]] for n in relus])
    saved = result.keras_model.get_weights()  # a training call moves the BatchNorm statistics
    got = probe(np.transpose(x, result.input_layouts[0].perm), training=True)
    result.keras_model.set_weights(saved)
    twin, want = copy.deepcopy(model).double().train(), {}
    for n in relus:
        twin.get_submodule(n.module_path).register_forward_hook(
            lambda _, i, __, path=n.module_path: want.__setitem__(path, i[0].detach().numpy()))
    twin(torch.from_numpy(x).double())
    perms = [op(result.graph, n.inputs[0]).layout.perm for n in relus]
    return [f"{n.module_path}: {int(np.sum((np.transpose(want[n.module_path], p) > 0) != (np.asarray(k) > 0)))}"
            for n, k, p in zip(relus, got, perms)
            if np.any((np.transpose(want[n.module_path], p) > 0) != (np.asarray(k) > 0))]


@pytest.mark.parametrize("name", ["repvit_kws", "repvgg_a0"])
def test_gradient_parity_training_mode(name):
    """Training-mode BatchNorm: input and parameter gradients, one SGD step, moving statistics."""
    model, result = _model(name), _converted(name, False)
    shape = (2, *EXAMPLES[name][1][1:])
    batch = np.random.default_rng(0).standard_normal(shape).astype(np.float32)  # check_gradients' draw (seed 0)
    assert not _relu_gate_flips(model, result, batch), "ReLU gates differ: the gradient is not comparable"
    report = check_gradients(model, result, [np.zeros(shape, np.float32)], batch=2, seed=0)
    assert report.ok, report.summary()
    trainable = sorted(k for k, p in model.named_parameters() if p.requires_grad)
    assert sorted(d.name for d in report.params) == trainable
    assert len(report.steps) == len(trainable) and all(d.ok for d in report.steps)
    assert report.inputs and all(d.ok for d in report.inputs)
    means = [d for d in report.bn_stats if "running_mean" in d.name]
    assert len(means) == _bn_count(model) and all(d.ok for d in means)
    # moving variance: PyTorch keeps the unbiased batch variance, Keras the biased one; where that
    # exceeds the tolerance it is named with its exact factor (report.ok holds the rest to 1e-5)
    assert 0 < len(report.known_differences) <= _bn_count(model)
    assert all(".running_var:" in k and "n/(n-1)" in k for k in report.known_differences)
