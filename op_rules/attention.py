"""Attention: F.scaled_dot_product_attention and nn.MultiheadAttention (a leaf module).

Both run in PyTorch's axis order: ``softmax(q @ k^T * scale + mask) @ v``. Masks become one
additive mask: a boolean mask adds 0 where attention is allowed and -inf where it is not (a
constant mask is turned into that once; a computed one with ``log`` of 1/0, no constants).
Dropout is inactive in eval mode and ignored. ``nn.TransformerEncoderLayer`` and friends are
traced through: their LayerNorm, Linear and this module's rule do the work.
"""
from __future__ import annotations

import inspect
import math
from typing import Any

import keras
import numpy as np
import torch.nn as nn
import torch.nn.functional as F

from tracer.emitter.context import Emit, to_numpy
from tracer.op_rules.common import call_with_weights, trainable
from tracer.op_rules.elementwise import scale
from tracer.op_rules.norm_layers import layer_norm_module
from tracer.op_rules.registry import Layout, rule
from tracer.op_rules.sizes import causal_mask
from tracer.ir import OpNode, Phys, Ref


def safe_add(a: Any, b: Any) -> Any:
    """``a + b`` for Keras tensors, written as ``a - (-b)``.

    Works around Keras 3.15 (TensorFlow backend): ``keras.ops.add(x1, x2)`` turns into
    ``tf.nn.bias_add`` when ``x2`` has one non-unit axis whose size equals ``x1``'s axis 1 or
    last axis, and then adds it along the wrong axis when it is not that axis (a mask of shape
    (B, 1, 1, S) with B == S). Delete when keras' TF ``add`` checks the axis position.
    """
    return keras.ops.subtract(a, keras.ops.negative(b))


def _mask(node: OpNode, ctx: Emit, ref: Any, allowed_if_true: bool, shape: tuple, name: str) -> Any:
    """An additive mask (Keras tensor) reshaped to ``shape``, from a boolean or float mask."""
    src = ctx.graph.nodes[ref.name]["op"]
    if src.is_constant:
        m = to_numpy(src.value)
        if m.dtype == bool:
            m = np.where(m == allowed_if_true, 0.0, -np.inf)
        return ctx.constant(m.astype(np.float32).reshape(shape), ctx.name(node, name))
    m = ctx.tensor_input(node, ctx.index_of(node, ref))
    if src.dtype == "bool":
        keep = m if allowed_if_true else keras.ops.logical_not(m)
        m = keras.ops.log(keras.ops.cast(keep, "float32"))  # 0 where kept, -inf elsewhere
    fits = len(m.shape) == len(shape) and all(g is None or g == w for g, w in zip(m.shape[1:], shape[1:]))
    if fits:
        return m
    if any(g is None for g in m.shape[1:]):  # a dynamic axis (tracer/dynamic.py): only unit axes are added
        return _unit_axes(m, src.shape, shape)
    return keras.ops.reshape(m, (-1, *shape[1:]))


def _unit_axes(m: Any, have: tuple, shape: tuple) -> Any:
    """Mask ``m`` (torch shape ``have``, dynamic axes None in Keras) as ``shape``, which adds unit axes:
    in front (a (T, T) mask as (1, 1, T, T)) or, with one dynamic axis, anywhere ((B, S) as (B, 1, 1, S))."""
    lead = len(shape) - len(have)
    if lead >= 0 and tuple(shape[lead:]) == tuple(have) and all(d == 1 for d in shape[:lead]):
        for _ in range(lead):
            m = keras.ops.expand_dims(m, 0)
        return m
    src = [k for k, d in enumerate(have) if d != 1]
    dst = [k for k, d in enumerate(shape) if d != 1]
    target = list(shape)
    for a, b in zip(src, dst):
        target[b] = -1 if a and m.shape[a] is None else target[b]
    same_batch = (src[:1] == [0]) == (dst[:1] == [0])
    if [have[k] for k in src] != [shape[k] for k in dst] or target.count(-1) != 1 or not same_batch:
        raise NotImplementedError(f"a mask of shape {have} with dynamic axes cannot be laid out as {shape}")
    return keras.layers.Reshape(tuple(target[1:]))(m)


