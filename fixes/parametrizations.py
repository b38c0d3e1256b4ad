"""Weights that PyTorch computes in forward() from parametrizations, baked into constants.

Works around: Keras 3 (checked on 3.15) layers hold plain weight tensors; there is no
counterpart of ``torch.nn.utils.parametrize`` (a weight recomputed from other tensors on every
access) nor of the forward pre-hooks of the older ``torch.nn.utils.spectral_norm`` /
``weight_norm`` (checked on torch 2.13), so the weight a layer would use is computed once, at
conversion, and stored as that layer's constant weight. Covered:

* ``torch.nn.utils.parametrizations.spectral_norm / weight_norm / orthogonal`` and any other
  ``parametrize.register_parametrization``: the parametrization is evaluated in eval mode. For
  spectral norm that is ``W / (u . (W v))`` with the *stored* ``u``, ``v``: no power iteration
  runs in eval mode (it would update ``u``, ``v``), exactly as torch does at inference.
* the old hooks ``torch.nn.utils.spectral_norm`` / ``weight_norm``: ``compute_weight`` with
  ``do_power_iteration=False``, what the hook computes in eval mode. The module's ``weight``
  attribute itself is not trusted: it holds whatever the last forward() left there (the raw
  weight for a module that never ran, a stale one after an optimizer step).

The converted model is therefore an inference model of the weights at conversion time;
training it further in Keras trains the baked weight, not ``weight_orig`` / ``u`` / ``v``.
Delete when Keras layers can carry parametrized weights.
"""
from __future__ import annotations

from collections import OrderedDict

import networkx as nx
import torch
import torch.nn as nn
from torch.nn.utils import parametrize
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from tracer.ir import ordered, update

_KINDS = {"_SpectralNorm": "spectral_norm", "_WeightNorm": "weight_norm", "_Orthogonal": "orthogonal"}


def parametrized_tensors(module: nn.Module) -> dict[str, str]:
    """{tensor name: what computes it} for the module's own parametrized tensors (not its children's)."""
    found: dict[str, str] = {}
    if parametrize.is_parametrized(module):
        for name, plist in module.parametrizations.items():
            found[name] = "+".join(_KINDS.get(type(p).__name__, type(p).__name__) for p in plist)
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, SpectralNorm):
            found[hook.name] = "spectral_norm (hook)"
        elif isinstance(hook, WeightNorm):
            found[hook.name] = "weight_norm (hook)"
    return found


def eval_value(module: nn.Module, name: str) -> torch.Tensor:
    """The tensor ``name`` exactly as the module computes it in eval mode, without side effects."""
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, SpectralNorm) and hook.name == name:
            with torch.no_grad():
                return hook.compute_weight(module, do_power_iteration=False).detach().clone()
        if isinstance(hook, WeightNorm) and hook.name == name:
            with torch.no_grad():
                return hook.compute_weight(module).detach().clone()
    plist = module.parametrizations[name]
    modes = [(m, m.training) for m in plist.modules()]
    plist.eval()  # spectral norm: no power iteration, the stored u and v
    try:
        with torch.no_grad():
            return getattr(module, name).detach().clone()
    finally:
        for m, mode in modes:
            m.training = mode


def baked(module: nn.Module) -> nn.Module:
    """A plain instance of the module's own class sharing everything but the parametrized tensors,
    which become ordinary parameters holding their eval-mode values. ``module`` is not changed."""
    names = parametrized_tensors(module)
    values = {n: eval_value(module, n) for n in names}
    cls = type(module).__bases__[0] if parametrize.is_parametrized(module) else type(module)
    plain = cls.__new__(cls)
    plain.__dict__.update(module.__dict__)
    plain._parameters = OrderedDict(module._parameters)
    plain._buffers = OrderedDict(module._buffers)
    plain._non_persistent_buffers_set = set(module._non_persistent_buffers_set)
    plain._modules = OrderedDict((k, m) for k, m in module._modules.items() if k != "parametrizations")
    plain._forward_pre_hooks = OrderedDict((k, h) for k, h in module._forward_pre_hooks.items()
                                           if not isinstance(h, (SpectralNorm, WeightNorm)))
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, (SpectralNorm, WeightNorm)):
            suffixes = ("_orig", "_u", "_v") if isinstance(hook, SpectralNorm) else ("_g", "_v")
            for s in suffixes:
                plain._parameters.pop(hook.name + s, None)
                plain._buffers.pop(hook.name + s, None)
    for name, value in values.items():
        plain.__dict__.pop(name, None)  # the old hooks keep the last computed weight as a plain attribute
        plain._parameters[name] = nn.Parameter(value, requires_grad=_requires_grad(module, name))
    return plain


def _requires_grad(module: nn.Module, name: str) -> bool:
    if parametrize.is_parametrized(module, name):
        return any(p.requires_grad for p in module.parametrizations[name].parameters())
    return any(p.requires_grad for n, p in module.named_parameters(recurse=False) if n.startswith(name))


def note_for(path: str, names: dict[str, str]) -> str:
    parts = [f"{path + '.' if path else ''}{n} = {kind}" for n, kind in names.items()]
    spectral = any("spectral" in kind for kind in names.values())
    return (f"{', '.join(parts)}: computed once as torch does in eval mode"
            f"{' (stored u, v; no power iteration)' if spectral else ''} and baked into a constant Keras weight")


def bake_parametrizations(graph: nx.DiGraph, model: nn.Module) -> nx.DiGraph:
    """Give rules plain modules whose parametrized weights are constants, and note it on each node.

    Module calls (the fx path keeps Conv2d, Linear ... as leaves) get a :func:`baked` module.
    Where the parametrization was traced through instead (torch.export, or ``self.conv.weight``
    used in forward), capture already folded the computed weight into a constant; the ops of
    that module only get the note.
    """
    found = {path: names for path, m in model.named_modules() if (names := parametrized_tensors(m))}
    if not found:
        return graph
    for node in ordered(graph):
        names = found.get(node.module_path)
        if names is None or not node.kind.startswith("call"):
            continue
        note = note_for(node.module_path, names)
        if node.kind == "call_module" and node.module is not None:
            plain = baked(node.module)
            update(graph, node.name, module=plain, target=type(plain), notes=(*node.notes, note))
        else:
            update(graph, node.name, notes=(*node.notes, note))
    return graph


__all__ = ["bake_parametrizations", "baked", "eval_value", "parametrized_tensors"]

