"""Build a Keras functional model from the laid-out IR graph, one rule call per node."""
from __future__ import annotations

from typing import Any, Callable

import keras
import networkx as nx

from tracer.emitter.context import Emit
from tracer.fixes.deep_graphs import recursion_room
from tracer.op_rules.registry import lookup
from tracer.op_rules.sizes import witness
from tracer.errors import ConversionError, TracerError
from tracer.ir import OpNode, Ref, ordered

_KERAS_DTYPES = {"float32": "float32", "float64": "float32", "float16": "float16", "bfloat16": "bfloat16",
                 "int64": "int32", "int32": "int32", "bool": "bool"}


def build_model(graph: nx.DiGraph, name: str = "converted",
                progress: Callable[[int, int], None] | None = None) -> tuple[keras.Model, Emit]:
    ctx = Emit(graph)
    inputs: list[Any] = []
    nodes = ordered(graph)
    outputs = None
    for k, node in enumerate(nodes):
        if progress is not None:
            progress(k + 1, len(nodes))
        if node.kind == "placeholder":
            t = keras.Input(shape=_input_shape(node, graph.graph.get("dynamic_axes", {}).get(node.name, {})),
                            name=node.name,
                            dtype=_KERAS_DTYPES.get(node.dtype or "float32", "float32"))
            inputs.append(t)
            ctx.anchor = ctx.anchor if ctx.anchor is not None else t
            ctx.tensors[node.name] = _held_to_multiples(t, node, graph.graph.get("dynamic_multiples", {}))
        elif node.is_constant:
            continue
        elif node.kind == "output":
            outputs = _outputs(node, ctx)
        else:
            ctx.tensors[node.name] = _emit_node(node, ctx)
    with recursion_room(3 * len(nodes)):  # each node emits a few Keras ops at most
        model = keras.Model(inputs=inputs[0] if len(inputs) == 1 else inputs, outputs=outputs, name=_model_name(name))
    return model, ctx


def _input_shape(node: OpNode, dynamic: dict[int, str]) -> tuple:
    """The Keras input shape without the batch: the node's in its layout, None on dynamic torch axes.
    The batch is the torch axis the layout puts first: 0, or 1 for an RNN's state ``h0`` ``(L*D, B, H)``,
    which enters as ``(B, L*D, H)`` (tracer/passes/layout.py batch_first_layout)."""
    shape = list(node.layout.keras_shape(node.shape))
    for axis in dynamic:
        shape[node.layout.axis(axis)] = None
    return tuple(shape[1:])


def _held_to_multiples(t: Any, node: OpNode, multiples: dict[str, dict[int, int]]) -> Any:
    """``t`` times a one computed from ones along each axis declared a multiple of ``k`` (``"h*32"``) reshaped
    to ``(-1, k)``: at a size that is not a multiple the reshape fails at run time, in Keras
    and in LiteRT, instead of the model computing wrong numbers (windows and paddings were converted for
    multiples only). Exact at every multiple."""
    for axis, k in multiples.get(node.name, {}).items():
        keras_axis = node.layout.axis(axis)
        w = witness(t, keras_axis)
        one = keras.ops.min(keras.ops.max(keras.ops.reshape(w, (-1, k)), axis=1))  # a reduction keeps the reshape
        ones = keras.ops.reshape(one, [1] * node.rank)
        t = keras.ops.logical_and(t, keras.ops.cast(ones, "bool")) if t.dtype == "bool" else keras.ops.multiply(
            t, keras.ops.cast(ones, t.dtype))
    return t


def _emit_node(node: OpNode, ctx: Emit) -> Any:
    r = lookup(node.target)
    if r is None:  # check_supported runs first; this is a guard against a pass adding nodes
        raise ConversionError(f"no rule for {node.describe()}")
    try:
        out = r(node, ctx)
    except TracerError:
        raise
    except Exception as exc:
        raise ConversionError(f"while converting {node.describe()} with rule {r.name}: "
                              f"{type(exc).__name__}: {exc}") from exc
    check_shape(node, out)
    return out


def check_shape(node: OpNode, out: Any) -> None:
    """The rule's result must have PyTorch's shape, permuted by the node's layout."""
    if node.shape is None:
        if node.structure is not None:
            if not isinstance(out, (tuple, list)) or len(out) != len(node.structure):
                raise ConversionError(f"rule for {node.describe()} returned {type(out).__name__}, "
                                      f"expected {len(node.structure)} tensors")
        return
    got = tuple(out.shape)
    want = _expected(node)
    if len(got) != len(want) or any(g is not None and g != w for g, w in zip(got[1:], want[1:])):
        raise ConversionError(f"rule for {node.describe()} made shape {got}, expected {want} "
                              f"(PyTorch shape {node.shape} in layout {node.layout.perm}"
                              f"{' flattened' if node.layout.flat else ''})")


def _expected(node: OpNode) -> tuple:
    phys = node.layout
    if phys.flat is not None:
        return (*[node.shape[p] for p in phys.perm[:-1]], node.shape[-1])
    return phys.keras_shape(node.shape)


def _outputs(node: OpNode, ctx: Emit) -> Any:
    """The model's outputs in the structure forward returned: one tensor, a list for a tuple or
    list (nested ones kept), a dict with the same keys (turned into str) for a dict."""
    layouts = dict(zip(node.inputs, node.in_layouts))

    def walk(v: Any) -> Any:
        if isinstance(v, Ref):
            src = ctx.graph.nodes[v.name]["op"]
            if src.is_constant:
                raise ConversionError(f"output {v.name} does not depend on the inputs; "
                                      "a constant output is not supported")
            return ctx.convert(src, layouts[v.name], reason="model output")
        if isinstance(v, (tuple, list)):
            return [x for x in (walk(x) for x in v) if x is not None]
        if isinstance(v, dict):
            return {str(k): y for k, y in ((k, walk(x)) for k, x in v.items()) if y is not None}
        return None

    out = walk(node.args[0])
    return out[0] if isinstance(out, list) and len(out) == 1 and not isinstance(out[0], (list, dict)) else out


def _model_name(name: str) -> str:
    """A Keras model name TensorFlow accepts as a root name scope inside tf.function (ASCII letters,
    digits, ``_`` and ``-``, not starting with ``_`` or ``-``): ``_HFTuple`` -> ``HFTuple``."""
    name = "".join(c if (c.isascii() and c.isalnum()) or c in "_-" else "_" for c in name)
    return name.lstrip("_-") or "converted"
