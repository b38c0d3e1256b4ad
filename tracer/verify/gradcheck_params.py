"""Which PyTorch tensor each Keras weight holds, found by value, as an index map.

Keras weights are matched to PyTorch parameters and buffers by layer name (Keras layers follow
torch module paths) and by value: each Keras weight must be an exact rearrangement of a PyTorch
tensor (conv kernels ``(*k, in, out)`` vs ``(out, in, *k)``, transposed dense kernels, depthwise
kernels, 1-D BatchNorm vectors, constants in a layout), or, when the tensor's values are
distinct, any selection of its entries (a Linear kernel with a flattening order folded in). The
index map carries gradients back (:mod:`tracer.verify.gradcheck`) and weights forward
(:func:`restore_torch_weights`).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Iterator

import keras
import numpy as np
import torch

_HINTS = {"kernel": ("weight",), "bias": ("bias",), "gamma": ("weight",), "beta": ("bias",),
          "moving_mean": ("running_mean",), "moving_variance": ("running_var",), "alpha": ("weight",),
          "embeddings": ("weight",), "value": ()}


@dataclass(frozen=True)
class ParamMap:
    """Keras variable ``keras_path`` holds PyTorch tensor ``torch_name`` rearranged: ``index`` has the
    Keras variable's shape and gives, for each entry, the flat index into the PyTorch tensor."""

    torch_name: str
    keras_path: str
    how: str
    index: np.ndarray
    trainable: bool



