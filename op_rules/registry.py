"""The rule registry: torch target -> the function that emits Keras for it.

A target is a module class (``nn.Conv2d``), a function (``F.relu``, ``torch.cat``,
``operator.add``) or a Tensor method name (``"view"``). Each rule declares how it treats layout:

* ``Layout.ANY``: elementwise; runs in whatever physical layout its inputs have.
* ``Layout.CHANNELS_LAST``: wants its first input channels-last (NHWC, NLC) and returns the same.
* ``Layout.TORCH``: wants every input in PyTorch's axis order and returns PyTorch's order.
* a function ``(node, input_layouts) -> (required_input_layouts, output_layout)`` for rules that
  move axes (reshape, permute, reductions).
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch


class Layout(enum.Enum):
    ANY = "any"
    CHANNELS_LAST = "channels_last"
    TORCH = "torch"


@dataclass(frozen=True)
class Qualname:
    """A target named by its import path (``Qualname("torchvision.ops.stochastic_depth.stochastic_depth")``),
    for libraries tracer does not import itself: the rule matches the function or module class whose
    ``__module__`` and ``__qualname__`` spell that path."""

    path: str


def qualname(target: Any) -> Qualname | None:
    module, name = getattr(target, "__module__", None), getattr(target, "__qualname__", None)
    return Qualname(f"{module}.{name}") if isinstance(module, str) and isinstance(name, str) else None


@dataclass(frozen=True)
class Rule:
    name: str
    fn: Callable
    layout: Any  # Layout member or a layout function
    targets: tuple

    def __call__(self, node, ctx):
        return self.fn(node, ctx)


_RULES: dict[Any, Rule] = {}


def register(targets: Iterable[Any], fn: Callable, layout: Any = Layout.TORCH, *, override: bool = False) -> Rule:
    """Register ``fn`` for ``targets``. Raises if a target already has a rule unless ``override``."""
    targets = tuple(targets)
    r = Rule(name=getattr(fn, "__name__", repr(fn)), fn=fn, layout=layout, targets=targets)
    for t in targets:
        if t in _RULES and not override and _RULES[t].fn is not fn:
            raise ValueError(f"{t!r} already has rule {_RULES[t].name}; pass override=True to replace it")
        _RULES[t] = r
    return r


def unregister(*targets: Any) -> None:
    for t in targets:
        _RULES.pop(t, None)


def rule(*targets: Any, layout: Any = Layout.TORCH, override: bool = False) -> Callable:
    """Decorator form of :func:`register`::

        @rule(MyLayer, layout=Layout.ANY)
        def my_layer(node: OpNode, ctx: Emit) -> KerasTensor:
            return keras.ops.tanh(ctx.input(node, 0)) * node.module.scale
    """

    def deco(fn: Callable) -> Callable:
        register(targets, fn, layout, override=override)
        return fn

    return deco


def lookup_module(cls: type) -> Rule | None:
    """A module class's rule; a subclass inherits its base's rule only if it keeps ``forward``."""
    for base in cls.__mro__:
        if base is torch.nn.Module:
            continue
        found = _RULES.get(base) or _RULES.get(qualname(base))
        if found is not None:
            return found if base is cls or cls.forward is base.forward else None
    return None


def lookup(target: Any) -> Rule | None:
    if isinstance(target, type):
        return lookup_module(target)
    try:
        found = _RULES.get(target)
    except TypeError:  # unhashable target
        return None
    return found if found is not None or not callable(target) else _RULES.get(qualname(target))


def has_module_rule(module: torch.nn.Module) -> bool:
    return lookup_module(type(module)) is not None


def all_targets() -> list[Any]:
    return list(_RULES)
