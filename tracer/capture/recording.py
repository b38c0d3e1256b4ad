"""What both capture paths share: one run of a traced GraphModule that records every node's result
(:class:`Recorder`), and the NetworkX IR built from it (:func:`build_graph`), each node with its
normalized arguments and the user's source line. torch.fx (``tracer.capture.fx``) and torch.export
(``tracer.capture.export``) produce the GraphModule."""
from __future__ import annotations

import inspect
import operator
import os
import re
from dataclasses import replace
from typing import Any

import networkx as nx
import torch
import torch.fx as fx
from torch.fx.operator_schemas import get_signature_for_torch_op

from tracer.capture.sizes import size_nodes
from tracer.errors import CaptureError
from tracer.ir import OP, OpNode, Ref, Source

TORCH_DIR = os.path.dirname(torch.__file__) + os.sep  # not site-packages/torchvision/: its frames are named
# tracer's own code, skipped when looking for the user's line: the installed package (which holds
# tracer.op_rules, .emitter, .fixes), and in a source checkout the stage folders beside tracer/
_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OWN_DIRS = (_PACKAGE + os.sep,) + tuple(
    os.path.join(os.path.dirname(_PACKAGE), d) + os.sep for d in ("op_rules", "emitter", "fixes"))
_FRAME = re.compile(r'File "([^"]+)", line (\d+), in [^\n]*\n\s*([^\n]*)')
# Tensor methods taking their shape/dims as varargs: x.view(2, -1) == x.view((2, -1)).
_VARARG_METHODS = {"view": "shape", "reshape": "shape", "permute": "dims", "repeat": "sizes",
                   "expand": "size", "tile": "dims", "flip": "dims", "new_zeros": "size",
                   "new_ones": "size", "new_empty": "size"}

# Creation ops: their result depends on size arguments only (sizes are folded into literals).
_CREATION = {torch.arange, torch.zeros, torch.ones, torch.full, torch.empty, torch.eye, torch.linspace,
             torch.tensor, torch.as_tensor}
_EXPANDS = {torch.ops.aten.expand.default, torch.ops.aten.repeat.default}
# torch.export's creation ops: their sizes are plain numbers, ``x.shape[0]`` among them
_ATEN_CREATION = {torch.ops.aten.zeros.default, torch.ops.aten.ones.default, torch.ops.aten.full.default,
                  torch.ops.aten.empty.memory_format}
_NEW = {"new_zeros", "new_ones", "new_full", "new_empty", "new_tensor"}


class Recorder(fx.Interpreter):
    """Runs the traced module once, keeping each node's result and whether it depends on inputs."""

    def __init__(self, gm: fx.GraphModule, sizes: dict[str, Any] | None = None):
        super().__init__(gm, garbage_collect_values=False)
        self.results: dict[str, Any] = {}
        self.dynamic: set[str] = set()
        self.sizes = sizes or {}  # sizes that follow a dynamic axis (tracer/capture/sizes.py): not folded
        self.batch: int | None = None  # axis 0 of the first input
        self.batch_sized: set[str] = set()  # size values equal to a computed tensor's batch size
        self.batch_shapes: set[str] = set()  # shapes whose first entry is one

    def run_node(self, n: fx.Node) -> Any:
        try:
            result = super().run_node(n)
        except Exception as exc:
            raise CaptureError(f"PyTorch failed to run {n.format_node()} at {source_of(n)}: {exc}") from exc
        if n.op == "placeholder" and self.batch is None:
            self.batch = result.shape[0] if isinstance(result, torch.Tensor) and result.dim() else 0
        if (n.op == "placeholder" or any(a.name in self.dynamic for a in self._value_inputs(n, result))
                or self._expands_to_batch(n, result)):
            self.dynamic.add(n.name)
        self.results[n.name] = result
        return result

    def _value_inputs(self, n: fx.Node, result: Any) -> list[fx.Node]:
        """The inputs whose values flow into ``n``'s result. A creation op (``torch.arange(x.shape[-1])``,
        ``x.new_zeros(4)``) reads only sizes, dtype and device, so it is a constant of those sizes,
        unless its axis 0 has the batch size (``torch.zeros(x.shape[0], 4)``): that follows the input."""
        self._track_batch_sizes(n)
        if (n.op == "call_function" and n.target in _CREATION) or (n.op == "call_method" and n.target in _NEW):
            if (isinstance(result, torch.Tensor) and result.dim() and result.shape[0] == self.batch
                    and any(a.name in self.batch_sized or a.name in self.batch_shapes for a in n.all_input_nodes)):
                return n.all_input_nodes
            return [a for a in n.all_input_nodes if a.name in self.sizes or (
                isinstance(self.results.get(a.name), torch.Tensor) and not (n.op == "call_method" and n.args
                                                                            and a is n.args[0]))]
        return n.all_input_nodes

    def _expands_to_batch(self, n: fx.Node, result: Any) -> bool:
        """A constant's unit axis 0 expanded or repeated to the batch size (over 1): ``cls.expand(x.shape[0],
        -1, -1)``, ``pos.repeat(B, 1, 1, 1)`` captured by torch.export, where the size is a plain number, or a tensor created with the batch
        size as axis 0 there (``torch.zeros(x.shape[0], ...)``). Either follows the input's batch."""
        if not (isinstance(result, torch.Tensor) and result.dim() and self.batch and self.batch > 1
                and result.shape[0] == self.batch):
            return False
        if n.op == "call_function" and n.target in _ATEN_CREATION:  # torch.zeros(x.shape[0], ...) exported
            return True
        if not (n.op == "call_method" and n.target in ("expand", "repeat") or n.target in _EXPANDS):
            return False
        src = self.results.get(n.args[0].name) if isinstance(n.args[0], fx.Node) else None
        return isinstance(src, torch.Tensor) and src.dim() == result.dim() and src.shape[0] == 1

    def _track_batch_sizes(self, n: fx.Node) -> None:
        """Mark sizes that are the batch size of a computed tensor: ``x.size(0)``, ``x.shape[0]``,
        arithmetic on them; ``x.shape`` / ``x.size()`` as shapes that start with it."""
        ins = n.all_input_nodes
        dyn = bool(ins) and ins[0].name in self.dynamic
        if (n.op == "call_function" and n.target is getattr and n.args[1:] == ("shape",) and dyn) or (
                n.op == "call_method" and n.target == "size" and len(n.args) == 1 and dyn):
            self.batch_shapes.add(n.name)
        elif n.op == "call_method" and n.target == "size" and dyn and n.args[1:] in ((0,), (-len(
                self.results[ins[0].name].shape),)):
            self.batch_sized.add(n.name)
        elif n.op == "call_function" and n.target is operator.getitem and ins and ins[0].name in self.batch_shapes:
            if n.args[1] == 0:
                self.batch_sized.add(n.name)
            elif isinstance(n.args[1], slice) and n.args[1].start in (None, 0):
                self.batch_shapes.add(n.name)
        elif n.op == "call_function" and getattr(n.target, "__module__", "") in ("_operator", "operator") and any(
                a.name in self.batch_sized for a in ins):
            self.batch_sized.add(n.name)


