"""ATen ops, the operations of torch.export graphs (tracer/capture/export.py).

Each ATen op is mapped onto the rule of its torch-level counterpart: the node is rewritten into
the form that rule reads (its target, named arguments, input order) and that rule does the work,
its layout declaration included, so the math is written once. Capture names an ATen op's
arguments from its schema (input, weight, stride, ...), mostly torch.nn.functional's names.
Ops returning a tuple of which inference uses only the first element (``native_layer_norm``:
output, mean, rstd; ``max_pool2d_with_indices``) are put back into their one-output forms at
capture (tracer/capture/export.py). Written directly here: only what no torch-level rule
expresses (``addmm`` and ``mm`` with a constant matrix become a Linear; dtype casts).

This module is imported after every other rule family (see op_rules/__init__.py): an ATen op is
registered only when its counterpart has a rule, so the supported-ops check stays honest. The
counterpart's rule is looked up when the node is converted, so overriding it applies here too.
"""
from __future__ import annotations

import math
import operator
from dataclasses import replace
from typing import Any, Callable

import keras
import torch
import torch.nn.functional as F

from tracer.emitter.context import Emit
from tracer.op_rules.registry import Layout, lookup, register
from tracer.ir import OpNode, Phys, Ref
from tracer.passes.layout import same_layout

aten = torch.ops.aten
_BIG = 2 ** 62  # slice ends at or past this mean "to the end" (ATen writes sys.maxsize)
Rewrite = Callable[[OpNode], OpNode]


def supported(target: Any) -> bool:
    """Whether an ATen op (or any target) has a rule."""
    return lookup(target) is not None


# ---- the adapter --------------------------------------------------------------------------

def _as(target: Any, **kw_changes: Any) -> Rewrite:
    """Rewrite to ``target`` with some named arguments renamed/added (``None`` drops one)."""
    def rewrite(node: OpNode) -> OpNode:
        kw = dict(node.kw)
        for k, v in kw_changes.items():
            if v is None:
                kw.pop(k, None)
            elif isinstance(v, _From):
                kw[k] = kw.pop(v.name, v.default)
            else:
                kw[k] = v
        return replace(node, target=target, kw=kw)
    return rewrite


class _From:
    """In :func:`_as`: take the value of another argument (renaming it)."""

    def __init__(self, name: str, default: Any = None):
        self.name, self.default = name, default


def alias(targets: tuple, base: Any, rewrite: Rewrite | None = None, **kw_changes: Any) -> None:
    """Register ATen ``targets`` onto the rule of ``base`` (a torch-level target), if it has one.

    ``rewrite`` turns the ATen node into the node that rule reads (default: the target becomes
    ``base`` and named arguments change as ``kw_changes`` say, see :func:`_as`).
    """
    base_rule = lookup(base)
    if base_rule is None:
        return
    rewrite = rewrite or _as(base, **kw_changes)

    def layout(node: OpNode, ins: list, shapes: list) -> tuple[list, Phys]:
        t = rewrite(node)
        idx = [node.inputs.index(i) for i in t.inputs]
        req_t, out = infer_with(lookup(t.target).layout, t, [ins[i] for i in idx], [shapes[i] for i in idx])
        req = [Phys.identity(len(s)) for s in shapes]  # inputs the rule does not read
        for i, want in zip(idx, req_t):  # (a rule may list layouts only for the inputs it reads first)
            req[i] = want
        return req, out

    def fn(node: OpNode, ctx: Emit) -> Any:
        t = rewrite(node)
        t = replace(t, in_layouts=tuple(node.in_layouts[node.inputs.index(i)] for i in t.inputs))
        return lookup(t.target).fn(t, ctx)

    fn.__name__ = f"aten_as_{base_rule.name}"
    # elementwise rules keep Layout.ANY, so the layout pass weighs their inputs' layouts itself
    register(targets, fn, Layout.ANY if base_rule.layout is Layout.ANY else layout)


def infer_with(policy: Any, node: OpNode, ins: list, shapes: list) -> tuple[list, Phys]:
    """What tracer.passes.layout.infer does for one rule's policy, for a rewritten node."""
    ranks = [len(s) for s in shapes]
    out_rank = node.rank if node.shape is not None else len(next(s for s in node.structure if s is not None))
    if policy is Layout.TORCH:
        return [Phys.identity(k) for k in ranks], Phys.identity(out_rank)
    if policy is Layout.CHANNELS_LAST:
        return ([Phys.channels_last(k) if j == 0 else Phys.identity(k) for j, k in enumerate(ranks)],
                Phys.channels_last(out_rank))
    if policy is Layout.ANY:
        return same_layout(ins, ranks, out_rank)
    return policy(node, ins, shapes)


