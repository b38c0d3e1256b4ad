"""BatchNormalization that runs TensorFlow's fused kernel at inference.

Keras 3's ``BatchNormalization`` normalizes through ``keras.ops.batch_normalization``, which on
the TensorFlow backend is ``tf.nn.batch_normalization``: about seven elementwise ops, two passes
over the activations, and nothing grappler's remapper can fuse with the convolution before it.
``FusedBatchNormV3`` at inference is one op, and the remapper folds ``Conv2D + FusedBatchNormV3
(+ Relu)`` into one ``_FusedConv2D`` (oneDNN: ``_MklNativePadWithFusedConv2D``): at batch 1 on two
CPU threads the default (trainable) conversion of MobileNetV2 ran about 1.2x faster, ResNet-18
a few percent.

The fused kernel is used only where it computes exactly what Keras does: TensorFlow backend,
inference (Keras' own test: not ``training and self.trainable``), a 4-D input normalized over its
last axis, float32 inputs and compute dtype. Everything else (training, with its moving-statistics
update; other ranks, axes, dtypes and backends) is Keras' ``BatchNormalization.call`` unchanged.
The class keeps Keras' name (registered as ``tracer>BatchNormalization``), so code that looks
layers up by class name, or by ``isinstance`` of Keras' class, still finds it.

Workaround for Keras 3.15 / TensorFlow 2.21: delete this layer if ``keras.ops.batch_normalization``
ever lowers to ``tf.nn.fused_batch_norm`` itself.
"""
from __future__ import annotations

import math
from typing import Any

import keras

from tracer.emitter.layers import PACKAGE


def worth_fusing(after_conv: bool, sample_shape: tuple) -> bool:
    """Whether the fused kernel is the faster inference: always after a (non-depthwise) conv that
    grappler fuses it into, else only on large maps (``sample_shape``: one sample, no batch axis)."""
    return after_conv or math.prod(sample_shape) >= STANDALONE_MIN_ELEMENTS

FUSED_RANK = 4  # 5-D (NDHWC) works too, but no remapper fusion with Conv3D: measured only ~1-4% faster
# A BatchNorm that grappler cannot fuse into a conv (after a depthwise conv, a sum, the input) runs
# faster fused only on large maps: per 20 calls at batch 1, 2 threads, 10k elements took 94 us fused
# vs 47 us unfused, 75k elements 187 us vs 407 us (TF 2.21, oneDNN).
STANDALONE_MIN_ELEMENTS = 32768


@keras.saving.register_keras_serializable(package=PACKAGE)
class BatchNormalization(keras.layers.BatchNormalization):
    """``keras.layers.BatchNormalization`` whose inference on TensorFlow is ``FusedBatchNormV3``.

    ``fused=False`` keeps Keras' own inference arithmetic (the converter sets it where that is faster).
    """

    def __init__(self, *args: Any, fused: bool = True, **kw: Any):
        super().__init__(*args, **kw)
        self.fused = bool(fused)

    def get_config(self) -> dict:
        return {**super().get_config(), "fused": self.fused}

    def call(self, inputs: Any, training: bool | None = None, mask: Any = None) -> Any:
        # Keras ignores the mask at inference, but still rejects one of the wrong rank: its call does that.
        bad_mask = mask is not None and len(mask.shape) != len(inputs.shape) - 1
        if (training and self.trainable) or bad_mask or not self._fusable(inputs):
            return super().call(inputs, training=training, mask=mask)
        return self._fused_inference(inputs)

    def _fusable(self, inputs: Any) -> bool:
        rank = len(inputs.shape)
        return (self.fused and keras.backend.backend() == "tensorflow" and rank == FUSED_RANK
                and self.axis in (-1, rank - 1)
                and keras.backend.standardize_dtype(inputs.dtype) == "float32"
                and self.compute_dtype == "float32")

    def _fused_inference(self, inputs: Any) -> Any:
        import tensorflow as tf

        scale = self.gamma if self.scale else tf.ones_like(self.moving_mean)
        offset = self.beta if self.center else tf.zeros_like(self.moving_mean)
        y, _, _ = tf.compat.v1.nn.fused_batch_norm(
            inputs, scale, offset,
            mean=self.moving_mean, variance=self.moving_variance, epsilon=self.epsilon,
            data_format="NHWC", is_training=False)
        return y
