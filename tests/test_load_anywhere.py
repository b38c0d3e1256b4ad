"""A converted ``.keras`` loads with Keras alone: ``safe_mode=True`` in a fresh process where
``import torch`` and ``import tracer`` fail, and computes what PyTorch computes. The models cover
every construct that once needed a layer of ours (constants and parameters in arithmetic, learned
tokens, PyTorch's padding modes, slices, adaptive pooling, resizing, Linears on transposed tokens,
pooling divisors, grouped/dilated transposed convolutions). Also: TFLite export of such a reloaded
model in a fresh process (issue 12, bug C)."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tests.helpers import FP32_TOL, assert_converts


class Consts(nn.Module):
    """Parameters and buffers in arithmetic (x + p with C == W, p - x, x / b, x ** 2, scalars)."""

    def __init__(self):
        super().__init__()
        self.p = nn.Parameter(torch.rand(5, 1, 1) + 0.5)
        self.register_buffer("b", torch.rand(1, 5, 1, 1) + 1.0)

    def forward(self, x):
        return (self.p - (x + self.p) / self.b) * 0.5 + x.clamp(min=0) ** 2


class Tokens(nn.Module):
    """A learned cls token and position embedding, a token-mixing Linear on transposed tokens."""

    def __init__(self):
        super().__init__()
        self.cls = nn.Parameter(torch.randn(1, 1, 8))
        self.pos = nn.Parameter(torch.randn(1, 7, 8))
        self.mix = nn.Linear(7, 7)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        t = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos
        t = t + self.mix(t.transpose(1, 2)).transpose(1, 2)
        return self.head(t[:, 0])


class Pads(nn.Module):
    def forward(self, x):
        a = F.pad(x, (1, 2, 2, 1), mode="reflect")
        b = F.pad(x, (2, 1, 1, 2), mode="replicate")
        c = F.pad(x, (1, 2, 2, 1), mode="circular")
        d = F.pad(x, (1, 2, 2, 1), value=0.75)
        return a + b + c + d


class Pools(nn.Module):
    """Adaptive pooling of non-dividing sizes, average pooling without the padding, chunk, slices."""

    def forward(self, x):
        m = F.adaptive_max_pool2d(x, (3, 4)) + F.adaptive_avg_pool2d(x, (3, 4))
        a = F.avg_pool2d(x, 3, 2, padding=1, count_include_pad=False)
        top, bottom = x.chunk(2, dim=2)
        return m, a, top[:, 1:, ::2] - bottom[:, :-1, ::2]


class Resize(nn.Module):
    def forward(self, x):
        up = F.interpolate(x, scale_factor=1.5, mode="bilinear", align_corners=False)
        near = F.interpolate(x, size=(11, 9), mode="nearest")
        return up, near


class Deconv(nn.Module):
    """Grouped transposed conv (per-group slices) and a strided, dilated one (zero interleaving)."""

    def __init__(self):
        super().__init__()
        self.grouped = nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, groups=2)
        self.dilated = nn.ConvTranspose2d(4, 3, 3, stride=2, dilation=2)

    def forward(self, x):
        return self.grouped(x), self.dilated(x)


class Gather(nn.Module):
    """A constant index table (int) and a boolean mask constant."""

    def __init__(self):
        super().__init__()
        self.register_buffer("idx", torch.tensor([[3, 0], [1, 1], [2, 3]]))
        self.register_buffer("mask", torch.tensor([True, False, True, False]))

    def forward(self, x):
        return x[:, self.idx].sum(-1), x.masked_fill(self.mask, -1.0)


class Clash(nn.Module):
    """A reflect pad (a keras.ops.pad named "pad"), a strided dilated transposed conv (its export fix
    adds another pad), exact GELU (erf fix) and tokens: the reloaded model failed to export with
    'The name "pad" is used 2 times in the model' before the export fixes reserved its names."""

    def __init__(self):
        super().__init__()
        self.up = nn.ConvTranspose2d(3, 3, 3, stride=2, dilation=2)
        self.lin = nn.Linear(3, 3)

    def forward(self, x):
        y = F.gelu(self.up(F.pad(x, (1, 1, 1, 1), mode="reflect")))
        return self.lin(y.flatten(2).transpose(1, 2) + 1.0) * 2.0


def _models() -> dict[str, tuple[nn.Module, tuple[int, ...]]]:
    torch.manual_seed(0)
    return {"consts": (Consts(), (2, 5, 6, 5)), "tokens": (Tokens(), (2, 6, 8)), "pads": (Pads(), (2, 3, 6, 7)),
            "pools": (Pools(), (2, 3, 10, 9)), "resize": (Resize(), (2, 3, 6, 5)), "deconv": (Deconv(), (2, 4, 5, 5)),
            "gather": (Gather(), (2, 4)), "clash": (Clash(), (2, 3, 5, 5))}


_FORBID = """
import sys


