"""Layout: which physical axis order each tensor has inside the Keras model.

One pass walks the graph in order and asks each node's rule which layout it needs for its
inputs and which it returns. Transposes are not inserted here: the emitter materializes a
conversion only where a producer's layout differs from what a consumer requires, and reuses it
for every consumer that needs the same. Axis-moving ops (permute, transpose, reshapes between
image maps and tokens) mostly change only the bookkeeping, not the data.
"""
from __future__ import annotations

import math

import networkx as nx

from tracer.op_rules.registry import Layout, lookup
from tracer.ir import OpNode, Phys, ordered, update


def assign_layouts(graph: nx.DiGraph, channels_last_io: bool = False) -> nx.DiGraph:
    plan = _Plan(graph, channels_last_io)
    for node in ordered(graph):
        if node.kind == "placeholder":
            update(graph, node.name, layout=_input_layout(graph, node, channels_last_io))
        elif node.is_constant:
            continue
        elif node.kind == "output":
            update(graph, node.name, in_layouts=tuple(
                _output_layout(graph.nodes[i]["op"], channels_last_io) for i in node.inputs))
        else:
            ins = [graph.nodes[i]["op"].layout for i in node.inputs]
            req, out = infer(node, ins, graph, plan)
            plan.record(node, req)
            update(graph, node.name, in_layouts=tuple(req), layout=out)
    return graph


class _Plan:
    """What the pass decided so far: the conversions already needed (the emitter shares each one)."""

    def __init__(self, graph: nx.DiGraph, channels_last_io: bool):
        self.graph = graph
        self.channels_last_io = channels_last_io
        self.converted: set[tuple[str, Phys]] = set()

    def record(self, node: OpNode, req: list) -> None:
        for src, want in zip(node.inputs, req):
            have = self.graph.nodes[src]["op"].layout
            if want is not None and have is not None and have != want:
                self.converted.add((src, want))


def infer(node: OpNode, ins: list, graph: nx.DiGraph, plan: "_Plan | None" = None) -> tuple[list, Phys]:
    r = lookup(node.target)
    policy = r.layout if r is not None else Layout.TORCH
    shapes = [_shape(graph.nodes[i]["op"]) for i in node.inputs]
    ranks = [len(s) for s in shapes]
    out_rank = node.rank if node.shape is not None else _structure_rank(node)
    if policy is Layout.TORCH:
        return [Phys.identity(k) for k in ranks], Phys.identity(out_rank)
    if policy is Layout.CHANNELS_LAST:
        req = [Phys.channels_last(k) if j == 0 else Phys.identity(k) for j, k in enumerate(ranks)]
        return req, Phys.channels_last(out_rank)
    if policy is Layout.ANY:
        if plan is not None:
            return elementwise_layout(node, ins, ranks, out_rank, plan)
        return same_layout(ins, ranks, out_rank)
    return policy(node, ins, shapes)


def elementwise_layout(node: OpNode, ins: list, ranks: list[int], out_rank: int, plan: _Plan) -> tuple[list, Phys]:
    """Elementwise ops whose inputs arrive in different layouts run in the one that costs fewest new
    transposes (a conversion another consumer already needs is free); on a tie, in the layout
    the ops downstream want, else in the first input's layout (:func:`same_layout`)."""
    req, out = same_layout(ins, ranks, out_rank)
    full = max(ranks, default=out_rank)
    tensors = [(src, p) for src, p, k in zip(node.inputs, ins, ranks) if p is not None and k == full]
    candidates = list(dict.fromkeys(p for _, p in tensors))
    if len(candidates) < 2 or any(p.flat is not None for p in candidates):
        return req, out

    def cost(c: Phys) -> int:
        return sum(1 for src, p in tensors if p != c and (src, c) not in plan.converted)

    best = min(cost(c) for c in candidates)
    tied = [c for c in candidates if cost(c) == best]
    choice = tied[0] if len(tied) == 1 else _downstream_choice(plan, node, tied) or (
        req[0] if req[0] in tied else tied[0])
    return [choice for _ in ranks], choice if out_rank == full else Phys.identity(out_rank)


