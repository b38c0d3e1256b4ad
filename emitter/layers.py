"""Built-in Keras for what PyTorch has and Keras lacks as one layer.

Everything here emits Keras built-in layers (``Dense``, ``EinsumDense``) and ``keras.ops`` calls
in the functional graph, so a converted model loads with ``keras.models.load_model(path,
safe_mode=True)`` where only Keras is installed (no torch, no tracer). Constant tensors are
weights of a built-in layer, never inlined into the config; ``trainable`` decides whether they
learn. This module imports Keras and numpy only.
"""
from __future__ import annotations

import collections
from typing import Any, Sequence

import keras
import numpy as np
from keras import ops

PACKAGE = "tracer"  # the package of Keras classes registered by tracer (emitter/batchnorm.py)
_EXACT_INT = 2 ** 24  # integers a float32 weight holds exactly


def unit(anchor: Any) -> Any:
    """A (1, 1) float32 tensor of ones, computed from any graph tensor (constants hang from it).

    Only the shape of one element is read, so it costs nothing; the TFLite converter folds it
    (and the constants made from it) into plain constants."""
    first = ops.take(ops.reshape(anchor, (-1,)), 0)
    return ops.reshape(ops.ones_like(ops.cast(first, "float32")), (1, 1))


def constant(one: Any, value: np.ndarray, name: str, trainable: bool = False) -> Any:
    """``value`` as a graph tensor of its own shape and dtype (float64 -> float32, int64 -> int32).

    The value is the kernel of a built-in ``Dense`` applied to ``one`` (:func:`unit`): ``1 * c``
    is ``c`` exactly, and training updates it like any weight when ``trainable``."""
    value = np.asarray(value)
    dtype = {"float64": "float32", "int64": "int32"}.get(str(value.dtype), str(value.dtype))
    is_float = np.issubdtype(value.dtype, np.floating)
    if not is_float and value.size and np.abs(value.astype(np.int64)).max() >= _EXACT_INT:
        raise NotImplementedError(f"integer constant {name} holds values beyond 2**24, which a float32 "
                                  "weight cannot store exactly")
    layer = keras.layers.Dense(max(value.size, 1), use_bias=False, dtype=dtype if is_float else "float32",
                               trainable=bool(trainable), name=name)
    flat = layer(ops.cast(one, layer.compute_dtype) if is_float else one)
    layer.set_weights([value.reshape(1, -1).astype(layer.kernel.dtype)])
    out = ops.reshape(flat, value.shape)
    return out if is_float else ops.cast(out, dtype)


def safe_add(a: Any, b: Any) -> Any:
    """``a + b`` for two Keras tensors, never broadcast along the wrong axis.

    Works around Keras 3.15 (TensorFlow backend, ``keras/src/backend/tensorflow/numpy.py``
    ``add``): ``keras.ops.add(x1, x2)`` becomes ``tf.nn.bias_add`` whenever ``x2`` squeezes to
    one axis whose size equals ``x1``'s axis 1 or last axis, and takes it as the last axis
    whenever the sizes allow - so ``x + p`` with ``p`` (1, C, 1, 1) on (B, C, H, C) adds ``p``
    along W, and a (B, C, L) + (1, C, 1) add becomes an NCHW BiasAdd that LiteRT cannot convert.
    The operand that cannot squeeze to one axis goes second (addition commutes exactly); when
    both can, ``a - (-b)`` (exact too). Delete when Keras' TF ``add`` checks the axis position.
    """
    order = add_order(tuple(a.shape), tuple(b.shape))
    if order == "negate":
        return ops.subtract(a, ops.negative(b))
    return ops.add(b, a) if order == "swap" else ops.add(a, b)


def add_order(a: tuple, b: tuple) -> str:
    """"keep" when ``add(a, b)`` is safe as written, "swap" for ``add(b, a)``, else "negate".

    Shapes are static (None where unknown: at run time such an axis may be 1)."""
    if _bias_safe(a, b):
        return "keep"
    return "swap" if _bias_safe(b, a) else "negate"


