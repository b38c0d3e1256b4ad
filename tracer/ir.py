"""The intermediate representation: a networkx.DiGraph whose nodes carry one frozen OpNode each.

Every fact about a node lives in its OpNode under the graph key ``"op"``; edges run from a
producer to each consumer and carry nothing. Passes replace OpNodes (``dataclasses.replace``)
instead of mutating them.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import networkx as nx
import torch

OP = "op"  # the single node-attribute key


@dataclass(frozen=True)
class Ref:
    """A reference to another node's value inside a node's arguments."""

    name: str


@dataclass(frozen=True)
class Phys:
    """How a torch tensor is laid out physically in Keras.

    ``perm[i]`` is the torch axis stored at Keras axis ``i``. ``flat`` is set when the last
    Keras axis holds torch's trailing axes flattened in another order:
    ``(torch_trailing_shape, order)``, ``order`` being the trailing axes in the order they
    were flattened. That lets a Linear absorb the permutation into its weights. ``items`` is set
    on a tuple result whose elements have different layouts (an RNN's output and its state): the
    tuple's own ``perm`` is its first element's, and ``getitem`` hands each element its layout.
    """

    perm: tuple[int, ...]
    flat: tuple[tuple[int, ...], tuple[int, ...]] | None = None
    items: tuple["Phys", ...] | None = None  # a tuple result: each element's own layout (RNN outputs)

    @staticmethod
    def identity(rank: int) -> "Phys":
        return Phys(tuple(range(rank)))

    @staticmethod
    def channels_last(rank: int) -> "Phys":
        if rank < 3:
            return Phys.identity(rank)
        return Phys((0, *range(2, rank), 1))

    @property
    def is_identity(self) -> bool:
        return self.flat is None and self.perm == tuple(range(len(self.perm)))

    def keras_shape(self, torch_shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(torch_shape[a] for a in self.perm)

    def axis(self, torch_dim: int) -> int:
        """Keras axis holding torch dimension ``torch_dim`` (negative dims allowed)."""
        rank = len(self.perm)
        return self.perm.index(torch_dim % rank if rank else 0)


@dataclass(frozen=True)
class Source:
    """Where the user wrote the operation."""

    file: str = ""
    line: int = 0
    code: str = ""

    def __str__(self) -> str:
        if not self.file:
            return "<unknown source>"
        return f"{self.file}:{self.line}" + (f"  ({self.code})" if self.code else "")


@dataclass(frozen=True)
class OpNode:
    """One captured operation and everything the passes and rules know about it."""

    name: str
    kind: str  # placeholder | call_module | call_function | call_method | get_attr | output | constant
    target: Any  # module class, function, method name or operator
    inputs: tuple[str, ...] = ()  # names of tensor-producing nodes, in argument order
    args: tuple = ()
    kw: dict = field(default_factory=dict)  # normalized named arguments (Ref for node values)
    shape: tuple[int, ...] | None = None  # torch shape of a tensor result
    dtype: str | None = None
    value: Any = None  # constant value (non-tensor results, parameters, buffers)
    structure: Any = None  # for tuple/list results: tuple of shapes
    module_path: str = ""
    source: Source = field(default_factory=Source)
    module: Any = None  # the nn.Module instance for call_module nodes
    layout: Phys | None = None  # physical layout of the result, set by the layout pass
    in_layouts: tuple = ()  # layout each tensor input must have, set by the layout pass
    notes: tuple[str, ...] = ()  # what passes and fixes did to this node

    @property
    def rank(self) -> int:
        return len(self.shape) if self.shape is not None else 0

    @property
    def is_tensor(self) -> bool:
        return self.shape is not None

    @property
    def is_constant(self) -> bool:
        return self.kind in ("constant", "get_attr")

    def describe(self) -> str:
        tgt = target_name(self.target)
        where = f" in {self.module_path}" if self.module_path else ""
        return f"{self.name} ({tgt}){where} at {self.source}"


def target_name(target: Any) -> str:
    if isinstance(target, str):
        return f"Tensor.{target}"
    if isinstance(target, type):
        return f"{target.__module__}.{target.__qualname__}"
    if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return f"torch.ops.{target}"  # str() of an ATen op is "aten.where.self"
    mod = getattr(target, "__module__", None) or ""
    name = getattr(target, "__qualname__", None) or getattr(target, "__name__", repr(target))
    if mod in ("_operator", "operator"):
        return f"operator.{name}"
    if mod.startswith("torch") or mod == "":
        mod = mod.replace("torch._C._nn", "torch.nn.functional").replace("torch._C._VariableFunctions", "torch")
        return f"{mod}.{name}" if mod else name
    return f"{mod}.{name}"


def op(graph: nx.DiGraph, name: str) -> OpNode:
    return graph.nodes[name][OP]


def set_op(graph: nx.DiGraph, node: OpNode) -> None:
    graph.nodes[node.name][OP] = node


def update(graph: nx.DiGraph, name: str, **changes: Any) -> OpNode:
    new = replace(op(graph, name), **changes)
    set_op(graph, new)
    return new


def swap_refs(value: Any, old: str, new: str) -> Any:
    """``value`` (node arguments: nested tuples, lists, dicts, slices) with ``Ref(old)`` read as ``Ref(new)``."""
    if isinstance(value, Ref):
        return Ref(new) if value.name == old else value
    if isinstance(value, (tuple, list)):
        return type(value)(swap_refs(v, old, new) for v in value)
    if isinstance(value, dict):
        return {k: swap_refs(v, old, new) for k, v in value.items()}
    if isinstance(value, slice):
        return slice(*(swap_refs(v, old, new) for v in (value.start, value.stop, value.step)))
    return value


def rewire(graph: nx.DiGraph, reader: str, old: str, new: str) -> None:
    """``reader`` reads ``new`` where it read ``old`` (inputs, arguments and the edge); a node never reads itself."""
    if reader == new:
        return
    node = op(graph, reader)
    inputs = tuple(dict.fromkeys(new if i == old else i for i in node.inputs))
    set_op(graph, replace(node, inputs=inputs, args=swap_refs(node.args, old, new), kw=swap_refs(node.kw, old, new)))
    graph.remove_edge(old, reader)
    graph.add_edge(new, reader)


def sole_user(graph: nx.DiGraph, name: str) -> str | None:
    """The one node reading ``name``, or None when it has no reader or several."""
    users = list(graph.successors(name))
    return users[0] if len(users) == 1 else None


def compact_order(graph: nx.DiGraph) -> nx.DiGraph:
    """Drop removed nodes from the graph's 'order' attribute (after a pass deleted some)."""
    graph.graph["order"] = [n for n in graph.graph["order"] if n in graph]
    return graph


def ordered(graph: nx.DiGraph) -> list[OpNode]:
    """Nodes in capture order (a topological order the graph keeps in its 'order' attribute)."""
    order = graph.graph["order"]
    return [graph.nodes[n][OP] for n in order if n in graph]


def check_integrity(graph: nx.DiGraph) -> None:
    """Raise if the graph's edges, order and node inputs disagree. Run after every pass."""
    if not nx.is_directed_acyclic_graph(graph):
        raise AssertionError("graph has a cycle")
    order = [n for n in graph.graph["order"] if n in graph]
    if set(order) != set(graph.nodes):
        raise AssertionError("graph order and nodes disagree")
    pos = {n: i for i, n in enumerate(order)}
    for name in order:
        node = graph.nodes[name][OP]
        if node.name != name:
            raise AssertionError(f"node {name} carries OpNode {node.name}")
        for src in node.inputs:
            if src not in graph or not graph.has_edge(src, name):
                raise AssertionError(f"{name} reads {src}, which is not connected to it")
            if pos[src] >= pos[name]:
                raise AssertionError(f"{name} reads {src}, which comes later")
