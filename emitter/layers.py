"""Serializable Keras layers of ours, for what no built-in layer expresses exactly.

Each is written with ``keras.ops`` only, so it runs on any Keras backend, saves in ``.keras``
files and loads with ``safe_mode=True`` after ``import tracer`` (which registers them).
Constant tensors are stored as weights, never inlined into the config.
"""
from __future__ import annotations

import keras
import numpy as np
from keras import ops

PACKAGE = "tracer"
_register = keras.saving.register_keras_serializable(package=PACKAGE)


@_register
class ConstantTensor(keras.layers.Layer):
    """Outputs a stored tensor (a learned token, a constant table). Called on any graph tensor."""

    def __init__(self, shape, value_dtype="float32", trainable_value=False, **kw):
        super().__init__(**kw)
        self.value_shape = tuple(shape)
        self.value_dtype = value_dtype
        self.trainable_value = trainable_value
        self.value = self.add_weight(name="value", shape=self.value_shape, dtype=value_dtype,
                                     initializer="zeros", trainable=trainable_value)

    def call(self, anchor):
        return ops.convert_to_tensor(self.value)

    def compute_output_spec(self, anchor):
        return keras.KerasTensor(self.value_shape, dtype=self.value_dtype)

    def get_config(self):
        return {**super().get_config(), "shape": self.value_shape, "value_dtype": self.value_dtype,
                "trainable_value": self.trainable_value}


_BINARY = {
    "add": ops.add, "subtract": ops.subtract, "multiply": ops.multiply, "divide": ops.divide,
    "power": ops.power, "maximum": ops.maximum, "minimum": ops.minimum,
    "floor_divide": ops.floor_divide, "mod": ops.mod,
}


@_register
class ConstBinary(keras.layers.Layer):
    """``op(x, c)`` or ``op(c, x)`` with a stored constant ``c`` that broadcasts against ``x``."""

    def __init__(self, op, shape, const_first=False, value_dtype="float32", trainable_value=False, **kw):
        super().__init__(**kw)
        if op not in _BINARY:
            raise ValueError(f"ConstBinary: unknown op. Received: op={op!r}")
        self.op, self.const_first = op, const_first
        self.value_shape, self.value_dtype, self.trainable_value = tuple(shape), value_dtype, trainable_value
        self.value = self.add_weight(name="value", shape=self.value_shape, dtype=value_dtype,
                                     initializer="zeros", trainable=trainable_value)

    def call(self, x):
        c = ops.cast(self.value, x.dtype) if self.value_dtype != x.dtype else self.value
        return _BINARY[self.op](c, x) if self.const_first else _BINARY[self.op](x, c)

    def get_config(self):
        return {**super().get_config(), "op": self.op, "shape": self.value_shape,
                "const_first": self.const_first, "value_dtype": self.value_dtype,
                "trainable_value": self.trainable_value}


@_register
class TorchPad(keras.layers.Layer):
    """Padding with PyTorch's modes: constant (any value), reflect, replicate, circular.

    ``pads`` is one ``(before, after)`` pair per axis (axis 0 included, usually ``(0, 0)``).
    """

    def __init__(self, pads, mode="constant", value=0.0, **kw):
        super().__init__(**kw)
        if mode not in ("constant", "reflect", "replicate", "circular"):
            raise ValueError(f"TorchPad: unknown mode. Received: mode={mode!r}")
        self.pads = [tuple(int(v) for v in p) for p in pads]
        self.mode, self.value = mode, float(value)

    def call(self, x):
        if self.mode == "constant":
            return ops.pad(x, self.pads, mode="constant", constant_values=self.value)
        if self.mode == "reflect":
            return ops.pad(x, self.pads, mode="reflect")
        for axis, (before, after) in enumerate(self.pads):
            if before == 0 and after == 0:
                continue
            n = x.shape[axis]
            parts = []
            if before:
                parts.append(_edge(x, axis, 0, 1, before) if self.mode == "replicate"
                             else _take_range(x, axis, n - before, n))
            parts.append(x)
            if after:
                parts.append(_edge(x, axis, n - 1, n, after) if self.mode == "replicate"
                             else _take_range(x, axis, 0, after))
            x = ops.concatenate(parts, axis=axis)
        return x

    def get_config(self):
        return {**super().get_config(), "pads": self.pads, "mode": self.mode, "value": self.value}


def _take_range(x, axis, start, stop):
    index = [slice(None)] * len(x.shape)
    index[axis] = slice(start, stop)
    return x[tuple(index)]


def _edge(x, axis, start, stop, times):
    return ops.repeat(_take_range(x, axis, start, stop), times, axis=axis)