def _downstream_choice(plan: _Plan, node: OpNode, options: list[Phys], limit: int = 16) -> Phys | None:
    """The option the nearest layout-decided consumers want, looking through elementwise ops."""
    graph, rank = plan.graph, node.rank
    wants = {Phys.channels_last(rank): 0, Phys.identity(rank): 0}
    frontier, seen = [node.name], {node.name}
    while frontier and len(seen) < limit:
        name = frontier.pop(0)
        for succ in graph.successors(name):
            s = graph.nodes[succ]["op"]
            if succ in seen:
                continue
            seen.add(succ)
            policy = _policy(s)
            if s.kind == "output":
                if not plan.channels_last_io:
                    wants[Phys.identity(rank)] += 1
            elif policy is Layout.CHANNELS_LAST:
                wants[Phys.channels_last(rank)] += 1
            elif policy is Layout.TORCH:
                wants[Phys.identity(rank)] += 1
            elif policy is Layout.ANY and s.rank == rank:
                frontier.append(succ)
    ranked = sorted((p for p in options if wants.get(p)), key=lambda p: -wants[p])
    return ranked[0] if ranked and (len(ranked) == 1 or wants[ranked[0]] > wants[ranked[1]]) else None


def _policy(node: OpNode):
    r = lookup(node.target) if node.kind.startswith("call") else None
    return r.layout if r is not None else None


def same_layout(ins: list, ranks: list[int], out_rank: int) -> tuple[list, Phys]:
    """Elementwise: every input takes the layout of the highest-rank input that has one.

    Lower-rank inputs are broadcast: they are first expanded to the full rank (torch aligns
    shapes on the right), then laid out like the rest.
    """
    full = max(ranks, default=out_rank)
    ref = next((p for p, k in zip(ins, ranks) if p is not None and k == full), None)
    if ref is None:
        ref = Phys.identity(full)
    if ref.flat is not None and any(p is not None and p != ref for p in ins):
        ref = Phys.identity(full)
    req = [ref for _ in ranks]  # with a flat ref, only constants (emitter.context.arrange orders them)
    out = ref if out_rank == full else Phys.identity(out_rank)
    return req, out


def _shape(node: OpNode) -> tuple:
    """A node's torch shape; for a tuple of tensors, the first element's shape."""
    if node.shape is not None:
        return node.shape
    shapes = [s for s in (node.structure or ()) if s is not None]
    return shapes[0] if shapes else ()


def _rank(node: OpNode) -> int:
    return node.rank if node.shape is not None else _structure_rank(node)


def _structure_rank(node: OpNode) -> int:
    shapes = [s for s in (node.structure or ()) if s is not None]
    return len(shapes[0]) if shapes else 0


def _input_layout(graph: nx.DiGraph, node: OpNode, channels_last_io: bool) -> Phys:
    """An input consumed with its batch at another torch axis has that axis first in Keras
    (:func:`batch_first_layout`). Else, with channels-last I/O, an input is NHWC when the
    layout-decided ops it reaches (through elementwise ones, or meeting their other operands) want
    channels-last."""
    moved = batch_first_layout(graph, node)
    if moved is not None:
        return moved
    if not channels_last_io or node.rank < 3:
        return Phys.identity(node.rank)
    frontier, seen = [node.name], {node.name}
    while frontier and len(seen) < 32:
        name = frontier.pop(0)
        for succ in graph.successors(name):
            s = graph.nodes[succ]["op"]
            policy = _policy(s)
            if policy is Layout.CHANNELS_LAST:
                return Phys.channels_last(node.rank)
            if policy is Layout.ANY and succ not in seen and s.rank == node.rank:
                seen.add(succ)
                frontier.append(succ)
                if any(_policy(graph.nodes[i]["op"]) is Layout.CHANNELS_LAST for i in s.inputs):
                    return Phys.channels_last(node.rank)
    return Phys.identity(node.rank)


