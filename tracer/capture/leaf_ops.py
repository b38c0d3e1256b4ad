"""Modules that have a rule stay one node under torch.export, as they do as torch.fx leaves.

torch.export traces through every module down to ATen ops, so without this an ``nn.LSTM`` became a
per-step loop whose zero ``h0`` is sized by the sample's batch, an ``nn.MultiheadAttention`` a
``reshape(L * B, E)`` baked at the sample's batch, and a user's own module rule was never used.
While exporting, each such module's ``forward`` (the instance's, by its module path) calls the custom
op ``tracer::leaf`` instead: its real and fake kernels run the original ``forward`` (the fake one on
the exporter's fake tensors, so the output shapes follow dynamic axes too). The module's arguments
and outputs are flattened with pytree: tensors travel through the op, everything else is kept with
the call. After export, :func:`restore_leaf_modules` turns each op node back into a ``call_module``
node of the original module (its arguments and ``getitem`` s rebuilt), so the IR and the rules see
what torch.fx would have given. The original ``forward`` s are back once the export returns or fails.
"""
from __future__ import annotations

import contextlib
import itertools
import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from tracer.errors import CaptureError


TENSOR = object()  # marks where a flattened argument or output is a tensor (None is a value there)


@dataclass
class LeafCall:
    """One call of a leaf module: how to rebuild its arguments from the op's tensors, and its outputs."""

    path: str
    module: torch.nn.Module
    forward: Callable  # the module's own forward, not the patched one
    in_spec: Any
    in_leaves: list  # the flattened arguments, tensors as TENSOR
    out_spec: Any = None
    out_leaves: list = field(default_factory=list)  # the flattened outputs, tensors as TENSOR

    def arguments(self, tensors: list) -> tuple[tuple, dict]:
        it = iter(tensors)
        leaves = [next(it) if v is TENSOR else v for v in self.in_leaves]
        return pytree.tree_unflatten(leaves, self.in_spec)

    def run(self, tensors: list) -> list[torch.Tensor]:
        args, kwargs = self.arguments(tensors)
        with _fake_state(self.module, tensors):
            out = self.forward(*args, **kwargs)
        leaves, spec = pytree.tree_flatten(out)
        if self.out_spec is None:
            self.out_spec = spec
            self.out_leaves = [TENSOR if isinstance(v, torch.Tensor) else v for v in leaves]
        outs: list[torch.Tensor] = []
        for v in leaves:  # a custom op's outputs may alias neither its inputs nor each other
            if isinstance(v, torch.Tensor):
                outs.append(v.clone() if _aliases(v, list(tensors) + outs) else v)
        return outs


_CALLS: dict[str, LeafCall] = {}
_COUNTER = itertools.count()


