"""Matrix products: matmul / ``@`` / bmm / mm, their ``add`` forms, and einsum.

A product with a constant matrix on the right (``x @ W``, a weight) is a Dense layer and keeps
the layout of ``x`` like a Linear does. Products of two computed tensors run in PyTorch's axis
order. ``einsum`` reads each operand in the layout it has: its subscripts are permuted to the
physical axis order, so no operand is transposed before it.
"""
from __future__ import annotations

import operator
from dataclasses import replace
from typing import Any

import keras
import numpy as np
import torch
import torch.nn.functional as F

from tracer.emitter.context import Emit, to_numpy
from tracer.op_rules.elementwise import scale
from tracer.op_rules.registry import lookup, rule
from tracer.ir import OpNode, Phys, Ref

_PRODUCTS = (torch.matmul, operator.matmul, "matmul", torch.bmm, "bmm", torch.mm, "mm")
_ADD_PRODUCTS = (torch.baddbmm, "baddbmm", torch.addmm, "addmm")


def _operands(node: OpNode) -> tuple[Any, Any, Any]:
    """(left, right, added) of ``matmul(input, other)``, ``bmm(input, mat2)`` and
    ``baddbmm(input, batch1, batch2)`` / ``addmm(input, mat1, mat2)``; fx keys for ``@``."""
    kw = node.kw
    if node.target in _ADD_PRODUCTS:
        return kw.get("batch1", kw.get("mat1")), kw.get("batch2", kw.get("mat2")), kw.get("input")
    if "input" in kw:
        return kw["input"], kw.get("other", kw.get("mat2")), None
    return node.args[0], node.args[1], None


def _is_const(v: Any, layouts: dict) -> bool:
    return isinstance(v, Ref) and layouts.get(v.name) is None


def _dense_form(node: OpNode, layouts: dict, shapes: dict) -> bool:
    """``x @ W`` with a constant 2-D ``W`` (and a constant or no added term): a Dense layer."""
    left, right, added = _operands(node)
    return (isinstance(left, Ref) and not _is_const(left, layouts) and _is_const(right, layouts)
            and len(shapes[right.name]) == 2 and len(shapes[left.name]) >= 2
            and (added is None or not isinstance(added, Ref) or _is_const(added, layouts)))


def _einsum_form(node: OpNode, layouts: dict, shapes: dict) -> bool:
    """Two computed operands of one rank >= 2 with equal batch dims, nothing added: an einsum
    reads both in their layouts (``q @ k.transpose(-2, -1)`` transposes nothing)."""
    left, right, added = _operands(node)
    if added is not None or not all(isinstance(r, Ref) and not _is_const(r, layouts) for r in (left, right)):
        return False
    a, b = shapes[left.name], shapes[right.name]
    return len(a) == len(b) >= 2 and tuple(a[:-2]) == tuple(b[:-2])


def _product_einsum(node: OpNode, ctx: Emit) -> Any:
    """The product with each operand in its layout; the result in the left operand's axis order
    (heads split by a permute stay where they are: ``(q @ k.T).softmax(-1) @ v`` then
    ``.transpose(1, 2).reshape(B, N, C)`` moves no data)."""
    left, right = _operands(node)[:2]
    rank = node.rank
    batch = "abcdefgh"[:rank - 2]
    subs = []
    for ref, sub in ((left, batch + "ij"), (right, batch + "jk")):
        phys = node.in_layouts[node.inputs.index(ref.name)]
        subs.append("".join(sub[p] for p in phys.perm))
    x, y = (_tensor(node, ctx, r) for r in (left, right))
    out = "".join((batch + "ik")[p] for p in node.layout.perm)
    return keras.ops.einsum(f"{subs[0]},{subs[1]}->{out}", x, y)


def _as_linear(node: OpNode, weight: Any = None, bias: Any = None) -> OpNode:
    left = _operands(node)[0]
    return replace(node, target=F.linear, inputs=(left.name,), module=None,
                   kw={"input": left, "weight": weight, "bias": bias})


def _product_layout(node: OpNode, ins: list, shapes: list) -> tuple[list, Phys]:
    layouts = dict(zip(node.inputs, ins))
    by_name = dict(zip(node.inputs, shapes))
    full = [Phys.identity(len(s)) for s in shapes]
    if _einsum_form(node, layouts, by_name):  # each operand read in its own layout
        left, right = _operands(node)[:2]
        for ref in (left, right):
            p = layouts[ref.name]
            full[node.inputs.index(ref.name)] = p if p.flat is None else full[node.inputs.index(ref.name)]
        return full, Phys(full[node.inputs.index(left.name)].perm)  # the left operand's axis order
    if not _dense_form(node, layouts, by_name):
        return full, Phys.identity(node.rank)
    left = _operands(node)[0].name
    i = node.inputs.index(left)
    req, out = lookup(F.linear).layout(_as_linear(node), [ins[i]], [shapes[i]])
    full[i] = req[0]
    return full, out


