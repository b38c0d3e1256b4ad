"""emitter/batchnorm.py: BatchNormalization on TensorFlow's fused kernel at inference.

Checked: parity of converted conv-BN-ReLU models, the FusedBatchNormV3 op in the inference graph
(so a fall-back to Keras' unfused ops fails here), training-mode batch moments as close to float64
as PyTorch's, and that a saved ``.keras`` is Keras' own BatchNormalization: it loads and computes
the same in a process where tracer and torch cannot be imported.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile

import keras
import numpy as np
import pytest
import tensorflow as tf
import torch
import torch.nn as nn

from tracer.emitter.batchnorm import BatchNormalization
from tests.helpers import FP32_TOL, assert_converts, randomize_bn

C_IN, C = 3, 8


class ConvBnRelu(nn.Module):
    def __init__(self, n: int = 2, affine: bool = True):
        super().__init__()
        torch.manual_seed(0)
        conv, bn = {1: (nn.Conv1d, nn.BatchNorm1d), 2: (nn.Conv2d, nn.BatchNorm2d)}[n]
        self.conv, self.bn = conv(C_IN, C, 3, padding=1, bias=False), bn(C, affine=affine)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


def graph_ops(keras_model: keras.Model) -> list[str]:
    """Op types of the inference ``tf.function`` graph, as TensorFlow runs it."""
    spec = [tf.TensorSpec(t.shape, t.dtype) for t in keras_model.inputs]
    fn = tf.function(lambda *t: keras_model(list(t) if len(t) > 1 else t[0], training=False))
    return [op.type for op in fn.get_concrete_function(*spec).graph.get_operations()]


def keras_input(result, x: torch.Tensor) -> np.ndarray:
    shape = tuple(result.keras_model.inputs[0].shape[1:])
    return x.numpy() if shape == tuple(x.shape[1:]) else np.moveaxis(x.numpy(), 1, -1)


def close(a: np.ndarray, b: np.ndarray) -> bool:
    return float(np.abs(a - b).max()) <= FP32_TOL * max(1.0, float(np.abs(b).max()))


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
@pytest.mark.parametrize("channels_last_io", [False, True], ids=["nchw_io", "nhwc_io"])
def test_conv_bn_relu_parity_and_fused_kernel(affine, channels_last_io):
    torch.manual_seed(0)
    result = assert_converts(randomize_bn(ConvBnRelu(affine=affine)), torch.randn(2, C_IN, 9, 9),
                             channels_last_io=channels_last_io)
    (layer,) = [lay for lay in result.keras_model.layers if isinstance(lay, keras.layers.BatchNormalization)]
    assert type(layer) is BatchNormalization and type(layer).__name__ == "BatchNormalization"
    ops = graph_ops(result.keras_model)
    assert ops.count("FusedBatchNormV3") == 1, sorted(set(ops))
    assert "Rsqrt" not in ops, sorted(set(ops))  # what tf.nn.batch_normalization is made of


def test_rank3_batchnorm1d_keeps_keras_path_and_parity():
    torch.manual_seed(0)
    result = assert_converts(randomize_bn(ConvBnRelu(n=1)), torch.randn(2, C_IN, 11))
    assert "FusedBatchNormV3" not in graph_ops(result.keras_model)


def saved_layers(path) -> list[dict]:
    return json.loads(zipfile.ZipFile(path).read("config.json"))["config"]["layers"]


def test_keras_file_is_keras_own_batchnorm(tmp_path):
    """Saved with Keras' own name and config (no ``fused``); loaded, the plain Keras layer computes the same."""
    torch.manual_seed(0)
    model = randomize_bn(ConvBnRelu())
    x = torch.randn(2, C_IN, 9, 9)
    result = assert_converts(model, x)
    path = tmp_path / "m.keras"
    result.keras_model.save(path)
    (bn,) = [lay for lay in saved_layers(path) if lay["class_name"] == "BatchNormalization"]
    assert (bn["module"], bn["registered_name"]) == ("keras.layers", None) and "fused" not in bn["config"]
    assert set(bn["config"]) == set(keras.layers.BatchNormalization().get_config())
    loaded = keras.models.load_model(path, safe_mode=True)
    assert [type(lay) for lay in loaded.layers if isinstance(lay, keras.layers.BatchNormalization)] == \
        [keras.layers.BatchNormalization]
    xk = keras_input(result, x)
    assert close(np.asarray(loaded(xk)), np.asarray(result.keras_model(xk)))
    for a, b in zip(loaded.weights, result.keras_model.weights):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# The receiving side: Keras and TensorFlow only. `tracer` and `torch` are made unimportable before