def batch_first_layout(graph: nx.DiGraph, node: OpNode) -> Phys | None:
    """The layout of an input whose consumers hold its batch at another torch axis than 0, or None.

    Each consumer's rule is asked which layout it needs this input in, given it in PyTorch's order;
    one that needs torch axis ``b > 0`` at Keras axis 0 reads axis ``b`` as the batch: the state
    ``h0`` / ``c0`` ``(L*D, B, H)`` of an nn.LSTM / GRU / RNN (needed as ``(B, L*D, H)``) or the
    sequence ``(T, B, F)`` of a time-major one (``(B, T, F)``). The Keras input then takes that
    layout, so its batch axis is the model's batch, and the tester and LiteRT arrange their arrays
    by it (``ConversionResult.input_layouts``). Consumers that need PyTorch's order get a transpose.
    None when no consumer moves the batch, or when two disagree on which axis it is."""
    if node.rank < 2:
        return None
    found: set[Phys] = set()
    for succ in graph.successors(node.name):
        s = graph.nodes[succ]["op"]
        policy = _policy(s)
        if not callable(policy):  # Layout.ANY follows its input; TORCH / CHANNELS_LAST keep axis 0 first
            continue
        ins = [Phys.identity(node.rank) if i == node.name else _known_layout(graph.nodes[i]["op"])
               for i in s.inputs]
        req, _ = infer(s, ins, graph)
        found |= {p for i, p in zip(s.inputs, req) if i == node.name and p is not None and p.flat is None
                  and p.items is None and len(p.perm) == node.rank and p.perm[0] != 0}
    return found.pop() if len(found) == 1 else None


def _known_layout(node: OpNode) -> Phys:
    """A node's layout when the pass has set it; PyTorch's order for one it has not reached yet."""
    return node.layout if node.layout is not None else Phys.identity(_rank(node))


def _output_layout(node: OpNode, channels_last_io: bool) -> Phys:
    rank = _rank(node)
    if channels_last_io and node.layout is not None and node.layout == Phys.channels_last(rank):
        return node.layout
    return Phys.identity(rank)


# ---- permutation algebra used by axis-moving rules -------------------------------------------

def permute_layout(phys: Phys, dims: tuple[int, ...]) -> Phys:
    """Layout of ``x.permute(dims)`` when ``x`` has layout ``phys``: no data moves."""
    rank = len(dims)
    dims = tuple(d % rank for d in dims)
    inv = [0] * rank
    for j, d in enumerate(dims):
        inv[d] = j
    return Phys(tuple(inv[p] for p in phys.perm))


def drop_dims(phys: Phys, dims: set[int]) -> Phys:
    """Layout after the torch dims ``dims`` are removed (reductions without keepdim, int indexing)."""
    kept = [p for p in phys.perm if p not in dims]
    return Phys(tuple(p - sum(1 for d in dims if d < p) for p in kept))


def reshape_layout(in_shape: tuple, phys: Phys, out_shape: tuple) -> tuple[Phys, Phys] | None:
    """(required input layout, output layout) for a reshape done in the physical layout.

    A reshape only merges and splits runs of axes. It runs on the physical tensor unchanged
    when each run of torch axes sits in the same order in the physical layout. When a run is
    flattened into the last axis in another order (flatten of an NHWC map), the result is
    marked ``flat`` so a following Linear can absorb the order into its weights. When a run
    sits in other order elsewhere (channel shuffle on NHWC), only that run is reordered.
    Returns None when the data must first return to PyTorch's order.
    """
    if phys.flat is not None:
        return None
    groups = _groups(tuple(in_shape), tuple(out_shape))
    if groups is None:
        return None
    grouped = {d for gin, _ in groups for d in gin}
    seq = [d for d in phys.perm if d in grouped]
    pos = {d: i for i, d in enumerate(seq)}
    disordered = []
    for gin, gout in groups:
        ps = sorted(pos[d] for d in gin)
        if ps != list(range(ps[0], ps[0] + len(ps))):
            return None
        if [pos[d] for d in gin] != ps:
            disordered.append((gin, gout))
    flat = None
    if len(disordered) == 1 and disordered[0][1] == [len(out_shape) - 1]:
        gin = disordered[0][0]
        flat = (tuple(in_shape[d] for d in gin), tuple(d - min(gin) for d in sorted(gin, key=pos.get)))
        out_perm = _place(groups, pos, out_shape)
        if out_perm == tuple(range(len(out_shape))):
            return phys, Phys(out_perm, flat)
    req = phys
    if disordered:  # reorder each disordered run in place, then reshape
        new = list(phys.perm)
        for gin, _ in disordered:
            slots = sorted(phys.perm.index(d) for d in gin)
            for slot, d in zip(slots, sorted(gin)):
                new[slot] = d
        req = Phys(tuple(new))
        seq = [d for d in req.perm if d in grouped]
        pos = {d: i for i, d in enumerate(seq)}
    return req, Phys(_place(groups, pos, out_shape))