def source_of(n: fx.Node) -> Source:
    """The deepest frame of the node's stack trace that is the user's code."""
    trace = n.stack_trace or ""
    best = Source()
    for file, line, code in _FRAME.findall(trace):
        path = os.path.abspath(file)
        if path.startswith(TORCH_DIR) or path.startswith(OWN_DIRS):
            continue
        best = Source(file, int(line), code.strip())
    return best


def module_path_of(n: fx.Node) -> str:
    if n.op == "call_module":
        return str(n.target)
    stack = n.meta.get("nn_module_stack") or {}
    if stack:
        path = list(stack.values())[-1][0]
        return str(path)
    return ""


def normalize(n: fx.Node, args: tuple, kwargs: dict) -> dict:
    """Name every argument once: {parameter name: value}. Falls back to positional keys."""
    target = n.target
    if n.op == "call_method":
        if target in _VARARG_METHODS:
            rest = args[1:]
            if len(rest) == 1 and isinstance(rest[0], (tuple, list)):
                rest = tuple(rest[0])
            return {"input": args[0], _VARARG_METHODS[target]: tuple(rest), **kwargs}
        target = getattr(torch, target, None)
        if target is None:
            return _positional(args, kwargs)
    if n.op not in ("call_function", "call_method"):
        return _positional(args, kwargs)
    for sig in _signatures(target):
        try:
            bound = sig.bind(*args, **kwargs)
        except TypeError:
            continue
        bound.apply_defaults()
        return dict(bound.arguments)
    return _positional(args, kwargs)


def _signatures(target: Any) -> list[inspect.Signature]:
    if isinstance(target, torch._ops.OpOverload):  # ATen ops (torch.export graphs): names from the schema
        return list(get_signature_for_torch_op(target) or [])
    try:
        sig = inspect.signature(target)
    except (TypeError, ValueError):
        return list(get_signature_for_torch_op(target) or [])
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in sig.parameters.values()):
        # torch's boolean_dispatch wrappers (F.max_pool2d): the wrapped functions have the names
        inner = [c.cell_contents for c in (getattr(target, "__closure__", None) or ())
                 if inspect.isfunction(c.cell_contents)]
        return [inspect.signature(f) for f in inner] or [sig]
    return [sig]


def _positional(args: tuple, kwargs: dict) -> dict:
    return {**{f"arg{i}": a for i, a in enumerate(args)}, **kwargs}



