"""Keras recurrent layers unrolled over time, for the exported copy of the model only.

Works around: a Keras 3 LSTM / GRU / SimpleRNN runs its time loop as a ``tf.while_loop`` over
TensorLists whose element shape holds the dynamic batch; the TensorFlow 2.21 TFLite converter
cannot lower those to builtin ops ("'tf.TensorListReserve' op requires element_shape to be
static"), and only offers Select TF ops. (Keras 3's LSTM is not marked for the converter's fused
UNIDIRECTIONAL_SEQUENCE_LSTM the way tf.keras 2's was, so that fusion does not happen either.)

The replacement runs the *same cell* (the same variables) in ``keras.layers.RNN(cell,
unroll=True)``: the time steps become plain MUL / ADD / LOGISTIC / TANH ops, the batch stays
dynamic, and the result is the same computation. A ``Bidirectional`` wrapper is replaced by its
two directions, the backward output flipped and concatenated as Keras does. The Keras model keeps
its loop; delete this fix when the converter lowers Keras 3's loop (or fuses its LSTM). Over a
dynamic time axis (unknown length, so no unrolling) fixes/tflite_rnn_while.py applies instead.
"""
from __future__ import annotations

from typing import Any, Callable

import keras

from tracer.fixes.tflite_rnn_while import bidirectional, time_is_dynamic


def _loops(layer: Any) -> bool:
    """A cell-based Keras RNN layer that runs a loop over time (and so needs unrolling)."""
    return isinstance(layer, keras.layers.RNN) and not layer.unroll and not layer.stateful and \
        layer.built and getattr(layer, "cell", None) is not None and not time_is_dynamic(layer)


def _unrolled(layer: Any) -> Any:
    return keras.layers.RNN(layer.cell, return_sequences=layer.return_sequences, return_state=layer.return_state,
                            go_backwards=layer.go_backwards, unroll=True, name=f"{layer.name}_unrolled")


def rnn_unrolled(operation: Any) -> Callable | None:
    """Export fix: a looping Keras RNN layer (or a concat ``Bidirectional`` of two) as its unrolled twin."""
    if isinstance(operation, keras.layers.Bidirectional):
        if operation.merge_mode == "concat" and not time_is_dynamic(operation) and \
                _loops(operation.forward_layer) and _loops(operation.backward_layer):
            return bidirectional(operation, _unrolled)
        return None
    if _loops(operation):
        layer = _unrolled(operation)

        def call(x: Any, initial_state: Any = None, **_: Any) -> Any:
            return layer(x, initial_state=initial_state)

        return call
    return None
