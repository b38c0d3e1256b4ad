"""Capture a PyTorch model with torch.fx into the NetworkX IR.

Modules that have a rule stay leaves; everything else is traced through. A run of the traced
module on the sample input records each node's shape and dtype; nodes that do not depend on
the inputs (parameter arithmetic, creation ops, ``x.size()`` arithmetic) are folded into
constants so rules see plain numbers. Models fx cannot trace are captured with torch.export
into the same IR (tracer/capture/export.py); both share tracer/capture/recording.py.
"""
from __future__ import annotations

import inspect
import operator
from typing import Callable, Sequence

import networkx as nx
import torch
import torch.fx as fx

from tracer.capture.recording import Recorder, build_graph, source_of
from tracer.capture.sizes import size_changes
from tracer.dynamic import DynamicAxis
from tracer.errors import CaptureError, InputError


class _Tracer(fx.Tracer):
    def __init__(self, is_leaf: Callable[[torch.nn.Module], bool]):
        super().__init__()
        self.record_stack_traces = True
        self._is_leaf = is_leaf

    def is_leaf_module(self, m: torch.nn.Module, module_qualified_name: str) -> bool:
        return self._is_leaf(m)


def trace(model: torch.nn.Module, is_leaf: Callable[[torch.nn.Module], bool]) -> fx.GraphModule:
    tracer = _Tracer(is_leaf)
    try:
        graph = tracer.trace(model)
    except Exception as exc:
        raise CaptureError(
            f"torch.fx could not trace {type(model).__name__}: {exc}. "
            "Data-dependent Python control flow in forward() cannot be traced; "
            "move it out of forward or give the submodule a rule so it stays a leaf."
        ) from exc
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


CAPTURE_METHODS = ("auto", "fx", "export")


def capture(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...],
            is_leaf: Callable[[torch.nn.Module], bool], method: str = "auto",
            dims: Sequence[DynamicAxis] = ()) -> nx.DiGraph:
    """Capture ``model`` and build the IR graph, shapes recorded from ``inputs``.

    ``method``: "fx" (torch.fx symbolic tracing), "export" (torch.export, ATen level) or "auto":
    fx, and torch.export when fx cannot capture the model. ``graph.graph["capture"]`` records
    which was used and why. Weights computed by parametrizations are baked in either way.

    A sample whose tensors all have batch size 1 cannot tell the batch size from a genuine unit
    axis (``cls.expand(x.shape[0], -1, -1)`` is then a no-op, ``x.view(-1, ...)`` of windows looks
    like a fixed size), so shapes are recorded on a batch-2 copy of it (the sample repeated along
    axis 0), and on the sample itself only when the model fails at batch 2;
    ``graph.graph["capture"]["batch"]`` says which.

    ``dims``: the dynamic axes (tracer/dynamic.py); sizes that follow them stay runtime computation
    (tracer/capture/sizes.py) instead of folding into the sample's numbers.
    """
    from tracer.fixes.parametrizations import bake_parametrizations
    from tracer.fixes.triton_llvm import isolate_triton_llvm

    isolate_triton_llvm()  # before fx's stack traces or torch.export import torch._dynamo (and triton)
    if method not in CAPTURE_METHODS:
        raise InputError(f"capture must be one of {', '.join(CAPTURE_METHODS)}. Received: capture={method!r}")
    # an in-place forward (x.add_(1), relu_(x)) must not change the caller's sample tensors
    inputs = tuple(x.detach().clone() if isinstance(x, torch.Tensor) else x for x in inputs)
    if not _all_batch_one(inputs):
        return bake_parametrizations(_capture_with(model, inputs, is_leaf, method, dims), model)
    doubled = tuple(torch.cat([x, x]) if isinstance(x, torch.Tensor) else x for x in inputs)
    try:
        graph = _capture_with(model, doubled, is_leaf, method, dims)
        note = "recorded at batch 2 (the batch-1 sample repeated), so batch-sized axes are told from unit axes"
    except CaptureError as exc:
        graph = _capture_with(model, inputs, is_leaf, method, dims)
        note = (f"recorded at batch 1: the model failed on the sample repeated to batch 2 ({_first_line(exc)}); "
                "axes of size 1 are taken for the batch where they are sized by it")
    graph.graph["capture"]["batch"] = note
    return bake_parametrizations(graph, model)