def build_graph(gm: fx.GraphModule, rec: Recorder) -> nx.DiGraph:
    graph = nx.DiGraph()
    modules = dict(gm.named_modules())
    folded: dict[str, Any] = {}  # node name -> constant value inlined into consumers
    params: dict[str, tuple[str, ...]] = {}  # node name -> the trainable parameters its value comes from
    order: list[str] = []
    for n in gm.graph.nodes:
        result = rec.results.get(n.name)
        params[n.name] = ((n.target,) if n.op == "get_attr" and isinstance(result, torch.nn.Parameter)
                          and result.requires_grad else
                          tuple(dict.fromkeys(p for i in n.all_input_nodes for p in params[i.name])))
        is_const = n.op not in ("placeholder", "output") and n.name not in rec.dynamic
        if n.op not in ("placeholder", "output") and not _has_tensor(result):  # sizes, shape arithmetic
            if n.name in rec.sizes:  # follows a dynamic axis: computed at runtime (tracer/capture/sizes.py)
                folded[n.name], made = _size_nodes(n, result, rec.sizes[n.name], folded)
                for node in made:
                    graph.add_node(node.name, **{OP: node})
                    graph.add_edges_from((src, node.name) for src in node.inputs)
                    order.append(node.name)
            else:
                folded[n.name] = result
            continue
        node = _make_node(n, result, is_const, folded, modules)
        if node.is_constant and params[n.name]:  # verify/trainable.py warns if these end up frozen
            node = replace(node, kw={**node.kw, "parameters": params[n.name]})
        graph.add_node(node.name, **{OP: node})
        for src in node.inputs:
            graph.add_edge(src, node.name)
        order.append(node.name)
    graph.graph["order"] = order
    return graph


def _converter(folded: dict) -> Any:
    """fx arguments -> IR arguments: folded values inlined, other nodes as Refs."""
    def conv(a: Any) -> Any:
        if isinstance(a, fx.Node):
            return folded[a.name] if a.name in folded else Ref(a.name)
        if isinstance(a, (tuple, list)):
            return type(a)(conv(x) for x in a)
        if isinstance(a, dict):
            return {k: conv(v) for k, v in a.items()}
        if isinstance(a, slice):
            return slice(conv(a.start), conv(a.stop), conv(a.step))
        return a
    return conv


def _size_nodes(n: fx.Node, result: Any, mask: Any, folded: dict) -> tuple[Any, list[OpNode]]:
    def make(name: str, target: Any, kw: dict, value: Any) -> OpNode:
        inputs = tuple(dict.fromkeys(_refs(kw)))
        length = int(value) if isinstance(value, int) else 1
        return OpNode(name=name, kind="call_function", target=target, inputs=inputs, args=tuple(kw.values()),
                      kw=kw, shape=(length,), dtype="float32", source=source_of(n), module_path=module_path_of(n))
    return size_nodes(n, result, mask, _converter(folded), make)


def _make_node(n: fx.Node, result: Any, is_const: bool, folded: dict, modules: dict) -> OpNode:
    conv = _converter(folded)
    args = conv(tuple(n.args))
    kwargs = conv(dict(n.kwargs))
    inputs = tuple(dict.fromkeys(_refs((args, kwargs))))
    common = dict(name=n.name, source=source_of(n), module_path=module_path_of(n))
    if is_const:  # a tensor that does not depend on the inputs: keep its value
        value = result.detach().clone() if isinstance(result, torch.Tensor) else result
        trainable = isinstance(result, torch.nn.Parameter) and result.requires_grad
        return OpNode(kind="constant" if n.op != "get_attr" else "get_attr", target=n.target,
                      value=value, kw={"trainable": trainable}, **_tensor_meta(result), **common)
    if n.op == "output":
        return OpNode(kind="output", target="output", inputs=inputs, args=args, **common)
    kw = normalize(n, args, kwargs) if n.op in ("call_function", "call_method") else kwargs
    module = modules.get(n.target) if n.op == "call_module" else None
    target = type(module) if module is not None else n.target
    return OpNode(kind=n.op, target=target, inputs=inputs, args=args, kw=kw, module=module,
                  **_tensor_meta(result), **common)


def _tensor_meta(result: Any) -> dict:
    if isinstance(result, torch.Tensor):
        return {"shape": tuple(result.shape), "dtype": str(result.dtype).replace("torch.", "")}
    def shapes(value: Any) -> Any:  # nested tuples (an LSTM's (output, (h_n, c_n))) as tuples of their shapes
        if isinstance(value, torch.Tensor):
            return tuple(value.shape)
        return tuple(shapes(v) for v in value) if isinstance(value, (tuple, list)) and _has_tensor(value) else None
    if isinstance(result, (tuple, list)) and _has_tensor(result):
        return {"structure": shapes(result)}
    return {}


def _has_tensor(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, (tuple, list)):
        return any(_has_tensor(v) for v in value)
    if isinstance(value, dict):
        return any(_has_tensor(v) for v in value.values())
    return False


def _refs(value: Any) -> list[str]:
    if isinstance(value, Ref):
        return [value.name]
    if isinstance(value, (tuple, list)):
        return [r for v in value for r in _refs(v)]
    if isinstance(value, dict):
        return [r for v in value.values() for r in _refs(v)]
    if isinstance(value, slice):
        return _refs((value.start, value.stop, value.step))
    return []
