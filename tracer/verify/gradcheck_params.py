"""Which PyTorch tensor each Keras weight holds, found by value, as an index map.

Keras weights are matched to PyTorch parameters and buffers by layer name (Keras layers follow
torch module paths) and by value: each Keras weight must be an exact rearrangement of a PyTorch
tensor (conv kernels ``(*k, in, out)`` vs ``(out, in, *k)``, transposed dense kernels, depthwise
kernels, 1-D BatchNorm vectors, constants in a layout), or, when the tensor's values are
distinct, any selection of its entries (a Linear kernel with a flattening order folded in). The
index map carries gradients back (:mod:`tracer.verify.gradcheck`) and weights forward
(:func:`restore_torch_weights`).

A Keras LSTM / GRU / SimpleRNN made from nn.LSTM / GRU / RNN (op_rules/recurrent.py) is mapped by
its layout, not by value: the GRU's gates reordered (torch r, z, n -> Keras z, r, h) and its
``(2, 3H)`` bias split, row 0 ``bias_ih`` and row 1 ``bias_hh``; the one bias of an LSTM / SimpleRNN
holds ``bias_ih + bias_hh``, so its gradient is each one's gradient. Which torch layer and direction
a Keras layer holds is the one whose values it has exactly.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Iterator

import keras
import numpy as np
import torch
import torch.nn as nn

from tracer.op_rules.recurrent_io import gru_order

_HINTS = {"kernel": ("weight",), "bias": ("bias",), "gamma": ("weight",), "beta": ("bias",),
          "moving_mean": ("running_mean",), "moving_variance": ("running_var",), "alpha": ("weight",),
          "embeddings": ("weight",), "value": ()}


@dataclass(frozen=True)
class ParamMap:
    """Keras variable ``keras_path`` holds PyTorch tensor ``torch_name`` rearranged: ``index`` has the
    Keras variable's shape and gives, for each entry, the flat index into the PyTorch tensor, or -1
    where the entry holds another tensor (a GRU's bias: ``bias_ih`` and ``bias_hh`` stacked).
    ``summed_with``: the Keras variable holds this tensor plus that one (an LSTM's ``bias_ih + bias_hh``;
    the other tensor has its own map, without ``summed_with``)."""

    torch_name: str
    keras_path: str
    how: str
    index: np.ndarray
    trainable: bool
    summed_with: str = ""

    @property
    def held(self) -> np.ndarray:
        """Which entries of the Keras variable hold this tensor."""
        return self.index >= 0


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
    used: set[tuple[str, str]] = set()  # (module path, suffix) of the torch RNN layers already mapped
    for layer in _layers(keras_model):
        owner = _owner(layer.name, modules)
        recurrent = _recurrent_maps(layer, owner, modules, tensors, used)
        if recurrent is not None:
            maps += recurrent
            continue
        for var in layer.weights:
            value = keras.ops.convert_to_numpy(var.value)
            short = var.path.rpartition("/")[2]
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


# ---- recurrent layers ------------------------------------------------------------------------------
_RNN_LAYERS = {"LSTM": nn.LSTM, "GRU": nn.GRU, "SimpleRNN": nn.RNN}


def _recurrent_maps(layer: Any, owner: str | None, modules: dict, tensors: dict,
                    used: set[tuple[str, str]]) -> list[ParamMap] | None:
    """The maps of a Keras recurrent layer (both of a Bidirectional's) that holds an nn.LSTM / GRU /
    RNN's weights in op_rules/recurrent.py's layout; None when it is not one (mapped by value then)."""
    inner = [layer.forward_layer, layer.backward_layer] if isinstance(layer, keras.layers.Bidirectional) else [layer]
    module = modules.get(owner) if owner is not None else None
    kinds = {type(sub).__name__ for sub in inner}
    if len(kinds) != 1 or not isinstance(module, _RNN_LAYERS.get(kinds.pop(), ())):
        return None
    maps: list[ParamMap] = []
    for sub in inner:
        found = _direction(sub, module, owner, tensors, used)
        if found is None:
            return None
        maps += found
    return maps


def _direction(sub: Any, module: nn.Module, owner: str, tensors: dict,
               used: set[tuple[str, str]]) -> list[ParamMap] | None:
    """The torch layer and direction (suffix ``_l1_reverse``) whose values Keras layer ``sub`` holds exactly."""
    values = {v.path: keras.ops.convert_to_numpy(v.value) for v in sub.weights}
    for k in range(module.num_layers):
        for d in range(2 if module.bidirectional else 1):
            sfx = f"_l{k}" + ("_reverse" if d else "")
            if (owner, sfx) in used:
                continue
            maps = _layout_maps(sub, f"{owner}." if owner else "", sfx, tensors)
            if maps is not None and _holds(maps, values, tensors):
                used.add((owner, sfx))
                return maps
    return None


def _layout_maps(sub: Any, prefix: str, sfx: str, tensors: dict) -> list[ParamMap] | None:
    """op_rules/recurrent.py's layout as index maps: kernels ``W.T`` (GRU gates reordered), the GRU's
    ``(2, 3H)`` bias split by row, an LSTM / SimpleRNN's bias as ``bias_ih + bias_hh``."""
    cell, gru = sub.cell, type(sub).__name__ == "GRU"
    order = gru_order if gru else (lambda a: a)
    names = {k: f"{prefix}{k}{sfx}" for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")}
    wanted = ["weight_ih", "weight_hh"] + (["bias_ih", "bias_hh"] if cell.use_bias else [])
    if any(names[k] not in tensors for k in wanted):
        return None
    idx = {k: order(np.arange(tensors[names[k]].w.size).reshape(tensors[names[k]].w.shape)) for k in wanted}
    gates = "gates r, z, n -> z, r, h, " if gru else ""
    maps = [ParamMap(names["weight_ih"], cell.kernel.path, f"recurrent kernel ({gates}transposed)",
                     idx["weight_ih"].T, bool(cell.kernel.trainable)),
            ParamMap(names["weight_hh"], cell.recurrent_kernel.path, f"recurrent kernel ({gates}transposed)",
                     idx["weight_hh"].T, bool(cell.recurrent_kernel.trainable))]
    if not cell.use_bias:
        return maps
    path, trainable = cell.bias.path, bool(cell.bias.trainable)
    if gru:  # reset_after=True: row 0 the input side, row 1 the state side
        none = np.full_like(idx["bias_ih"], -1)
        return maps + [ParamMap(names["bias_ih"], path, f"GRU bias row 0 ({gates[:-2]})",
                                np.stack([idx["bias_ih"], none]), trainable),
                       ParamMap(names["bias_hh"], path, f"GRU bias row 1 ({gates[:-2]})",
                                np.stack([none, idx["bias_hh"]]), trainable)]
    return maps + [ParamMap(names["bias_ih"], path, f"summed bias: {names['bias_ih']} + {names['bias_hh']}",
                            idx["bias_ih"], trainable, summed_with=names["bias_hh"]),
                   ParamMap(names["bias_hh"], path, f"summed bias: {names['bias_ih']} + {names['bias_hh']}",
                            idx["bias_hh"], trainable)]


def _holds(maps: list[ParamMap], values: dict[str, np.ndarray], tensors: dict) -> bool:
    """Every Keras variable is exactly what ``maps`` put together (stacked parts, or a sum)."""
    built: dict[str, np.ndarray] = {}
    for m in maps:
        part = np.where(m.held, tensors[m.torch_name].flat[np.where(m.held, m.index, 0)], 0).astype(np.float32)
        built[m.keras_path] = part if m.keras_path not in built else built[m.keras_path] + part
    return set(built) == set(values) and all(np.array_equal(built[p], values[p]) for p in values)


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
            _restore(m, saved[m.keras_path], tensors, maps)
            done.add(m.torch_name)
    missing = [k for k, t in tensors.items() if k not in done and t.is_floating_point()]
    return sorted(done), missing



def _restore(m: ParamMap, saved: np.ndarray, tensors: dict, maps: list[ParamMap]) -> None:
    """Keras value ``saved`` into the entries of torch tensor ``m.torch_name`` it holds; of a summed bias,
    ``summed_with`` keeps its value and ``m.torch_name`` takes the rest."""
    if any(o.summed_with == m.torch_name and o.keras_path == m.keras_path for o in maps):
        return  # the partner of a summed bias: it keeps its value
    t = tensors[m.torch_name]
    flat = t.detach().cpu().numpy().ravel().copy()
    value = saved
    if m.summed_with:
        other = next(o for o in maps if o.torch_name == m.summed_with and o.keras_path == m.keras_path)
        value = saved - tensors[m.summed_with].detach().cpu().numpy().ravel()[other.index]
    held = m.held.ravel()
    flat[m.index.ravel()[held]] = value.ravel()[held]
    t.copy_(torch.from_numpy(flat.reshape(tuple(t.shape))).to(t.dtype))
