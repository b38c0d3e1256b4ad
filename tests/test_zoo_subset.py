"""A few timm architectures from bench/zoo.py, one per family, convert with fp32 parity.

Needs timm, which the default test venv does not have (see DEVELOPERS.md): the module skips
there. Run it in the zoo venv:  .venv-zoo/bin/python -m pytest -m slow tests/test_zoo_subset.py
"""
from __future__ import annotations

import pytest
import torch

from tests.helpers import assert_converts

timm = pytest.importorskip("timm", reason="timm is installed only in .venv-zoo (bash dev.sh zoo)")

pytestmark = pytest.mark.slow

# (timm name, input side, create_model kwargs, Transpose ops at most)
SUBSET = [
    ("resnet18", 64, {}, 1),                                   # CNN: the NCHW input only
    ("mobilenetv3_small_100", 64, {}, 1),                      # hard-swish, squeeze-excite
    ("convnext_atto", 64, {}, 1),                              # LayerNorm2d over channels
    ("vit_tiny_patch16_224", 32, {"img_size": 32, "depth": 2}, 3),  # class token, fused qkv
    ("mixer_s16_224", 32, {"img_size": 32}, 5),    # token-mixing MLP over transposed tokens
]


@pytest.mark.parametrize("name, side, kwargs, max_transposes", SUBSET, ids=[s[0] for s in SUBSET])
def test_timm_model_converts(name, side, kwargs, max_transposes):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs).eval()
    x = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(0))
    result = assert_converts(model, x, n_random=1)
    assert result.transpose_count <= max_transposes, result.transposes
