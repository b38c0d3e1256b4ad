"""erf from builtin LiteRT ops, for the exported copy of the model only.

Works around: TFLite has no builtin ERF kernel (checked with the TensorFlow 2.21 converter and
ai-edge-litert 2.3), so ``tf.Erf`` converts only as a Select TF ("Flex") op, which a builtin-only
export refuses. (Exact GELU is not affected: the converter maps it to the builtin GELU.)

The replacement is the float32 rational approximation Eigen uses for erf on CPU (the kernel
TensorFlow itself runs for ``tf.math.erf``): inputs clamped to [-4, 4], an odd degree-13
polynomial over an even degree-8 one; |error| < 2e-7 against float64 erf. It needs only
MINIMUM, MAXIMUM, MUL, ADD and DIV. The Keras model keeps ``keras.ops.erf``; delete this fix
when LiteRT gains a builtin erf.
"""
from __future__ import annotations

from typing import Any, Callable

from keras import ops

_ALPHA = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06, -5.69250639462346e-05,
          -7.34990630326855e-04, -2.95459980854025e-03, -1.60960333262415e-02)  # x^13 ... x^1
_BETA = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03, -7.37332916720468e-03,
         -1.42647390514189e-02)  # x^8 ... x^0


def erf_rational(x: Any) -> Any:
    """erf(x) with builtin ops only (Eigen's float32 approximation)."""
    x = ops.clip(x, -4.0, 4.0)
    x2 = ops.multiply(x, x)
    p = _horner(x2, _ALPHA)
    q = _horner(x2, _BETA)
    return ops.divide(ops.multiply(x, p), q)


def _horner(x2: Any, coefficients: tuple[float, ...]) -> Any:
    acc = ops.add(ops.multiply(x2, coefficients[0]), coefficients[1])
    for c in coefficients[2:]:
        acc = ops.add(ops.multiply(x2, acc), c)
    return acc


def erf_builtin(operation: Any) -> Callable | None:
    """Export fix: replace a ``keras.ops.erf`` node with :func:`erf_rational`."""
    from keras.src.ops.math import Erf  # keras.ops exposes the function, not the Operation class

    return erf_rational if isinstance(operation, Erf) else None