@_register
class StridedSlice(keras.layers.Layer):
    """Basic slicing ``x[start:stop:step, ...]`` with one ``[start, stop, step]`` per axis."""

    def __init__(self, slices, **kw):
        super().__init__(**kw)
        self.slices = [list(s) for s in slices]

    def call(self, x):
        return x[tuple(slice(*s) for s in self.slices)]

    def get_config(self):
        return {**super().get_config(), "slices": self.slices}


@_register
class BinnedReduce(keras.layers.Layer):
    """Max or mean over bins ``[starts[i], ends[i])`` of one axis, one output per bin.

    Rectangular pooling windows are separable, so adaptive pooling of any output size (exact
    when the size does not divide) is one BinnedReduce per spatial axis.
    """

    def __init__(self, axis, starts, ends, mode="mean", **kw):
        super().__init__(**kw)
        if mode not in ("mean", "max"):
            raise ValueError(f"BinnedReduce: unknown mode. Received: mode={mode!r}")
        self.axis, self.mode = int(axis), mode
        self.starts, self.ends = [int(s) for s in starts], [int(e) for e in ends]

    def call(self, x):
        reduce = ops.max if self.mode == "max" else ops.mean
        parts = [reduce(_take_range(x, self.axis, s, e), axis=self.axis, keepdims=True)
                 for s, e in zip(self.starts, self.ends)]
        return parts[0] if len(parts) == 1 else ops.concatenate(parts, axis=self.axis)

    def get_config(self):
        return {**super().get_config(), "axis": self.axis, "starts": self.starts, "ends": self.ends,
                "mode": self.mode}


@_register
class AxisLinearMap(keras.layers.Layer):
    """``y = M @ x`` along one axis, with a stored (out, in) matrix: exact bilinear resizing."""

    def __init__(self, axis, in_size, out_size, **kw):
        super().__init__(**kw)
        self.axis, self.in_size, self.out_size = int(axis), int(in_size), int(out_size)
        self.matrix = self.add_weight(name="matrix", shape=(self.out_size, self.in_size),
                                      initializer="zeros", trainable=False)

    def call(self, x):
        rank = len(x.shape)
        axis = self.axis % rank
        letters = "abcdefghijklmn"[:rank]
        src = letters
        dst = letters[:axis] + "z" + letters[axis + 1:]
        return ops.einsum(f"z{letters[axis]},{src}->{dst}", ops.cast(self.matrix, x.dtype), x)

    def get_config(self):
        return {**super().get_config(), "axis": self.axis, "in_size": self.in_size, "out_size": self.out_size}


@_register
class AxisDense(keras.layers.Layer):
    """A Linear applied along the second-to-last axis: ``y = W @ x + b[:, None]``, W (units, in).

    Token-mixing MLPs (MLP-Mixer, ResMLP, gMLP) apply a Linear to ``x.transpose(1, 2)``; keeping
    ``x`` in its own layout and multiplying from the left computes that without moving any data.
    """

    def __init__(self, units, activation=None, use_bias=True, **kw):
        super().__init__(**kw)
        self.units, self.use_bias = int(units), bool(use_bias)
        self.activation = keras.activations.get(activation)

    def build(self, input_shape):
        self.kernel = self.add_weight(name="kernel", shape=(self.units, int(input_shape[-2])),
                                      initializer="glorot_uniform")
        self.bias = self.add_weight(name="bias", shape=(self.units, 1), initializer="zeros") if self.use_bias else None

    def call(self, x):
        y = ops.matmul(ops.cast(self.kernel, x.dtype), x)
        if self.bias is not None:
            y = y + ops.cast(self.bias, x.dtype)
        return self.activation(y)

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-2], self.units, input_shape[-1])

    def get_config(self):
        return {**super().get_config(), "units": self.units, "use_bias": self.use_bias,
                "activation": keras.activations.serialize(self.activation)}


@_register
class AxisGather(keras.layers.Layer):
    """Gather fixed indices along one axis (nearest resizing with non-integer scales)."""

    def __init__(self, axis, indices, **kw):
        super().__init__(**kw)
        self.axis, self.indices = int(axis), [int(i) for i in indices]

    def call(self, x):
        return ops.take(x, np.asarray(self.indices, dtype="int32"), axis=self.axis)

    def get_config(self):
        return {**super().get_config(), "axis": self.axis, "indices": self.indices}


def set_value(layer: keras.layers.Layer, attr: str, value: np.ndarray) -> None:
    getattr(layer, attr).assign(np.asarray(value, dtype=getattr(layer, attr).dtype))
