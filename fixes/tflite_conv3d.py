"""Grouped and dilated 3-D convolutions as LiteRT can run them, for the exported copy of the
model only.

Works around two limitations (TensorFlow 2.21 converter, ai-edge-litert 2.3):

* grouped: TFLite's CONV_3D has no groups; the converter accepts a grouped Keras Conv3D but the
  interpreter refuses it ("conv3d.cc: input->dims->data[4] != filter->dims->data[3]"). It becomes
  one convolution per group on that group's channel slice, concatenated in group order, which
  is PyTorch's channel order. (Grouped CONV_2D runs fine.)
* dilated: TensorFlow lowers a dilated 3-D convolution to SpaceToBatchND / Conv3D /
  BatchToSpaceND, and 5-D space-to-batch has no builtin, so it stays a Select TF ("Flex") op.
  The dilation goes into the kernel instead (d - 1 zeros between taps): the same products plus
  exact zeros (only inf/NaN inputs under a zero tap would differ), at ((d(k-1)+1)/k)^3 the compute.

The Keras model keeps its Conv3D layer; delete each part when LiteRT supports it.
"""
from __future__ import annotations

from typing import Any, Callable

import keras
import numpy as np
from keras import ops


def dilate_kernel(kernel: np.ndarray, dilation: tuple[int, ...]) -> np.ndarray:
    """(*k, in, out) -> (*(d*(k-1)+1), in, out) with zeros between the taps."""
    n = len(dilation)
    size = [d * (k - 1) + 1 for d, k in zip(dilation, kernel.shape[:n])]
    out = np.zeros((*size, *kernel.shape[n:]), kernel.dtype)
    out[tuple(slice(None, None, d) for d in dilation)] = kernel
    return out


def conv3d_for_litert(operation: Any) -> Callable | None:
    """Export fix: a grouped and/or dilated Conv3D layer -> per-group undilated convolutions."""
    if not isinstance(operation, keras.layers.Conv3D) or isinstance(operation, keras.layers.Conv3DTranspose):
        return None
    dilation = tuple(int(d) for d in operation.dilation_rate)
    groups = int(operation.groups)
    if (groups == 1 and all(d == 1 for d in dilation)) or operation.data_format != "channels_last":
        return None
    kernel = dilate_kernel(np.asarray(operation.kernel.numpy()), dilation)  # (*k, in/groups, out)
    bias = np.asarray(operation.bias.numpy()) if operation.use_bias else None
    strides, padding, activation = operation.strides, operation.padding, operation.activation
    in_per_group, out_per_group = kernel.shape[3], kernel.shape[4] // groups

    def conv(x: Any) -> Any:
        parts = []
        for j in range(groups):
            xj = x if groups == 1 else x[..., j * in_per_group:(j + 1) * in_per_group]
            kj = kernel[..., j * out_per_group:(j + 1) * out_per_group]
            parts.append(ops.conv(xj, np.ascontiguousarray(kj), strides=strides, padding=padding))
        y = parts[0] if groups == 1 else ops.concatenate(parts, axis=-1)
        return activation(y if bias is None else ops.add(y, bias))

    return conv
