"""The transformer examples (ViT-Tiny, Swin stages, CvT-13) convert with fp32 parity.

Small configurations keep the default run short; the architectures are the examples' own
(window attention with shifts and masks, class tokens, convolutional projections), only the
depth or the image size is reduced. The full-size models are ``slow``.
Samples have batch 2: a class token expanded to ``x.shape[0]`` is then visibly batch-sized.
"""
from __future__ import annotations

import importlib.util
import os

import pytest

from tests.helpers import assert_converts, randomize_bn

_EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(_EXAMPLES, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


vit = _load("vit_tiny")
swin = _load("swin_block")
cvt = _load("cvt13")


def test_vit_tiny_two_blocks_at_64x64():
    model = vit.build(img_size=64, depth=2, num_classes=10)
    result = assert_converts(model, vit.sample_input(2, 64))
    facts = result.facts()
    assert facts["capture"]["method"] == "fx"
    extra = facts["keras_params"] - sum(p.numel() for p in model.parameters())
    assert extra == 2  # every weight once, plus one scalar constant per block (``* self.scale``)
    # only the NCHW image: the head split/merge permutes stay bookkeeping
    assert result.transpose_count <= 1, result.transposes


def test_swin_stages_with_shifted_windows_at_56x56():
    model = swin.build(img_size=56)  # 14x14 tokens: 2x2 windows of 7, shift 3; after merging one window
    blocks = [m for m in model.modules() if isinstance(m, swin.SwinBlock)]
    assert [b.shift for b in blocks] == [0, 3, 0, 0] and blocks[1].attn_mask.shape == (4, 49, 49)
    result = assert_converts(model, swin.sample_input(2, 56))
    # the image and window_partition/reverse where a stage has more than one window (2 per block of stage 1)
    assert result.transpose_count <= 1 + 4, result.transposes


def test_cvt_stages_with_conv_projections_and_class_token():
    model = randomize_bn(cvt.build(depths=(1, 1, 2), num_classes=10), seed=3)
    result = assert_converts(model, cvt.sample_input(2, 64))
    facts = result.facts()
    assert facts["ops_by_rule"]["batch_norm"] == 3 * (1 + 1 + 2)  # q, k, v of every block
    # only the NCHW image
    assert result.transpose_count <= 1, result.transposes


def test_cvt13_has_about_20m_parameters():
    model = cvt.build()
    n = sum(p.numel() for p in model.parameters())
    assert 19.5e6 < n < 20.5e6, n
    assert [len(s.blocks) for s in model.stages] == [1, 2, 10]
    assert [s.cls_token is not None for s in model.stages] == [False, False, True]


FULL_SIZE_TRANSPOSES = {  # ceilings: the layout pass may remove more
    "vit_tiny": 1, "swin_block": 1 + 8, "cvt13": 1}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vit_tiny", "swin_block", "cvt13"])
def test_full_size_at_224x224(name):
    module = {"vit_tiny": vit, "swin_block": swin, "cvt13": cvt}[name]
    model = randomize_bn(module.build(), seed=1)
    result = assert_converts(model, module.sample_input(2, 224), n_random=1)
    assert result.transpose_count <= FULL_SIZE_TRANSPOSES[name], result.transposes