class _Forbid:  # import torch / import tracer raise ImportError (sys.modules[name] = None would
    # break libraries that look for torch in sys.modules, e.g. scipy's array API probe)

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("torch", "tracer"):
            raise ImportError(f"{name} cannot be imported here")
        return None


sys.meta_path.insert(0, _Forbid())
"""

_LOAD = """
import json, sys
import numpy as np
for name in ("torch", "tracer"):
    try:
        __import__(name)
    except ImportError:
        pass
    else:
        raise SystemExit(f"{name} imported")
import keras
names = json.loads(open("names.json").read())
for name in names:
    model = keras.models.load_model(f"{name}.keras", safe_mode=True)
    out = model(np.load(f"{name}_in.npy"), training=False)
    flat = keras.tree.flatten(out) if not isinstance(out, dict) else [out[k] for k in out]
    np.savez(f"{name}_out.npz", *[np.asarray(y) for y in flat])
print("loaded", len(names))
"""


def _run(script: str, cwd: Path, pythonpath: str | None) -> str:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(cwd), "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def _convert_and_save(names: list[str], folder: Path) -> dict[str, list[np.ndarray]]:
    expected = {}
    for name in names:
        model, shape = _models()[name]
        torch.manual_seed(1)
        x = torch.randn(*shape)
        result = assert_converts(model.eval(), x)
        result.keras_model.save(folder / f"{name}.keras")
        np.save(folder / f"{name}_in.npy", x.numpy())
        with torch.no_grad():
            out = model(x)
        expected[name] = [t.numpy() for t in (out if isinstance(out, tuple) else (out,))]
        assert result.facts()["load_needs"] == [], name
        config = zipfile.ZipFile(folder / f"{name}.keras").read("config.json").decode()
        assert "tracer>" not in config and '"module": "tracer' not in config, f"{name}: a class of ours in the file"
    (folder / "names.json").write_text(json.dumps(names))
    return expected


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> tuple[Path, dict[str, list[np.ndarray]]]:
    """Every model converted once, its .keras, input and PyTorch outputs in one folder."""
    folder = tmp_path_factory.mktemp("load_anywhere")
    return folder, _convert_and_save(list(_models()), folder)


def test_keras_file_loads_and_matches_without_torch_or_tracer(converted):
    tmp_path, expected = converted
    names = list(_models())
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(_FORBID)
    assert f"loaded {len(names)}" in _run(_LOAD, tmp_path, str(site))
    for name in names:
        with np.load(tmp_path / f"{name}_out.npz") as z:
            got = [z[f"arr_{i}"] for i in range(len(z.files))]
        assert len(got) == len(expected[name]), name
        for e, g in zip(expected[name], got):
            assert g.shape == e.shape, (name, g.shape, e.shape)
            assert np.max(np.abs(g.astype(np.float64) - e)) <= FP32_TOL * max(1.0, float(np.max(np.abs(e)))), name


_TFLITE = """
import numpy as np, keras
import tracer  # registers nothing this model needs; the export fixes live here
from tracer.emitter.tflite import export_tflite
from tracer.verify.litert import LiteRTRunner
for name in ("clash", "resize", "deconv", "tokens"):
    model = keras.models.load_model(f"{name}.keras", safe_mode=True)
    x = np.load(f"{name}_in.npy")
    want = keras.tree.flatten(model(x, training=False))
    got = LiteRTRunner(export_tflite(model, "fp32"))(x)
    for w, g in zip(want, got):
        w = np.asarray(w)
        assert np.max(np.abs(w - g)) <= 1e-5 * max(1.0, float(np.max(np.abs(w)))), name
print("exported")
"""


def test_tflite_export_of_a_reloaded_model_in_a_fresh_process(converted):
    """Issue 12 bug C: 'The name "..." is used 2 times in the model' from the export fixes' clone
    of a reloaded model (``Clash`` fails that way without the fix)."""
    tmp_path, _ = converted
    repo = str(Path(__file__).resolve().parents[1])
    assert "exported" in _run(_TFLITE, tmp_path, repo)
