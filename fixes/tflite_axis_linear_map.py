"""An EinsumDense that multiplies the second-to-last axis by its kernel (a Linear on transposed
tokens, exact linear resizing along W of an NHWC map), or one with a bias, as matmul, for the
exported copy of the model only.

Works around the TensorFlow 2.21 TFLite converter's einsum lowering: ``"abc,bz->azc"`` becomes
TRANSPOSE, FULLY_CONNECTED, TRANSPOSE where a left matmul by the constant kernel is one
BATCH_MATMUL, and with a bias over a middle axis it does not convert at all ("'tf.Transpose' op
x should be of the same rank with y", at the bias add). Other axes without a bias export as the
einsum (for resizing along H of an NHWC map that is FULLY_CONNECTED between two TRANSPOSE ops,
what moving the axis last would cost too). The Keras model keeps its EinsumDense; delete this fix
when the converter lowers such an einsum to BATCH_MATMUL and converts its bias.
"""
from __future__ import annotations

from typing import Any, Callable

import keras
import numpy as np
from keras import ops

from tracer.emitter.layers import parse_axis_map


def axis_linear_map_matmul(operation: Any) -> Callable | None:
    """Export fix: an EinsumDense of the form "one axis times the kernel" (on the second-to-last axis
    or with a bias) -> matmul (+ bias, activation)."""
    if not isinstance(operation, keras.layers.EinsumDense):
        return None
    axis = parse_axis_map(operation.equation)
    rank = len(operation.equation.split(",")[0])
    if axis is None or (axis != rank - 2 and operation.bias is None):
        return None
    kernel = np.ascontiguousarray(np.asarray(operation.kernel.numpy(), np.float32))  # (in, out)
    bias = None if operation.bias is None else np.asarray(operation.bias.numpy(), np.float32)
    activation = operation.activation

    def multiply_axis(x: Any, **_: Any) -> Any:
        rank = len(x.shape)
        if axis == rank - 1:
            y = ops.matmul(x, kernel)
        elif axis == rank - 2:
            y = ops.matmul(np.ascontiguousarray(kernel.T), x)
        else:
            order = [i for i in range(rank) if i != axis] + [axis]
            y = ops.transpose(ops.matmul(ops.transpose(x, order), kernel), [int(i) for i in np.argsort(order)])
        if bias is not None:  # y - (-b) is y + b exactly; Keras' TF add would take (1, n, 1) for a BiasAdd
            y = ops.subtract(y, -bias.reshape((1,) * (rank - bias.ndim) + bias.shape))
        return y if activation is None else activation(y)

    return multiply_axis
