"""Helpers shared by rule families: argument reading, explicit padding, weight setting."""
from __future__ import annotations

from typing import Any, Sequence

import keras
import numpy as np

from tracer.emitter import layers as L
from tracer.emitter.context import Emit, to_numpy
from tracer.ir import OpNode


def param(node: OpNode, name: str, default: Any = None) -> Any:
    """A hyper-parameter: the module's attribute for module calls, else the named argument."""
    if node.module is not None and hasattr(node.module, name):
        return getattr(node.module, name)
    return node.kw.get(name, default)


def ntuple(v: Any, n: int) -> tuple:
    if isinstance(v, (tuple, list)):
        if len(v) == 1:
            return tuple(v) * n
        return tuple(v)
    return (v,) * n


def weight_of(node: OpNode, ctx: Emit, name: str) -> np.ndarray | None:
    """A module parameter or a constant functional argument, as numpy (None when absent)."""
    if node.module is not None:
        w = getattr(node.module, name, None)
        return None if w is None else to_numpy(w)
    v = ctx.value(node, name)
    return None if v is None else np.asarray(v)


def pad_spatial(x: Any, pads: Sequence[tuple[int, int]], mode: str, name: str, value: float = 0.0) -> Any:
    """Explicit padding of the spatial axes of a channels-last tensor (never TF's 'same')."""
    if not any(a or b for a, b in pads):
        return x
    pads = [tuple(int(v) for v in p) for p in pads]
    if mode == "zeros" or (mode == "constant" and value == 0.0):
        if all(a >= 0 and b >= 0 for a, b in pads):
            cls = {1: keras.layers.ZeroPadding1D, 2: keras.layers.ZeroPadding2D,
                   3: keras.layers.ZeroPadding3D}[len(pads)]
            return cls(pads[0] if len(pads) == 1 else tuple(pads), name=name)(x)
        mode = "constant"
    return L.pad(x, [(0, 0), *pads, (0, 0)], mode=mode, value=value)


def crop_spatial(x: Any, crops: Sequence[tuple[int, int]], name: str) -> Any:
    if not any(a or b for a, b in crops):
        return x
    cls = {1: keras.layers.Cropping1D, 2: keras.layers.Cropping2D, 3: keras.layers.Cropping3D}[len(crops)]
    crops = [tuple(int(v) for v in c) for c in crops]
    return cls(crops[0] if len(crops) == 1 else tuple(crops), name=name)(x)


def call_with_weights(layer: keras.layers.Layer, x: Any, weights: list[np.ndarray]) -> Any:
    """Call ``layer`` (which builds it) with its variables created holding ``weights``.

    Random initialization followed by ``set_weights`` was most of the conversion time: the
    layer's initializers hand out ``weights`` in the order the layer creates its variables, and
    are put back afterwards, so ``get_config()`` still describes the layer as the user would
    write it. When the creation order cannot be confirmed by the variables' names, the weights
    are assigned after building (shape-checked, the error naming the layer).
    """
    weights = [w.astype(np.float32) if w.dtype == np.float64 else w for w in weights]
    preset = _Preset(weights)
    y = preset.build(layer, x)
    expected = [tuple(v.shape) for v in layer.weights]
    got = [tuple(w.shape) for w in weights]
    if expected != got:
        raise ValueError(f"weights for Keras layer {layer.name} have shapes {got}, layer expects {expected}")
    if not preset.confirmed([v.name for v in layer.weights]):
        layer.set_weights(weights)
    return y


class _Preset:
    """Initializers that return given arrays, one per variable, in creation order."""

    def __init__(self, weights: list[np.ndarray]):
        self.weights = weights
        self.calls: list[str] = []  # variable name each initializer call was for
        self.ok = True

    def initializer(self, attr: str) -> Any:
        var = "kernel" if attr == "depthwise_initializer" else attr[: -len("_initializer")]

        def init(shape: Any, dtype: Any = None) -> Any:
            k = len(self.calls)
            self.calls.append(var)
            if k < len(self.weights) and tuple(self.weights[k].shape) == tuple(shape):
                return self.weights[k] if dtype is None else self.weights[k].astype(dtype, copy=False)
            self.ok = False
            return np.zeros(shape, dtype or "float32")

        return init

    def build(self, layer: keras.layers.Layer, x: Any) -> Any:
        saved = {k: v for k, v in vars(layer).items()
                 if k.endswith("_initializer") and isinstance(v, keras.initializers.Initializer)}
        for k in saved:
            setattr(layer, k, self.initializer(k))
        try:
            return layer(x)
        except ValueError as exc:
            if "must be fully-defined" not in str(exc):
                raise
            raise NotImplementedError(
                f"the weights of Keras layer {layer.name} would span the batch axis: its input has Keras "
                f"shape {tuple(x.shape)}, the batch (None) on an axis the weights cover, and a Keras model "
                f"keeps the batch as a variable axis. Keep the batch on dim 0 through this op (move the "
                f"transpose or reshape that moves it to after the op)") from exc
        finally:
            for k, v in saved.items():
                setattr(layer, k, v)

    def confirmed(self, names: list[str]) -> bool:
        """Whether every variable got its own array: one call per variable, names in order."""
        return self.ok and self.calls == names


def spatial_layer(kind: str, n: int, suffix: str = "") -> type:
    try:
        return getattr(keras.layers, f"{kind}{n}D{suffix}")
    except AttributeError:
        raise NotImplementedError(f"Keras has no {kind}{n}D{suffix} layer") from None


def trainable(node: OpNode) -> bool:
    """Whether the module's parameters are trained further (any requires_grad)."""
    if node.module is None:
        return True
    params = list(node.module.parameters(recurse=False))
    return not params or any(p.requires_grad for p in params)
