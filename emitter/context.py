"""Emit: what a rule sees while it builds Keras for one node.

Rules ask for inputs (already in the layout they declared), constants as numpy arrays, layer
names derived from torch module paths, and axis numbers mapped through layouts. Layout
conversions are created here, once per (tensor, layout), so every consumer shares them.
"""
from __future__ import annotations

import math
import re
from typing import Any

import keras
import networkx as nx
import numpy as np
import torch

from tracer.emitter import layers as L
from tracer.ir import OpNode, Phys, Ref, op


class Emit:
    def __init__(self, graph: nx.DiGraph):
        self.graph = graph
        self.tensors: dict[str, Any] = {}  # node name -> Keras tensor(s) in the node's layout
        self._converted: dict[tuple[str, Phys], Any] = {}
        self._names: set[str] = set()
        self.anchor = None  # a graph tensor constants hang from
        self._unit = None
        self.transposes: list[str] = []  # one entry per Transpose op created, with its reason

    # ---- inputs -------------------------------------------------------------------------
    def input(self, node: OpNode, i: int = 0) -> Any:
        """Input ``i`` in the layout the rule declared: a Keras tensor, or a numpy array for a constant."""
        src = op(self.graph, node.inputs[i])
        want = node.in_layouts[i] if i < len(node.in_layouts) else None
        if src.is_constant:
            return arrange(to_numpy(src.value), want)
        where = f" ({node.module_path})" if node.module_path else ""
        return self.convert(src, want, reason=f"{node.name}{where} needs axis order {want.perm if want else ''}")

    def tensor_input(self, node: OpNode, i: int = 0) -> Any:
        """Like :meth:`input`, but a constant becomes a Keras tensor too."""
        x = self.input(node, i)
        if isinstance(x, np.ndarray):
            src = op(self.graph, node.inputs[i])
            return self.constant(x, self.name(src), trainable=bool(src.kw.get("trainable")))
        return x

    def is_constant(self, node: OpNode, i: int) -> bool:
        return op(self.graph, node.inputs[i]).is_constant

    def value(self, node: OpNode, key: str, default: Any = None) -> Any:
        """A named argument; a reference to a constant node gives its value as numpy."""
        v = node.kw.get(key, default)
        if isinstance(v, Ref):
            src = op(self.graph, v.name)
            if not src.is_constant:
                raise TypeError(f"argument {key!r} of {node.name} must be constant, it depends on the inputs")
            return to_numpy(src.value)
        return v

    def index_of(self, node: OpNode, ref: Ref) -> int:
        return node.inputs.index(ref.name)

    # ---- naming and axes -----------------------------------------------------------------
    def name(self, node: OpNode, suffix: str = "") -> str:
        base = node.module_path if node.kind == "call_module" else (
            f"{node.module_path}.{node.name}" if node.module_path else node.name)
        base = re.sub(r"[^A-Za-z0-9_.\-]", "_", base + (f".{suffix}" if suffix else "")) or "op"
        base = base if base[0].isalnum() else f"op{base}"  # TensorFlow's root scope names start alphanumeric
        name, k = base, 1
        while name in self._names or L.name_taken(name):
            k += 1
            name = f"{base}_{k}"
        self._names.add(name)
        L.reserve_name(name)
        return name

    def axis(self, node: OpNode, dim: int, i: int = 0) -> int:
        """Keras axis of torch dim ``dim`` of input ``i`` in its required layout."""
        return node.in_layouts[i].axis(dim)

    # ---- constants and layout conversions ---------------------------------------------------
    def constant(self, value: np.ndarray, name: str, trainable: bool = False) -> Any:
        """``value`` as a graph tensor (the kernel of a built-in layer; see emitter/layers.py)."""
        return L.constant(self.unit(), value, name, trainable=trainable)

    def unit(self) -> Any:
        """The model's (1, 1) tensor of ones that constants hang from (made once, from an input)."""
        if self._unit is None:
            self._unit = L.unit(self.anchor)
        return self._unit

    def convert(self, src: OpNode, want: Phys | None, reason: str = "") -> Any:
        have = src.layout
        x = self.tensors[src.name]
        if want is None or want == have or have is None:
            return x
        key = (src.name, want)
        if key not in self._converted:
            self._converted[key] = self._materialize(x, src, have, want, reason)
        return self._converted[key]

    def _materialize(self, x: Any, src: OpNode, have: Phys, want: Phys, reason: str) -> Any:
        shape = src.shape
        if have.flat is not None:  # unflatten, back to torch order, flatten again
            tshape, order = have.flat
            prefix = list(have.perm[:-1])
            x = keras.ops.reshape(x, (-1, *[shape[p] for p in prefix[1:]], *[tshape[o] for o in order]))
            unflat = Phys((*prefix, *[len(prefix) + o for o in order]))
            x = self._transpose(x, unflat, Phys.identity(len(unflat.perm)),
                                (*shape[:-1], *tshape), f"{src.name}: flattened NHWC map, {reason}")
            x = keras.ops.reshape(x, (-1, *shape[1:]))
            have = Phys.identity(len(shape))
        if len(want.perm) > len(shape):  # broadcast operand of lower rank
            x = self._transpose(x, have, Phys.identity(len(shape)), shape, f"{src.name}: {reason}")
            for _ in range(len(want.perm) - len(shape)):
                x = keras.ops.expand_dims(x, 0)
            shape = (1,) * (len(want.perm) - len(shape)) + tuple(shape)
            have = Phys.identity(len(shape))
        return self._transpose(x, have, want, shape, f"{src.name}: {reason}")

    def _transpose(self, x: Any, have: Phys, want: Phys, shape: tuple, reason: str) -> Any:
        if have.perm == want.perm:
            return x
        axes = [have.perm.index(d) for d in want.perm]
        moved = [d for d in want.perm if shape[d] != 1 or d == 0]
        if moved == [d for d in have.perm if shape[d] != 1 or d == 0] and axes[0] == 0:  # only unit axes move
            dynamic = [d for d in want.perm[1:] if x.shape[have.perm.index(d)] is None]  # tracer/dynamic.py
            if len(dynamic) == 1:
                return keras.layers.Reshape(tuple(-1 if d in dynamic else shape[d] for d in want.perm[1:]))(x)
            if not dynamic:
                return keras.ops.reshape(x, (-1, *[shape[d] for d in want.perm[1:]]))
        self.transposes.append(reason)
        return keras.ops.transpose(x, axes)


def arrange(value: np.ndarray, want: Phys | None) -> np.ndarray:
    """Lay a constant out like a tensor of layout ``want`` (expanding to its rank first)."""
    if want is None:
        return value
    rank = len(want.perm)
    value = value.reshape((1,) * (rank - value.ndim) + value.shape) if value.ndim < rank else value
    value = np.transpose(value, want.perm) if rank > 1 else value
    if want.flat is not None and value.shape[-1] != 1:  # its last axis in the flattened order
        tshape, order = want.flat
        if value.shape[-1] != math.prod(tshape):
            raise ValueError(f"a constant of shape {value.shape} cannot take a flattened layout of {tshape}")
        value = value[..., np.arange(math.prod(tshape)).reshape(tshape).transpose(order).ravel()]
    return value


def to_numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def fold_flat(weight: np.ndarray, phys: Phys) -> np.ndarray:
    """Reorder a Linear's input columns for an input flattened in another axis order."""
    if phys.flat is None:
        return weight
    tshape, order = phys.flat
    idx = np.arange(math.prod(tshape)).reshape(tshape).transpose(order).ravel()
    return weight[:, idx]
