"""Dilated transposed convolutions (stride 1) as ordinary convolutions, for the exported copy of
the model only.

Works around: TFLite's TRANSPOSE_CONV has no dilation, so the TensorFlow 2.21 converter keeps a
dilated ``Conv{1,2,3}DTranspose`` as ``tf.Conv2DBackpropInput``/``Conv3DBackpropInputV2``, a
Select TF ("Flex") op. (Keras refuses stride > 1 with dilation > 1; fixes/strided_dilated_conv.py
turns those into stride-1 ones on a spread input, which this fix then handles.)

A stride-1 transposed convolution is the convolution of the input padded by d*(k-1) on each
side with the kernel flipped in space and its in/out axes swapped: the same products and sums
(in another order, so fp32 results agree to rounding). In 3-D the dilation goes into the kernel
(see fixes/tflite_conv3d.py). The Keras model keeps its
ConvTranspose layer; delete this fix when TRANSPOSE_CONV supports dilation.
"""
from __future__ import annotations

from typing import Any, Callable

import keras
import numpy as np
from keras import ops

from tracer.fixes.tflite_conv3d import dilate_kernel

_TRANSPOSED = (keras.layers.Conv1DTranspose, keras.layers.Conv2DTranspose, keras.layers.Conv3DTranspose)


def dilated_conv_transpose_as_conv(operation: Any) -> Callable | None:
    """Export fix: a stride-1, dilated, 'valid' ConvTranspose layer -> pad + convolution."""
    if not isinstance(operation, _TRANSPOSED) or all(d == 1 for d in operation.dilation_rate):
        return None
    if any(s != 1 for s in operation.strides) or operation.padding != "valid" \
            or operation.data_format != "channels_last" or any(operation.output_padding or ()):
        return None
    kernel = np.asarray(operation.kernel.numpy())  # (*k, out, in)
    n = kernel.ndim - 2
    flipped = np.ascontiguousarray(np.swapaxes(np.flip(kernel, axis=tuple(range(n))), -1, -2))  # (*k, in, out)
    bias = np.asarray(operation.bias.numpy()) if operation.use_bias else None
    dilation = tuple(int(d) for d in operation.dilation_rate)
    pads = [(0, 0), *[(d * (k - 1),) * 2 for d, k in zip(dilation, kernel.shape[:n])], (0, 0)]
    activation = operation.activation

    if n == 3:  # 5-D space-to-batch (how TF dilates) has no builtin: see fixes/tflite_conv3d.py
        flipped, dilation = dilate_kernel(flipped, dilation), (1, 1, 1)

    def conv(x: Any) -> Any:
        y = ops.conv(ops.pad(x, pads), flipped, strides=1, padding="valid", dilation_rate=dilation)
        return activation(y if bias is None else ops.add(y, bias))

    return conv
