"""Capture with torch.export, for models torch.fx cannot trace symbolically.

torch.export (non-strict) runs forward() as ordinary Python on fake tensors with static shapes,
so what stops fx (asserts and ``if`` on shapes, ``len(x)``, iterating or unpacking tensors,
comprehensions over inputs) just runs. Control flow on tensor *values* (``if x.sum() > 0``)
stops both. The result is an fx graph at the ATen level (``aten.conv2d``, ``aten.linear`` ...)
with each node's module path in ``node.meta["nn_module_stack"]`` and its source in
``node.meta["stack_trace"]``, so it is built into the same IR as the fx path
(:func:`tracer.capture.recording.build_graph`). Parameters, buffers and constants are graph inputs in an
exported program; they are lifted back into get_attr nodes holding their values, so only the
user's inputs stay placeholders and everything computed from weights alone folds into constants.

The graph is kept at the level export produces. It is decomposed (functionalized and lowered
with torch's decomposition table) only as needed: when it mutates tensors in place, or when an
op that depends on the inputs has no rule, and then only those ops are decomposed.
"""
from __future__ import annotations

import inspect
import operator
import os
import re
import traceback
import warnings
from dataclasses import replace
from typing import Any, Sequence

import networkx as nx
import torch
import torch.fx as fx
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind, OutputKind
from torch.fx.operator_schemas import normalize_function

from tracer.capture.leaf_ops import LEAF_OP, keep_whole, leaf_modules, restore_leaf_modules
from tracer.capture.recording import OWN_DIRS, TORCH_DIR, Recorder, build_graph
from tracer.capture.sizes import size_changes
from tracer.dynamic import DynamicAxis
from tracer.errors import CaptureError

aten = torch.ops.aten


def capture_export(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...], reason: str,
                   fx_error: Exception | None = None, core_aten: bool = False,
                   dims: Sequence[DynamicAxis] = ()) -> nx.DiGraph:
    """Export ``model`` on ``inputs`` and build the IR graph; ``reason`` says why export is used.

    ``core_aten``: lower the whole graph to the core ATen opset (``aten.convolution``,
    ``aten.addmm`` ...) instead of decomposing only what has no rule. ``dims``: dynamic axes, exported
    as ``torch.export.Dim`` s so that sizes computed from them stay nodes (``aten.sym_size.int`` and
    SymInt arithmetic; tracer/capture/sizes.py) instead of numbers.
    """
    with leaf_modules(model, keep_whole) as leaves:  # RNNs, MHA, user rules: one node each (leaf_ops.py)
        ep = export(model, inputs, fx_error, dims)
        ep, decomposed = decompose_as_needed(ep, everything=core_aten)
    gm = lift_state(ep)
    restore_leaf_modules(gm, leaves)
    one_output_forms(gm.graph)
    gm.recompile()
    recorder = Recorder(gm, size_changes(gm, inputs, dims))
    with torch.no_grad():
        recorder.run(*inputs)
    graph = build_graph(gm, recorder)
    graph.graph["capture"] = {"method": "torch.export", "reason": reason, "decomposed": decomposed}
    return graph


def export(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...],
           fx_error: Exception | None = None, dims: Sequence[DynamicAxis] = ()) -> ExportedProgram:
    try:
        return _export_with_multiples(model, inputs, dims)
    except Exception as exc:
        before = f"{fx_failure(model, fx_error)}; " if fx_error is not None else ""
        either = " either" if fx_error is not None else ""
        hint = (". Control flow on tensor values (if x.sum() > 0) cannot be captured; rewrite it with "
                "torch.where or move it out of forward()") if "data-dependent" in str(exc).lower() else ""
        raise CaptureError(f"{before}torch.export could not capture {type(model).__name__}{either}: "
                           f"{_first_line(exc)}{_where(exc)}{hint}") from exc


def _export_with_multiples(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...],
                           dims: Sequence[DynamicAxis]) -> ExportedProgram:
    """Export with the multiples as derived Dims; where torch refuses them (a size the model specializes or
    guards beyond the multiple: "Constraints violated"), again with ``Dim.AUTO`` on every axis, as without
    multiples, so tracer's runs at other sizes name the user's line instead of torch's constraint solver."""
    try:
        return torch.export.export(model, tuple(inputs), strict=False, dynamic_shapes=export_dims(inputs, dims, model))
    except Exception as exc:
        if not any(d.multiple > 1 for d in dims) or "constraints violated" not in str(exc).lower():
            raise
    plain = [replace(d, multiple=1) for d in dims]
    return torch.export.export(model, tuple(inputs), strict=False, dynamic_shapes=export_dims(inputs, plain, model))