# anything else runs, and the repository is not on the path.
LOAD_ELSEWHERE = """
import importlib.abc, sys

class NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("tracer", "torch"):
            raise ModuleNotFoundError(f"No module named {name!r} (not installed here)")
        return None

sys.meta_path.insert(0, NotInstalled())
import numpy as np, keras
for name in sys.argv[1:]:
    model = keras.models.load_model(name + ".keras", safe_mode=True)
    np.save(name + "_y.npy", np.asarray(model(np.load(name + "_x.npy"))))
    print(name, sorted({type(lay).__module__ for lay in model.layers}))
assert not [m for m in sys.modules if m.partition(".")[0] in ("tracer", "torch")]
"""


def test_keras_file_loads_and_matches_without_tracer_and_torch(tmp_path):
    models = {"conv_bn_relu": (ConvBnRelu(), (2, C_IN, 9, 9)), "dw_bn": (DepthwiseThenBn(8), (2, 8, 64, 64))}
    want = {}
    for name, (model, shape) in models.items():
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(3))
        result = assert_converts(randomize_bn(model), x)
        result.keras_model.save(tmp_path / f"{name}.keras")
        xk = keras_input(result, x)
        np.save(tmp_path / f"{name}_x.npy", xk)
        with torch.no_grad():
            want[name] = (model(x).numpy(), np.asarray(result.keras_model(xk)))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    proc = subprocess.run([sys.executable, "-I", "-c", LOAD_ELSEWHERE, *models], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "tracer" not in proc.stdout, proc.stdout
    for name, (torch_y, keras_y) in want.items():
        got = np.load(tmp_path / f"{name}_y.npy")
        got = got if got.shape == torch_y.shape else np.moveaxis(got, -1, 1)
        assert close(got, torch_y), name
        assert close(got, keras_y if keras_y.shape == got.shape else np.moveaxis(keras_y, -1, 1)), name


def _pair(trainable: bool = True, **kw) -> tuple[keras.layers.Layer, keras.layers.Layer]:
    """Ours and Keras' BatchNormalization, built on NHWC with the same random weights."""
    rng = np.random.default_rng(0)
    ours, plain = BatchNormalization(**kw), keras.layers.BatchNormalization(**kw)
    for layer in (ours, plain):
        layer.build((None, 5, 6, C))
    weights = [rng.normal(size=C).astype(np.float32) for _ in ours.weights]
    weights[-1] = np.abs(weights[-1]) + 0.5  # the moving variance
    for layer in (ours, plain):
        layer.set_weights(weights)
        layer.trainable = trainable
    return ours, plain


def _moments64(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x64 = x.astype(np.float64)
    mean = x64.mean((0, 1, 2))
    return mean, ((x64 - mean) ** 2).mean((0, 1, 2))


@pytest.mark.parametrize("kw", [{"momentum": 0.7, "epsilon": 1e-5}, {"center": False, "scale": False}],
                         ids=["affine", "no_affine"])
def test_training_call_is_keras_batchnorm_with_exact_moments(kw):
    """Training: Keras' arithmetic and moving-statistics update, on batch moments rounded once from float64."""
    ours, plain = _pair(**kw)
    x = np.random.default_rng(1).normal(size=(4, 5, 6, C)).astype(np.float32)
    mean, var = _moments64(x)
    start = np.asarray(ours.moving_mean), np.asarray(ours.moving_variance)
    y = np.asarray(ours(tf.constant(x), training=True))
    assert close(y, np.asarray(plain(tf.constant(x), training=True)))
    gamma = np.asarray(ours.gamma) if ours.scale else 1.0
    beta = np.asarray(ours.beta) if ours.center else 0.0
    assert close(y, (x - mean) / np.sqrt(var + ours.epsilon) * gamma + beta)
    m = ours.momentum
    np.testing.assert_allclose(np.asarray(ours.moving_mean), m * start[0] + (1 - m) * mean, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(ours.moving_variance), m * start[1] + (1 - m) * var, rtol=1e-6)


def test_batch_variance_is_as_close_to_float64_as_pytorch():
    """A post-ReLU map, 16 x 32 x 32 values per channel: TensorFlow's fp32 accumulation is ~3e-5 off
    (relative), PyTorch's ~4e-8; ours is rounded once from float64 (if TensorFlow ever accumulates
    pairwise, the second assertion fails and BatchNormalization._moments can go)."""
    x = np.maximum(np.random.default_rng(4).normal(0.3, 1.0, size=(16, 32, 32, 16)), 0).astype(np.float32)
    _, var64 = _moments64(x)
    ours, plain = _pair()
    _, var_ours = ours._moments(tf.constant(x), None)
    _, var_keras = plain._moments(tf.constant(x), None)
    var_torch = torch.from_numpy(x).var((0, 1, 2), unbiased=False).double().numpy()
    error = {k: float(np.max(np.abs(np.asarray(v, np.float64) - var64) / var64))
             for k, v in (("ours", var_ours), ("keras", var_keras), ("torch", var_torch))}
    assert error["ours"] <= 2 ** -24 and error["torch"] <= 2 ** -22, error  # rounded once; PyTorch within 4 ulp
    assert error["keras"] > 1e-6, error


@pytest.mark.parametrize("trainable", [True, False], ids=["inference", "frozen_in_training"])
def test_moving_statistics_path_matches_keras_with_gradients(trainable):
    """training=False, or training=True on a frozen layer: moving statistics, fused, same gradients."""
    ours, plain = _pair(trainable=trainable, epsilon=1e-3)
    x = tf.constant(np.random.default_rng(2).normal(size=(2, 5, 6, C)).astype(np.float32))
    outs, grads = [], []
    for layer in (ours, plain):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=not trainable)
            loss = tf.reduce_sum(y * y)
        outs.append(np.asarray(y))
        grads.append([np.asarray(g) for g in tape.gradient(loss, [x, layer.gamma, layer.beta])])
    assert close(outs[0], outs[1])
    for g_ours, g_plain in zip(*grads):
        assert close(g_ours, g_plain)
    for a, b in zip(ours.weights, plain.weights):  # statistics untouched
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_mask_of_wrong_rank_is_refused_like_keras():
    ours, _ = _pair()
    with pytest.raises(ValueError, match="one dimension less"):
        ours(tf.zeros((1, 5, 6, C)), mask=tf.ones((1, 5)))


class DepthwiseThenBn(nn.Module):
    """BN after a depthwise conv (no grappler fusion) and a standalone BN on the input."""

    def __init__(self, c: int):
        super().__init__()
        self.bn_in, self.dw, self.bn = nn.BatchNorm2d(c), nn.Conv2d(c, c, 3, padding=1, groups=c), nn.BatchNorm2d(c)

    def forward(self, x):
        return self.bn(self.dw(self.bn_in(x)))


@pytest.mark.parametrize("hw, fused", [(6, 0), (64, 2)], ids=["small_map_unfused", "large_map_fused"])
def test_unfusable_batchnorm_is_fused_only_on_large_maps(hw, fused):
    """8 x 6 x 6 maps: Keras' arithmetic is faster; 8 x 64 x 64 (>= 32768 elements): the fused kernel."""
    torch.manual_seed(0)
    result = assert_converts(randomize_bn(DepthwiseThenBn(8)), torch.randn(1, 8, hw, hw))
    layers = [lay for lay in result.keras_model.layers if isinstance(lay, BatchNormalization)]
    assert [lay.fused for lay in layers] == [bool(fused)] * 2
    assert graph_ops(result.keras_model).count("FusedBatchNormV3") == fused


def test_unfused_layer_saves_as_keras_batchnorm(tmp_path):
    """``fused`` belongs to the model in memory: the file holds Keras' layer either way."""
    torch.manual_seed(0)
    result = assert_converts(randomize_bn(DepthwiseThenBn(4)), torch.randn(1, 4, 5, 5))
    path = tmp_path / "m.keras"
    result.keras_model.save(path)
    saved = [lay for lay in saved_layers(path) if lay["class_name"] == "BatchNormalization"]
    assert len(saved) == 2 and all(lay["module"] == "keras.layers" and "fused" not in lay["config"] for lay in saved)
