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
    if cls in _RULES:
        return _RULES[cls]
    for base in cls.__mro__[1:]:
        if base in _RULES and base is not torch.nn.Module:
            return _RULES[base] if cls.forward is base.forward else None
    return None


def lookup(target: Any) -> Rule | None:
    if isinstance(target, type):
        return lookup_module(target)
    try:
        return _RULES.get(target)
    except TypeError:  # unhashable target
        return None


def has_module_rule(module: torch.nn.Module) -> bool:
    return lookup_module(type(module)) is not None


def all_targets() -> list[Any]:
    return list(_RULES)
