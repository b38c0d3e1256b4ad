"""Rules for library functions and modules tracer does not import itself, named by import path
(:class:`~tracer.op_rules.registry.Qualname`): torchvision's ``stochastic_depth`` (a ``torch.fx.wrap``-ed
function, so fx records it as one call) and ``StochasticDepth``.

Stochastic depth drops whole residual branches at random while training and is the identity
at inference; the conversion drops it (tracer/passes/training_only.py) and says so in the facts.
Other fx-wrapped library functions without a rule (torchvision's ``shifted_window_attention``)
are traced into through torch.export (tracer/capture/fx.py).
"""
from __future__ import annotations

from typing import Any

from tracer.emitter.context import Emit
from tracer.ir import OpNode
from tracer.op_rules.common import param
from tracer.op_rules.registry import Layout, Qualname, rule

STOCHASTIC_DEPTH = (Qualname("torchvision.ops.stochastic_depth.stochastic_depth"),
                    Qualname("torchvision.ops.stochastic_depth.StochasticDepth"))


@rule(*STOCHASTIC_DEPTH, layout=Layout.ANY)
def stochastic_depth(node: OpNode, ctx: Emit) -> Any:
    """The identity at inference (``training=False``); removed before emission, with a note."""
    return ctx.input(node, 0)


def training_only_note(node: OpNode) -> str:
    """What the conversion did with a training-only op (shown in ``facts()["notes"]``)."""
    p, mode = param(node, "p", "?"), param(node, "mode", "?")
    return (f"stochastic depth {node.name} (p={p}, mode={mode!r}, {node.source}) dropped: it is the identity at "
            "inference, and training the Keras model runs without it")
