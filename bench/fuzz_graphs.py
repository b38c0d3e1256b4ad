"""Seeded random valid PyTorch models over the op families, for the differential fuzzer.

A graph is a *spec*: a JSON-able dict ``{"inputs": [...], "ops": [...], "outputs": ...}``, so a
failure can be minimized (ops dropped) and written out as a standalone reproducer. ``build(spec)``
makes the ``nn.Module``; ``random_spec(rng)`` draws one. Each op reads and writes the running
tensor ``x``; some read the extra inputs or a saved branch, some add a side output.

Used by ``bench/fuzz.py`` (long runs) and ``tests/test_fuzz.py`` (the default suite).
"""
from __future__ import annotations

import copy
import random
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

ACTS = ["ReLU", "GELU", "SiLU", "Sigmoid", "Tanh", "LeakyReLU", "Hardswish", "ELU", "Softplus", "ReLU6",
        "Hardsigmoid", "Mish", "PReLU"]


class Op(nn.Module):
    """One step: ``kind`` with its parameters; submodules are made here from the spec."""

    def __init__(self, spec: dict, ch: int):
        super().__init__()
        self.spec = spec
        k, s = spec["op"], spec
        g = torch.Generator().manual_seed(s.get("seed", 0))
        if k == "conv":
            cls = {1: nn.Conv1d, 2: nn.Conv2d}[s["dims"]]
            self.m = cls(ch, s["out"], s["k"], stride=s["stride"], padding=s["pad"], dilation=s["dil"],
                         groups=s["groups"], bias=s["bias"], padding_mode=s["mode"])
        elif k == "convT":
            cls = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d}[s["dims"]]
            self.m = cls(ch, s["out"], s["k"], stride=s["stride"], padding=s["pad"], output_padding=s["opad"],
                         dilation=s["dil"], groups=s["groups"], bias=s["bias"])
        elif k == "bn":
            self.m = (nn.BatchNorm1d if s["dims"] == 1 else nn.BatchNorm2d)(ch)
            with torch.no_grad():
                self.m.running_mean.copy_(torch.randn(ch, generator=g) * 0.5)
                self.m.running_var.copy_(torch.rand(ch, generator=g) + 0.5)
                self.m.weight.copy_(torch.rand(ch, generator=g) + 0.5)
                self.m.bias.copy_(torch.randn(ch, generator=g) * 0.2)
        elif k == "gn":
            self.m = nn.GroupNorm(s["groups"], ch)
        elif k == "inorm":
            self.m = (nn.InstanceNorm1d if s["dims"] == 1 else nn.InstanceNorm2d)(ch, affine=s["affine"])
        elif k in ("ln", "ln_cl"):
            self.m = nn.LayerNorm(s["n"])
        elif k == "act":
            self.m = getattr(nn, s["fn"])()
        elif k == "param":
            self.p = nn.Parameter(torch.rand(*s["shape"], generator=g) + 0.5)
        elif k == "linear":
            self.m = nn.Linear(s["n"], s["out"], bias=s["bias"])
        elif k == "mha":
            self.m = nn.MultiheadAttention(s["n"], s["heads"], batch_first=True)
        elif k == "rnn":
            self.m = getattr(nn, s["cell"])(s["n"], s["hidden"], batch_first=True, bidirectional=s["bi"])
        elif k == "branch_conv":
            self.m = nn.Conv2d(ch, ch, 3, padding=1, groups=s["groups"])
        self._init(g)

    def _init(self, g: torch.Generator) -> None:
        """Seeded weights (BatchNorm's were set above): fan-in scaled normals, small biases."""
        m = getattr(self, "m", None)
        if m is None or isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            return
        with torch.no_grad():
            for p in m.parameters():
                fan_in = p[0].numel() if p.dim() > 1 else 1
                p.copy_(torch.randn(p.shape, generator=g) * (fan_in ** -0.5 if p.dim() > 1 else 0.1))

    def forward(self, x: torch.Tensor, env: dict) -> torch.Tensor:
        s, k = self.spec, self.spec["op"]
        if k in ("conv", "convT", "bn", "gn", "inorm", "ln", "act", "linear"):
            return self.m(x)
        if k == "ln_cl":  # LayerNorm over the channels of an NCHW map
            return self.m(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        if k == "param":
            p = self.p
            return {"add": lambda: x + p, "radd": lambda: p + x, "mul": lambda: x * p, "sub": lambda: x - p,
                    "rsub": lambda: p - x, "div": lambda: x / p}[s["how"]]()
        if k == "pool":
            return _pool(x, s)
        if k == "reduce":
            fn = {"mean": torch.mean, "sum": torch.sum, "amax": torch.amax}[s["fn"]]
            return fn(x, dim=tuple(s["dims_"]), keepdim=s["keep"])
        if k == "shape":
            return _shape_op(x, s)
        if k == "save":
            env["saved"] = x
            return x
        if k == "merge":
            y = env.get("saved", x)
            return {"add": lambda: x + y, "mul": lambda: x * y, "sub": lambda: x - y,
                    "max": lambda: torch.maximum(x, y), "cat": lambda: torch.cat([x, y], dim=1)}[s["how"]]()
        if k == "input2":
            return x + env["in2"] if s["how"] == "add" else x * env["in2"]
        if k == "side":
            env["side"].append(x.mean(dim=-1) if s["mean"] else x * 1.5)
            return x
        if k == "mha":
            return self.m(x, x, x, need_weights=False)[0] + (x if s["res"] else 0)
        if k == "rnn":
            return self.m(x)[0]
        if k == "branch_conv":
            return x + self.m(x)
        if k == "softmax":
            return torch.softmax(x, dim=s["dim"])
        if k == "scalar":
            return {"add": lambda: x + s["v"], "mul": lambda: x * s["v"], "pow": lambda: x.abs() ** s["v"],
                    "clamp": lambda: x.clamp(min=-s["v"], max=s["v"])}[s["how"]]()
        raise ValueError(f"unknown fuzz op {k!r}")


def _pool(x: torch.Tensor, s: dict) -> torch.Tensor:
    d = s["dims"] if "dims" in s else x.dim() - 2  # from the spec: x.dim() under torch.fx is a Proxy
    if s["kind"] == "max":
        return (F.max_pool1d if d == 1 else F.max_pool2d)(x, s["k"], s["stride"], s["pad"], ceil_mode=s["ceil"])
    if s["kind"] == "avg":
        return (F.avg_pool1d if d == 1 else F.avg_pool2d)(x, s["k"], s["stride"], s["pad"], ceil_mode=s["ceil"],
                                                          count_include_pad=s["cip"])
    return (F.adaptive_avg_pool1d if d == 1 else F.adaptive_avg_pool2d)(x, s["size"] if d == 1 else
                                                                        (s["size"], s["size"]))


def _shape_op(x: torch.Tensor, s: dict) -> torch.Tensor:
    how = s["how"]
    if how == "tokens":  # (B, C, H, W) -> (B, HW, C)
        return x.flatten(2).transpose(1, 2)
    if how == "untokens":  # (B, L, C) -> (B, C, L)
        return x.transpose(1, 2)
    if how == "flatten":
        return x.flatten(1)
    if how == "shuffle":  # sizes from the spec: unpacking x.shape fails under torch.fx
        return x.unflatten(1, (s["g"], s["ch"] // s["g"])).transpose(1, 2).flatten(1, 2)
    if how == "nhwc_roundtrip":
        return x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2) * 1.0
    if how == "chunk_add":
        a, b = x.chunk(2, dim=1)
        return a * b + a
    if how == "transpose_hw":
        return x.transpose(-1, -2)
    if how == "to1d":  # (B, C, H, W) -> (B, C, HW)
        return x.flatten(2)
    raise ValueError(how)


class FuzzNet(nn.Module):
    """The model a spec describes: input ``x``, ops in order, outputs. Traceable by torch.fx (the
    spec's choices are Python, not tensor, control flow), so the converter's default capture runs."""

    def __init__(self, spec: dict):
        super().__init__()
        self.spec = copy.deepcopy(spec)
        self.ops = nn.ModuleList(Op(o, o["ch"]) for o in spec["ops"])

    def run(self, x: torch.Tensor, env: dict) -> Any:
        for op in self.ops:
            x = op(x, env)
        outs = [x, *env["side"]]
        return outs[0] if len(outs) == 1 else tuple(outs)

    def forward(self, x):
        return self.run(x, {"side": []})


class FuzzNet2(FuzzNet):
    """A spec with a second input ``in2``."""

    def forward(self, x, in2):
        return self.run(x, {"side": [], "in2": in2})


def build(spec: dict) -> FuzzNet:
    return (FuzzNet2 if len(spec["inputs"]) > 1 else FuzzNet)(spec).eval()


def sample_inputs(spec: dict, seed: int, batch: int | None = None, scale: float = 1.0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for shape in spec["inputs"]:
        shape = (batch, *shape[1:]) if batch else tuple(shape)
        out.append(torch.randn(*shape, generator=g) * scale)
    return out


# ---- the generator -----------------------------------------------------------------------------

def random_spec(rng: random.Random, max_ops: int = 6, size: int = 8) -> dict:
    """A random valid spec: ops proposed at random, each kept only if it runs on the tensor so far
    (finite, 1 to 4096 values: a transposed conv can make an empty map, no axis over 64)."""
    c = rng.choice([3, 4, 5, 6, 8])
    h = rng.choice([size, size - 2, size + 1, c])
    w = rng.choice([h, c, size - 1])  # C == W on purpose (bug A's collision)
    shape = [rng.choice([1, 2]), c, h, w] if rng.random() < 0.75 else [rng.choice([1, 2]), c, w * 2]
    spec: dict = {"inputs": [shape], "ops": []}
    inputs = sample_inputs(spec, 0)
    x, env = inputs[0], {"side": []}
    if rng.random() < 0.15:
        spec["inputs"].append([1, *shape[1:]] if rng.random() < 0.3 else list(shape))
        env["in2"] = sample_inputs(spec, 0)[1]
    n = rng.randint(1, max_ops)
    for _ in range(40):
        if len(spec["ops"]) >= n:
            break
        o = _propose(rng, tuple(x.shape), len(spec["ops"]), "in2" in env and "input2" not in
                     [p["op"] for p in spec["ops"]])
        trial = {**env, "side": list(env["side"])}
        try:
            with torch.no_grad():
                y = Op(o, o["ch"]).eval()(x, trial)
        except Exception:  # noqa: BLE001  (an invalid proposal: the generator drops it)
            continue
        if not torch.isfinite(y).all() or not 0 < y.numel() <= 4096 or y.dim() < 2 or max(y.shape[1:]) > 64 or \
                not all(torch.isfinite(t).all() for t in trial["side"]):
            continue
        spec["ops"].append(o)
        x, env = y, trial
    if len(spec["inputs"]) > 1 and not any(o["op"] == "input2" for o in spec["ops"]):
        del spec["inputs"][1]
    return spec


def _propose(rng: random.Random, cur: tuple, pos: int, second_input: bool = False) -> dict:
    rank = len(cur)
    seed = rng.randrange(1 << 30)
    if rank == 4:
        kinds = ["conv"] * 4 + ["convT"] * 2 + ["pool"] * 2 + ["bn", "gn", "inorm", "ln_cl", "act", "act",
                 "param", "param", "param", "reduce", "shape", "shape", "save", "merge", "side",
                 "branch_conv", "softmax", "scalar"]
    elif rank == 3:
        kinds = ["conv", "convT", "pool", "bn", "ln", "act", "act", "param", "param", "linear", "linear", "mha",
                 "rnn", "shape", "reduce", "save", "merge", "side", "softmax", "scalar", "inorm"]
    else:
        kinds = ["linear", "act", "ln", "param", "bn", "side", "scalar"]
    k = "input2" if second_input and rng.random() < 0.5 else rng.choice(kinds)
    c = cur[1] if rank >= 2 else 1
    d = rank - 2
    o: dict = {"op": k, "seed": seed}
    if k == "conv":
        groups = rng.choice([1, 1, c]) if c > 1 else 1
        out = rng.choice([c, 4, 6, 8]) if groups == 1 else c * rng.choice([1, 2])
        kk = rng.choice([1, 2, 3, 3, 5])
        stride = rng.choice([1, 1, 2])
        pad = rng.choice(["same", "valid", 0, 1, 2]) if stride == 1 else rng.choice([0, 1, 2])
        mode = rng.choice(["zeros", "zeros", "reflect", "replicate", "circular"])
        dil = rng.choice([1, 1, 2])
        if isinstance(pad, int) and pad >= min(cur[2:]):
            pad = 0
        o.update(dims=d, out=out, k=kk, stride=stride, pad=pad, dil=dil, groups=groups, bias=rng.random() < 0.7,
                 mode=mode)
    elif k == "convT":
        stride = rng.choice([1, 2, 2, 3])
        kk = rng.choice([1, 2, 3, 4])
        dil = rng.choice([1, 1, 2])
        o.update(dims=d, out=rng.choice([c, 4, 6]), k=kk, stride=stride, pad=rng.randint(0, max(0, (kk - 1) * dil)),
                 opad=rng.randint(0, max(0, max(stride, dil) - 1)), dil=dil, groups=1, bias=rng.random() < 0.7)
        if o["opad"] >= max(stride, dil):
            o["opad"] = 0
    elif k == "pool":
        kind = rng.choice(["max", "avg", "adaptive"])
        kk = rng.choice([2, 3])
        o.update(kind=kind, k=kk, stride=rng.choice([1, 2, kk]), pad=rng.randint(0, kk // 2),
                 ceil=rng.random() < 0.4, cip=rng.random() < 0.5, size=rng.choice([1, 2, 3, 4]), dims=d)
    elif k == "bn":
        o.update(dims=1 if rank in (2, 3) else 2)
    elif k == "gn":
        o.update(groups=rng.choice([g for g in (1, 2, c) if c % g == 0]))
    elif k == "inorm":
        o.update(dims=d, affine=rng.random() < 0.5)
    elif k == "ln":
        o.update(n=cur[-1])
    elif k == "ln_cl":
        o.update(n=c)
    elif k == "act":
        o.update(fn=rng.choice(ACTS))
    elif k == "param":
        o.update(shape=_param_shape(rng, cur), how=rng.choice(["add", "add", "radd", "mul", "sub", "rsub", "div"]))
    elif k == "linear":
        o.update(n=cur[-1], out=rng.choice([4, 8, cur[-1]]), bias=rng.random() < 0.8)
    elif k == "mha":
        n = cur[-1]
        heads = [h for h in (1, 2, 4) if n % h == 0]
        o.update(n=n, heads=rng.choice(heads), res=rng.random() < 0.5)
    elif k == "rnn":
        o.update(cell=rng.choice(["LSTM", "GRU", "RNN"]), n=cur[-1], hidden=rng.choice([4, 6, 8]),
                 bi=rng.random() < 0.3)
    elif k == "reduce":
        dims = rng.choice([[-1], [1], [2, 3] if rank == 4 else [-1]])
        o.update(fn=rng.choice(["mean", "sum", "amax"]), dims_=dims, keep=rng.random() < 0.7)
    elif k == "shape":
        opts = {4: ["tokens", "flatten", "shuffle", "nhwc_roundtrip", "chunk_add", "transpose_hw", "to1d"],
                3: ["untokens", "flatten", "chunk_add", "transpose_hw"]}[rank]
        o.update(how=rng.choice(opts), g=rng.choice([g for g in (2, 3) if c % g == 0] or [1]))
    elif k in ("merge", "input2"):
        o.update(how=rng.choice(["add", "mul", "sub", "max", "cat"] if k == "merge" else ["add", "mul"]))
    elif k == "side":
        o.update(mean=rng.random() < 0.5)
    elif k == "branch_conv":
        o.update(groups=rng.choice([1, c]))
    elif k == "softmax":
        o.update(dim=rng.choice([1, -1]))
    elif k == "scalar":
        o.update(how=rng.choice(["add", "mul", "pow", "clamp"]), v=rng.choice([0.5, 2.0, 3.0]))
    o["ch"] = c  # the channels the op's modules are built for
    return o


def _param_shape(rng: random.Random, cur: tuple) -> list[int]:
    """Broadcasting parameter shapes: per channel, per position, full, with leading ones or not."""
    rank = len(cur)
    c = cur[1]
    if rank == 4:
        return rng.choice([[c, 1, 1], [1, c, 1, 1], [cur[3]], [cur[2], 1], [1, 1, cur[2], cur[3]],
                           [cur[2], cur[3]], [c, cur[2], cur[3]], [1]])
    if rank == 3:
        return rng.choice([[c, 1], [1, c, 1], [cur[2]], [1, 1, cur[2]], [c, cur[2]], [1]])
    return rng.choice([[cur[-1]], [1, cur[-1]], [1]])


def spec_source(spec: dict, capture: str = "auto") -> str:
    """Python source of a standalone reproducer for ``spec`` (converted with ``capture``)."""
    return (
        '"""A fuzz reproducer: run `.venv/bin/python THIS_FILE` from the repository root."""\n'
        "import sys, pathlib\n"
        "sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))\n"
        "from bench.fuzz_graphs import build, sample_inputs\n"
        "from bench.fuzz import check_graph\n\n"
        f"SPEC = {spec!r}\n\n"
        "if __name__ == '__main__':\n"
        f"    print(check_graph(SPEC, tflite=True, reload=True, capture={capture!r}))\n")
