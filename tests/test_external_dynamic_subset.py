"""A fast subset of bench/external_dynamic.py (issue 14's table): one conversion with dynamic axes,
checked in Keras and fp32 LiteRT at the sample's size, the converter's two others and one odd size,
run in-process here.

torch's LSTM over a dynamic time axis needs nothing else; torchvision's ViT (a clear refusal at other
image sizes: its forward asserts the size) needs torchvision and Hugging Face DistilBERT (ids and mask
over one dynamic length) transformers, both installed only in .venv-zoo; those skip elsewhere.
"""
from __future__ import annotations

import pytest

from bench.external_dynamic import MODELS, convert_one, table
from tests.helpers import FP32_TOL


def test_lstm_over_a_dynamic_time_axis_keras_and_litert():
    row = convert_one("lstm_batch_first")
    assert row.status == "ok", row.reason
    assert row.sizes == ["sample", "time=40", "time=31", "time=21"] and row.sample_sizes == [20]  # 21: an odd one
    for errors in (row.keras, row.tflite):
        assert list(errors) == row.sizes, errors
        assert all(0.0 <= v <= FP32_TOL for v in errors.values()), errors
    assert row.tflite_transposes is not None and row.transposes is not None
    line = next(ln for ln in table([row]).splitlines() if ln.startswith("lstm_batch_first"))
    assert "time=20,40,31,21" in line and line.split()[-1] == "ok"


def test_torchvision_vit_refuses_other_image_sizes():
    pytest.importorskip("torchvision", reason="torchvision is installed only in .venv-zoo")
    assert MODELS["vit_small_64"][3] == "refused"
    row = convert_one("vit_small_64", tflite=False)
    assert row.status == "refused" and not row.keras and not row.tflite
    assert "dynamic axis 'h'" in row.reason and "fails in PyTorch at h=128" in row.reason, row.reason
    line = next(ln for ln in table([row]).splitlines() if ln.startswith("vit_small_64"))
    assert "refused " in line and "refused!" not in line  # as expected: no '!' mark


def test_hugging_face_distilbert_with_a_mask_over_a_dynamic_length():
    pytest.importorskip("transformers", reason="transformers is installed only in .venv-zoo")
    row = convert_one("hf_distilbert_mask")  # token ids and attention mask share one torch.export.Dim (max 64)
    assert row.status == "ok", row.reason
    assert row.axes == "seq[2..64]" and row.sizes == ["sample", "seq=32", "seq=25", "seq=17"]
    assert row.capture == "torch.export"
    for errors in (row.keras, row.tflite):
        assert list(errors) == row.sizes and all(v <= FP32_TOL for v in errors.values()), errors