# ---- indexing as getitem ------------------------------------------------------------------

def _slice(node: OpNode) -> OpNode:
    rank = node.rank
    dim = node.kw.get("dim", 0) % rank
    start, end, step = node.kw.get("start"), node.kw.get("end"), node.kw.get("step", 1)
    end = None if isinstance(end, int) and end >= _BIG else end  # (a Ref: a dynamic size, op_rules/sizes.py)
    index = (slice(None),) * dim + (slice(start or None, end, None if step == 1 else step),)
    return replace(node, target=operator.getitem, args=(node.args[0], index), kw={})


def _select(node: OpNode) -> OpNode:
    dim = node.kw.get("dim", 0) % (node.rank + 1)
    index = (slice(None),) * dim + (int(node.kw["index"]),)
    return replace(node, target=operator.getitem, args=(node.args[0], index), kw={})


def _transpose_2d(node: OpNode) -> OpNode:
    """aten.t: a transpose of a 2-D tensor, nothing for 0-D and 1-D ones."""
    if node.rank < 2:
        return replace(node, target="contiguous")
    return replace(node, target=torch.transpose, kw={**node.kw, "dim0": 0, "dim1": 1})


def _rsub(node: OpNode) -> OpNode:
    """rsub(input, other, alpha) = other - alpha * input."""
    a = node.args[0]
    b = node.args[1] if len(node.args) > 1 else node.kw["other"]
    return replace(node, target=torch.sub, args=(b, a), kw={"alpha": node.kw.get("alpha", 1)})


def _all_dims_if_empty(target: Any) -> Rewrite:
    """ATen reductions: an empty dim list (or none) means every dim."""
    def fn(node: OpNode) -> OpNode:
        dim = node.kw.get("dim")
        return replace(node, target=target, kw={**node.kw, "dim": dim if dim not in ((), []) else None})
    return fn


def _convolution(node: OpNode) -> OpNode:
    transposed = bool(node.kw.get("transposed", False))
    return replace(node, target=F.conv_transpose2d if transposed else F.conv2d)


def _dropout(node: OpNode) -> OpNode:
    if node.kw.get("train"):
        raise ValueError("dropout with train=True is random; convert the model in eval mode")
    return replace(node, target="contiguous")


def _elu(node: OpNode) -> OpNode:
    """aten.elu(alpha, scale, input_scale): ELU, or SELU with SELU's constants."""
    alpha, scale = float(node.kw.get("alpha", 1.0)), float(node.kw.get("scale", 1.0))
    if float(node.kw.get("input_scale", 1.0)) == 1.0 and scale == 1.0:
        return replace(node, target=F.elu)
    if math.isclose(alpha, 1.6732632423543772) and math.isclose(scale, 1.0507009873554805):
        return replace(node, target=F.selu)
    raise ValueError(f"aten.elu with scale={scale} is not supported (ELU and SELU are)")


def _upsample(mode: str, n: int) -> Rewrite:
    """upsample_*.vec (output_size, scale_factors) and .default (output_size, scales_h, ...)."""
    per_axis = {1: ("scales",), 2: ("scales_h", "scales_w"), 3: ("scales_d", "scales_h", "scales_w")}[n]

    def fn(node: OpNode) -> OpNode:
        kw = dict(node.kw)
        scale = kw.pop("scale_factors", None)
        scales = [kw.pop(k, None) for k in per_axis]
        if scale is None and all(s is not None for s in scales):
            scale = scales
        return replace(node, target=F.interpolate, kw={
            "input": kw.get("input"), "size": kw.get("output_size"), "scale_factor": scale, "mode": mode,
            "align_corners": kw.get("align_corners") if mode != "nearest" and mode != "nearest-exact" else None})
    return fn


def _pad(mode: str) -> Rewrite:
    def fn(node: OpNode) -> OpNode:
        kw = node.kw
        return replace(node, target=F.pad, kw={"input": kw.get("input"), "pad": kw.get("pad", kw.get("padding")),
                                                "mode": mode, "value": kw.get("value", 0.0)})
    return fn


