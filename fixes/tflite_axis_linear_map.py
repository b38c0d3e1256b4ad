"""AxisLinearMap (exact linear/bilinear/trilinear resizing) as transpose + matmul, for the exported
copy of the model only.

Works around: the TensorFlow 2.21 TFLite converter lowers the layer's einsum
(``"zb,abcd->azcd"``) on a tensor with a dynamic batch into RESHAPE/BATCH_MATMUL ops whose
static shapes overflow, and the ai-edge-litert 2.3 interpreter refuses the file ("BytesRequired
number of elements overflowed. Tensor 13 is invalidly specified in schema"). Moving the axis
last, multiplying by the constant (in, out) matrix and moving the axis back computes the same
sums with TRANSPOSE and FULLY_CONNECTED/BATCH_MATMUL. The Keras model keeps its einsum layer;
delete this fix when einsum with a dynamic batch converts correctly.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
from keras import ops

from tracer.emitter.layers import AxisLinearMap


def axis_linear_map_matmul(operation: Any) -> Callable | None:
    """Export fix: replace an AxisLinearMap layer with transpose + matmul by its matrix."""
    if not isinstance(operation, AxisLinearMap):
        return None
    matrix_t = np.ascontiguousarray(np.asarray(operation.matrix.numpy(), np.float32).T)  # (in, out)
    axis = operation.axis

    def resize_axis(x: Any) -> Any:
        rank = len(x.shape)
        a = axis % rank
        if a == rank - 1:
            return ops.matmul(x, matrix_t)
        order = [i for i in range(rank) if i != a] + [a]
        y = ops.matmul(ops.transpose(x, order), matrix_t)
        return ops.transpose(y, [int(i) for i in np.argsort(order)])

    return resize_axis
