"""The energy-based models of examples/ebm_cubes.py convert with fp32 parity."""
from __future__ import annotations

import importlib.util
import os
import warnings

import pytest
import torch

from tests.helpers import FP32_TOL, assert_converts

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "ebm_cubes.py")
_spec = importlib.util.spec_from_file_location("ebm_cubes", _PATH)
ebm = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ebm)


def assert_tight(result) -> None:
    """Beyond the issue's bound (1e-5 x max(1, max|y|)): spectral-norm energies are small, so
    also hold every output to 1e-4 of its own scale."""
    for trial in result.report.trials:
        for out in trial.outputs:
            assert out.max_rel <= FP32_TOL and out.max_abs <= 1e-4 * out.max_ref, result.report.summary()


def test_energy_net_two_inputs_two_outputs():
    model = ebm.build_energy()
    result = assert_converts(model, *ebm.energy_inputs(2))
    assert_tight(result)
    facts = result.facts()
    assert facts["capture"]["method"] == "torch.export"  # forward asserts on shapes: fx cannot trace it
    assert "assert image.shape[-2:] == (64, 64)" in facts["capture"]["reason"]
    assert [i.name for i in result.keras_model.inputs] == ["image", "label"]
    assert [tuple(o.shape) for o in result.keras_model.outputs] == [(None, 1), (None, 128)]
    spectral = {p for p, m in model.named_modules() if hasattr(m, "parametrizations")}
    assert len(spectral) == 1 + 4 * 3 + 2 + 1  # stem, 4 x (conv1, conv2, film), 3 skips, fc_dense
    noted = {n.split(":")[1].strip().rsplit(".weight", 1)[0] for n in facts["notes"]}
    assert noted == spectral
    assert facts["transpose_ops"] == 1  # the NCHW image; the flatten folds into fc_dense


def test_generator_latent_and_label_to_image():
    model = ebm.build_generator()
    result = assert_converts(model, *ebm.generator_inputs(2))
    assert_tight(result)
    facts = result.facts()
    assert facts["capture"]["method"] == "fx"
    assert sum("spectral_norm (hook)" in n for n in facts["notes"]) == 1 + 4 * 4 + 1  # fc, 4 x (up, film, conv, skip), to_rgb
    assert tuple(result.keras_model.outputs[0].shape) == (None, 3, 64, 64)
    assert facts["ops_by_rule"]["conv_transpose"] == 4


@pytest.mark.parametrize("build, inputs", [(ebm.build_energy, ebm.energy_inputs),
                                           (ebm.build_generator, ebm.generator_inputs)])
def test_conversion_leaves_spectral_norm_state_alone(build, inputs):
    model = build(num_filters=8, warm_up=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        assert_converts(model, *inputs(1), n_random=1)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not model.training
