"""Elementwise arithmetic with broadcasting, Python scalars and constant tensors."""
from __future__ import annotations

import operator
from typing import Any

import keras
import numpy as np
import torch

from tracer.emitter import layers as L
from tracer.emitter.layers import add_order as _add_order, safe_add as add
from tracer.emitter.context import Emit
from tracer.op_rules.registry import Layout, register, rule
from tracer.ir import OpNode, Ref

_BINARY = {
    "add": (operator.add, operator.iadd, torch.add, "add", "add_"),
    "subtract": (operator.sub, operator.isub, torch.sub, torch.subtract, "sub", "sub_"),
    "multiply": (operator.mul, operator.imul, torch.mul, torch.multiply, "mul", "mul_"),
    "divide": (operator.truediv, operator.itruediv, torch.div, torch.divide, torch.true_divide, "div", "div_"),
    "power": (operator.pow, torch.pow, "pow"),
    "maximum": (torch.maximum, "maximum"),
    "minimum": (torch.minimum, "minimum"),
    "floor_divide": (operator.floordiv, torch.floor_divide, "floor_divide"),
    "mod": (operator.mod, torch.remainder, "remainder"),
}


def _operand(node: OpNode, ctx: Emit, v: Any) -> Any:
    if isinstance(v, Ref):
        i = ctx.index_of(node, v)
        x = ctx.input(node, i)
        if isinstance(x, np.ndarray) and x.size == 1:
            return float(x.reshape(()))
        return x
    if isinstance(v, bool):
        return float(v)
    return float(v) if isinstance(v, (int, float)) else v


def _binary(kname: str):
    def fn(node: OpNode, ctx: Emit) -> Any:
        args = list(node.args[:2])
        if len(args) < 2:
            args.append(node.kw.get("other"))
        a, b = (_operand(node, ctx, v) for v in args)
        alpha = node.kw.get("alpha", 1)
        if alpha not in (1, None):
            b = b * float(alpha) if not isinstance(b, keras.KerasTensor) else scale(b, alpha, ctx.name(node, "alpha"))
        mode = node.kw.get("rounding_mode")
        if kname == "divide" and mode is not None:
            if mode == "floor":
                return _apply(node, ctx, "floor_divide", a, b)
            if mode == "trunc":
                return keras.ops.trunc(_apply(node, ctx, "divide", a, b))
            raise ValueError(f"rounding_mode must be None, 'floor' or 'trunc'. Received: rounding_mode={mode!r}")
        return _apply(node, ctx, kname, a, b)

    fn.__name__ = f"binary_{kname}"
    return fn


def _apply(node: OpNode, ctx: Emit, kname: str, a: Any, b: Any) -> Any:
    ka, kb = isinstance(a, keras.KerasTensor), isinstance(b, keras.KerasTensor)
    if ka and kb:
        return add(a, b) if kname == "add" else getattr(keras.ops, kname)(a, b)
    if not ka and not kb:
        raise ValueError("neither operand depends on the model inputs")
    tensor, other = (a, b) if ka else (b, a)
    if kname == "multiply" and isinstance(other, (int, float, np.number)) and "float" in str(tensor.dtype):
        other = np.asarray(other, np.float32)  # see scale()
    if isinstance(other, np.ndarray):
        const_first = not ka
        if kname == "add" and other.ndim:  # see add(): the constant goes first unless that is unsafe too
            order = _add_order(tuple(tensor.shape), other.shape)
            if order == "negate":
                kname, other, const_first = "subtract", -other, False
            else:
                const_first = order == "swap"
        c = ctx.constant(other, ctx.name(node))
        c = c if c.dtype == tensor.dtype else keras.ops.cast(c, tensor.dtype)
        return getattr(keras.ops, kname)(*((c, tensor) if const_first else (tensor, c)))
    if not ka and kname in ("subtract", "divide"):
        return _scalar_first(kname, a, tensor)
    return getattr(keras.ops, kname)(a, b)