@torch.library.custom_op("tracer::leaf", mutates_args=())
def leaf(key: str, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """A module with a rule as one op: runs the module of call ``key`` on ``tensors``."""
    return _CALLS[key].run(tensors)


@leaf.register_fake
def _leaf_fake(key: str, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return _CALLS[key].run(tensors)


LEAF_OP = torch.ops.tracer.leaf.default


def _aliases(t: torch.Tensor, others: list) -> bool:
    return any(torch._C._is_alias_of(t, o) for o in others)


@contextlib.contextmanager
def _fake_state(module: torch.nn.Module, tensors: list) -> Iterator[None]:
    """Under a fake mode (an export retracing the program), the module's real weights as fake tensors."""
    from torch._guards import detect_fake_mode
    from torch._subclasses.fake_tensor import FakeTensor

    mode = detect_fake_mode(tuple(tensors))
    state = dict(itertools.chain(module.named_parameters(), module.named_buffers()))
    real = {k: v for k, v in state.items() if not isinstance(v, FakeTensor)}
    if mode is None or not real:
        yield
        return
    fake = {k: mode.from_tensor(v, static_shapes=True) for k, v in real.items()}
    with torch.nn.utils.stateless._reparametrize_module(module, fake):
        yield


# torch.nn layer families that torch.export lowers to one ATen op (aten.conv2d, aten.linear, aten.layer_norm,
# aten.max_pool2d ...) which has a rule of its own that is exact at any batch: these stay at the ATen level,
# as they always were under export. Every other module with a rule (RNNs and their cells, MultiheadAttention,
# the Transformer layers, a user's or library's own classes) is kept whole.
ONE_ATEN_OP = frozenset(f"torch.nn.modules.{m}" for m in (
    "batchnorm", "channelshuffle", "conv", "dropout", "flatten", "fold", "instancenorm", "linear",
    "normalization", "padding", "pixelshuffle", "pooling", "sparse", "upsampling"))


def keep_whole(module: torch.nn.Module) -> bool:
    """Whether torch.export should keep ``module`` as one node: it has a module rule, and it is not a torch.nn
    layer that export lowers to one ATen op anyway (:data:`ONE_ATEN_OP`, activations but MultiheadAttention)."""
    from tracer.op_rules.registry import has_module_rule

    if not has_module_rule(module):
        return False
    family = type(module).__module__
    if family == "torch.nn.modules.activation":
        return isinstance(module, torch.nn.MultiheadAttention)
    return family not in ONE_ATEN_OP


def leaf_paths(model: torch.nn.Module, is_leaf: Callable[[torch.nn.Module], bool]) -> dict[str, torch.nn.Module]:
    """The outermost submodules (not the model itself) that ``is_leaf`` keeps whole, by path."""
    found: dict[str, torch.nn.Module] = {}
    for path, m in model.named_modules():  # a module shared by two paths: its first, as torch.fx names it
        if path and is_leaf(m) and not any(path.startswith(p + ".") for p in found):
            found.setdefault(path, m)
    return found


def _patched_forward(path: str, module: torch.nn.Module, forward: Callable, calls: dict) -> Callable:
    def forward_as_leaf(*args: Any, **kwargs: Any) -> Any:
        leaves, spec = pytree.tree_flatten((args, kwargs))
        tensors = [v for v in leaves if isinstance(v, torch.Tensor)]
        symbolic = any(isinstance(v, (torch.SymInt, torch.SymFloat, torch.SymBool)) for v in leaves)
        if symbolic or not tensors:  # sizes that follow a dynamic axis cannot be kept with the call
            return forward(*args, **kwargs)
        key = f"{path}#{next(_COUNTER)}"
        call = LeafCall(path, module, forward, spec, [TENSOR if isinstance(v, torch.Tensor) else v for v in leaves])
        _CALLS[key] = calls[key] = call
        outs = iter(leaf(key, tensors))
        return pytree.tree_unflatten([next(outs) if v is TENSOR else v for v in call.out_leaves], call.out_spec)
    return forward_as_leaf


@contextlib.contextmanager
def leaf_modules(model: torch.nn.Module, is_leaf: Callable[[torch.nn.Module], bool]) -> Iterator[dict]:
    """While inside, the modules ``is_leaf`` keeps whole run as ``tracer::leaf`` ops; yields the calls made
    ({op key: :class:`LeafCall`}). Each module's ``forward`` is restored on leaving, also on an error."""
    calls: dict[str, LeafCall] = {}
    patched: list[tuple[torch.nn.Module, bool, Any]] = []
    try:
        for path, m in leaf_paths(model, is_leaf).items():
            own = "forward" in m.__dict__
            patched.append((m, own, m.__dict__.get("forward")))
            m.forward = _patched_forward(path, m, m.forward, calls)
        yield calls
    finally:
        for m, own, before in reversed(patched):
            if own:
                m.forward = before
            else:
                m.__dict__.pop("forward", None)
        for key in calls:
            _CALLS.pop(key, None)


def restore_leaf_modules(gm: fx.GraphModule, calls: dict[str, LeafCall]) -> None:
    """Each ``tracer::leaf`` node -> a ``call_module`` node of its module, with the original arguments
    and the ``getitem`` s into its (nested) outputs; the module's weights, now unused, leave the graph."""
    graph = gm.graph
    for n in list(graph.nodes):
        if n.op != "call_function" or n.target is not LEAF_OP:
            continue
        call = calls[n.args[0]]
        target = _add_module(gm, call.path, call.module)
        args, kwargs = call.arguments(list(n.args[1]))
        with graph.inserting_before(n):
            node = graph.call_module(target, tuple(args), dict(kwargs))
        node.meta = {k: v for k, v in n.meta.items() if k in ("nn_module_stack", "stack_trace", "source_fn_stack")}
        _rebuild_outputs(graph, n, node, call)
        graph.erase_node(n)
    _drop_unused_state(gm, calls)
    graph.lint()
    gm.recompile()


def _add_module(gm: fx.GraphModule, path: str, module: torch.nn.Module) -> str:
    try:
        if gm.get_submodule(path) is module:
            return path
    except AttributeError:
        if gm.add_submodule(path, module):
            return path
    name, k = f"leaf_{path.replace('.', '_')}", 1
    while hasattr(gm, name):  # the path is taken in the exported module: keep the module under another name
        k += 1
        name = f"leaf_{path.replace('.', '_')}_{k}"
    gm.add_submodule(name, module)
    return name


def _rebuild_outputs(graph: fx.Graph, op_node: fx.Node, node: fx.Node, call: LeafCall) -> None:
    """``getitem(op, i)`` -> the chain of ``getitem`` s that reaches output ``i`` in the module's result."""
    where: dict[int, tuple] = {}
    indexed = itertools.count()
    numbered = pytree.tree_unflatten([next(indexed) if v is TENSOR else _Const() for v in call.out_leaves],
                                     call.out_spec)
    _paths(numbered, (), where)
    for user in list(op_node.users):
        if user.target is not operator.getitem:
            raise CaptureError(f"{call.path} ({type(call.module).__name__}) kept as one node under torch.export: "
                               f"its outputs are read by {user.format_node()}, not by indexing; report this")
        current = node
        with graph.inserting_before(user):
            for step in where[user.args[1]]:
                current = graph.call_function(operator.getitem, (current, step))
                current.meta = dict(node.meta)
        user.replace_all_uses_with(current)
        graph.erase_node(user)


class _Const:
    """A non-tensor output, not counted among the op's outputs."""


def _paths(value: Any, prefix: tuple, where: dict) -> None:
    if isinstance(value, int) and not isinstance(value, bool):
        where[value] = prefix
    elif isinstance(value, (tuple, list)):
        for i, v in enumerate(value):
            _paths(v, prefix + (i,), where)
    elif isinstance(value, dict):
        for k, v in value.items():
            _paths(v, prefix + (k,), where)


def _drop_unused_state(gm: fx.GraphModule, calls: dict[str, LeafCall]) -> None:
    """get_attr nodes of a leaf module's weights that nothing reads any more (the module holds them)."""
    owners = tuple(c.path + "." for c in calls.values())
    for n in list(gm.graph.nodes):
        if n.op == "get_attr" and not n.users and any(
                (p + ".").startswith(owners) for p in (n.meta.get("nn_module_stack") or {})):
            gm.graph.erase_node(n)
