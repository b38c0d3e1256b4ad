"""Convolutions with both a stride > 1 and a dilation > 1 (on any axes).

Works around: Keras 3 (checked on 3.15) convolution layers (Conv, DepthwiseConv, ConvTranspose)
raise "`strides > 1` not supported in conjunction with `dilation_rate > 1`", while PyTorch
accepts the combination. Both rewrites are exact:

* a convolution runs at stride 1 and every stride-th output is kept (``subsample``);
* a transposed convolution of stride s equals a stride-1 one on the input spread out with
  s - 1 zeros after each sample (``spread``); the trailing zeros only add output rows that
  the caller crops away.

They cost up to prod(stride) times the layer's compute. Delete when Keras accepts the combination.
"""
from __future__ import annotations

from typing import Any

import keras

from tracer.emitter import layers as L


def strided_dilated(stride: tuple, dilation: tuple) -> bool:
    """Whether Keras refuses this stride/dilation pair."""
    return any(s > 1 for s in stride) and any(d > 1 for d in dilation)


def subsample(x: Any, stride: tuple, name: str) -> Any:
    """Every stride-th position of each spatial axis of a channels-last tensor."""
    return L.strided_slice(x, [[None, None, None], *[[None, None, int(s)] for s in stride], [None, None, None]])


def spread(x: Any, stride: tuple, name: str) -> Any:
    """(B, *L, C) -> (B, *(L * s), C): each sample followed by s - 1 zeros along its axis."""
    spatial, channels = tuple(x.shape[1:-1]), x.shape[-1]
    y = keras.ops.reshape(x, (-1, *[v for size in spatial for v in (size, 1)], channels))
    pads = [(0, 0), *[p for s in stride for p in ((0, 0), (0, int(s) - 1))], (0, 0)]
    y = L.pad(y, pads, mode="constant", value=0.0)
    return keras.ops.reshape(y, (-1, *[size * s for size, s in zip(spatial, stride)], channels))
