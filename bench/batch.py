"""Time ``tracer batch`` over 20+ models: serial, ``--workers 2`` and ``--ray local``, and a rerun.

The manifest holds the examples (examples/*.py, small configurations), the benchmark architectures
(bench/archs.py) and the small models below, including an FNet block (torch.fft: unsupported), a
missing file and a wrong input shape (bad_input); every model is checked on 3 inputs and written
as model.keras and report.json (no SavedModel export, to keep the run short). Each mode runs into a
fresh folder through the ``tracer batch`` command line (so start-up is counted); then the first
mode's folder is run again to time the resume (every entry unchanged, skipped).

    .venv/bin/python bench/batch.py [--out out/bench_batch] [--modes serial,workers2,ray] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parent.parent
EX, BENCH = ROOT / "examples", ROOT / "bench"


class TinyMLP(nn.Module):
    def __init__(self, width: int = 64):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(32, width), nn.GELU(), nn.LayerNorm(width), nn.Linear(width, 10))

    def forward(self, x):
        return self.net(x)


class TinyUNet(nn.Module):
    """Down, up (transposed conv) and a skip concatenation."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.down = nn.Sequential(nn.Conv2d(3, c, 3, 2, 1), nn.BatchNorm2d(c), nn.ReLU())
        self.mid = nn.Sequential(nn.Conv2d(c, c, 3, 1, 1), nn.ReLU())
        self.up = nn.ConvTranspose2d(c, c, 2, 2)
        self.out = nn.Conv2d(c + 3, 1, 1)

    def forward(self, x):
        return self.out(torch.cat([self.up(self.mid(self.down(x))), x], 1))


class TinyLSTM(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(12, 16, batch_first=True)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        y, _ = self.lstm(x)
        return self.head(y[:, -1])


class TinyAttention(nn.Module):
    def __init__(self, dim: int = 32):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, 4, batch_first=True)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        return self.norm(x + self.attn(x, x, x, need_weights=False)[0])


class TinyConv1d(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv1d(4, 16, 5, padding=2), nn.ReLU(), nn.MaxPool1d(2),
                                 nn.Conv1d(16, 16, 3, groups=4, padding=1), nn.AdaptiveAvgPool1d(1), nn.Flatten(),
                                 nn.Linear(16, 3))

    def forward(self, x):
        return self.net(x)


class FNetBlock(nn.Module):
    """FNet token mixing (Lee-Thorp et al.): the real part of a 2-D FFT. tracer has no FFT rule."""

    def __init__(self, dim: int = 32):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.ff = nn.Linear(dim, dim)

    def forward(self, x):
        return self.ff(self.norm(x + torch.fft.fft2(x).real))