def attend(node: OpNode, ctx: Emit, q: Any, k: Any, v: Any, factor: float, masks: list,
           subs: tuple[str, ...] = ("...le", "...se", "...sf", "...ls", "...lf"),
           zero_masked_rows: bool = False) -> tuple[Any, Any]:
    """``(softmax(q @ k^T * factor + sum(masks)) @ v, the softmax)`` as two einsums; ``subs``:
    the subscripts of q, k, v, the scores (the masks' order) and the output.
    ``zero_masked_rows``: a query whose keys are all masked (-inf) gets weights 0, not NaN, as
    F.scaled_dot_product_attention gives since torch 2.5 (left-padded GPT-2 batches have such rows)."""
    qs, ks, vs, ss, os = subs
    s = keras.ops.einsum(f"{qs},{ks}->{ss}", q, k)
    s = scale(s, factor, ctx.name(node, "scale"))
    for m in masks:
        s = safe_add(s, m)
    weights = keras.ops.softmax(s, axis=-1)
    if zero_masked_rows and masks:
        seen = keras.ops.any(keras.ops.greater(s, float("-inf")), axis=-1, keepdims=True)
        weights = keras.ops.where(seen, weights, keras.ops.zeros_like(weights))
    return keras.ops.einsum(f"{ss},{vs}->{os}", weights, v), weights


def _causal(node: OpNode, ctx: Emit, lq: int, lk: int, rank: int) -> Any:
    allowed = np.tril(np.ones((lq, lk), dtype=bool))
    m = np.where(allowed, 0.0, -np.inf).astype(np.float32).reshape((1,) * (rank - 2) + (lq, lk))
    return ctx.constant(m, ctx.name(node, "causal"))


_QKV = ("query", "key", "value")


def _sdpa_layout(node: OpNode, ins: list, shapes: list) -> tuple[list, Phys]:
    """q, k and v in the layouts they have (heads split by a permute stay put); the output in q's."""
    req = [Phys.identity(len(s)) for s in shapes]
    for name in (node.kw[n].name for n in _QKV):
        i = node.inputs.index(name)
        if ins[i] is not None and ins[i].flat is None and len(shapes[i]) == node.rank:
            req[i] = ins[i]
    return req, Phys(req[node.inputs.index(node.kw["query"].name)].perm)


def _sdpa_subscripts(node: OpNode) -> tuple[str, ...]:
    batch = "abcdefgh"[:node.rank - 2]
    phys = [node.in_layouts[node.inputs.index(node.kw[n].name)].perm for n in _QKV]
    q, k, v = ("".join((batch + sub)[a] for a in p) for p, sub in zip(phys, ("le", "se", "sf")))
    return q, k, v, batch + "ls", "".join((batch + "lf")[a] for a in node.layout.perm)


@rule(F.scaled_dot_product_attention, layout=_sdpa_layout)
def scaled_dot_product_attention(node: OpNode, ctx: Emit) -> Any:
    """Each of q, k, v read in its own layout by the einsums; masks in PyTorch's order."""
    kw = node.kw
    if kw.get("enable_gqa"):
        raise NotImplementedError("scaled_dot_product_attention(enable_gqa=True) is not supported")
    q, k, v = (ctx.tensor_input(node, ctx.index_of(node, kw[n])) for n in ("query", "key", "value"))
    lq, e = node.shape[-2], ctx.graph.nodes[kw["query"].name]["op"].shape[-1]
    lk = ctx.graph.nodes[kw["key"].name]["op"].shape[-2]
    factor = kw.get("scale")
    factor = 1.0 / math.sqrt(e) if factor is None else float(factor)
    masks = []
    qa, ka = (node.in_layouts[node.inputs.index(kw[n].name)].axis(-2) for n in ("query", "key"))
    if kw.get("is_causal") and (q.shape[qa] is None or k.shape[ka] is None):  # a dynamic length (tracer/dynamic.py)
        masks.append(causal_mask(q, qa, k, ka, node.rank))
    elif kw.get("is_causal"):
        masks.append(_causal(node, ctx, lq, lk, node.rank))
    mask = kw.get("attn_mask")
    if isinstance(mask, Ref):
        mshape = ctx.graph.nodes[mask.name]["op"].shape
        masks.append(_mask(node, ctx, mask, True, (1,) * (node.rank - len(mshape)) + tuple(mshape), "mask"))
    return attend(node, ctx, q, k, v, factor, masks, _sdpa_subscripts(node), zero_masked_rows=True)[0]


