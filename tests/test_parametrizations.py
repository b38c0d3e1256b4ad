"""fixes/parametrizations.py: weights computed by parametrizations are baked, exactly as torch's eval mode."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
from torch.nn.utils import parametrizations as P
from torch.nn.utils import parametrize

from tracer.fixes.parametrizations import baked, eval_value, parametrized_tensors
from tests.helpers import assert_converts
from tracer import convert_model
from tracer.ir import ordered


def legacy_spectral_norm(m: nn.Module) -> nn.Module:
    return nn.utils.spectral_norm(m, dim=1 if isinstance(m, nn.ConvTranspose2d) else 0)


def legacy_weight_norm(m: nn.Module) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return nn.utils.weight_norm(m)


WRAPPERS = {
    "spectral_norm": P.spectral_norm,
    "weight_norm": P.weight_norm,
    "orthogonal": P.orthogonal,
    "spectral_norm (hook)": legacy_spectral_norm,
    "weight_norm (hook)": legacy_weight_norm,
}
LAYERS = {
    "Conv2d": (lambda: nn.Conv2d(4, 6, 3, padding=1), (2, 4, 7, 7)),
    "Linear": (lambda: nn.Linear(5, 6), (2, 3, 5)),
    "ConvTranspose2d": (lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1), (2, 4, 5, 5)),
}


def trained(wrapper, layer, shape: tuple, seed: int = 0) -> nn.Module:
    """The wrapped layer in a small net after a few optimizer steps (weights, u and v all moved)."""
    torch.manual_seed(seed)
    model = nn.Sequential(wrapper(layer()), nn.Tanh())
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(shape)).square().mean().backward()
        opt.step()
    return model.eval()


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("kind", WRAPPERS)
def test_parametrized_layer_converts_with_parity_and_note(kind, layer):
    torch.manual_seed(0)
    make, shape = LAYERS[layer]
    model = trained(WRAPPERS[kind], make, shape)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    result = assert_converts(model, torch.randn(shape))
    notes = [n for n in result.facts()["notes"] if "fused into this layer" not in n]  # activation fusion notes
    assert len(notes) == 1 and f"0.weight = {kind}:" in notes[0] and "baked into a constant Keras weight" in notes[0]
    assert ("stored u, v" in notes[0]) == ("spectral" in kind)
    after = model.state_dict()
    assert all(torch.equal(state[k], after[k]) for k in state)  # conversion ran no power iteration
    node = next(n for n in ordered(result.graph) if n.module_path == "0")
    assert type(node.module) is type(make()) and parametrized_tensors(node.module) == {}  # a plain layer


def test_export_path_folds_the_same_weights_and_notes_them():
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = P.spectral_norm(nn.Conv2d(3, 4, 3, padding=1))
            self.up = legacy_spectral_norm(nn.ConvTranspose2d(4, 4, 2, stride=2))
            self.fc = P.weight_norm(nn.Linear(4, 4))
            self.rot = P.orthogonal(nn.Linear(4, 4))

        def forward(self, x):
            y = self.up(torch.relu(self.conv(x))).mean((2, 3))
            return self.rot(self.fc(y))

    torch.manual_seed(0)
    model = Mixed()
    model.train()
    for _ in range(2):
        model(torch.randn(2, 3, 6, 6))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # export: the legacy hook assigns self.up.weight
        result = convert_model(model.eval(), torch.randn(2, 3, 6, 6), capture="export", n_random=2)
    assert result.report.ok
    notes = result.facts()["notes"]
    for text in ("conv.weight = spectral_norm", "up.weight = spectral_norm (hook)", "fc.weight = weight_norm",
                 "rot.weight = orthogonal"):
        assert sum(text + ":" in n for n in notes) == 1, (text, notes)
    assert isinstance(model.up.weight, torch.Tensor) and not isinstance(model.up.weight, nn.Parameter)


def test_eval_value_is_what_torch_uses_in_eval_mode():
    model = trained(P.spectral_norm, lambda: nn.Conv2d(3, 5, 3), (2, 3, 6, 6))
    conv = model[0]
    u = conv.parametrizations.weight[0]._u.clone()
    conv.train()  # even from training mode: no power iteration, the stored u and v
    value = eval_value(conv, "weight")
    assert conv.training and torch.equal(conv.parametrizations.weight[0]._u, u)
    conv.eval()
    assert torch.equal(value, conv.weight)
    w = conv.parametrizations.weight.original.flatten(1)
    sigma = torch.vdot(u, torch.mv(w, conv.parametrizations.weight[0]._v))
    torch.testing.assert_close(value, conv.parametrizations.weight.original / sigma, rtol=0, atol=0)


def test_legacy_hook_weight_attribute_is_not_trusted():
    """A never-run legacy spectral-norm layer still holds the raw weight in ``.weight``."""
    torch.manual_seed(0)
    layer = nn.utils.spectral_norm(nn.Linear(6, 6))
    raw = layer.weight.clone()
    value = eval_value(layer, "weight")
    assert torch.equal(layer.weight, raw) and not torch.allclose(value, raw)
    layer.eval()
    with torch.no_grad():
        layer(torch.zeros(1, 6))  # what the hook computes in eval mode
    assert torch.equal(layer.weight, value)
    assert_converts(nn.Sequential(nn.utils.spectral_norm(nn.Linear(6, 6)), nn.ReLU()), torch.randn(2, 6))


def test_baked_copy_leaves_the_model_untouched():
    conv = P.spectral_norm(nn.Conv2d(3, 4, 3))
    legacy = legacy_weight_norm(nn.Linear(3, 3))
    for module in (conv, legacy):
        cls, names = type(module), dict(parametrized_tensors(module))
        plain = baked(module)
        assert type(plain) in (nn.Conv2d, nn.Linear) and parametrized_tensors(plain) == {}
        assert isinstance(plain.weight, nn.Parameter) and torch.equal(plain.weight, eval_value(module, "weight"))
        assert not any(n.endswith(("_orig", "_g", "_v", "_u")) for n, _ in plain.named_parameters())
        assert type(module) is cls and parametrized_tensors(module) == names
    assert parametrize.is_parametrized(conv, "weight") and conv.weight.shape == (4, 3, 3, 3)
