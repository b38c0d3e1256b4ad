"""Ops outside the other families that the transformer examples and the timm zoo need.

* ``unbind``: a tensor into the tuple of its slices along one axis (``q, k, v = qkv.unbind(0)``
  after the fused qkv projection of ViT-style attention). Like ``split``, no data moves but the
  slicing: the slices keep the input's physical layout minus the unbound axis, so the
  ``permute(2, 0, 3, 1, 4)`` that usually comes before stays bookkeeping. ``aten.unbind.int``
  (torch.export capture) has the same arguments and takes the same rule.
* ``addcmul``: ``input + value * tensor1 * tensor2``, as ResMLP's affine layer writes
  ``torch.addcmul(beta, alpha, x)``; any operand may be a constant (a parameter).
* ``F.normalize``: ``x / max(||x||_p, eps)`` along one axis (XCiT's cross-covariance attention).
* ``~x`` (``operator.invert``, ``torch.bitwise_not``): logical not of a bool tensor (EdgeNeXt's
  positional encoding inverts its mask), bitwise not of an integer one; ``torch.logical_not``.
"""
from __future__ import annotations

import operator
from typing import Any

import keras
import numpy as np
import torch
import torch.nn.functional as F

from tracer.emitter.context import Emit
from tracer.op_rules.elementwise import _apply, _operand
from tracer.op_rules.registry import Layout, rule
from tracer.ir import OpNode, Phys
from tracer.passes.layout import drop_dims


def _unbind_dim(node: OpNode, rank: int) -> int:
    return node.kw.get("dim", node.args[1] if len(node.args) > 1 else 0) % rank


def _unbind_layout(node: OpNode, ins: list, shapes: list) -> tuple[list, Phys]:
    rank = len(shapes[0])
    phys = ins[0] if ins[0] is not None and ins[0].flat is None else Phys.identity(rank)
    return [phys], drop_dims(phys, {_unbind_dim(node, rank)})


@rule(torch.unbind, "unbind", torch.ops.aten.unbind.int, layout=_unbind_layout)
def unbind(node: OpNode, ctx: Emit) -> Any:
    """The slices along one axis, each without that axis."""
    x = ctx.input(node, 0)
    phys = node.in_layouts[0]
    dim = _unbind_dim(node, len(phys.perm))
    axis = phys.axis(dim)
    if axis == 0:
        raise NotImplementedError(f"unbind along torch dim {dim}, which is the Keras batch axis: the number of "
                                  "pieces would depend on the batch size")
    return tuple(keras.ops.unstack(x, num=x.shape[axis], axis=axis))


def _combine(node: OpNode, ctx: Emit, kname: str, a: Any, b: Any) -> Any:
    """``a <kname> b`` where either may be a Keras tensor, a numpy constant or a number."""
    if isinstance(a, keras.KerasTensor) or isinstance(b, keras.KerasTensor):
        return _apply(node, ctx, kname, a, b)
    return getattr(np, kname)(np.asarray(a, np.float32), np.asarray(b, np.float32))


@rule(torch.addcmul, "addcmul", torch.ops.aten.addcmul.default, layout=Layout.ANY)
def addcmul(node: OpNode, ctx: Emit) -> Any:
    """``input + value * tensor1 * tensor2`` with broadcasting."""
    base, t1, t2 = (_operand(node, ctx, node.kw[k]) for k in ("input", "tensor1", "tensor2"))
    prod = _combine(node, ctx, "multiply", t1, t2)
    value = node.kw.get("value", 1)
    if value != 1:
        prod = _combine(node, ctx, "multiply", prod, float(value))
    return _combine(node, ctx, "add", base, prod)


@rule(F.normalize, layout=Layout.ANY)
def normalize(node: OpNode, ctx: Emit) -> Any:
    """``x / max(||x||_p, eps)`` along ``dim``, the norm kept as a unit axis for broadcasting."""
    x = ctx.input(node, 0)
    p, eps = float(node.kw.get("p", 2.0)), float(node.kw.get("eps", 1e-12))
    axis = ctx.axis(node, node.kw.get("dim", 1))
    if p == 2.0:
        norm = keras.ops.sqrt(keras.ops.sum(keras.ops.square(x), axis=axis, keepdims=True))
    elif p == 1.0:
        norm = keras.ops.sum(keras.ops.abs(x), axis=axis, keepdims=True)
    else:
        raise NotImplementedError(f"F.normalize with p={p}: only p=1 and p=2 are converted")
    return keras.ops.divide(x, keras.ops.maximum(norm, eps))


@rule(operator.invert, torch.bitwise_not, "bitwise_not", torch.ops.aten.bitwise_not.default, layout=Layout.ANY)
def invert(node: OpNode, ctx: Emit) -> Any:
    """``~x``: logical not for bool, bitwise not (two's complement, ``-x - 1``) for integers."""
    x = ctx.input(node, 0)
    if x.dtype == "bool":
        return keras.ops.logical_not(x)
    if "int" not in str(x.dtype):
        raise NotImplementedError(f"~x of a {x.dtype} tensor: PyTorch inverts only bool and integer tensors")
    return keras.ops.bitwise_invert(x)


@rule(torch.logical_not, "logical_not", torch.ops.aten.logical_not.default, layout=Layout.ANY)
def logical_not(node: OpNode, ctx: Emit) -> Any:
    """``torch.logical_not(x)``: True where ``x`` is zero (False), for any dtype."""
    x = ctx.input(node, 0)
    return keras.ops.logical_not(x if x.dtype == "bool" else keras.ops.not_equal(x, 0))
