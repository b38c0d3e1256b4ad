"""Sizes that follow a dynamic axis, kept as runtime computation (issue 14, item 2).

With ``dynamic_shapes``, the traced GraphModule runs a second time per dynamic name with the inputs
resized along its axes (:func:`size_changes`); a non-tensor result (``x.shape``, ``x.size(1)``,
``aten.sym_size.int``, ``T // 2``) whose value differs is a *dynamic size*. Everything else is folded
into plain numbers exactly as without dynamic axes. :func:`size_nodes` turns a dynamic size into IR:

* ``x.shape`` / ``x.size()`` fold into a tuple whose dynamic entries are ``Ref`` s to one
  :func:`dim_size` node per axis (static entries stay ints), so ``x.shape[1]`` is that ``Ref``;
* ``x.size(k)`` / ``aten.sym_size.int(x, k)`` is a :func:`dim_size` node;
* arithmetic on sizes (``operator.add`` ...) is a :func:`size_math` node whose operands are ``Ref`` s
  or ints; op_rules/sizes.py emits the supported ones and refuses the rest naming the line.

A size node's recorded shape is ``(value,)``: op_rules/sizes.py emits it as a 1-D tensor of ones of
that length (a "unary witness"), which the shape check then holds to the recorded size.
"""
from __future__ import annotations

import math
import operator
from typing import Any, Sequence

import torch
import torch.fx as fx

from tracer.dynamic import DynamicAxis, resized
from tracer.ir import OpNode, Ref

_ARITH = {operator.add: "add", operator.sub: "sub", operator.mul: "mul", operator.floordiv: "floordiv",
          operator.truediv: "truediv", operator.mod: "mod", operator.neg: "neg", operator.pow: "pow",
          torch.sym_max: "max", torch.sym_min: "min", math.floor: "floor", math.ceil: "ceil",
          torch.sym_float: "float", torch.sym_int: "int", math.sqrt: "sqrt", max: "max", min: "min"}


def dim_size(input: torch.Tensor, dim: int) -> int:  # noqa: A002  (the IR's name for torch's argument)
    """IR target: the size of torch axis ``dim`` of ``input`` (``x.shape[dim]``, ``x.size(dim)``)."""
    return input.shape[dim]


def size_math(op: str, a: Any, b: Any = None) -> Any:
    """IR target: ``op`` (``"add"``, ``"floordiv"`` ...) of two sizes or a size and a number."""
    return {"add": operator.add, "sub": operator.sub, "mul": operator.mul, "floordiv": operator.floordiv}[op](a, b)