def _bias_safe(x1: tuple, x2: tuple) -> bool:
    """Whether Keras' bias_add shortcut cannot misfire for ``add(x1, x2)`` at any run-time size."""
    if len(x1) <= 1 or sum(1 for d in x2 if d is not None and d > 1) >= 2:
        return True  # never a bias: x1 is a vector, or x2 keeps two axes after squeezing
    if len(x1) == len(x2) == 2 and x1[-1] == x2[-1]:
        return True  # (B, C) + (B, C): a bias on the last axis, the right one
    if any(d is None for d in x2):
        return False  # may squeeze to one axis at run time (batch 1)
    if all(d == 1 for d in x2):
        return True
    # x2 is a fixed bias: right only as a trailing vector over x1's own last axis
    n = max(x2)
    return x2[-1] == n and len(x2) <= len(x1) and x1[-1] == n


def pad(x: Any, pads: Sequence[tuple[int, int]], mode: str = "constant", value: float = 0.0) -> Any:
    """Padding with PyTorch's modes: constant (any value), reflect, replicate, circular.

    ``pads`` is one ``(before, after)`` pair per axis (axis 0 included, usually ``(0, 0)``)."""
    if mode not in ("constant", "reflect", "replicate", "circular"):
        raise ValueError(f"pad: unknown mode. Received: mode={mode!r}")
    pads = [tuple(int(v) for v in p) for p in pads]
    if mode == "constant":
        return ops.pad(x, pads, mode="constant", constant_values=float(value))
    if mode == "reflect":
        return ops.pad(x, pads, mode="reflect")
    for axis, (before, after) in enumerate(pads):
        if before == 0 and after == 0:
            continue
        n = x.shape[axis]
        parts = []
        if before:
            parts.append(_edge(x, axis, 0, 1, before) if mode == "replicate" else _take_range(x, axis, n - before, n))
        parts.append(x)
        if after:
            parts.append(_edge(x, axis, n - 1, n, after) if mode == "replicate" else _take_range(x, axis, 0, after))
        x = ops.concatenate(parts, axis=axis)
    return x


def _take_range(x: Any, axis: int, start: int, stop: int) -> Any:
    index = [slice(None)] * len(x.shape)
    index[axis] = slice(start, stop)
    return x[tuple(index)]


def _edge(x: Any, axis: int, start: int, stop: int, times: int) -> Any:
    return ops.repeat(_take_range(x, axis, start, stop), times, axis=axis)


def strided_slice(x: Any, slices: Sequence[Sequence[int | None]]) -> Any:
    """Basic slicing ``x[start:stop:step, ...]`` with one ``[start, stop, step]`` per axis."""
    return x[tuple(slice(*s) for s in slices)]


def binned_reduce(x: Any, axis: int, starts: Sequence[int], ends: Sequence[int], mode: str = "mean") -> Any:
    """Max or mean over bins ``[starts[i], ends[i])`` of one axis, one output per bin.

    Rectangular pooling windows are separable, so adaptive pooling of any output size (exact
    when the size does not divide) is one binned reduction per spatial axis."""
    if mode not in ("mean", "max"):
        raise ValueError(f"binned_reduce: unknown mode. Received: mode={mode!r}")
    reduce = ops.max if mode == "max" else ops.mean
    parts = [reduce(_take_range(x, axis, int(s), int(e)), axis=axis, keepdims=True) for s, e in zip(starts, ends)]
    return parts[0] if len(parts) == 1 else ops.concatenate(parts, axis=axis)


def axis_gather(x: Any, axis: int, indices: Sequence[int]) -> Any:
    """Gather fixed indices along one axis (nearest resizing with non-integer scales)."""
    return ops.take(x, np.asarray(indices, dtype="int32"), axis=axis)


_LETTERS = "abcdefghijklmnopqrstuvwxy"  # "z" is the new axis


def axis_map_equation(rank: int, axis: int) -> str:
    """EinsumDense equation of ``y = x @ K`` along one axis: "abcd,bz->azcd" for rank 4, axis 1."""
    axis %= rank
    src = _LETTERS[:rank]
    return f"{src},{src[axis]}z->{src[:axis]}z{src[axis + 1:]}"


def parse_axis_map(equation: str) -> int | None:
    """The axis an EinsumDense equation multiplies by its (in, out) kernel, or None if it does not
    have that form (see :func:`axis_map_equation`)."""
    try:
        lhs, out = equation.replace(" ", "").split("->")
        src, kernel = lhs.split(",")
    except ValueError:
        return None
    if "." in equation or len(kernel) != 2 or kernel[1] in src or kernel[0] not in src or len(out) != len(src):
        return None
    axis = src.index(kernel[0])
    return axis if out == src[:axis] + kernel[1] + src[axis + 1:] else None