# ---- the table ----------------------------------------------------------------------------

def aten_ops(*names: str) -> tuple:
    """ATen overloads by "packet.overload" name; names this torch lacks are skipped."""
    out = []
    for name in names:
        packet, _, overload = name.partition(".")
        op = getattr(getattr(aten, packet, None), overload or "default", None)
        if op is not None:
            out.append(op)
    return tuple(out)


def _register_nn() -> None:
    """Convolution, linear, normalization, activations, softmax."""
    alias(aten_ops("conv1d", "conv2d", "conv3d", "conv1d.padding", "conv2d.padding", "conv3d.padding"), F.conv2d)
    alias(aten_ops("conv_transpose1d.input", "conv_transpose2d.input", "conv_transpose3d.input"), F.conv_transpose2d)
    alias(aten_ops("convolution", "_convolution"), F.conv2d, _convolution)
    alias(aten_ops("linear"), F.linear)
    alias(aten_ops("t"), torch.transpose, _transpose_2d)
    alias(aten_ops("batch_norm"), F.batch_norm)
    alias(aten_ops("layer_norm"), F.layer_norm, cudnn_enable=None)
    alias(aten_ops("group_norm"), F.group_norm, cudnn_enabled=None)
    for names, target in [(("relu",), F.relu), (("gelu",), F.gelu), (("silu",), F.silu),
                          (("sigmoid",), torch.sigmoid), (("tanh",), torch.tanh),
                          (("hardtanh",), F.hardtanh), (("leaky_relu",), F.leaky_relu),
                          (("hardswish",), F.hardswish), (("hardsigmoid",), F.hardsigmoid),
                          (("softplus",), F.softplus), (("mish",), F.mish)]:
        alias(aten_ops(*names), target)
    alias(aten_ops("elu"), F.elu, _elu)
    alias(aten_ops("selu"), F.selu)
    alias(aten_ops("softmax.int", "_softmax"), F.softmax, half_to_float=None, dtype=None)
    alias(aten_ops("log_softmax.int", "_log_softmax"), F.log_softmax, half_to_float=None, dtype=None)


def _register_arithmetic() -> None:
    """Elementwise arithmetic. In-place variants never reach the rules: capture functionalizes them."""
    for packet, target in [("add", torch.add), ("sub", torch.sub), ("mul", torch.mul), ("div", torch.div)]:
        alias(aten_ops(f"{packet}.Tensor", f"{packet}.Scalar"), target)
    alias(aten_ops("div.Tensor_mode", "div.Scalar_mode"), torch.div)
    alias(aten_ops("rsub.Scalar", "rsub.Tensor"), torch.sub, _rsub)
    alias(aten_ops("pow.Tensor_Scalar", "pow.Tensor_Tensor", "pow.Scalar"), torch.pow)
    for name, target in [("maximum", torch.maximum), ("minimum", torch.minimum), ("neg", torch.neg),
                         ("exp", torch.exp), ("log", torch.log), ("sqrt", torch.sqrt), ("rsqrt", torch.rsqrt),
                         ("abs", torch.abs), ("reciprocal", torch.reciprocal), ("sin", torch.sin),
                         ("cos", torch.cos), ("erf", torch.erf), ("floor", torch.floor), ("ceil", torch.ceil),
                         ("sign", torch.sign), ("log1p", torch.log1p), ("square", torch.square),
                         ("clamp", torch.clamp), ("clamp_min", torch.clamp_min), ("clamp_max", torch.clamp_max)]:
        alias(aten_ops(name), target)


def _register_shapes() -> None:
    """Reshapes, permutes, concatenation, indexing, identities."""
    alias(aten_ops("view", "reshape", "_unsafe_view", "view_copy", "flatten.using_ints", "unflatten.int",
               "unsqueeze", "squeeze.dim", "squeeze.dims", "squeeze"), "reshape")
    alias(aten_ops("permute"), "permute")
    alias(aten_ops("transpose.int"), torch.transpose)
    alias(aten_ops("cat"), torch.cat)
    alias(aten_ops("stack"), torch.stack)
    alias(aten_ops("split.Tensor", "split_with_sizes"), torch.split)
    alias(aten_ops("chunk"), torch.chunk)
    alias(aten_ops("slice.Tensor"), operator.getitem, _slice)
    alias(aten_ops("select.int"), operator.getitem, _select)
    alias(aten_ops("clone", "alias", "detach", "lift_fresh_copy", "contiguous"), "contiguous")
    alias(aten_ops("dropout", "feature_dropout"), "contiguous", _dropout)


