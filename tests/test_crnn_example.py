"""examples/crnn_kws.py: the CRNN keyword spotter converts with Keras parity and fp32 LiteRT parity."""
from __future__ import annotations

import pytest
import torch

from examples import crnn_kws
from tests.helpers import assert_converts, randomize_bn
from tracer import convert_model


@pytest.mark.parametrize("pool", ["last", "mean"])
def test_crnn_keras_parity(pool):
    torch.manual_seed(0)
    model = randomize_bn(crnn_kws.build(pool=pool), seed=1)
    result = assert_converts(model, torch.randn(crnn_kws.SAMPLE_SHAPE))
    names = [type(layer).__name__ for layer in result.keras_model.layers]
    assert names.count("Bidirectional") == 2, names
    assert result.report.trials[-1].label.endswith("(batch 3)")  # the zero GRU state follows the batch


@pytest.mark.slow  # ~50 s on 2 shared cores; tests/op_rules/test_recurrent.py exports a bidirectional GRU by default
@pytest.mark.parametrize("frames", [48, 100])
def test_crnn_tflite_fp32_parity(frames):
    """Builtin ops only (the GRU loops unrolled for export)."""
    torch.manual_seed(0)
    model = randomize_bn(crnn_kws.build(), seed=2)
    result = convert_model(model, torch.randn(1, 1, 40, frames), n_random=2, tflite=("fp32",),
                           raise_on_mismatch=False)
    assert result.report.ok, result.report.summary()
    report = result.tflite_reports["fp32"]
    assert report.ok, report.summary()
    assert not [op for op in report.ops if op.startswith("Flex")], report.ops