def _einsum_bias_safe(y: tuple, axis: int) -> bool:
    """Whether Keras' bias_add shortcut adds EinsumDense's bias of ``y[axis]`` entries along ``axis``:
    it takes the last axis when that has the size, else axis 1 when that has it, else plain broadcasting."""
    n, first, last = y[axis], y[1], y[-1]
    if first is None or last is None:
        return False  # a dynamic size may equal the bias's at run time
    if last == n:
        return axis == len(y) - 1
    return first != n or axis == 1


def axis_map(x: Any, axis: int, kernel: np.ndarray, name: str, bias: np.ndarray | None = None,
             activation: Any = None, trainable: bool = False) -> Any:
    """``x`` with axis ``axis`` multiplied by ``kernel`` (in, out) (+ bias, activation): a built-in
    ``EinsumDense``. A Linear along any axis (token-mixing MLPs) and exact linear resizing."""
    rank = len(x.shape)
    axis %= rank
    equation = axis_map_equation(rank, axis)
    out_shape = [*x.shape[1:axis], kernel.shape[1], *x.shape[axis + 1:]]
    # EinsumDense adds its bias with keras.ops.add, whose bias_add shortcut (see safe_add) picks the
    # wrong axis when the output's axis 1 or last axis has the bias's size: the bias is then a
    # weight of its own, added by safe_add, and the activation follows it.
    b_shape = (1,) * axis + (kernel.shape[1],) + (1,) * (rank - axis - 1)
    separate = bias is not None and not _einsum_bias_safe((None, *out_shape), axis)
    layer = keras.layers.EinsumDense(equation, output_shape=out_shape,
                                     activation=None if separate else activation,
                                     bias_axes="z" if bias is not None and not separate else None, name=name)
    y = layer(x)
    weights = [kernel.astype(np.float32)]
    if bias is not None and not separate:
        weights.append(np.asarray(bias, np.float32).reshape(tuple(layer.bias.shape)))
    layer.set_weights(weights)
    layer.trainable = bool(trainable)
    if separate:
        b = constant(unit(x), np.asarray(bias, np.float32).reshape(b_shape), f"{name}_bias", trainable)
        y = safe_add(y, b)
        if activation is not None:
            y = keras.layers.Activation(activation, name=f"{name}_act")(y)
    return y


# ---- Keras' automatic operation names ---------------------------------------------------

def _keras_uids() -> dict:
    from keras.src.backend.common import global_state

    return global_state.get_global_attribute("object_name_uids", default=collections.defaultdict(int),
                                             set_to_default=True)


def name_taken(name: str) -> bool:
    """Whether Keras gave (or will give) ``name`` to one of its auto-named ops and layers.

    Works around Keras 3.15: a functional model needs unique operation names, but auto-naming
    (``keras.ops.add`` -> "add", "add_1", ...; keras/src/utils/naming.py ``uniquify``) does not
    avoid names given explicitly, nor the names of a model loaded from a file, so a layer we
    name after the fx node "add" clashes with the first ``keras.ops.add``, and an export fix
    that adds a ``keras.ops.transpose`` to a reloaded model clashes with its "transpose". Delete
    when Keras' uniquify skips names in use.
    """
    uids = _keras_uids()
    prefix, _, k = name.rpartition("_")
    return name in uids or (k.isdigit() and prefix in uids and uids[prefix] > int(k))


def reserve_name(name: str) -> None:
    """Make Keras' auto-naming step over ``name`` ("add" -> next is "add_1"; "add_3" -> "add_4")."""
    uids = _keras_uids()
    uids[name] = max(uids[name], 1)
    prefix, _, k = name.rpartition("_")
    if k.isdigit() and prefix:
        uids[prefix] = max(uids[prefix], int(k) + 1)


def load_needs(keras_model: Any) -> list[str]:
    """What ``keras.models.load_model(path, safe_mode=True)`` needs for this model besides Keras:
    the registered names of classes that are not Keras' own (``[]`` for a converted model)."""
    from keras.saving import serialize_keras_object

    found = set()
    for operation in keras_model.operations:
        config = serialize_keras_object(operation)
        module, registered = str(config.get("module") or ""), config.get("registered_name") or ""
        if not module.startswith("keras") or ">" in registered:
            found.add(f"{registered or config.get('class_name')} (from {module})")
    return sorted(found)
