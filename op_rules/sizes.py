"""Sizes that follow a dynamic axis, and the ops that read them (tracer/capture/sizes.py, issue 14).

A dynamic size is emitted as a *unary witness*: a 1-D float tensor of ones whose length is the size,
built from built-in ``keras.ops`` only (a Keras op cannot take a symbolic shape, and ``ops.shape`` of a
KerasTensor gives ``None``). Arithmetic acts on lengths: ``T + c`` concatenates ``c`` ones, ``T - c``
drops ``c``, ``T * c`` tiles, ``T // c`` keeps every ``c``-th one, ``T1 + T2`` concatenates and
``T1 * T2`` flattens an outer product; anything else is refused naming the op and the user's line.
Consumers turn witnesses back into numbers: ``arange`` is ``cumsum(w) - 1``; ``zeros``/``ones``/``full``
broadcast reshaped witnesses; a slice with a dynamic bound gathers ``arange`` indices. In TFLite these
are the builtins GATHER, FILL, CUMSUM, CONCATENATION, TILE, STRIDED_SLICE, RESHAPE and MUL.
"""
from __future__ import annotations

from typing import Any

import keras
import numpy as np
import torch

from tracer.capture.sizes import dim_size, size_math
from tracer.emitter.context import Emit
from tracer.errors import ConversionError
from tracer.ir import OpNode, Phys, Ref
from tracer.op_rules.registry import Layout, rule

aten = torch.ops.aten
_KERAS_DTYPE = {"float64": "float32", "int64": "int32"}


def _dim_layout(node: OpNode, ins: list, shapes: list) -> tuple[list, Phys]:
    """Reads its input in the layout it has (any but a flattened one); the witness is 1-D."""
    rank = len(shapes[0])
    phys = ins[0] if ins[0] is not None and ins[0].flat is None and len(ins[0].perm) == rank else Phys.identity(rank)
    return [phys], Phys.identity(1)


@rule(dim_size, layout=_dim_layout)
def dim(node: OpNode, ctx: Emit) -> Any:
    """The size of torch axis ``dim``: index 0 along every other Keras axis, then ones of that length."""
    return witness(ctx.input(node, 0), ctx.axis(node, int(node.kw["dim"])))


def witness(x: Any, keep: int) -> Any:
    """Ones as long as Keras axis ``keep`` of ``x``."""
    for a in reversed(range(len(x.shape))):
        if a != keep:
            x = keras.ops.take(x, 0, axis=a)
    return keras.ops.ones_like(x, dtype="float32")


def _refuse(node: OpNode, why: str) -> ConversionError:
    return ConversionError(f"{node.describe()}: {why}. tracer computes sizes that follow a dynamic axis at runtime "
                           "for sums, products, differences with a number and floor division by a number; keep "
                           "that axis static (leave it out of dynamic_shapes / --dynamic-axis), compute the size "
                           "that way, or, where the model needs sizes that are multiples of a number (padding to a "
                           "window or stride: x % k), declare the axis a multiple: dynamic_shapes={2: 'h*32'} / "
                           "--dynamic-axis 0:2=h*32")


def _operand(node: OpNode, ctx: Emit, v: Any) -> Any:
    if isinstance(v, Ref):
        return ctx.tensor_input(node, ctx.index_of(node, v))
    if isinstance(v, int) and not isinstance(v, bool):
        return v
    raise _refuse(node, f"its operand {v!r} is not a whole number")


def _plus(w: Any, c: int) -> Any:
    if c < 0:
        return cut(w, -c)
    return w if c == 0 else keras.ops.concatenate([w, keras.ops.tile(cut(w, None, 1), (c,))], axis=0)


@rule(size_math, layout=Layout.TORCH)
def size_arith(node: OpNode, ctx: Emit) -> Any:
    what = node.kw["op"]
    if what not in ("add", "sub", "mul", "floordiv"):
        raise _refuse(node, f"the size is computed with {what}")
    a, b = _operand(node, ctx, node.kw["a"]), _operand(node, ctx, node.kw["b"])
    if isinstance(b, int) and not isinstance(a, int) or what in ("add", "mul") and isinstance(a, int):
        w, c = (a, b) if isinstance(b, int) else (b, a)
        if what == "add":
            return _plus(w, c)
        if what == "sub":
            return _plus(w, -c)
        if what == "mul" and c >= 1:
            return keras.ops.tile(w, (c,))
        if what == "floordiv" and c >= 1:
            return cut(w, c - 1, None, c)
        raise _refuse(node, f"{what} by {c}")
    if isinstance(a, int) or isinstance(b, int):
        raise _refuse(node, f"a number minus or divided by a dynamic size ({what})")
    if what == "add":
        return keras.ops.concatenate([a, b], axis=0)
    if what == "mul":
        return keras.ops.reshape(keras.ops.expand_dims(a, 1) * keras.ops.expand_dims(b, 0), (-1,))
    raise _refuse(node, f"{what} of two sizes that both follow dynamic axes")