# ---- nn.MultiheadAttention -------------------------------------------------------------------

@rule(nn.MultiheadAttention, layout=Layout.TORCH)
def multihead_attention(node: OpNode, ctx: Emit) -> Any:
    a = _mha_args(node)
    q, k, v = (ctx.tensor_input(node, ctx.index_of(node, a[n])) for n in ("query", "key", "value"))
    shapes = [ctx.graph.nodes[a[n].name]["op"].shape for n in ("query", "key")]
    out, weights = mha(node, ctx, node.module, (q, k, v), shapes, a, "")
    if not a.get("need_weights", True):
        return out, None
    if a.get("average_attn_weights", True):
        weights = keras.ops.mean(weights, axis=1)
    return out, weights


def mha(node: OpNode, ctx: Emit, m: nn.MultiheadAttention, qkv: tuple, shapes: list, a: dict,
        prefix: str) -> tuple[Any, Any]:
    """MultiheadAttention ``m`` on Keras tensors ``qkv`` (torch shapes ``shapes`` of query and
    key); masks in ``a`` ("attn_mask", "key_padding_mask": Refs of ``node``, "is_causal").
    Heads are split by reshapes and handled by the einsums: no transposes. Returns the output
    and the per-head weights (B, heads, L, S)."""
    if m.bias_k is not None or m.add_zero_attn:
        raise NotImplementedError("MultiheadAttention with add_bias_kv or add_zero_attn is not supported")
    bf = m.batch_first
    (lq, b), lk = ((shapes[0][1], shapes[0][0]) if bf else (shapes[0][0], shapes[0][1])), shapes[1][1 if bf else 0]
    heads = m.num_heads
    split = []
    for x, (w, bias), tag in zip(qkv, _projections(m), "qkv"):
        x = _dense(node, ctx, x, w, bias, f"{prefix}{tag}_proj")
        hd = x.shape[-1] // heads
        # batch first: Reshape keeps the batch axis, so a dynamic length (tracer/dynamic.py) is the one -1
        split.append(keras.layers.Reshape((-1, heads, hd))(x) if bf else keras.ops.reshape(x, (-1, b, heads, hd)))
    masks = []
    if isinstance(a.get("attn_mask"), Ref):
        mshape = ctx.graph.nodes[a["attn_mask"].name]["op"].shape
        target = (1, 1, lq, lk) if len(mshape) == 2 else (b, heads, lq, lk)
        masks.append(_mask(node, ctx, a["attn_mask"], False, target, f"{prefix}attn_mask"))
    elif a.get("is_causal"):
        masks.append(_causal(node, ctx, lq, lk, 4))
    if isinstance(a.get("key_padding_mask"), Ref):
        masks.append(_mask(node, ctx, a["key_padding_mask"], False, (b, 1, 1, lk), f"{prefix}key_padding_mask"))
    subs = ("blhd", "bshd", "bshd", "bhls", "blhd") if bf else ("lbhd", "sbhd", "sbhd", "bhls", "lbhd")
    out, weights = attend(node, ctx, *split, 1.0 / math.sqrt(m.head_dim), masks, subs)
    out = keras.layers.Reshape((-1, m.embed_dim))(out) if bf else keras.ops.reshape(out, (-1, b, m.embed_dim))
    return dense_module(node, ctx, out, m.out_proj, f"{prefix}out_proj"), weights


def _mha_args(node: OpNode) -> dict:
    """The module call's arguments by name (module calls are not normalized at capture)."""
    sig = inspect.signature(type(node.module).forward)
    bound = sig.bind(None, *node.args, **node.kw)
    bound.apply_defaults()
    args = dict(bound.arguments)
    args.pop("self", None)
    return args