def _arrangements(var_shape: tuple, torch_shape: tuple, layer: Any) -> Iterator[tuple[str, Any]]:
    """Candidate rearrangements (name, fn: torch index array -> Keras-shaped index array), likeliest first."""
    n = len(torch_shape)
    if "Depthwise" in type(layer).__name__ and n >= 3 and torch_shape[1] == 1:
        mult = var_shape[-1]
        yield "depthwise (in*mult, 1, *k) -> (*k, in, mult)", lambda i: i.reshape(
            i.shape[0] // mult, mult, *i.shape[2:]).transpose(*range(2, n), 0, 1)
    yield "same", lambda i: i.reshape(var_shape)
    if n >= 3:
        yield "conv (out, in, *k) -> (*k, in, out)", lambda i: i.transpose(*range(2, n), 1, 0)
    if n == 2:
        yield "dense (out, in) -> (in, out)", lambda i: i.T
    if 2 <= n <= 5:
        for perm in itertools.permutations(range(n)):
            yield f"transpose {perm}", lambda i, p=perm: i.transpose(p).reshape(var_shape)


class _Tensor:
    """A PyTorch tensor as numpy, with its sort order when its values are distinct (computed once)."""

    def __init__(self, t: torch.Tensor):
        self.w = t.detach().cpu().numpy()
        self.flat = self.w.ravel()
        self._order: np.ndarray | None | bool = False

    @property
    def order(self) -> np.ndarray | None:
        if self._order is False:
            order = np.argsort(self.flat, kind="stable")
            distinct = self.flat.size < 2 or bool(np.all(np.diff(self.flat[order]) != 0))
            self._order = order if distinct and np.issubdtype(self.flat.dtype, np.floating) else None
        return self._order


def _match(value: np.ndarray, t: _Tensor, layer: Any) -> tuple[str, np.ndarray] | None:
    """How Keras ``value`` is an exact rearrangement (or part) of PyTorch tensor ``t``, as an index map."""
    w, w_flat = t.w, t.flat
    if value.size == w.size:
        base = np.arange(w.size).reshape(w.shape)
        for how, fn in _arrangements(value.shape, w.shape, layer):
            try:
                idx = fn(base)
            except ValueError:
                continue
            if idx.shape == value.shape and np.array_equal(w_flat[idx], value):
                return how, idx
    order = t.order if value.size <= w.size and (value.size > 1 or w.size == 1) else None
    if order is not None:  # distinct values: look each one up
        pos = np.clip(np.searchsorted(w_flat[order], value.ravel()), 0, w.size - 1)
        idx = order[pos].reshape(value.shape)
        if np.array_equal(w_flat[idx], value):
            return "by value", idx
    return None


def _owner(layer_name: str, modules: dict) -> str | None:
    """The torch module path a Keras layer name was derived from (emitter.context.Emit.name)."""
    name = layer_name
    while True:
        if name in modules:
            return name
        base, _, tail = name.rpartition("_")
        if base and tail.isdigit() and base in modules:  # a module called again: path_2
            return base
        if "." not in name:
            return "" if "" in modules else None
        name = name.rpartition(".")[0]


def map_parameters(model: torch.nn.Module, keras_model: Any) -> tuple[list[ParamMap], list[str]]:
    """Every Keras weight matched to the PyTorch parameter or buffer it holds; and the unmatched ones."""
    modules = dict(model.named_modules())
    tensors = {k: _Tensor(t) for k, t in {**dict(model.named_buffers()), **dict(model.named_parameters())}.items()}
    maps, unmatched = [], []
    for layer in _layers(keras_model):
        for var in layer.weights:
            value = keras.ops.convert_to_numpy(var.value)
            short = var.path.rpartition("/")[2]
            owner = _owner(layer.name, modules)
            prefix = f"{owner}." if owner else ""
            local = [k for k in tensors if owner is not None and k.startswith(prefix)]
            hinted = [f"{prefix}{h}" for h in _HINTS.get(short, ()) if f"{prefix}{h}" in tensors]
            found = None
            for name in dict.fromkeys(hinted + local + list(tensors)):
                t = tensors[name]
                if np.issubdtype(t.w.dtype, np.floating) != np.issubdtype(value.dtype, np.floating):
                    continue
                hit = _match(value, t, layer) if t.w.size >= value.size and value.size else None
                if hit is not None:
                    found = ParamMap(name, var.path, hit[0], hit[1], bool(var.trainable))
                    break
            if found is None:
                unmatched.append(var.path)
            else:
                maps.append(found)
    return maps, unmatched


def _layers(keras_model: Any) -> Iterator[Any]:
    for layer in keras_model.layers:
        if hasattr(layer, "layers") and layer.layers and layer is not keras_model:
            yield from _layers(layer)
        else:
            yield layer


def restore_torch_weights(model: torch.nn.Module, fresh_keras: Any, saved_keras: Any) -> tuple[list[str], list[str]]:
    """Put the weights of ``saved_keras`` into ``model``, through the map between ``model`` and its fresh
    conversion ``fresh_keras``. Returns (restored, not restored) names.

    Both Keras models come from the same conversion, so their weights pair up in order; names may
    not (a second conversion in one process gets ``bn_2`` where the saved file has ``bn``)."""
    maps, _ = map_parameters(model, fresh_keras)
    fresh, stored = list(fresh_keras.weights), list(saved_keras.weights)
    if len(fresh) == len(stored) and all(tuple(a.shape) == tuple(b.shape) for a, b in zip(fresh, stored)):
        saved = {a.path: keras.ops.convert_to_numpy(b.value) for a, b in zip(fresh, stored)}
    else:  # not the same architecture: only what has the same path
        saved = {v.path: keras.ops.convert_to_numpy(v.value) for v in stored}
    tensors = {**dict(model.named_buffers()), **dict(model.named_parameters())}
    done: set[str] = set()
    with torch.no_grad():
        for m in maps:
            if m.keras_path not in saved or saved[m.keras_path].shape != m.index.shape:
                continue
            t = tensors[m.torch_name]
            flat = t.detach().cpu().numpy().ravel().copy()
            flat[m.index.ravel()] = saved[m.keras_path].ravel()
            t.copy_(torch.from_numpy(flat.reshape(tuple(t.shape))).to(t.dtype))
            done.add(m.torch_name)
    missing = [k for k, t in tensors.items() if k not in done and t.is_floating_point()]
    return sorted(done), missing