@rule(*_PRODUCTS, *_ADD_PRODUCTS, layout=_product_layout)
def matmul(node: OpNode, ctx: Emit) -> Any:
    """``beta * added + alpha * (left @ right)``; a Dense layer when ``right`` is a weight."""
    left, right, added = _operands(node)
    alpha, beta = float(node.kw.get("alpha", 1)), float(node.kw.get("beta", 1))
    layouts = {n: (None if ctx.graph.nodes[n]["op"].is_constant else p) for n, p in zip(node.inputs, node.in_layouts)}
    shapes = {n: ctx.graph.nodes[n]["op"].shape for n in node.inputs}
    if _dense_form(node, layouts, shapes):
        w = np.asarray(_const(ctx, right), np.float32) * alpha
        b = None if added is None else np.broadcast_to(np.asarray(_const(ctx, added), np.float32) * beta,
                                                       (w.shape[1],)).copy()
        t = _as_linear(node, w.T, b)
        t = replace(t, in_layouts=(node.in_layouts[node.inputs.index(left.name)],))
        return lookup(F.linear).fn(t, ctx)
    if _einsum_form(node, layouts, shapes):
        y = _product_einsum(node, ctx)
    else:
        y = keras.ops.matmul(_tensor(node, ctx, left), _tensor(node, ctx, right))
    y = y if alpha == 1 else scale(y, alpha, ctx.name(node, "alpha"))
    if added is None or (beta == 0 and isinstance(added, Ref)):
        return y
    if not isinstance(added, Ref):
        return keras.ops.add(y, float(added) * beta)
    b = _tensor(node, ctx, added)
    b = b if beta == 1 else scale(b, beta, ctx.name(node, "beta"))
    return keras.ops.subtract(y, keras.ops.negative(b))  # not add: see safe_add in op_rules/attention.py


def _const(ctx: Emit, ref: Any) -> np.ndarray:
    if isinstance(ref, Ref):
        return to_numpy(ctx.graph.nodes[ref.name]["op"].value)
    return np.asarray(ref)


def _tensor(node: OpNode, ctx: Emit, ref: Ref) -> Any:
    return ctx.tensor_input(node, ctx.index_of(node, ref))


# ---- einsum --------------------------------------------------------------------------------

def _einsum_parts(node: OpNode) -> tuple[str, list]:
    """The equation made explicit with lower-case labels (:func:`normalized_equation`), and the operands."""
    args = list(node.args)
    equation = args[0]
    operands = args[1:]
    if len(operands) == 1 and isinstance(operands[0], (tuple, list)):
        operands = list(operands[0])
    return normalized_equation(equation), operands


def normalized_equation(equation: str) -> str:
    """``equation`` without spaces, with its output written out (torch's implicit output: the labels
    used once, in ASCII order, after ``...``) and its labels renamed to ``a``, ``b``, ... in order of first
    use: torch takes upper- and lower-case labels, Keras' einsum shape inference only lower case
    (keras.src.ops.numpy.Einsum in Keras 3.15: torchvision's maxvit_t writes ``"B G H I D, ..."``)."""
    equation = equation.replace(" ", "")
    lhs, arrow, rhs = equation.partition("->")
    if not arrow:
        letters = [c for c in lhs if c.isalpha()]
        rhs = ("..." if "..." in lhs else "") + "".join(sorted(c for c in set(letters) if letters.count(c) == 1))
    labels = list(dict.fromkeys(c for c in lhs + rhs if c.isalpha()))
    if len(labels) > 26:
        raise NotImplementedError(f"einsum equation {equation!r} uses {len(labels)} index labels; Keras' einsum "
                                  "takes at most 26 (a-z): split it into two einsums")
    rename = {c: chr(ord("a") + k) for k, c in enumerate(labels)}
    return "".join(rename.get(c, c) for c in f"{lhs}->{rhs}")


def _subscripts(equation: str) -> tuple[list[str], str]:
    """Operand and output subscripts of an explicit equation (:func:`normalized_equation`)."""
    lhs, _, rhs = equation.partition("->")
    return lhs.split(","), rhs


def _einsum_layout(node: OpNode, ins: list, shapes: list) -> tuple[list, Phys]:
    equation, operands = _einsum_parts(node)
    ellipsis = "..." in equation
    req = []
    for p, s in zip(ins, shapes):
        keep = p is not None and p.flat is None and not ellipsis
        req.append(p if keep else Phys.identity(len(s)))
    if ellipsis or not isinstance(operands[0], Ref):
        return req, Phys.identity(node.rank)
    return req, Phys(_output_order(equation, req[node.inputs.index(operands[0].name)]))


def _output_order(equation: str, first: Phys) -> tuple[int, ...]:
    """The output's axes in the first operand's physical order (then the rest in torch order),
    when that keeps torch's axis 0 first: ``einsum("bhlk,bhtk->bhlt", q, k)`` of a q whose heads
    were split by a permute stays in that order, so the permute back moves no data."""
    subs, out = _subscripts(equation)
    seen = [c for c in (subs[0][p] for p in first.perm) if c in out]
    order = seen + [c for c in out if c not in seen]
    perm = tuple(out.index(c) for c in order)
    return perm if perm and perm[0] == 0 else tuple(range(len(out)))


@rule(torch.einsum, torch.ops.aten.einsum.default, layout=_einsum_layout)
def einsum(node: OpNode, ctx: Emit) -> Any:
    """keras.ops.einsum with each operand's subscripts in its physical axis order."""
    equation, operands = _einsum_parts(node)
    subs, out = _subscripts(equation)
    if len(subs) != len(operands):
        raise ValueError(f"einsum equation {equation!r} names {len(subs)} operands, got {len(operands)}")
    tensors, physical = [], []
    for sub, ref in zip(subs, operands):
        if not isinstance(ref, Ref):
            raise ValueError(f"einsum operand {ref!r} is not a tensor")
        i = ctx.index_of(node, ref)
        tensors.append(ctx.tensor_input(node, i))
        phys = node.in_layouts[i]
        physical.append(sub if "..." in sub else "".join(sub[p] for p in phys.perm))
    out = out if "..." in out else "".join(out[p] for p in node.layout.perm)
    return keras.ops.einsum(f"{','.join(physical)}->{out}", *tensors)
