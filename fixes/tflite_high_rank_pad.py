"""Constant padding of 6-D and higher tensors as 3-D pads between reshapes, for the exported copy
of the model only.

Works around: the TensorFlow 2.21 TFLite converter has builtin PAD/PADV2 only up to 5-D; a 6-D
``tf.PadV2`` (e.g. from the zero-interleaving ``spread`` of a strided, dilated transposed
convolution in fixes/strided_dilated_conv.py) converts only as a Select TF ("Flex") op. Padding
one axis at a time is the same result: the tensor is reshaped to (rows before the axis, axis,
everything after), padded on the middle axis and reshaped back. Only values move, no arithmetic,
so the result is bit-identical. The Keras model keeps its ``keras.ops.pad``; delete this fix when
LiteRT pads tensors of any rank.
"""
from __future__ import annotations

import math
from typing import Any, Callable

from keras import ops

MAX_PAD_RANK = 5  # TFLite PAD / PADV2


def high_rank_pad_as_3d(operation: Any) -> Callable | None:
    """Export fix: a constant-mode ``keras.ops.pad`` of rank > 5 -> one 3-D pad per padded axis."""
    if type(operation).__name__ != "Pad" or not type(operation).__module__.startswith("keras."):
        return None
    pads = [tuple(int(v) for v in p) for p in operation.pad_width]
    if operation.mode != "constant" or len(pads) <= MAX_PAD_RANK:
        return None

    def pad(x: Any, constant_values: Any = None) -> Any:
        value = 0.0 if constant_values is None else constant_values
        if pads[0] != (0, 0) or any(d is None for d in x.shape[1:]):
            raise ValueError(f"{operation.name}: high-rank padding needs static non-batch axes and no batch padding")
        for axis, (before, after) in enumerate(pads):
            if before == 0 and after == 0:
                continue
            shape = list(x.shape)
            tail = math.prod(shape[axis + 1:])
            y = ops.reshape(x, (-1, shape[axis], tail))
            y = ops.pad(y, [(0, 0), (before, after), (0, 0)], constant_values=value)
            shape[axis] += before + after
            x = ops.reshape(y, (-1, *shape[1:]))
        return x

    return pad