def manifest() -> dict:
    ex, b = str(EX), str(BENCH)
    m = [("repvit_kws", f"{ex}/repvit_kws.py:build", None, [[1, 100, 40]], {}),
         ("repvgg_a0", f"{ex}/repvgg.py:build_a0", {"num_classes": 10}, [[1, 3, 32, 32]], {}),
         ("repvgg_a0_folded", f"{ex}/repvgg.py:build_a0", {"num_classes": 10}, [[1, 3, 32, 32]], {"fold_bn": True}),
         ("repvgg_a0_deploy", f"{ex}/repvgg.py:build_a0_deploy", {"num_classes": 10}, [[1, 3, 32, 32]], {}),
         ("custom_layer", f"{ex}/custom_layer.py:build", None, [[2, 3, 16, 16]], {}),
         ("fbnet_a", f"{ex}/fbnet_a.py:build", {"num_classes": 10}, [[1, 3, 96, 96]], {}),
         ("digits", f"{ex}/digits_tflite.py:DigitsNet", None, [[1, 1, 8, 8]], {"tflite": ["fp32"]}),
         ("ebm_energy", f"{ex}/ebm_cubes.py:build_energy", {"num_filters": 16, "warm_up": 0},
          [[1, 3, 64, 64], [1, 6]], {}),
         ("ebm_generator", f"{ex}/ebm_cubes.py:build_generator", {"num_filters": 16, "warm_up": 0},
          [[1, 128], [1, 6]], {}),
         ("swin_small", f"{ex}/swin_block.py:build", {"img_size": 56, "num_classes": 10, "dim": 48},
          [[1, 3, 56, 56]], {}),
         ("vit_tiny_d2", f"{ex}/vit_tiny.py:build", {"img_size": 32, "num_classes": 10, "depth": 2},
          [[1, 3, 32, 32]], {}),
         ("cvt_small", f"{ex}/cvt13.py:build", {"num_classes": 10, "depths": [1, 1, 1]}, [[1, 3, 64, 64]], {}),
         ("resnet18", f"{b}/archs.py:ResNet18", {"num_classes": 10}, [[1, 3, 64, 64]], {"channels_last_io": True}),
         ("mobilenet_v2", f"{b}/archs.py:MobileNetV2", {"num_classes": 10}, [[1, 3, 64, 64]], {}),
         ("mlp_small", f"{b}/archs.py:BigMLP", {"width": 256, "depth": 2}, [[1, 1024]], {}),
         ("tiny_mlp", f"{b}/batch.py:TinyMLP", None, [[4, 32]], {}),
         ("tiny_unet", f"{b}/batch.py:TinyUNet", None, [[1, 3, 16, 16]], {}),
         ("tiny_lstm", f"{b}/batch.py:TinyLSTM", None, [[2, 7, 12]], {}),
         ("tiny_attention", f"{b}/batch.py:TinyAttention", None, [[2, 9, 32]], {}),
         ("tiny_conv1d", f"{b}/batch.py:TinyConv1d", None, [[2, 4, 32]], {}),
         ("fnet_block", f"{b}/batch.py:FNetBlock", None, [[2, 9, 32]], {}),
         ("missing_file", f"{b}/no_such_model.py:Net", None, [[1, 3, 32, 32]], {}),
         ("wrong_shape", f"{b}/archs.py:ResNet18", {"num_classes": 10}, [[1, 1, 64, 64]], {})]
    models = [{"name": n, "model": t, **({"init_args": a} if a else {}), "input_shapes": s,
               **({"options": o} if o else {})} for n, t, a, s, o in m]
    return {"defaults": {"timeout": 900, "memory_mb": 6144, "options": {"n_random": 2, "no_saved_model": True}}, "models": models}


def run_mode(manifest_path: Path, out: Path, extra: list[str]) -> dict:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "tracer.cli", "batch", str(manifest_path), "-o", str(out), "-q", *extra],
                   check=False)
    wall = time.perf_counter() - start
    summary = json.loads((out / "summary.json").read_text())
    return {"wall_s": round(wall, 1), "counts": summary["counts"], "skipped": summary["skipped"],
            "cpu_s_in_workers": round(sum(r["seconds"] for r in summary["models"] if not r["skipped"]), 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "out" / "bench_batch"))
    ap.add_argument("--modes", default="serial,workers2,ray")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    path = out / "manifest.json"
    path.write_text(json.dumps(manifest(), indent=2))
    modes = {"serial": ["--workers", "1"], "workers2": ["--workers", "2"], "ray": ["--ray", "local", "--workers", "2"]}
    results = {}
    for mode in args.modes.split(","):
        results[mode] = run_mode(path, out / mode, modes[mode])
        print(mode, results[mode], flush=True)
    first = next(iter(results))
    results[f"{first} rerun"] = run_mode(path, out / first, modes[first])
    print("rerun", results[f"{first} rerun"], flush=True)
    n = len(manifest()["models"])
    print(f"\n{n} models; wall seconds include start-up\n")
    print("| run | wall s | ok | parity_failed | bad_input | unsupported | crashed | timeout | skipped |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for mode, r in results.items():
        c = r["counts"]
        print(f"| {mode} | {r['wall_s']} | " + " | ".join(str(c[s]) for s in
              ("ok", "parity_failed", "bad_input", "unsupported", "crashed", "timeout")) + f" | {r['skipped']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
