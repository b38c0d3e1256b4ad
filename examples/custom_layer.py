"""Adding a rule for your own layer.

``ScaledTanh`` is a layer tracer does not know. Without a rule, torch.fx traces through its
forward (here that would work, via tanh and multiply); with a rule it stays one node and you
decide the Keras it becomes.

Run:  python examples/custom_layer.py
"""
from __future__ import annotations

import keras
import torch
import torch.nn as nn

from tracer import Emit, KerasTensor, Layout, OpNode, convert, rule


class ScaledTanh(nn.Module):
    """y = alpha * tanh(x / alpha): a soft clip with a learned scale per channel."""

    def __init__(self, channels: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.linspace(1.0, 3.0, channels))

    def forward(self, x):
        a = self.alpha.view(1, -1, 1, 1)
        return a * torch.tanh(x / a)


@rule(ScaledTanh, layout=Layout.CHANNELS_LAST)
def scaled_tanh(node: OpNode, ctx: Emit) -> KerasTensor:
    """The input arrives channels-last (declared above), so alpha broadcasts on the last axis.

    alpha becomes a constant: right for inference, and ``tracer verify`` / ``--verify deep``
    reports that Keras cannot train it further. To keep it trainable, emit a Keras layer of your
    own that holds alpha as a weight (registered with ``keras.saving.register_keras_serializable``).
    """
    x = ctx.input(node, 0)
    alpha = node.module.alpha.detach().numpy()
    return keras.ops.multiply(keras.ops.tanh(keras.ops.divide(x, alpha)), alpha)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.act = ScaledTanh(8)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.act(self.conv(x)).mean((2, 3)))


def build() -> nn.Module:
    return Net().eval()


SAMPLE_SHAPE = (1, 3, 16, 16)

if __name__ == "__main__":
    keras_model = convert(build(), torch.randn(SAMPLE_SHAPE))
    print(keras_model.tracer_result.report.summary())
