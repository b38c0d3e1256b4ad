"""Reductions over named dims: mean, sum, amax, amin (with keepdim)."""
from __future__ import annotations

from typing import Any

import keras
import torch

from tracer.emitter.context import Emit
from tracer.op_rules.registry import register
from tracer.ir import OpNode, Phys
from tracer.passes.layout import drop_dims


def _dims(node: OpNode, rank: int) -> tuple[int, ...]:
    dim = node.kw.get("dim", node.kw.get("axis"))
    if dim is None:
        return tuple(range(rank))
    dims = dim if isinstance(dim, (tuple, list)) else (dim,)
    return tuple(sorted(d % rank for d in dims))


def _reduce_layout(node: OpNode, ins: list, shapes: list) -> tuple[list, Phys]:
    rank = len(shapes[0])
    phys = ins[0] if ins[0] is not None and ins[0].flat is None else Phys.identity(rank)
    if node.kw.get("keepdim", False):
        return [phys], phys
    return [phys], drop_dims(phys, set(_dims(node, rank)))


def _reduction(kname: str):
    def fn(node: OpNode, ctx: Emit) -> Any:
        x = ctx.input(node, 0)
        phys = node.in_layouts[0]
        axes = tuple(sorted(phys.axis(d) for d in _dims(node, len(phys.perm))))
        return getattr(keras.ops, kname)(x, axis=axes, keepdims=bool(node.kw.get("keepdim", False)))

    fn.__name__ = f"reduce_{kname}"
    return fn


for _kname, _targets in {
    "mean": (torch.mean, "mean"), "sum": (torch.sum, "sum"),
    "max": (torch.amax, "amax"), "min": (torch.amin, "amin"),
}.items():
    register(_targets, _reduction(_kname), _reduce_layout)