def export_dims(inputs: Sequence[Any], dims: Sequence[DynamicAxis], model: torch.nn.Module | None = None) -> tuple | None:
    """torch.export's ``dynamic_shapes`` for ``dims``: ``Dim.AUTO`` on each dynamic axis, so export infers
    the guards (``T // 2 != 1``, axes that must be equal) instead of refusing the model; the range the user
    gave is held by tracer's own runs at other sizes (tracer/dynamic.py), and an axis export specializes
    shows up there as a size baked into the graph. The batch stays static (handled from recorded shapes).
    An axis that is a multiple of a number gets a derived Dim instead (``Dim(name, min, max) * multiple``), so
    export keeps its size symbolic as that multiple and folds what that implies (``W % 8`` is 0).

    torch.export matches the spec to ``model.forward``'s signature: a ``*args`` parameter takes one tuple
    holding the specs of all the inputs it collects (``forward(self, x, *rest)``: ``(spec0, (spec1, ...))``);
    a ``**kwargs`` parameter gets nothing, since the inputs are all positional."""
    if not dims:
        return None
    spec: list[dict] = [{} for _ in inputs]
    for d in dims:
        dim = _export_dim(d)
        for i, axis in d.places:
            spec[i][axis] = dim
    flat = [s or None for s in spec]
    star = _varargs_position(model) if model is not None else None
    if star is None or star > len(flat):
        return tuple(flat)
    return (*flat[:star], tuple(flat[star:]))


