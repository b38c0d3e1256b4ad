"""A CRNN keyword spotter for log-mel input, written in plain PyTorch.

The convolutional-recurrent shape keyword spotters commonly use (Arik et al., "Convolutional
Recurrent Neural Networks for Small-Footprint Keyword Spotting", Interspeech 2017): a small conv
front end with BatchNorm, the feature map read as a sequence over time, a bidirectional GRU, and a
Linear classifier over the last time step (or the mean over time).

Input ``(B, 1, 40, T)``: a one-channel map of 40 mel bins by T frames (T = 100 by default).
Output ``(B, num_classes)`` logits (12 by default: ten keywords, silence, unknown).

Shapes through the network (channels, frequency, time)::

    (1, 40, 100)  -> conv 3x3 + BN + ReLU, max-pool 2x2     -> (32, 20, 50)
                  -> conv 3x3 + BN + ReLU, max-pool 2x1     -> (64, 10, 50)
                  -> conv 3x3 stride (1, 2) + BN + ReLU     -> (64, 10, 25)
    read as time steps: permute to (B, 25, 64, 10), flatten -> (B, 25, 640)
    Linear(640, 64) + ReLU, bidirectional GRU(64, 2 layers) -> (B, 25, 128)
    last step (or mean over time), Linear(128, num_classes)

Convert:  tracer convert examples/crnn_kws.py:build --input-shape 1,1,40,100 --tflite fp32
"""
from __future__ import annotations

import torch
import torch.nn as nn

try:  # imported as examples.crnn_kws (tests)
    from examples.common import ConvBN
except ImportError:  # loaded from its file (tracer convert puts this folder on sys.path)
    from common import ConvBN


class CRNN(nn.Module):
    def __init__(self, num_classes: int = 12, n_mels: int = 40, hidden: int = 64, layers: int = 2,
                 pool: str = "last"):
        super().__init__()
        if pool not in ("last", "mean"):
            raise ValueError(f"pool must be 'last' or 'mean'. Received: pool={pool!r}")
        self.pool = pool
        self.front = nn.Sequential(
            ConvBN(1, 32, 3, 1, 1), nn.ReLU(), nn.MaxPool2d(2),
            ConvBN(32, 64, 3, 1, 1), nn.ReLU(), nn.MaxPool2d((2, 1)),
            ConvBN(64, 64, 3, (1, 2), 1), nn.ReLU())
        features = 64 * (n_mels // 4)
        self.proj = nn.Sequential(nn.Linear(features, hidden), nn.ReLU())
        self.gru = nn.GRU(hidden, hidden, num_layers=layers, batch_first=True, bidirectional=True)
        self.classifier = nn.Linear(2 * hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.front(x)  # (B, C, F', T')
        x = x.permute(0, 3, 1, 2).flatten(2)  # (B, T', C * F'): one feature vector per time step
        y, _ = self.gru(self.proj(x))
        y = y[:, -1] if self.pool == "last" else y.mean(1)
        return self.classifier(y)


def build(num_classes: int = 12, pool: str = "last") -> CRNN:
    """The CRNN keyword spotter in eval mode."""
    return CRNN(num_classes, pool=pool).eval()


SAMPLE_SHAPE = (1, 1, 40, 100)

if __name__ == "__main__":
    try:
        from examples.common import convert_and_print, randomize_bn_stats
    except ImportError:
        from common import convert_and_print, randomize_bn_stats

    torch.manual_seed(0)
    model = randomize_bn_stats(build())
    convert_and_print("crnn_kws", model, torch.randn(SAMPLE_SHAPE, generator=torch.Generator().manual_seed(0)))
