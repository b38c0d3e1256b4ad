"""BatchNormalization: TensorFlow's fused kernel at inference, exact batch statistics in training,
saved as Keras' own ``BatchNormalization``.

Inference. Keras 3's ``BatchNormalization`` normalizes through ``keras.ops.batch_normalization``,
which on the TensorFlow backend is ``tf.nn.batch_normalization``: about seven elementwise ops, two
passes over the activations, and nothing grappler's remapper can fuse with the convolution before
it. ``FusedBatchNormV3`` at inference is one op, and the remapper folds ``Conv2D + FusedBatchNormV3
(+ Relu)`` into one ``_FusedConv2D`` (oneDNN: ``_MklNativePadWithFusedConv2D``): at batch 1 on two
CPU threads the default (trainable) conversion of MobileNetV2 ran about 1.2x faster, ResNet-18 a
few percent. The fused kernel is used only where it computes what Keras does: TensorFlow backend,
inference (Keras' own test: not ``training and self.trainable``), a 4-D input normalized over its
last axis, float32 inputs and compute dtype.

Training. ``tf.nn.moments`` is two-pass (mean, then the mean of squared deviations), but TensorFlow
accumulates an fp32 reduction over the batch and spatial axes one element after another: on a
post-ReLU map of 4 x 32 x 32 values per channel its batch variance is 6e-6 off (relative), 3e-5 at
16 x 32 x 32, where PyTorch's (pairwise summation) is 4e-8. Here the batch moments of fp32 inputs
are accumulated in float64 and rounded once to fp32 (the same two-pass form), which is as close as
PyTorch's; everything else in training (the moving-statistics update, gradients) is Keras' own.

Saving. The layer serializes as Keras' own ``keras.layers.BatchNormalization`` with Keras' config
(no ``fused`` key) and the same weights, so a ``.keras`` file loads where tracer is not installed
(``keras.models.load_model(path, safe_mode=True)`` with Keras alone). Loaded, it is the plain Keras
layer: the same inference numbers (to fp32 rounding) on Keras' unfused arithmetic, and Keras' own
training moments. ``model.export()`` (SavedModel) and the TFLite export trace the in-memory layer,
so they keep the fused kernel.

Workarounds for Keras 3.15 / TensorFlow 2.21: delete the fused path if ``keras.ops.batch_normalization``
ever lowers to ``tf.nn.fused_batch_norm`` itself, and ``_moments`` if TensorFlow's reductions
accumulate pairwise. Keras has no public way to save a subclass under its parent's public name:
``_serialize_as_keras_own`` adds this class to the table Keras' serializer reads public names from
(``keras.src.api_export.REGISTERED_OBJS_TO_NAMES``, class -> name only: loading is untouched).
"""
from __future__ import annotations

import math
from typing import Any

import keras

__all__ = ["BatchNormalization", "worth_fusing"]

KERAS_NAME = "keras.layers.BatchNormalization"


def worth_fusing(after_conv: bool, sample_shape: tuple) -> bool:
    """Whether the fused kernel is the faster inference: always after a (non-depthwise) conv that
    grappler fuses it into, else only on large maps (``sample_shape``: one sample, no batch axis)."""
    return after_conv or math.prod(sample_shape) >= STANDALONE_MIN_ELEMENTS


FUSED_RANK = 4  # 5-D (NDHWC) works too, but no remapper fusion with Conv3D: measured only ~1-4% faster
# A BatchNorm that grappler cannot fuse into a conv (after a depthwise conv, a sum, the input) runs
# faster fused only on large maps: per 20 calls at batch 1, 2 threads, 10k elements took 94 us fused
# vs 47 us unfused, 75k elements 187 us vs 407 us (TF 2.21, oneDNN).
STANDALONE_MIN_ELEMENTS = 32768


class BatchNormalization(keras.layers.BatchNormalization):
    """``keras.layers.BatchNormalization`` whose inference on TensorFlow is ``FusedBatchNormV3`` and
    whose training-mode batch moments are accumulated in float64; saved as Keras' own layer.

    ``fused=False`` keeps Keras' own inference arithmetic (the converter sets it where that is faster).
    It is a property of the converted model in memory and is not saved (Keras' config has no such key).
    """

    def __init__(self, *args: Any, fused: bool = True, **kw: Any):
        super().__init__(*args, **kw)
        self.fused = bool(fused)

    def call(self, inputs: Any, training: bool | None = None, mask: Any = None) -> Any:
        # Keras ignores the mask at inference, but still rejects one of the wrong rank: its call does that.
        bad_mask = mask is not None and len(mask.shape) != len(inputs.shape) - 1
        if (training and self.trainable) or bad_mask or not self._fusable(inputs):
            return super().call(inputs, training=training, mask=mask)
        return self._fused_inference(inputs)

    def _moments(self, inputs: Any, mask: Any) -> tuple[Any, Any]:
        """Batch mean and (biased) variance: two-pass, accumulated in float64, rounded once."""
        if mask is not None or self.synchronized or keras.backend.standardize_dtype(inputs.dtype) != "float32":
            return super()._moments(inputs, mask)
        x = keras.ops.cast(inputs, "float64")
        mean = keras.ops.mean(x, axis=self._reduction_axes, keepdims=True)
        variance = keras.ops.mean(keras.ops.square(x - mean), axis=self._reduction_axes)
        mean = keras.ops.squeeze(mean, axis=self._reduction_axes)
        return keras.ops.cast(mean, "float32"), keras.ops.cast(variance, "float32")

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


def _serialize_as_keras_own(cls: type) -> None:
    """Make Keras' serializer write ``cls`` as ``keras.layers.BatchNormalization`` (see the module doc)."""
    from keras.src import api_export

    if api_export.get_symbol_from_name(KERAS_NAME) is not keras.layers.BatchNormalization:
        raise RuntimeError(f"Keras {keras.__version__} does not register {KERAS_NAME} where Keras 3.15 did "
                           "(keras.src.api_export): update tracer/emitter/batchnorm.py")
    api_export.REGISTERED_OBJS_TO_NAMES[cls] = KERAS_NAME


_serialize_as_keras_own(BatchNormalization)