def _export_dim(d: DynamicAxis) -> Any:
    """``Dim.AUTO``, or for a multiple the derived Dim of the number of multiples in the axis's range."""
    if d.multiple == 1:
        return torch.export.Dim.AUTO
    low = -(-max(1, d.low) // d.multiple)
    high = None if d.high is None else d.high // d.multiple
    root = torch.export.Dim("q_" + re.sub(r"\W", "_", d.name), min=low, **({} if high is None else {"max": high}))
    return root * d.multiple


def _varargs_position(model: torch.nn.Module) -> int | None:
    """How many positional parameters ``model.forward`` has before its ``*args`` (None without one)."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    for k, p in enumerate(params):
        if p.kind == inspect.Parameter.VAR_POSITIONAL:
            return sum(1 for q in params[:k] if q.kind in positional)
    return None


def fx_failure(model: torch.nn.Module, exc: Exception) -> str:
    """One line: why torch.fx failed, with the user's line that made it fail."""
    cause = exc.__cause__ if exc.__cause__ is not None else exc
    return f"torch.fx could not trace {type(model).__name__}: {_first_line(cause)}{_where(cause)}"


def _first_line(exc: BaseException) -> str:
    """The exception's first sentence: torch's messages go on with general advice."""
    text = str(exc).strip().splitlines()
    if not text:
        return type(exc).__name__
    sentence = re.split(r"(?<=[a-z0-9)'\]])\. ", text[0], maxsplit=1)[0]
    return f"{type(exc).__name__}: {sentence}"


def _where(exc: BaseException) -> str:
    """The deepest frame of the traceback that is the user's code, as ' (at file:line: code)'."""
    best = ""
    for frame in traceback.extract_tb(exc.__traceback__):
        path = os.path.abspath(frame.filename)
        if path.startswith(TORCH_DIR) or path.startswith(OWN_DIRS) or "<" in frame.filename:
            continue
        best = f" (at {frame.filename}:{frame.lineno}: {(frame.line or '').strip()})"
    return best


# ---- decomposition, only as needed --------------------------------------------------------

def decompose_as_needed(ep: ExportedProgram, everything: bool = False) -> tuple[ExportedProgram, list[str]]:
    """Functionalize in-place ops and decompose the input-dependent ops that have no rule.

    Returns the program and the names of the ops that were decomposed. Ops with a rule stay as
    they are (they are removed from torch's default decomposition table before it runs).
    ``everything``: the whole default table (core ATen).
    """
    from tracer.op_rules.aten import supported

    if everything:
        return _run_decompositions(ep, None), ["all (core ATen)"]
    dynamic = _dynamic_nodes(ep)
    ops = {n.target for n in ep.graph.nodes if n.op == "call_function" and n.name in dynamic
           and isinstance(n.target, torch._ops.OpOverload) and n.target not in _SIZE_OPS}
    mutating = {t for t in ops if t._schema.is_mutable}
    missing = sorted(str(t) for t in ops - mutating if not supported(t) and t is not LEAF_OP)
    if not missing and not mutating:
        return ep, []
    table = torch.export.default_decompositions()
    for op in list(table.keys()):
        if supported(op):
            del table[op]
    return _run_decompositions(ep, table), missing


# sizes of dynamic axes (export with Dims): tracer/capture/sizes.py turns them into size nodes
_SIZE_OPS = {aten.sym_size.int, aten.sym_numel.default, aten.sym_stride.int, aten.sym_storage_offset.default}


def _run_decompositions(ep: ExportedProgram, table: Any) -> ExportedProgram:
    with warnings.catch_warnings():  # torch 2.13's own use of a deprecated pytree API
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        return ep.run_decompositions(table) if table is not None else ep.run_decompositions()


def _dynamic_nodes(ep: ExportedProgram) -> set[str]:
    """Nodes that depend on the user's inputs (the rest folds into constants at capture)."""
    users = {s.arg.name for s in ep.graph_signature.input_specs if s.kind == InputKind.USER_INPUT}
    dynamic: set[str] = set()
    for n in ep.graph.nodes:
        if n.name in users or any(a.name in dynamic for a in n.all_input_nodes):
            dynamic.add(n.name)
    return dynamic


# ---- tuple-returning ops whose extra outputs are unused -------------------------------------

def _batch_norm(k: dict) -> tuple | None:
    if k.get("training"):
        return None
    return aten.batch_norm.default, (k["input"], k["weight"], k["bias"], k["running_mean"], k["running_var"],
                                     False, k["momentum"], k["eps"], False)


_ONE_OUTPUT = {
    aten._native_batch_norm_legit_no_training.default: _batch_norm,
    aten.native_batch_norm.default: _batch_norm,
    aten.native_layer_norm.default: lambda k: (aten.layer_norm.default, (
        k["input"], k["normalized_shape"], k["weight"], k["bias"], k["eps"], False)),
    aten.native_group_norm.default: lambda k: (aten.group_norm.default, (
        k["input"], k["group"], k["weight"], k["bias"], k["eps"], False)),
    aten.max_pool2d_with_indices.default: lambda k: (aten.max_pool2d.default, (
        k["input"], k["kernel_size"], k["stride"], k["padding"], k["dilation"], k["ceil_mode"])),
    aten.max_pool3d_with_indices.default: lambda k: (aten.max_pool3d.default, (
        k["input"], k["kernel_size"], k["stride"], k["padding"], k["dilation"], k["ceil_mode"])),
}


def one_output_forms(graph: fx.Graph) -> None:
    """``getitem(native_layer_norm(...), 0)`` -> ``layer_norm(...)`` and the like, where only the
    first element is used (mean/rstd and pooling indices matter only for training)."""
    for n in list(graph.nodes):
        make = _ONE_OUTPUT.get(n.target) if n.op == "call_function" else None
        users = list(n.users)
        if make is None or not users or any(u.target is not operator.getitem or u.args[1] != 0 for u in users):
            continue
        found = normalize_function(n.target, n.args, n.kwargs, normalize_to_only_use_kwargs=True)
        made = make(found.kwargs) if found is not None else None
        if made is None:
            continue
        with graph.inserting_before(n):
            single = graph.call_function(*made)
        single.meta = {k: v for k, v in n.meta.items() if k in ("nn_module_stack", "stack_trace", "source_fn_stack")}
        for u in users:
            u.replace_all_uses_with(single)
            graph.erase_node(u)
        graph.erase_node(n)


# ---- parameters, buffers and constants back into the graph --------------------------------

def lift_state(ep: ExportedProgram) -> fx.GraphModule:
    """The program's graph module with parameters/buffers/constants as get_attr nodes holding
    their values, user inputs as the only placeholders and user outputs as the only outputs."""
    gm = ep.graph_module
    graph = gm.graph
    placeholders = {n.name: n for n in graph.nodes if n.op == "placeholder"}
    first = next(n for n in graph.nodes if n.op != "placeholder")
    for spec in ep.graph_signature.input_specs:
        if spec.kind == InputKind.USER_INPUT:
            continue
        if spec.kind not in (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
            raise CaptureError(f"torch.export input {spec.arg.name} is a {spec.kind.name}, "
                               "which tracer cannot convert")
        ph = placeholders[spec.arg.name]
        attr = _attr_name(gm, spec.target)
        value = _state_value(ep, spec)
        if isinstance(value, torch.nn.Parameter):
            gm.register_parameter(attr, value)
        else:
            gm.register_buffer(attr, value)
        with graph.inserting_before(first):
            node = graph.get_attr(attr)
        owner = spec.target.rpartition(".")[0]
        node.meta["nn_module_stack"] = {owner: (owner, "")} if owner else {}
        ph.replace_all_uses_with(node)
        graph.erase_node(ph)
    _keep_user_outputs(ep, graph)
    graph.lint()
    gm.recompile()
    return gm


def _state_value(ep: ExportedProgram, spec: Any) -> torch.Tensor:
    if spec.kind == InputKind.BUFFER and spec.persistent:
        return ep.state_dict[spec.target]
    if spec.target in ep.state_dict:
        return ep.state_dict[spec.target]
    return ep.constants[spec.target]


def _attr_name(gm: fx.GraphModule, target: str) -> str:
    base = re.sub(r"\W", "_", target) or "const"
    name, k = base, 1
    while hasattr(gm, name):
        k += 1
        name = f"{base}_{k}"
    return name


def _keep_user_outputs(ep: ExportedProgram, graph: fx.Graph) -> None:
    """Drop buffer-mutation outputs (none in eval mode, but export may list some)."""
    out = next(n for n in graph.nodes if n.op == "output")
    flat = out.args[0]
    specs = ep.graph_signature.output_specs
    if len(flat) == len(specs):
        out.args = (tuple(a for a, s in zip(flat, specs) if s.kind == OutputKind.USER_OUTPUT),)
