"""Any model class name gives a Keras model name TensorFlow accepts: a leading underscore
(``_HFTuple``) used to be rejected inside tf.function ("not a valid root scope name"), so eager
parity passed and export broke."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from tracer import convert_model


def named(cls_name: str) -> nn.Module:
    cls = type(cls_name, (nn.Module,), {
        "__init__": lambda self: (nn.Module.__init__(self), setattr(self, "fc", nn.Linear(3, 2)))[0],
        "forward": lambda self, x: self.fc(x)})
    return cls()


@pytest.mark.parametrize("cls_name,keras_name", [
    ("_HFTuple", "HFTuple"), ("__Private", "Private"), ("Ünïcode", "n_code"), ("-", "converted"), ("ok_Name-2", "ok_Name-2"),
])
def test_model_name_is_a_valid_scope(cls_name, keras_name):
    import tensorflow as tf

    x = torch.randn(1, 3, generator=torch.Generator().manual_seed(0))
    model = convert_model(named(cls_name), x).keras_model
    assert model.name == keras_name
    fn = tf.function(lambda t: model(t))  # the root name scope is the model's name
    np.testing.assert_allclose(fn(x.numpy()).numpy(), model(x.numpy()).numpy(), rtol=0, atol=0)


def test_leading_underscore_model_exports(tmp_path):
    import tensorflow as tf

    torch.manual_seed(0)
    m = named("_HFTuple").eval()
    x = torch.randn(2, 3, generator=torch.Generator().manual_seed(1))
    model = convert_model(m, x).keras_model
    model.export(str(tmp_path / "saved"), verbose=False)
    loaded = tf.saved_model.load(str(tmp_path / "saved"))  # kept: its variables live as long as it does
    served = loaded.serve(tf.constant(x.numpy()))
    np.testing.assert_allclose(served.numpy(), m(x).detach().numpy(), rtol=0, atol=1e-6)