def _all_batch_one(inputs: tuple) -> bool:
    tensors = [x for x in inputs if isinstance(x, torch.Tensor)]
    return bool(tensors) and all(x.dim() and x.shape[0] == 1 for x in tensors)


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _capture_with(model: torch.nn.Module, inputs: tuple, is_leaf: Callable[[torch.nn.Module], bool],
                  method: str, dims: Sequence[DynamicAxis] = ()) -> nx.DiGraph:
    from tracer.capture.export import capture_export, fx_failure

    if method == "export":
        return capture_export(model, inputs, reason="requested with capture='export'", dims=dims)
    try:
        return capture_fx(model, inputs, is_leaf, dims)
    except CaptureError as exc:
        if method == "fx":
            raise
        return capture_export(model, inputs, reason=fx_failure(model, exc), fx_error=exc, dims=dims)


def capture_fx(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...],
               is_leaf: Callable[[torch.nn.Module], bool], dims: Sequence[DynamicAxis] = ()) -> nx.DiGraph:
    """Trace ``model`` with torch.fx and build the IR graph."""
    gm = trace(model, is_leaf)
    _check_wrapped_functions(gm, model)
    _expand_varargs(gm, len(inputs))
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(inputs):
        raise CaptureError(f"{type(model).__name__}.forward takes {len(placeholders)} inputs "
                           f"({', '.join(p.name for p in placeholders)}) but {len(inputs)} were given")
    recorder = Recorder(gm, size_changes(gm, inputs, dims))
    with torch.no_grad():
        recorder.run(*inputs)
    graph = build_graph(gm, recorder)
    graph.graph["capture"] = {"method": "fx", "reason": "torch.fx traced the model"}
    return graph


def _expand_varargs(gm: fx.GraphModule, n_inputs: int) -> None:
    """``forward(self, x, *xs)``: torch.fx makes ``*xs`` one placeholder that receives a tuple; it becomes
    one placeholder per input it collects (``xs_0``, ``xs_1`` ...), ``xs[k]`` that placeholder and any
    other use of ``xs`` (``torch.cat(xs)``) the tuple of them. A ``**kwargs`` placeholder receives {}
    (the inputs are all positional) and is replaced by it."""
    graph = gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    star = next((n for n in placeholders if str(n.target).startswith("*") and not str(n.target).startswith("**")), None)
    for kw in [n for n in placeholders if str(n.target).startswith("**")]:
        _substitute(graph, kw, {})
    if star is None:
        return
    count = n_inputs - (len([n for n in graph.nodes if n.op == "placeholder"]) - 1)
    base = str(star.target).lstrip("*")
    parts = []
    with graph.inserting_before(star):
        for k in range(max(count, 0)):
            parts.append(graph.placeholder(f"{base}_{k}"))
            parts[-1].meta = dict(star.meta)
    _substitute(graph, star, tuple(parts))
    graph.lint()
    gm.recompile()


def _substitute(graph: fx.Graph, node: fx.Node, value: object) -> None:
    """Every use of ``node`` becomes ``value`` (a node, a tuple of nodes or a constant); ``node`` goes.
    ``node[k]`` and ``node[a:b]`` of a tuple value are resolved (and their uses substituted in turn)."""
    for user in list(node.users):
        if (isinstance(value, tuple) and user.op == "call_function" and user.target is operator.getitem
                and user.args[0] is node and isinstance(user.args[1], (int, slice))):
            _substitute(graph, user, value[user.args[1]])
            continue
        user.args, user.kwargs = fx.node.map_arg((user.args, user.kwargs), lambda a: value if a is node else a)
    graph.erase_node(node)


def _check_wrapped_functions(gm: fx.GraphModule, model: torch.nn.Module) -> None:
    """A library's ``torch.fx.wrap``-ed function (torchvision's ``shifted_window_attention``) is one
    call in the fx graph; without a rule for it, fx's capture fails so that torch.export (which
    runs it as ordinary Python) traces into it. fx traces through every other Python function, so a
    plain function outside torch in the graph was wrapped."""
    from tracer.op_rules.registry import lookup, qualname

    wrapped = {}
    for n in gm.graph.nodes:
        t = n.target
        if (n.op == "call_function" and inspect.isfunction(t) and t.__module__.split(".")[0] != "torch"
                and lookup(t) is None):
            wrapped.setdefault(qualname(t).path, n)
    if wrapped:
        names = ", ".join(f"{name} (at {source_of(n)})" for name, n in wrapped.items())
        raise CaptureError(f"torch.fx keeps {names} as one call (torch.fx.wrap) and there is no rule for it: "
                           "capture='export' traces into it, or add @rule(Qualname(...)) for it")
