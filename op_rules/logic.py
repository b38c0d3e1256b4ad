"""Comparisons and logic: the masks of token models (padding masks, causal masks, position ids).

* ``eq ne lt le gt ge`` (``a == b``, ``torch.eq``, ``Tensor.eq``, ``aten.eq.Tensor`` /
  ``aten.eq.Scalar`` ...; ``torch.greater`` and the other long names): a bool tensor, with
  PyTorch's type promotion (an integer tensor compared with a float number compares as float).
* ``bitwise_and/or/xor`` (``&``, ``|``, ``^``): logical on bool tensors, bitwise on integer ones.
  ``bitwise_not`` / ``~x`` and ``logical_not`` are in misc_ops.py.
* ``logical_and/or/xor``: nonzero is True, for any dtype; the result is bool.

Either operand may be a Keras tensor, a constant (a causal mask built from ``torch.tril(ones)``
folds into one) or a Python number. All are elementwise (``Layout.ANY``). Operands are named
positionally: ATen (``self``, ``other``), ``operator`` (``a``, ``b``) and torch (``input``,
``other``) name them differently.
"""
from __future__ import annotations

import operator
from typing import Any

import keras
import numpy as np
import torch

from tracer.emitter.context import Emit
from tracer.op_rules.aten import aten_ops
from tracer.op_rules.registry import Layout, register
from tracer.ir import OpNode, Ref

aten = torch.ops.aten


def _pair(node: OpNode) -> tuple[Any, Any]:
    args = list(node.args[:2])
    for key in ("input", "self", "a", "other", "b"):
        if len(args) < 2 and key in node.kw and node.kw[key] not in args:
            args.append(node.kw[key])
    if len(args) != 2:
        raise ValueError(f"{node.name}: expected two operands, got {len(args)}")
    return args[0], args[1]


def _operand(node: OpNode, ctx: Emit, v: Any, what: str) -> Any:
    """A Keras tensor, or a Python number (a one-element constant becomes one)."""
    if not isinstance(v, Ref):
        return v.item() if isinstance(v, torch.Tensor) else v
    x = ctx.input(node, ctx.index_of(node, v))
    if isinstance(x, np.ndarray):
        if x.ndim == 0:
            return x.reshape(()).item()
        if x.dtype == np.float64:
            x = x.astype(np.float32)
        elif x.dtype == np.int64:
            x = x.astype(np.int32)
        return ctx.constant(x, ctx.name(node, what))
    return x


def _operands(node: OpNode, ctx: Emit) -> tuple[Any, Any]:
    a, b = _pair(node)
    a, b = _operand(node, ctx, a, "a"), _operand(node, ctx, b, "b")
    if not (isinstance(a, keras.KerasTensor) or isinstance(b, keras.KerasTensor)):
        raise ValueError(f"{node.name}: neither operand depends on the model inputs")
    return a, b


def _is_bool(x: Any) -> bool:
    return isinstance(x, bool) or (isinstance(x, keras.KerasTensor) and x.dtype == "bool")


def _as_bool(x: Any) -> Any:
    if isinstance(x, keras.KerasTensor):
        return x if x.dtype == "bool" else keras.ops.not_equal(x, 0)
    return bool(x)


def _compare(kname: str):
    def fn(node: OpNode, ctx: Emit) -> Any:
        a, b = _operands(node, ctx)
        if _is_bool(a) != _is_bool(b):  # bool against a number: True is 1
            a, b = (keras.ops.cast(v, "int32") if isinstance(v, keras.KerasTensor) and v.dtype == "bool"
                    else (int(v) if isinstance(v, bool) else v) for v in (a, b))
        return getattr(keras.ops, kname)(a, b)

    fn.__name__ = f"compare_{kname}"
    return fn


def _bitwise(kind: str):
    def fn(node: OpNode, ctx: Emit) -> Any:
        a, b = _operands(node, ctx)
        if node.dtype == "bool":
            return getattr(keras.ops, f"logical_{kind}")(_as_bool(a), _as_bool(b))
        if node.dtype is not None and "int" not in node.dtype:
            raise NotImplementedError(f"bitwise_{kind} of {node.dtype} tensors: PyTorch computes it only for "
                                      "bool and integer tensors")
        a, b = (v if isinstance(v, keras.KerasTensor) else np.asarray(v, "int32") for v in (a, b))
        return getattr(keras.ops, f"bitwise_{kind}")(a, b)

    fn.__name__ = f"bitwise_{kind}"
    return fn


def _logical(kind: str):
    def fn(node: OpNode, ctx: Emit) -> Any:
        a, b = _operands(node, ctx)
        return getattr(keras.ops, f"logical_{kind}")(_as_bool(a), _as_bool(b))

    fn.__name__ = f"logical_{kind}"
    return fn


_COMPARISONS = {
    "equal": ("eq", operator.eq, torch.eq, None),
    "not_equal": ("ne", operator.ne, torch.ne, torch.not_equal),
    "less": ("lt", operator.lt, torch.lt, torch.less),
    "less_equal": ("le", operator.le, torch.le, torch.less_equal),
    "greater": ("gt", operator.gt, torch.gt, torch.greater),
    "greater_equal": ("ge", operator.ge, torch.ge, torch.greater_equal),
}
_LONG_METHODS = {"not_equal", "less", "less_equal", "greater", "greater_equal"}
for _kname, (_short, _op, _fn, _long) in _COMPARISONS.items():
    _targets = [_op, _fn, _short, *aten_ops(f"{_short}.Tensor", f"{_short}.Scalar")]
    if _long is not None:
        _targets += [_long, _kname]
    register(tuple(dict.fromkeys(_targets)), _compare(_kname), Layout.ANY)

for _kind, _op in (("and", operator.and_), ("or", operator.or_), ("xor", operator.xor)):
    register((_op, getattr(torch, f"bitwise_{_kind}"), f"bitwise_{_kind}", f"__{_kind}__",
              *aten_ops(f"bitwise_{_kind}.Tensor", f"bitwise_{_kind}.Scalar", f"__{_kind}__.Tensor",
                     f"__{_kind}__.Scalar")), _bitwise(_kind), Layout.ANY)
    register((getattr(torch, f"logical_{_kind}"), f"logical_{_kind}", *aten_ops(f"logical_{_kind}")),
             _logical(_kind), Layout.ANY)

__all__: list[str] = []