class _Sizes(fx.Interpreter):
    """One run that keeps only the non-tensor results (sizes and shape arithmetic)."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm, garbage_collect_values=True)
        self.values: dict[str, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        if isinstance(result, (int, float, tuple, list, torch.Size)) and not isinstance(result, bool) \
                and not _holds_tensor(result):
            self.values[n.name] = result
        return result


def _holds_tensor(value: Any) -> bool:
    if isinstance(value, (tuple, list)):
        return any(_holds_tensor(v) for v in value)
    return isinstance(value, (torch.Tensor, dict))


def _values(gm: fx.GraphModule, inputs: Sequence[Any]) -> dict[str, Any] | None:
    runner = _Sizes(gm)
    try:
        with torch.no_grad():
            runner.run(*inputs)
    except Exception:  # the model fails at the other size: tracer/dynamic.py reports it after capture
        return None
    return runner.values


def size_changes(gm: fx.GraphModule, inputs: Sequence[Any], dims: Sequence[DynamicAxis]) -> dict[str, Any]:
    """Node name -> which parts of its non-tensor result follow a dynamic axis: True for a number,
    a tuple of bools for a shape. {} without dynamic axes. Compared with a run at each other size of
    each axis (:meth:`DynamicAxis.others`), the masks merged."""
    if not dims:
        return {}
    base = _values(gm, inputs)
    if base is None:
        return {}
    changed: dict[str, Any] = {}
    for d in dims:
        for size in _sizes_to_compare(inputs, d):
            alt = _values(gm, resized(inputs, d, size))
            for name, value in (base.items() if alt is not None else ()):
                mask = _differs(value, alt.get(name))
                if mask is not None:
                    old = changed.get(name)
                    changed[name] = mask if old is None or mask is True or old is True else tuple(
                        p or q for p, q in zip(old, mask))
    return changed


def _sizes_to_compare(inputs: Sequence[Any], d: DynamicAxis) -> list[int]:
    """Every size the tester tries besides the one ``inputs`` have (the sample's, or another when capturing
    at that one): a size such as ``(7 - W % 7) % 7`` is the same at 2x and differs only at an odd size."""
    i, axis = d.places[0]
    current = int(inputs[i].shape[axis])
    return [c for c in dict.fromkeys((d.size, *d.others())) if c != current]


def _differs(a: Any, b: Any) -> Any:
    if isinstance(a, (tuple, list, torch.Size)) and isinstance(b, (tuple, list, torch.Size)) and len(a) == len(b) \
            and all(isinstance(v, int) and not isinstance(v, bool) for v in (*a, *b)):
        mask = tuple(p != q for p, q in zip(a, b))
        return mask if any(mask) else None
    return True if a != b else None


def size_nodes(n: fx.Node, result: Any, mask: Any, conv: Any, make: Any) -> tuple[Any, list[OpNode]]:
    """A dynamic size ``n`` as (the value its consumers read in place of it, new IR nodes).
    ``conv`` turns fx arguments into IR arguments (folded values, Refs); ``make(name, target, kw, value)``
    makes an OpNode with ``n``'s source and module path."""
    args = conv(tuple(n.args))
    if isinstance(mask, tuple):  # a shape: per-axis size nodes for its dynamic entries
        if _is_shape_of(n):
            x = args[0]
            nodes = [make(f"{n.name}__dim{k}", dim_size, {"input": x, "dim": k}, v)
                     for k, (v, m) in enumerate(zip(result, mask)) if m]
            return tuple(Ref(f"{n.name}__dim{k}") if m else v for k, (v, m) in enumerate(zip(result, mask))), nodes
        folded = _fold_static(n, args)
        if folded is not None:
            return folded, []
    elif n.target is operator.getitem and isinstance(args[0], (tuple, list)) and isinstance(args[1], (int, slice)):
        return args[0][args[1]], []
    elif _is_dim_of(n):
        return Ref(n.name), [make(n.name, dim_size, {"input": args[0], "dim": int(args[1])}, result)]
    what = _ARITH.get(n.target, f"{n.op} {getattr(n.target, '__name__', n.target)}")
    operands = args + tuple(n.kwargs.values())
    kw = {"op": what, "a": operands[0] if operands else None, "b": operands[1] if len(operands) > 1 else None}
    return Ref(n.name), [make(n.name, size_math, kw, result)]


def _is_shape_of(n: fx.Node) -> bool:
    return (n.op == "call_function" and n.target is getattr and n.args[1:] == ("shape",)) or (
        n.op == "call_method" and n.target == "size" and len(n.args) == 1 and not n.kwargs)


def _is_dim_of(n: fx.Node) -> bool:
    if n.op == "call_method" and n.target == "size" and len(n.args) == 2 and isinstance(n.args[1], int):
        return True
    return n.op == "call_function" and n.target is torch.ops.aten.sym_size.int and isinstance(n.args[1], int)


def _fold_static(n: fx.Node, args: tuple) -> Any:
    """A shape computed from shapes by indexing or concatenation (``x.shape[:2]``, ``s + (4,)``)."""
    if n.target is operator.getitem and isinstance(args[0], (tuple, list)) and isinstance(args[1], (int, slice)):
        return args[0][args[1]]
    if n.target is operator.add and all(isinstance(a, (tuple, list)) for a in args):
        return tuple(args[0]) + tuple(args[1])
    return None