def _register_spatial() -> None:
    """Reductions, pooling, resizing, padding."""
    alias(aten_ops("mean.dim", "mean"), torch.mean, _all_dims_if_empty(torch.mean))
    alias(aten_ops("sum.dim_IntList", "sum"), torch.sum, _all_dims_if_empty(torch.sum))
    alias(aten_ops("amax"), torch.amax, _all_dims_if_empty(torch.amax))
    alias(aten_ops("amin"), torch.amin, _all_dims_if_empty(torch.amin))
    alias(aten_ops("max_pool1d", "max_pool2d", "max_pool3d"), F.max_pool2d)
    alias(aten_ops("avg_pool1d", "avg_pool2d", "avg_pool3d"), F.avg_pool2d)
    alias(aten_ops("adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "_adaptive_avg_pool2d",
               "_adaptive_avg_pool3d"), F.adaptive_avg_pool2d)
    for n in (1, 2, 3):
        alias(aten_ops(f"upsample_nearest{n}d.vec", f"upsample_nearest{n}d"), F.interpolate, _upsample("nearest", n))
        alias(aten_ops(f"_upsample_nearest_exact{n}d.vec", f"_upsample_nearest_exact{n}d"), F.interpolate,
              _upsample("nearest-exact", n))
    alias(aten_ops("upsample_linear1d.vec", "upsample_linear1d"), F.interpolate, _upsample("linear", 1))
    alias(aten_ops("upsample_bilinear2d.vec", "upsample_bilinear2d"), F.interpolate, _upsample("bilinear", 2))
    alias(aten_ops("upsample_bicubic2d.vec", "upsample_bicubic2d"), F.interpolate, _upsample("bicubic", 2))
    alias(aten_ops("upsample_trilinear3d.vec", "upsample_trilinear3d"), F.interpolate, _upsample("trilinear", 3))
    alias(aten_ops("pad"), F.pad)
    alias(aten_ops("constant_pad_nd"), F.pad, _pad("constant"))
    alias(aten_ops("reflection_pad1d", "reflection_pad2d", "reflection_pad3d"), F.pad, _pad("reflect"))
    alias(aten_ops("replication_pad1d", "replication_pad2d", "replication_pad3d"), F.pad, _pad("replicate"))
    alias(aten_ops("pixel_shuffle"), F.pixel_shuffle)
    alias(aten_ops("pixel_unshuffle"), F.pixel_unshuffle)


def _register_transformer_ops() -> None:
    """Registered when the torch-level rules of the transformer families exist."""
    alias(aten_ops("matmul"), torch.matmul)
    alias(aten_ops("scaled_dot_product_attention"), F.scaled_dot_product_attention)
    alias(aten_ops("repeat"), "repeat", sizes=_From("repeats"))
    alias(aten_ops("index_select"), torch.index_select)
    alias(aten_ops("gather"), torch.gather, sparse_grad=None)
    alias(aten_ops("where.self"), torch.where)
    alias(aten_ops("masked_fill.Scalar", "masked_fill.Tensor"), torch.masked_fill)
    alias(aten_ops("roll"), torch.roll)
    alias(aten_ops("flip"), torch.flip)
    alias(aten_ops("cumsum"), torch.cumsum)


# ---- written here: matrix products with a constant matrix, no-op expands, dtype casts ---------

def _mm_parts(node: OpNode) -> tuple[Ref, Any, Any]:
    """(data, matrix, bias) of mm/bmm(input, mat2) and addmm/baddbmm(input=bias, mat1/batch1, mat2/batch2)."""
    kw = node.kw
    if "mat1" in kw or "batch1" in kw:
        return kw.get("mat1", kw.get("batch1")), kw.get("mat2", kw.get("batch2")), kw.get("input")
    return kw["input"], kw["mat2"], None


def _as_linear(node: OpNode, data: Ref) -> OpNode:
    return replace(node, target=F.linear, inputs=(data.name,), kw={"input": data})


def _constant_operands(node: OpNode, constant: Callable[[str], bool]) -> bool:
    """Matrix and bias constant (weights): the product is a Dense layer."""
    data, mat, bias = _mm_parts(node)
    return isinstance(data, Ref) and not constant(data.name) and all(
        not isinstance(r, Ref) or constant(r.name) for r in (mat, bias))


