"""Energy-based models of compositional visual generation, written in PyTorch.

After the CubesNet / CubesNetGen models of the EBM compositionality code (Du, Li & Mordatch,
"Compositional Visual Generation with Energy Based Models", NeurIPS 2020; public code at
github.com/yilundu/ebm_compositionality); the code here is ours.

* :class:`CubesNet`: an energy E(x, label) for 64x64 RGB images and a label vector of 6.
  A 3x3 stem, four residual blocks that halve the resolution with 2x2 average pooling
  (64 -> 32 -> 16 -> 8 -> 4), each conditioned on the label FiLM-style (a gain multiplied
  into and a bias added to the feature maps, both from a linear embedding of the label),
  swish activations, spectral norm on every conv and linear
  (``torch.nn.utils.parametrizations.spectral_norm``), then a dense layer and the scalar
  energy. It returns ``(energy, features)``: energy (B, 1) and the 2*nf features it is read from.
  Its forward checks input shapes with ``assert``, which torch.fx cannot trace: tracer captures
  it with torch.export instead.
* :class:`CubesNetGen`: a generator from a latent of 128 and the label to a 64x64 image. A
  linear layer to a 4x4 map, four residual up-blocks (4 -> 8 -> 16 -> 32 -> 64) whose main path
  is a stride-2 ConvTranspose2d and whose learnable skip is nearest upsampling and a 1x1 conv,
  label FiLM in each block, swish, and a 3x3 conv to RGB with tanh. Spectral norm here is the
  older hook form ``torch.nn.utils.spectral_norm`` that PyTorch ports of those models use.

Run:  python examples/ebm_cubes.py
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrizations

LABEL_SIZE = 6
LATENT_SIZE = 128
IMAGE_SHAPE = (3, 64, 64)


def swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


def spectral(module: nn.Module, enabled: bool) -> nn.Module:
    return parametrizations.spectral_norm(module) if enabled else module


def spectral_hook(module: nn.Module, enabled: bool) -> nn.Module:
    return nn.utils.spectral_norm(module) if enabled else module


class FiLM(nn.Module):
    """Label -> per-channel gain and bias applied to a feature map: h * (1 + gain) + bias."""

    def __init__(self, label_size: int, channels: int, wrap=spectral, spec_norm: bool = True):
        super().__init__()
        self.channels = channels
        self.embed = wrap(nn.Linear(label_size, 2 * channels), spec_norm)

    def forward(self, h: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        e = self.embed(label)
        gain = e[:, :self.channels].view(-1, self.channels, 1, 1)
        bias = e[:, self.channels:].view(-1, self.channels, 1, 1)
        return h * (1 + gain) + bias


class CondResBlock(nn.Module):
    """conv3x3 -> FiLM(label) -> swish -> conv3x3 -> swish, plus a (1x1 conv) shortcut, then
    optionally 2x2 average pooling."""

    def __init__(self, cin: int, cout: int, label_size: int, downsample: bool = True, spec_norm: bool = True):
        super().__init__()
        self.conv1 = spectral(nn.Conv2d(cin, cout, 3, padding=1), spec_norm)
        self.film = FiLM(label_size, cout, spectral, spec_norm)
        self.conv2 = spectral(nn.Conv2d(cout, cout, 3, padding=1), spec_norm)
        self.skip = spectral(nn.Conv2d(cin, cout, 1), spec_norm) if cin != cout else None
        self.downsample = downsample

    def forward(self, x: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        h = swish(self.film(self.conv1(x), label))
        h = swish(self.conv2(h))
        out = h + (x if self.skip is None else self.skip(x))
        return F.avg_pool2d(out, 2) if self.downsample else out


class CubesNet(nn.Module):
    """Energy E(image, label) -> (energy (B, 1), features (B, 2*nf))."""

    def __init__(self, num_channels: int = 3, num_filters: int = 64, label_size: int = LABEL_SIZE,
                 spec_norm: bool = True):
        super().__init__()
        nf = num_filters
        self.label_size = label_size
        self.c1_pre = spectral(nn.Conv2d(num_channels, nf, 3, padding=1), spec_norm)
        widths = [(nf, nf), (nf, 2 * nf), (2 * nf, 4 * nf), (4 * nf, 4 * nf)]
        self.blocks = nn.ModuleList(CondResBlock(a, b, label_size, True, spec_norm) for a, b in widths)
        self.fc_dense = spectral(nn.Linear(4 * nf * 4 * 4, 2 * nf), spec_norm)
        self.fc5 = nn.Linear(2 * nf, 1)

    def forward(self, image: torch.Tensor, label: torch.Tensor):
        assert image.shape[-2:] == (64, 64), f"CubesNet takes 64x64 images, got {tuple(image.shape)}"
        assert label.shape[-1] == self.label_size, f"label must have {self.label_size} entries"
        h = swish(self.c1_pre(image))
        for block in self.blocks:
            h = block(h, label)
        h = swish(h).flatten(1)
        features = swish(self.fc_dense(h))
        return self.fc5(features), features


class UpResBlock(nn.Module):
    """ConvTranspose2d (x2) -> FiLM(label) -> swish -> conv3x3 -> swish, plus an upsampled 1x1 skip."""

    def __init__(self, cin: int, cout: int, label_size: int, spec_norm: bool = True):
        super().__init__()
        self.up = spectral_hook(nn.ConvTranspose2d(cin, cout, 4, stride=2, padding=1), spec_norm)
        self.film = FiLM(label_size, cout, spectral_hook, spec_norm)
        self.conv = spectral_hook(nn.Conv2d(cout, cout, 3, padding=1), spec_norm)
        self.skip = spectral_hook(nn.Conv2d(cin, cout, 1), spec_norm)

    def forward(self, x: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        h = swish(self.film(self.up(x), label))
        h = swish(self.conv(h))
        return h + self.skip(F.interpolate(x, scale_factor=2, mode="nearest"))


class CubesNetGen(nn.Module):
    """Generator G(latent, label) -> image (B, 3, 64, 64) in [-1, 1]."""

    def __init__(self, num_channels: int = 3, num_filters: int = 64, label_size: int = LABEL_SIZE,
                 latent_size: int = LATENT_SIZE, spec_norm: bool = True):
        super().__init__()
        nf = num_filters
        self.nf = nf
        self.fc = spectral_hook(nn.Linear(latent_size + label_size, 4 * nf * 4 * 4), spec_norm)
        widths = [(4 * nf, 4 * nf), (4 * nf, 2 * nf), (2 * nf, nf), (nf, nf)]
        self.blocks = nn.ModuleList(UpResBlock(a, b, label_size, spec_norm) for a, b in widths)
        self.to_rgb = spectral_hook(nn.Conv2d(nf, num_channels, 3, padding=1), spec_norm)

    def forward(self, latent: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        h = swish(self.fc(torch.cat([latent, label], dim=1)))
        h = h.view(-1, 4 * self.nf, 4, 4)
        for block in self.blocks:
            h = block(h, label)
        return torch.tanh(self.to_rgb(h))


def _warm_up(model: nn.Module, inputs: tuple, steps: int) -> nn.Module:
    """A few forward passes in training mode, so spectral norm's u and v are power-iterated
    estimates as in a trained model, not their random start."""
    model.train()
    with torch.no_grad():
        for _ in range(steps):
            model(*inputs)
    return model.eval()


def build_energy(num_filters: int = 64, seed: int = 0, warm_up: int = 3) -> CubesNet:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = CubesNet(num_filters=num_filters)
        return _warm_up(model, energy_inputs(2, seed), warm_up)


def build_generator(num_filters: int = 64, seed: int = 0, warm_up: int = 3) -> CubesNetGen:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = CubesNetGen(num_filters=num_filters)
        return _warm_up(model, generator_inputs(2, seed), warm_up)


def energy_inputs(batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, *IMAGE_SHAPE, generator=g) * 2 - 1, torch.randn(batch, LABEL_SIZE, generator=g)


def generator_inputs(batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, LATENT_SIZE, generator=g), torch.randn(batch, LABEL_SIZE, generator=g)


ENERGY_SAMPLE_SHAPES = ((1, *IMAGE_SHAPE), (1, LABEL_SIZE))
GENERATOR_SAMPLE_SHAPES = ((1, LATENT_SIZE), (1, LABEL_SIZE))

if __name__ == "__main__":
    from tracer import convert_model

    for name, model, inputs in [("CubesNet", build_energy(), energy_inputs()),
                                ("CubesNetGen", build_generator(), generator_inputs())]:
        result = convert_model(model, inputs)
        facts = result.facts()
        print(f"{name}: captured with {facts['capture']['method']} ({facts['capture']['reason']})")
        print(f"  {facts['nodes']} ops, {facts['keras_params']} Keras parameters, "
              f"{facts['transpose_ops']} Transpose ops, {facts['seconds']} s")
        print("  " + result.report.summary().replace("\n", "\n  "))
