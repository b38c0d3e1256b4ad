"""Batch-1 samples: shapes are recorded on a batch-2 copy, so batch-sized axes are told from unit axes.

With a batch-1 sample, ``cls.expand(x.shape[0], -1, -1)`` is a no-op (torch.export drops it) and
``windows.view(-1, ...)`` / ``view(B, ...)`` look like fixed sizes; recorded at batch 2 they convert,
with parity at the sample's batch 1 and at batch 3 (the last random trial).
"""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torch.nn as nn

from tracer.api import convert_model
from tracer.errors import ConversionError
from tests.helpers import FP32_TOL


class ClsTokenViT(nn.Module):
    """Patch embedding, a class token expanded to the batch, position embedding, token 0 as output."""

    def __init__(self, dim: int = 16):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, stride=4)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, 17, dim))
        self.fc = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, 5)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        x = x + torch.relu(self.fc(x))
        return self.head(x[:, 0]), x


def window_partition(x, ws: int):
    b, h, w, c = x.shape
    x = x.view(b, h // ws, ws, w // ws, ws, c)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, ws * ws, c)


def window_reverse(windows, ws: int, h: int, w: int):
    x = windows.view(-1, h // ws, w // ws, ws, ws, windows.shape[-1])  # timm's Swin: the batch as -1
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, h, w, x.shape[-1])


class Windows(nn.Module):
    """Swin-style window attention skeleton: partition to (B*nW, ws*ws, C), mix tokens, reverse."""

    def __init__(self, dim: int = 8, ws: int = 4):
        super().__init__()
        self.ws = ws
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)

    def forward(self, x):  # (B, H, W, C)
        _, h, w, _ = x.shape
        win = window_partition(self.norm(x), self.ws)
        q, k, v = self.qkv(win).chunk(3, dim=-1)
        att = torch.softmax(q @ k.transpose(-2, -1), dim=-1)
        return x + window_reverse(att @ v, self.ws, h, w)


class RepeatedPosition(nn.Module):
    """XCiT's positional encoding: computed from the map's size, then ``pos.repeat(B, 1, 1, 1)``."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Conv2d(1, 3, 1)

    def forward(self, x):
        b, _, h, w = x.shape
        pos = torch.arange(1, w + 1).to(torch.float32).repeat(1, h, 1) / w
        pos = self.proj(pos.unsqueeze(1)).repeat(b, 1, 1, 1)
        return torch.cat([pos, x], dim=1)


@pytest.mark.parametrize("capture", ["fx", "export"])
@pytest.mark.parametrize("model,shape", [(ClsTokenViT, (1, 3, 16, 16)), (Windows, (1, 8, 8, 8)),
                                         (RepeatedPosition, (1, 3, 4, 5))],
                         ids=["cls-token", "windows", "repeated-position"])
def test_batch_one_sample_converts_with_parity_at_other_batches(model, shape, capture):
    torch.manual_seed(0)
    result = convert_model(model().eval(), torch.randn(shape), capture=capture, n_random=2, raise_on_mismatch=False)
    report = result.report
    assert report.ok, report.summary()
    assert [t.input_shapes[0][0] for t in report.trials] == [1, 1, 3]  # the sample, random, random at batch 3
    assert "recorded at batch 2" in result.facts()["capture"]["batch"]


class OnlyBatchOne(nn.Module):
    """Runs only at batch 1 (a reshape that drops the batch axis), so capture stays at batch 1."""

    def forward(self, x):
        if x.shape[0] != 1:
            raise ValueError("batch 1 only")
        return torch.relu(x) * 2


def test_model_failing_at_batch_two_is_recorded_at_batch_one():
    torch.manual_seed(0)
    x = torch.randn(1, 4, 5)
    result = convert_model(OnlyBatchOne().eval(), x, check=False)
    how = result.facts()["capture"]
    assert how["batch"].startswith("recorded at batch 1: the model failed on the sample repeated to batch 2")
    assert "batch 1 only" in how["batch"]
    got = np.asarray(result.keras_model(x.numpy()))
    want = OnlyBatchOne()(x).numpy()
    assert np.max(np.abs(got - want)) <= FP32_TOL * max(1.0, float(np.max(np.abs(want))))


def test_larger_batch_sample_is_recorded_as_given():
    torch.manual_seed(0)
    result = convert_model(ClsTokenViT().eval(), torch.randn(2, 3, 16, 16), n_random=1)
    assert "batch" not in result.facts()["capture"]
    assert next(n for n in result.graph.nodes.values()).get("op").shape[0] == 2


def test_keras_runtime_failure_names_the_layer_and_torch_node(monkeypatch):
    """Recorded at batch 1 (as before batch-2 recording), export drops the class token's expand and
    Concatenate fails at batch 3 in TensorFlow: the error names the layer, the node and the line."""
    torch.manual_seed(0)
    monkeypatch.setattr("tracer.capture.fx._all_batch_one", lambda inputs: False)
    with pytest.raises(ConversionError) as info:
        convert_model(ClsTokenViT().eval(), torch.randn(1, 3, 16, 16), capture="export", n_random=2)
    msg = str(info.value)
    assert re.match(r"the converted Keras model fails on the random1 \(batch 3\) input \(\(3, 3, 16, 16\)\), which "
                    r"PyTorch runs: Keras Concatenate 'cat(_\d+)?' emitted for torch node cat \(torch.ops.aten.cat", msg), msg
    assert "x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos" in msg
    assert "Dimension 0 in both shapes must be equal" in msg and "\n" not in msg
