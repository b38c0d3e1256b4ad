"""Bugs the random graphs found (issue 12.3), each reproduced: the test fails without its fix."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from tests.helpers import assert_converts
from tracer import convert_model


class AddParam(nn.Module):
    def __init__(self, shape, how="add"):
        super().__init__()
        self.p = nn.Parameter(torch.rand(*shape, generator=torch.Generator().manual_seed(0)) + 0.5)
        self.how = how

    def forward(self, x):
        return {"add": lambda: x + self.p, "radd": lambda: self.p + x, "mul": lambda: x * self.p}[self.how]()


@pytest.mark.parametrize("x_shape,p_shape,how", [
    ((1, 5, 6, 5), (5, 1, 1), "add"),          # C == W: Keras' bias_add shortcut added p along W
    ((1, 5, 6, 5), (1, 5, 1, 1), "add"),
    ((2, 16, 16), (1, 16, 1), "add"),
    ((1, 5, 6, 5), (5, 1, 1), "radd"),
    ((1, 5, 6, 5), (5, 1, 1), "mul"),
    ((1, 5, 6, 5), (5,), "add"),               # a true last-axis bias keeps the fast path
])
def test_a_parameter_broadcasts_along_its_own_axis(x_shape, p_shape, how):
    x = torch.randn(*x_shape, generator=torch.Generator().manual_seed(1))
    assert_converts(AddParam(p_shape, how), x)


class AddMean(nn.Module):
    def forward(self, x):  # (B, C, 1, 1) + (B, C, H, W) at batch 1: both operands may squeeze to one axis
        return x.mean((2, 3), keepdim=True) + x.amax((2, 3), keepdim=True)


def test_a_tensor_plus_tensor_at_batch_one():
    x = torch.randn(1, 5, 6, 5, generator=torch.Generator().manual_seed(2))
    assert_converts(AddMean(), x)


class FlattenAdd(nn.Module):
    def __init__(self, c=6):
        super().__init__()
        self.p = nn.Parameter(torch.rand(1, c, 1, generator=torch.Generator().manual_seed(0)) + 0.5)

    def forward(self, x):
        return (x * 2).flatten(2) + self.p


def test_b_flatten_plus_channel_parameter_exports_to_tflite():
    from tests.test_tflite import tflite_parity

    tflite_parity(FlattenAdd(), torch.randn(1, 6, 4, 5, generator=torch.Generator().manual_seed(3)))


class StackedLayerNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.LayerNorm(16), nn.LayerNorm(16), nn.LayerNorm(16)

    def forward(self, x):
        x = self.a(x.clamp(min=10.0))
        return self.c(self.b(x * 30 + 100) * 30 + 100)


def test_d_layer_norm_of_rows_with_a_large_mean():
    g = torch.Generator().manual_seed(4)
    model = StackedLayerNorm().eval()
    x = torch.randn(2, 8, 16, generator=g) * 0.01 + 10.0
    result = convert_model(model, x, n_random=0, raise_on_mismatch=False)
    xs = [x, torch.randn(3, 8, 16, generator=g) * 0.05 + 1000.0]
    for t in xs:
        y64 = model.double()(t.double()).detach().numpy()
        model.float()
        got = np.asarray(result.keras_model(t.numpy()))
        y32 = model(t).detach().numpy()
        keras_err, torch_err = np.abs(got - y64).max(), np.abs(y32 - y64).max()
        assert keras_err <= 1e-5 * max(1.0, np.abs(y64).max()), (keras_err, torch_err)
        assert keras_err <= 4 * torch_err + 1e-6, (keras_err, torch_err)


class FixedView(nn.Module):
    def forward(self, x):
        return torch.relu(x.view(2, 12)) * 2


class LinearOnBatch(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(2, 5)

    def forward(self, x):
        return self.fc(x.transpose(0, 1))


class BatchNormOnBatch(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(2)

    def forward(self, x):
        return self.bn(x.transpose(0, 1))


def test_e_model_that_runs_only_at_the_sample_batch_is_refused_with_its_line():
    from tracer.errors import ConversionError

    with pytest.raises(ConversionError) as err:
        convert_model(FixedView().eval(), torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(5)))
    text = str(err.value)
    assert "only at the sample's batch size 2" in text and "test_bugs_random_graphs.py" in text, text
    assert "x.view(2, 12)" in text, text


@pytest.mark.parametrize("model", [LinearOnBatch, BatchNormOnBatch])
def test_e_weights_over_the_batch_axis_are_refused_naming_the_op(model):
    from tracer.errors import ConversionError

    with pytest.raises(ConversionError) as err:
        convert_model(model().eval(), torch.randn(2, 3, generator=torch.Generator().manual_seed(6)))
    text = str(err.value)
    assert "would span the batch axis" in text and "test_bugs_random_graphs.py" in text, text
    assert "fully-defined" not in text.split("with rule")[-1].split("NotImplementedError:")[-1], text