def positions(w: Any, start: int = 0, step: int = 1) -> Any:
    """``0, 1, ..., len(w) - 1`` (int32), from ``start`` by ``step``."""
    idx = keras.ops.cast(keras.ops.cumsum(w) - 1.0, "int32")
    return cut(idx, start, None, step)


def cut(x: Any, start: int | None = None, stop: int | None = None, step: int | None = None) -> Any:
    """``x[start:stop:step]`` of a 1-D tensor of dynamic length (Keras takes a tuple key only)."""
    return x if (start, stop, step) in ((None, None, None), (0, None, 1), (0, None, None)) else x[
        (slice(start, stop, step),)]


def _arange_args(node: OpNode) -> tuple[Any, Any, Any]:
    kw = node.kw
    if "end" in kw:
        return kw.get("start", 0), kw["end"], kw.get("step", 1)
    nums = [v for k, v in kw.items() if k.startswith("arg")]
    return (0, nums[0], 1) if len(nums) == 1 else (nums[0], nums[1], nums[2] if len(nums) > 2 else 1)


@rule(torch.arange, aten.arange.default, aten.arange.start, aten.arange.start_step, layout=Layout.TORCH)
def arange(node: OpNode, ctx: Emit) -> Any:
    """``torch.arange(T)`` (and ``arange(start, T, step)`` with static start and step); capture keeps
    only those whose end follows a dynamic axis as operations, the rest are constants."""
    start, end, step = _arange_args(node)
    if not isinstance(end, Ref) or not isinstance(start, int) or not isinstance(step, int) or start < 0 or step < 1:
        raise _refuse(node, f"arange({start!r}, {end!r}, {step!r}) needs a dynamic end and a static start >= 0 "
                            "and step >= 1")
    y = positions(ctx.tensor_input(node, ctx.index_of(node, end)), start, step)
    dtype = _KERAS_DTYPE.get(node.dtype, node.dtype)
    return y if dtype == "int32" else keras.ops.cast(y, dtype)


def has_dynamic_size(value: Any) -> bool:
    if isinstance(value, Ref):
        return True
    if isinstance(value, (tuple, list)):
        return any(has_dynamic_size(v) for v in value)
    if isinstance(value, slice):
        return has_dynamic_size((value.start, value.stop, value.step))
    return False


def filled(node: OpNode, ctx: Emit, size: tuple, fill: float, batch: int | None) -> Any:
    """``torch.full(size, fill)`` with dynamic entries in ``size``: ``fill`` times a broadcast of reshaped
    witnesses. An int axis 0 equal to the sample's ``batch`` is the runtime batch (the first input's)."""
    rank = len(size)
    value = np.full([s if isinstance(s, int) and not (i == 0 and s == batch) else 1 for i, s in enumerate(size)],
                    fill, dtype=np.float32)
    y = ctx.constant(value, ctx.name(node, "fill"))
    if isinstance(size[0], int) and size[0] == batch:
        y = keras.ops.multiply(keras.ops.reshape(witness(ctx.anchor, 0), [-1] + [1] * (rank - 1)), y)
    for i, s in enumerate(size):
        if isinstance(s, Ref):
            w = ctx.tensor_input(node, ctx.index_of(node, s))
            y = keras.ops.multiply(y, keras.ops.reshape(w, [1] * i + [-1] + [1] * (rank - i - 1)))
    dtype = _KERAS_DTYPE.get(node.dtype, node.dtype)
    return y if dtype == "float32" else keras.ops.cast(y, dtype)


