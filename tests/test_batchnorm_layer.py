"""emitter/batchnorm.py: BatchNormalization on TensorFlow's fused kernel at inference.

Checked: parity of converted conv-BN-ReLU models, the FusedBatchNormV3 op in the inference graph
(so a fall-back to Keras' unfused ops fails here), ``.keras`` save/load in safe mode, and that
training (outputs, moving statistics, gradients) is exactly Keras' own BatchNormalization.
"""
from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
import torch
import torch.nn as nn

import tracer  # noqa: F401  (registers tracer's layers for load_model)
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
    result = assert_converts(randomize_bn(ConvBnRelu(affine=affine)), torch.randn(2, C_IN, 9, 9),
                             channels_last_io=channels_last_io)
    (layer,) = [lay for lay in result.keras_model.layers if isinstance(lay, keras.layers.BatchNormalization)]
    assert type(layer) is BatchNormalization and type(layer).__name__ == "BatchNormalization"
    ops = graph_ops(result.keras_model)
    assert ops.count("FusedBatchNormV3") == 1, sorted(set(ops))
    assert "Rsqrt" not in ops, sorted(set(ops))  # what tf.nn.batch_normalization is made of


def test_rank3_batchnorm1d_keeps_keras_path_and_parity():
    result = assert_converts(randomize_bn(ConvBnRelu(n=1)), torch.randn(2, C_IN, 11))
    assert "FusedBatchNormV3" not in graph_ops(result.keras_model)


def test_keras_file_loads_in_safe_mode(tmp_path):
    model = randomize_bn(ConvBnRelu())
    x = torch.randn(2, C_IN, 9, 9)
    result = assert_converts(model, x)
    path = tmp_path / "m.keras"
    result.keras_model.save(path)
    loaded = keras.models.load_model(path, safe_mode=True)
    assert sum(type(lay) is BatchNormalization for lay in loaded.layers) == 1
    xk = keras_input(result, x)
    np.testing.assert_array_equal(np.asarray(loaded(xk)), np.asarray(result.keras_model(xk)))
    assert "FusedBatchNormV3" in graph_ops(loaded)


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


@pytest.mark.parametrize("kw", [{"momentum": 0.7, "epsilon": 1e-5}, {"center": False, "scale": False}],
                         ids=["affine", "no_affine"])
def test_training_call_is_keras_batchnorm(kw):
    ours, plain = _pair(**kw)
    x = tf.constant(np.random.default_rng(1).normal(size=(4, 5, 6, C)).astype(np.float32))
    for _ in range(2):
        np.testing.assert_array_equal(np.asarray(ours(x, training=True)), np.asarray(plain(x, training=True)))
    for a, b in zip(ours.weights, plain.weights):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=a.name)
    assert not np.allclose(np.asarray(ours.moving_mean), np.asarray(_pair(**kw)[0].moving_mean))


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
    result = assert_converts(randomize_bn(DepthwiseThenBn(8)), torch.randn(1, 8, hw, hw))
    layers = [lay for lay in result.keras_model.layers if isinstance(lay, BatchNormalization)]
    assert [lay.fused for lay in layers] == [bool(fused)] * 2
    assert graph_ops(result.keras_model).count("FusedBatchNormV3") == fused


def test_unfused_flag_survives_save_and_load(tmp_path):
    result = assert_converts(randomize_bn(DepthwiseThenBn(4)), torch.randn(1, 4, 5, 5))
    path = tmp_path / "m.keras"
    result.keras_model.save(path)
    loaded = keras.models.load_model(path, safe_mode=True)
    assert [lay.fused for lay in loaded.layers if isinstance(lay, BatchNormalization)] == [False, False]
