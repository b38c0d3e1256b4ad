"""In-place ops as the values they leave behind: later reads of a mutated tensor read the op.

Works around torch.fx (checked on torch 2.13): symbolic tracing records ``z.mul_(2)``,
``torch.relu_(z)``, ``F.relu(z, inplace=True)`` and a call of ``nn.ReLU(inplace=True)`` as nodes
of their own, but every later use of ``z`` still reads the node from before the mutation. An
in-place op whose result is not used is even dead code in the fx graph, so without this pass it
would silently vanish. torch.export graphs are functionalized already; there this is a no-op.

Mutation through views is not followed (``z[:, :2].mul_(2)`` changes ``z``; ``v = z.view(...)``
sees a later ``z.mul_(2)``): when another view of the mutated memory is read after the op, a
ConversionError names both instead of converting to different numbers. Delete when fx captures
functionalize in-place ops.
"""
from __future__ import annotations

import operator

import networkx as nx

from tracer.errors import ConversionError
from tracer.ir import OpNode, Ref, op, ordered, rewire

# Results that share memory with their first input (torch views and possible views).
_VIEWS = {"view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "permute", "transpose",
          "swapaxes", "squeeze", "unsqueeze", "expand", "expand_as", "narrow", "t", "movedim", "chunk",
          "split", "unbind", "detach", "contiguous", "as_strided", operator.getitem}


def is_inplace(node: OpNode) -> bool:
    """Whether ``node`` overwrites its first input: ``x.mul_()``, ``torch.relu_``, ``inplace=True``."""
    if not node.kind.startswith("call") or not node.inputs:
        return False
    if node.kind == "call_module":
        return bool(getattr(node.module, "inplace", False))
    if node.kw.get("inplace") is True:
        return True
    if getattr(node.target, "__module__", "") in ("_operator", "operator"):
        return False  # operator.and_ / or_ (``a & b``, ``a | b``) are not in-place despite the name
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    return name.endswith("_") and not name.startswith("_") and _first_ref(node) is not None


def _first_ref(node: OpNode) -> str | None:
    if node.kind == "call_module":
        first = node.args[0] if node.args else None
    else:
        first = node.args[0] if node.args else next(iter(node.kw.values()), None)
    return first.name if isinstance(first, Ref) else None


def _is_view(node: OpNode) -> bool:
    t = node.target
    name = t if isinstance(t, str) else getattr(t, "__name__", None)
    return t in _VIEWS or name in _VIEWS


def functionalize_inplace(graph: nx.DiGraph) -> nx.DiGraph:
    order = [n.name for n in ordered(graph)]
    pos = {name: i for i, name in enumerate(order)}
    for name in order:
        node = op(graph, name)
        if not is_inplace(node):
            continue
        src = _first_ref(node)
        if src is None or op(graph, src).is_constant:
            continue
        _refuse_view_aliasing(graph, node, src, pos)
        for reader in [r for r in graph.successors(src) if pos[r] > pos[name]]:
            rewire(graph, reader, src, name)
    return graph


def _refuse_view_aliasing(graph: nx.DiGraph, node: OpNode, src: str, pos: dict) -> None:
    """Raise when another view of the mutated memory (its base, or a view of it) is read after
    the op: those reads would see the change, and fx does not say which they are."""
    root = src
    while _is_view(op(graph, root)) and op(graph, root).inputs:
        root = op(graph, root).inputs[0]
    family, todo = {root}, [root]
    while todo:
        for succ in graph.successors(todo.pop()):
            s = op(graph, succ)
            if succ not in family and _is_view(s) and s.inputs and s.inputs[0] in family:
                family.add(succ)
                todo.append(succ)
    earlier = [m for m in family - {src} if pos[m] < pos[node.name]]  # later views see the change
    for member in sorted(earlier, key=pos.get):
        late = [r for r in graph.successors(member) if pos[r] > pos[node.name]]
        if late:
            raise ConversionError(
                f"{node.describe()} modifies in-place memory that {op(graph, member).describe()} also holds "
                f"(a view), and {op(graph, late[0]).describe()} reads it afterwards; write the op out of "
                "place (y = x * 2) instead")