def _projections(m: nn.MultiheadAttention) -> list[tuple[np.ndarray, np.ndarray | None]]:
    e = m.embed_dim
    bias = None if m.in_proj_bias is None else to_numpy(m.in_proj_bias)
    if m._qkv_same_embed_dim:
        w = to_numpy(m.in_proj_weight)
        ws = [w[:e], w[e:2 * e], w[2 * e:]]
    else:
        ws = [to_numpy(m.q_proj_weight), to_numpy(m.k_proj_weight), to_numpy(m.v_proj_weight)]
    bs = [None, None, None] if bias is None else [bias[:e], bias[e:2 * e], bias[2 * e:]]
    return list(zip(ws, bs))


def _dense(node: OpNode, ctx: Emit, x: Any, w: np.ndarray, b: np.ndarray | None, suffix: str) -> Any:
    layer = keras.layers.Dense(w.shape[0], use_bias=b is not None, name=ctx.name(node, suffix))
    y = call_with_weights(layer, x, [w.T] + ([] if b is None else [b]))
    layer.trainable = trainable(node)
    return y


def dense_module(node: OpNode, ctx: Emit, x: Any, lin: nn.Linear, suffix: str) -> Any:
    bias = None if lin.bias is None else to_numpy(lin.bias)
    return _dense(node, ctx, x, to_numpy(lin.weight), bias, suffix)


# ---- nn.TransformerEncoderLayer / nn.TransformerEncoder --------------------------------------
# torch.fx cannot trace their forward (it checks src.dim() and mask dtypes for a fast path), so
# they are leaves whose rule composes the rules of their parts.

def _activation(layer: nn.Module, x: Any) -> Any:
    act = layer.activation
    if act is F.relu or isinstance(act, nn.ReLU):
        return keras.ops.relu(x)
    if act is F.gelu or isinstance(act, nn.GELU):
        return keras.ops.gelu(x, approximate=getattr(act, "approximate", "none") == "tanh")
    raise NotImplementedError(f"Transformer layer activation {act!r} (relu and gelu are supported)")


def encoder_layer(node: OpNode, ctx: Emit, layer: nn.TransformerEncoderLayer, x: Any, shape: tuple,
                  masks: dict, prefix: str) -> Any:
    def sa(y: Any) -> Any:
        return mha(node, ctx, layer.self_attn, (y, y, y), [shape, shape], masks, f"{prefix}self_attn.")[0]

    def ff(y: Any) -> Any:
        y = _activation(layer, dense_module(node, ctx, y, layer.linear1, f"{prefix}linear1"))
        return dense_module(node, ctx, y, layer.linear2, f"{prefix}linear2")

    def norm(y: Any, which: str) -> Any:
        return layer_norm_module(ctx, y, getattr(layer, which), ctx.name(node, prefix + which), trainable(node))

    if layer.norm_first:
        x = keras.ops.add(x, sa(norm(x, "norm1")))
        return keras.ops.add(x, ff(norm(x, "norm2")))
    x = norm(keras.ops.add(x, sa(x)), "norm1")
    return norm(keras.ops.add(x, ff(x)), "norm2")


def _layer_masks(node: OpNode) -> dict:
    a = _mha_args(node)
    return {"attn_mask": a.get("src_mask", a.get("mask")), "key_padding_mask": a.get("src_key_padding_mask"),
            "is_causal": bool(a.get("is_causal"))}


@rule(nn.TransformerEncoderLayer, layout=Layout.TORCH)
def transformer_encoder_layer(node: OpNode, ctx: Emit) -> Any:
    return encoder_layer(node, ctx, node.module, ctx.tensor_input(node, 0), node.shape, _layer_masks(node), "")


@rule(nn.TransformerEncoder, layout=Layout.TORCH)
def transformer_encoder(node: OpNode, ctx: Emit) -> Any:
    x = ctx.tensor_input(node, 0)
    masks = _layer_masks(node)
    for k, layer in enumerate(node.module.layers):
        x = encoder_layer(node, ctx, layer, x, node.shape, masks, f"layers.{k}.")
    if node.module.norm is not None:
        x = layer_norm_module(ctx, x, node.module.norm, ctx.name(node, "norm"), trainable(node))
    return x