def _scalar_first(kname: str, c: Any, x: Any) -> Any:
    """``c - x`` / ``c / x`` for a Python number ``c``, in a form LiteRT keeps the right way round.

    Works around the TFLite converter of TF 2.21: ``SUB(c, TRANSPOSE(x))`` / ``DIV(c, ...)`` with a
    scalar (or all-ones-shaped) constant first becomes ``SUB(x', c)`` when the converter moves the
    transposes through it, so the sign or the quotient is flipped in the .tflite while Keras is right
    (bench/fuzz.py graph 1810: 1.39 off; ``-x + c`` is canonicalized back into that SUB). The first
    operand is a tensor filled with ``c`` instead (FILL of x's runtime shape: exact, and not a
    constant the converter can move). Delete when ``c - transpose(x)`` converts correctly."""
    return getattr(keras.ops, kname)(keras.ops.full_like(x, c), x)


def scale(x: Any, factor: float, name: str) -> Any:
    """``x * factor`` for a Keras tensor ``x`` and a Python number, the number a constant tensor.

    Works around Keras 3.15: ``keras.ops.multiply`` with a Python or NumPy scalar operand marks
    its symbolic result sparse (``Multiply.compute_output_spec`` reads the scalar's missing
    ``sparse`` attribute as True), so a layer called on that result is traced with a SparseTensor
    and infers a wrong shape. Delete when ``keras.ops.multiply(x, 2.0).sparse`` is False.
    """
    c = L.constant(L.unit(x), np.asarray(factor, np.float32), name)
    return keras.ops.multiply(x, c if c.dtype == x.dtype else keras.ops.cast(c, x.dtype))


for _name, _targets in _BINARY.items():
    register(tuple(dict.fromkeys(_targets)), _binary(_name), Layout.ANY)

_UNARY = {
    "negative": (operator.neg, torch.neg, "neg"), "abs": (torch.abs, "abs", operator.abs),
    "exp": (torch.exp, "exp"), "log": (torch.log, "log"), "sqrt": (torch.sqrt, "sqrt"),
    "rsqrt": (torch.rsqrt, "rsqrt"), "sin": (torch.sin, "sin"), "cos": (torch.cos, "cos"),
    "erf": (torch.erf, torch.special.erf, "erf"), "reciprocal": (torch.reciprocal, "reciprocal"),
    "square": (torch.square, "square"), "floor": (torch.floor, "floor"), "ceil": (torch.ceil, "ceil"),
    "sign": (torch.sign, "sign"), "log1p": (torch.log1p, "log1p"),
}


def _unary(kname: str):
    def fn(node: OpNode, ctx: Emit) -> Any:
        return getattr(keras.ops, kname)(ctx.input(node, 0))

    fn.__name__ = f"unary_{kname}"
    return fn


for _name, _targets in _UNARY.items():
    register(_targets, _unary(_name), Layout.ANY)


@rule(torch.clamp, torch.clip, "clamp", "clip", "clamp_", "clamp_min", "clamp_max", torch.clamp_min,
      torch.clamp_max, layout=Layout.ANY)
def clamp(node: OpNode, ctx: Emit) -> Any:
    x = ctx.input(node, 0)
    lo = node.kw.get("min", node.kw.get("arg1"))
    hi = node.kw.get("max", node.kw.get("arg2"))
    if node.target in ("clamp_max", torch.clamp_max):
        lo, hi = None, node.kw.get("max", node.args[1] if len(node.args) > 1 else None)
    if any(isinstance(v, Ref) for v in (lo, hi)):
        raise ValueError("clamp with tensor bounds is not supported; use torch.maximum/minimum")
    if lo is not None and hi is not None:
        return keras.ops.clip(x, float(lo), float(hi))
    if lo is not None:
        return keras.ops.maximum(x, float(lo))
    if hi is not None:
        return keras.ops.minimum(x, float(hi))
    return x