def regrouped_layout(in_shape: tuple, phys: Phys, out_shape: tuple) -> tuple[Phys, Phys] | None:
    """For a reshape that cannot run in ``phys``: one reorder of the input that lets it run and
    leaves the result channels-last when the input had its channels last (a MobileViT unfold or
    fold between NHWC maps and patches), else in PyTorch's order. None if no such reorder exists.

    Without it the data goes back to PyTorch's order for the reshape and, for the channels-last
    op that follows, is transposed once more.
    """
    groups = _groups(tuple(in_shape), tuple(out_shape))
    rank_in, rank_out = len(in_shape), len(out_shape)
    if groups is None or phys.flat is not None or rank_out < 3:
        return None
    channels_last = phys.perm[-1] == 1 and ([1], [1]) in groups
    target = Phys.channels_last(rank_out) if channels_last else Phys.identity(rank_out)
    owner = {d: gin for gin, gout in groups for d in gout}
    order = [d for o in target.perm if o in owner and owner[o][0] == min(owner[o]) for d in owner[o]]
    order = list(dict.fromkeys(order))
    for d in range(rank_in):  # unit axes: right after their torch predecessor
        if d not in order:
            order.insert(order.index(d - 1) + 1 if d > 0 and (d - 1) in order else 0, d)
    req = Phys(tuple(order))
    found = reshape_layout(in_shape, req, out_shape)
    return (req, found[1]) if found is not None and found[0] == req and found[1] == target else None


def _place(groups: list, pos: dict, out_shape: tuple) -> tuple[int, ...]:
    placed = sorted((min(pos[d] for d in gin), gout) for gin, gout in groups)
    out_perm = [d for _, gout in placed for d in gout]
    for j in range(len(out_shape)):  # unit axes: right after their torch predecessor
        if j not in out_perm:
            out_perm.insert(out_perm.index(j - 1) + 1 if j > 0 and (j - 1) in out_perm else 0, j)
    return tuple(out_perm)


def _groups(a: tuple, b: tuple) -> list[tuple[list[int], list[int]]] | None:
    """Split two shapes of equal size into runs with equal products, ignoring unit axes.

    Axis 0 is kept as its own run when both shapes share it (the batch axis, size 1 or not).
    """
    groups = []
    start = 0
    if a and b and a[0] == b[0]:
        groups.append(([0], [0]))
        start = 1
    ia = [d for d in range(start, len(a)) if a[d] != 1]
    ib = [d for d in range(start, len(b)) if b[d] != 1]
    if math.prod(a[d] for d in ia) != math.prod(b[d] for d in ib):
        return None
    i = j = 0
    while i < len(ia) and j < len(ib):
        gin, gout = [ia[i]], [ib[j]]
        pa, pb = a[ia[i]], b[ib[j]]
        i, j = i + 1, j + 1
        while pa != pb:
            if pa < pb:
                gin.append(ia[i]); pa *= a[ia[i]]; i += 1
            else:
                gout.append(ib[j]); pb *= b[ib[j]]; j += 1
        groups.append((gin, gout))
    return groups