def dynamic_slices(node: OpNode, ctx: Emit, x: Any, index: list) -> tuple[Any, list]:
    """Slices of ``index`` (one entry per torch axis) whose bounds follow a dynamic axis, taken with
    gathered positions; returns the tensor and the index left for the static rule (those as ``:``)."""
    rest = list(index)
    d = -1
    for k, i in enumerate(index):
        d += i is not None
        if not (isinstance(i, slice) and has_dynamic_size(i)):
            continue
        if isinstance(i.start, Ref) or isinstance(i.step, Ref) or (i.start or 0) < 0 or (i.step or 1) < 1:
            raise _refuse(node, f"a slice [{i.start}:{i.stop}:{i.step}] whose start or step follows a dynamic "
                                "axis (only the end may)")
        w = ctx.tensor_input(node, ctx.index_of(node, i.stop))
        axis = node.in_layouts[0].axis(d)
        if axis == 0:
            raise _refuse(node, "a slice of axis 0 (the Keras batch axis) with a dynamic bound")
        x = keras.ops.take(x, positions(w, i.start or 0, i.step or 1), axis=axis)
        rest[k] = slice(None)
    return x, rest


def unfolds_batch(node: OpNode, size: Any, in_shape: tuple, batch: int) -> bool:
    """Whether a reshape is ``(B * T, ...) -> (B, T, ...)`` in PyTorch's layout, T a dynamic size."""
    return isinstance(size, (tuple, list)) and [i for i, s in enumerate(size) if isinstance(s, Ref)] == [1] and \
        size[0] == batch and node.layout.is_identity and node.in_layouts[0].is_identity and \
        node.shape[0] * node.shape[1] == in_shape[0]


def unfold_batch(node: OpNode, ctx: Emit, x: Any, size: tuple, in_shape: tuple, batch: int) -> Any:
    """``y.view(B, T, ...)`` of ``y`` (B * T, ...) whose rows fold a dynamic size T into the batch (a Linear
    run on ``x.view(-1, C)``, GPT-2's Conv1D): Keras cannot reshape to two unknown sizes, so the rows are
    gathered at ``b * T + t``."""
    w = ctx.tensor_input(node, ctx.index_of(node, size[1]))
    n = keras.ops.cast(keras.ops.sum(w), "int32")
    rows = keras.ops.expand_dims(positions(witness(ctx.anchor, 0)), 1) * n + keras.ops.expand_dims(positions(w), 0)
    y = keras.ops.take(x, rows, axis=0)
    if tuple(in_shape[1:]) == tuple(node.shape[2:]):
        return y
    return keras.layers.Reshape((-1, *node.shape[2:]), name=ctx.name(node, "reshape"))(y)


def causal_mask(q: Any, q_axis: int, k: Any, k_axis: int, rank: int) -> Any:
    """The additive causal mask (0 where key <= query, -inf elsewhere) of rank ``rank`` for queries along
    Keras axis ``q_axis`` of ``q`` and keys along ``k_axis`` of ``k``, lengths read at runtime."""
    rows, cols = positions(witness(q, q_axis)), positions(witness(k, k_axis))
    allowed = keras.ops.less_equal(keras.ops.expand_dims(cols, 0), keras.ops.expand_dims(rows, 1))
    m = keras.ops.log(keras.ops.cast(allowed, "float32"))
    for _ in range(rank - 2):
        m = keras.ops.expand_dims(m, 0)
    return m


def expanded(node: OpNode, ctx: Emit, x: Any, in_shape: tuple, batch: int) -> Any:
    """``x.expand(size)`` with entries of ``size`` that follow a dynamic axis: new leading axes added, each
    unit axis that grows multiplied by ones of its length (a witness for a dynamic size, the runtime
    batch for an int axis 0 equal to the sample's ``batch``, a tile for other numbers)."""
    size, rank = tuple(node.kw["size"]), node.rank
    for _ in range(rank - len(in_shape)):
        x = keras.ops.expand_dims(x, 0)
    have = (1,) * (rank - len(in_shape)) + tuple(in_shape)
    phys = node.layout if len(node.layout.perm) == rank and node.layout.flat is None else Phys.identity(rank)
    reps = [1] * rank
    for i, (h, s) in enumerate(zip(have, size)):
        if h != 1 or s == -1 or s == 1:
            continue
        axis = phys.axis(i)
        if isinstance(s, Ref):
            ones = ctx.tensor_input(node, ctx.index_of(node, s))
        elif i == 0 and s == batch:
            ones = witness(ctx.anchor, 0)
        else:
            reps[axis] = int(s)
            continue
        ones = keras.ops.reshape(ones, [1] * axis + [-1] + [1] * (rank - axis - 1))
        x = keras.ops.logical_and(x, keras.ops.cast(ones, "bool")) if x.dtype == "bool" else keras.ops.multiply(
            x, keras.ops.cast(ones, x.dtype))
    return x if all(r == 1 for r in reps) else keras.ops.tile(x, reps)
