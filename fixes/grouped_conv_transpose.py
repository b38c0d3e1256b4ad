"""Grouped transposed convolution as one transposed convolution per group.

Works around: Keras 3 (checked on 3.15) ``Conv{1,2,3}DTranspose`` has no ``groups`` argument,
while PyTorch's ConvTranspose supports ``groups``. Each group's input channels are sliced,
convolved with that group's slice of the weight, and the results concatenated in group order,
which is exactly PyTorch's channel order. Delete when Keras gains grouped transposed convs.
"""
from __future__ import annotations

from typing import Any, Callable

import keras

from tracer.emitter import layers as L


def grouped_conv_transpose(x: Any, spec: Any, extra: tuple, name: str, build_one: Callable) -> Any:
    g = spec.groups
    in_ch, out_per_group = spec.weight.shape[:2]
    in_per_group = in_ch // g
    rank = spec.n + 2
    parts = []
    for j in range(g):
        sl = [[None, None, None]] * (rank - 1) + [[j * in_per_group, (j + 1) * in_per_group, None]]
        xj = L.strided_slice(x, sl)
        wj = spec.weight[j * in_per_group:(j + 1) * in_per_group]
        bj = None if spec.bias is None else spec.bias[j * out_per_group:(j + 1) * out_per_group]
        parts.append(build_one(xj, wj, bj, spec, extra, f"{name}.g{j}"))
    return keras.layers.Concatenate(axis=-1, name=f"{name}.concat")(parts)