def _mm_layout(node: OpNode, ins: list, shapes: list) -> tuple[list, Phys]:
    if _constant_operands(node, lambda name: ins[node.inputs.index(name)] is None):
        i = node.inputs.index(_mm_parts(node)[0].name)
        req, out = lookup(F.linear).layout(_as_linear(node, _mm_parts(node)[0]), [ins[i]], [shapes[i]])
        full = [Phys.identity(len(s)) for s in shapes]
        full[i] = req[0]
        return full, out
    return [Phys.identity(len(s)) for s in shapes], Phys.identity(node.rank)


def matrix_product(node: OpNode, ctx: Emit) -> Any:
    """``beta * bias + alpha * (x @ W)`` (mm, addmm, bmm, baddbmm). A Dense layer when W and the
    bias are constants, as in decomposed Linear layers (bmm: W expanded over the batch, every
    slice the same); else a matmul and an add in PyTorch's axis order."""
    data, mat, bias = _mm_parts(node)
    alpha, beta = float(node.kw.get("alpha", 1)), float(node.kw.get("beta", 1))
    if _constant_operands(node, lambda name: ctx.graph.nodes[name]["op"].is_constant):
        w = ctx.value(node, "mat2" if "mat2" in node.kw else "batch2")
        if w.ndim == 3:
            if not (w == w[:1]).all():
                raise ValueError("bmm with a different constant matrix per batch item is not supported")
            w = w[0]
        b = None if bias is None else ctx.value(node, "input") * beta
        t = replace(_as_linear(node, data), in_layouts=(node.in_layouts[node.inputs.index(data.name)],))
        t = replace(t, kw={**t.kw, "weight": w.T * alpha, "bias": b})
        return lookup(F.linear).fn(t, ctx)
    x = ctx.tensor_input(node, ctx.index_of(node, data))
    y = keras.ops.matmul(x, ctx.tensor_input(node, ctx.index_of(node, mat)))
    y = y if alpha == 1 else keras.ops.multiply(y, alpha)
    if bias is None:
        return y
    b = ctx.tensor_input(node, ctx.index_of(node, bias)) if isinstance(bias, Ref) else float(bias)
    return keras.ops.add(y, b if beta == 1 else keras.ops.multiply(b, beta))


def expand(node: OpNode, ctx: Emit) -> Any:
    """``aten.expand``: nothing when no axis grows (decomposed matmuls expand to the same shape),
    else the ``expand`` rule of the tensor method."""
    src = ctx.graph.nodes[node.inputs[0]]["op"]
    if tuple(src.shape) == tuple(node.shape):
        return ctx.input(node, 0)
    base = lookup("expand")
    if base is None:
        raise NotImplementedError("aten.expand that grows an axis needs a rule for Tensor.expand")
    return base.fn(replace(node, target="expand", kw={k: v for k, v in node.kw.items() if k != "implicit"}), ctx)


def _expand_layout(node: OpNode, ins: list, shapes: list) -> tuple[list, Phys]:
    if tuple(shapes[0]) == tuple(node.shape):
        return same_layout(ins, [len(s) for s in shapes], node.rank)
    base = lookup("expand")
    policy = base.layout if base is not None else Layout.TORCH
    return infer_with(policy, replace(node, target="expand"), ins, shapes)


def to_copy(node: OpNode, ctx: Emit) -> Any:
    """``_to_copy`` / ``to``: a cast when the dtype changes, else nothing (device moves are moot)."""
    x = ctx.input(node, 0)
    src = ctx.graph.nodes[node.inputs[0]]["op"]
    if node.dtype is None or node.dtype == src.dtype:
        return x
    dtype = {"float64": "float32", "int64": "int32"}.get(node.dtype, node.dtype)
    return keras.ops.cast(x, dtype)


register(aten_ops("addmm", "mm", "bmm", "baddbmm"), matrix_product, _mm_layout)
register(aten_ops("expand"), expand, _expand_layout)
register(aten_ops("_to_copy", "to.dtype", "to.dtype_layout", "to.device"), to_copy, Layout.ANY)
for _register in (_register_nn, _register_arithmetic, _register_shapes, _register_spatial,
                  _register_transformer_ops):
    _register()

__all__ = ["alias", "infer_with", "supported"]
