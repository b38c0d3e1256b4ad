"""Keras recurrent layers over a dynamic time axis as a builtin TFLite WHILE loop, for the exported
copy of the model only.

Works around: a Keras 3 LSTM / GRU / SimpleRNN runs its time loop as a ``tf.while_loop`` over
TensorLists (TensorArrays) whose element shape holds the dynamic batch; the TensorFlow 2.21 TFLite
converter cannot lower those to builtin ops ("'tf.TensorListReserve' op requires element_shape to be
static") and only offers Select TF ops. Unrolling (fixes/tflite_rnn_unroll.py) needs a fixed length.

The replacement runs the *same cell* (the same variables) in ``keras.ops.while_loop`` over a time-major
copy of the input, without TensorLists: each step reads its input ``xs[t]`` (STRIDED_SLICE) and
writes its output into a preallocated (T, B, units) tensor with ``keras.ops.slice_update``
(DYNAMIC_UPDATE_SLICE). The converter keeps the loop as a builtin WHILE whose cond and body are
subgraphs of builtin ops, so batch and time both stay -1 in the .tflite signature. ``go_backwards``
reads the input reversed and returns the outputs in processing order, as Keras does; a concat
``Bidirectional`` becomes its two directions, the backward sequence flipped back and concatenated.
Cost: each step rewrites the (T, B, units) output buffer, so a step's cost grows with T (LSTM x2 +
BiGRU stack, 1 thread: ~20 us/step at T=25, ~110 us/step at T=1600); at T=25 (CRNN) it ran faster than
the unrolled file. For int8 the loop passes no variable through unchanged (:func:`rnn_while_loop_int8`), which TF's
calibrator needs. The Keras model keeps its own loop; delete this fix when the converter lowers Keras 3's loop.
"""
from __future__ import annotations

from typing import Any, Callable

import keras
from keras import ops


def time_is_dynamic(layer: Any) -> bool:
    """Whether a layer's first input has an unknown size on axis 1 (the time axis of a batch-first RNN)."""
    return any(len(node.input_tensors[0].shape) > 2 and node.input_tensors[0].shape[1] is None
               for node in getattr(layer, "_inbound_nodes", []) if node.input_tensors)


def _loops(layer: Any) -> bool:
    """A cell-based Keras RNN layer that runs a loop over time."""
    return isinstance(layer, keras.layers.RNN) and not layer.unroll and not layer.stateful and layer.built \
        and getattr(layer, "cell", None) is not None


def _state_sizes(cell: Any) -> list[int]:
    size = cell.state_size
    return [int(s) for s in size] if isinstance(size, (list, tuple)) else [int(size)]


def _zeros(like: Any, size: int) -> Any:
    """Zeros of shape like.shape[:-1] + (size,), built from ``like`` so dynamic sizes stay dynamic."""
    return ops.zeros_like(like[..., :1]) * ops.zeros((size,), dtype=like.dtype)


def while_loop_rnn(layer: Any, fresh_input: bool = False) -> Callable:
    """A callable computing ``layer`` (a keras.layers.RNN over batch-first input) with a while loop.
    ``fresh_input``: no loop variable passes through the body unchanged (for int8 calibration)."""
    cell, sizes = layer.cell, _state_sizes(layer.cell)
    units = int(getattr(cell, "output_size", None) or sizes[0])

    def call(x: Any, initial_state: Any = None, **_: Any) -> Any:
        xs = ops.transpose(x, (1, 0, *range(2, len(x.shape))))  # time-major: (T, B, ...)
        if layer.go_backwards:
            xs = ops.flip(xs, axis=0)
        states = list(initial_state) if initial_state is not None else [_zeros(xs[0], s) for s in sizes]
        seq = _zeros(xs, units) if layer.return_sequences else _zeros(xs[0], units)
        step0 = ops.zeros((), dtype="int32")

        def cond(t: Any, xs_: Any, seq_: Any, *_states: Any) -> Any:
            return t < ops.shape(xs_)[0]

        def body(t: Any, xs_: Any, seq_: Any, *states_: Any) -> tuple:
            y, new = cell(xs_[t], list(states_), training=False)  # a TF tensor in the loop: STRIDED_SLICE
            new = list(new) if isinstance(new, (list, tuple)) else [new]
            if fresh_input:  # + min(t, 0), which is 0 but not folded away: the input is a new tensor
                xs_ = xs_ + ops.minimum(ops.cast(t, xs_.dtype), 0.0)
            if layer.return_sequences:
                seq_ = ops.slice_update(seq_, (t, 0, 0), y[None])
            else:
                seq_ = y
            return (t + 1, xs_, seq_, *new)

        _, _, seq, *final = ops.while_loop(cond, body, (step0, xs, seq, *states))
        out = ops.transpose(seq, (1, 0, 2)) if layer.return_sequences else seq
        return [out, *final] if layer.return_state else out

    return call


def bidirectional(op: Any, direction: Callable[[Any], Callable]) -> Callable:
    """A concat ``Bidirectional`` as its two directions, each ``direction(layer)`` (called as
    ``f(x, initial_state=...)``), the backward sequence flipped back and concatenated as Keras does."""
    fwd, bwd = direction(op.forward_layer), direction(op.backward_layer)

    def call(x: Any, initial_state: Any = None, **_: Any) -> Any:
        half = None if initial_state is None else len(initial_state) // 2
        y = fwd(x, initial_state=None if half is None else list(initial_state[:half]))
        y_rev = bwd(x, initial_state=None if half is None else list(initial_state[half:]))
        states = ()
        if op.return_state:
            states = tuple(y[1:]) + tuple(y_rev[1:])
            y, y_rev = y[0], y_rev[0]
        if op.return_sequences:
            y_rev = ops.flip(y_rev, axis=1)
        out = ops.concatenate([y, y_rev], axis=-1)
        return (out, *states) if op.return_state else out

    return call


def rnn_while_loop(operation: Any, fresh_input: bool = False) -> Callable | None:
    """Export fix: a Keras RNN layer (or a concat ``Bidirectional`` of two) over a dynamic time axis as a
    while loop the TFLite converter keeps as builtin WHILE."""
    if isinstance(operation, keras.layers.Bidirectional):
        return bidirectional(operation, lambda r: while_loop_rnn(r, fresh_input)) if _dynamic_pair(operation) \
            else None
    if _loops(operation) and time_is_dynamic(operation):
        return while_loop_rnn(operation, fresh_input)
    return None


def rnn_while_loop_int8(operation: Any) -> Callable | None:
    """:func:`rnn_while_loop` for full-integer int8: TensorFlow 2.21's calibrator segfaults on a WHILE
    whose body passes a loop variable through unchanged (tensorflow/tensorflow#75140: the WHILE op frees
    that output and the calibrator then logs it), so the time-major input is made a new tensor each step
    (one ADD over it per step: a cost the float kinds do not pay)."""
    return rnn_while_loop(operation, fresh_input=True)


def _dynamic_pair(op: Any) -> bool:
    """A concat Bidirectional over a dynamic time axis whose two directions loop (the inner layers have
    no inbound nodes of their own, so the wrapper's input decides)."""
    inner = (op.forward_layer, op.backward_layer)
    return op.merge_mode == "concat" and time_is_dynamic(op) and all(_loops(r) for r in inner)
