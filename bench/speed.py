"""Conversion speed and memory, converted-model latency next to PyTorch's, Transpose counts.

    .venv/bin/python bench/speed.py            # every model, one table
    .venv/bin/python bench/speed.py --only resnet18,repvgg_a0
    .venv/bin/python bench/speed.py --memory   # conversion memory of a >100M-parameter model
    .venv/bin/python bench/speed.py --scaling  # conversion time against node count

Each model runs in its own subprocess so peak memory (ru_maxrss) is its own. Conversion time
excludes interpreter and framework import and is measured warm (after one throwaway conversion
of a tiny model in the same process); latency is the median of repeated calls after
warm-up with 2 threads on both sides (tf.function for Keras, torch.no_grad for PyTorch).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
THREADS = int(os.environ.get("TRACER_BENCH_THREADS", "2"))  # intra-op threads, PyTorch, TF and LiteRT
MODELS = {
    # name: (module path, factory, input shape)
    "repvit_kws": ("examples/repvit_kws.py", "build", (1, 100, 40)),
    "repvgg_a0": ("examples/repvgg.py", "build_a0", (1, 3, 32, 32)),
    "repvgg_a0_deploy": ("examples/repvgg.py", "build_a0_deploy", (1, 3, 32, 32)),
    "repvgg_b1g4": ("examples/repvgg.py", "build_b1g4", (1, 3, 32, 32)),
    "fbnet_a": ("examples/fbnet_a.py", "build", (1, 3, 224, 224)),
    "resnet18": ("bench/archs.py", "ResNet18", (1, 3, 224, 224)),
    "mobilenet_v2": ("bench/archs.py", "MobileNetV2", (1, 3, 224, 224)),
}


def _load(path: str, name: str):
    import importlib.util
    spec = importlib.util.spec_from_file_location(Path(path).stem, ROOT / path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str((ROOT / path).parent))
    spec.loader.exec_module(module)
    return getattr(module, name)


def _rss_mb() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _warm_up() -> None:
    """One throwaway conversion of a tiny model: the timed ones then exclude first-use costs."""
    import torch

    from tracer import convert_model
    tiny = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                               torch.nn.Flatten(), torch.nn.Linear(16, 2)).eval()
    convert_model(tiny, torch.randn(1, 3, 4, 4), check=False)


def _interleaved_ms(fns: dict, repeats: int = 30, warmup: int = 5) -> dict:
    """Median ms of each function, calls interleaved so all of them see the same machine load."""
    import numpy as np
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append((time.perf_counter() - t) * 1e3)
    return {k: float(np.median(v)) for k, v in times.items()}


def _keras_call(keras_model, perm: tuple, shape: tuple, batch: int, jit: bool = False):
    import numpy as np
    import tensorflow as tf
    x = tf.constant(np.transpose(np.random.randn(batch, *shape[1:]).astype("float32"), perm))
    call = tf.function(lambda t: keras_model(t, training=False), jit_compile=jit)
    return lambda: call(x)


def _torch_call(model, shape: tuple, batch: int):
    import torch
    x = torch.randn(batch, *shape[1:])

    def run():
        with torch.no_grad():
            model(x)
    return run


def measure(name: str) -> dict:
    import numpy as np
    import tensorflow as tf
    import torch

    from tracer import convert_model

    torch.set_num_threads(THREADS)
    tf.config.threading.set_intra_op_parallelism_threads(THREADS)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    path, factory, shape = MODELS[name]
    model = _load(path, factory)().eval()
    x = torch.randn(*shape)
    params = sum(p.numel() for p in model.parameters())
    _warm_up()
    base = _current_rss_mb()
    t = time.perf_counter()
    result = convert_model(model, x, check=False)
    seconds = time.perf_counter() - t
    peak = _rss_mb() - base
    folded = convert_model(model, x, check=False, fold_bn=True)
    row = {"model": name, "params": params, "convert_s": seconds, "peak_mb": peak, "nodes": result.facts()["nodes"],
           "transposes": result.transpose_count,
           "transposes_cl": convert_model(model, x, check=False, channels_last_io=True).transpose_count,
           "transposes_fold": folded.transpose_count,
           "transposes_fold_cl": convert_model(model, x, check=False, channels_last_io=True,
                                               fold_bn=True).transpose_count}
    km, fm, perm = result.keras_model, folded.keras_model, result.input_layouts[0].perm
    b1 = {"torch_b1_ms": _torch_call(model, shape, 1), "keras_b1_ms": _keras_call(km, perm, shape, 1),
          "keras_fold_b1_ms": _keras_call(fm, perm, shape, 1), "xla_fold_b1_ms": _keras_call(fm, perm, shape, 1, True)}
    tfl = _tflite_call(fm, np.transpose(x.numpy(), perm))
    if tfl is not None:
        b1["tflite_b1_ms"] = tfl
    row.update(_interleaved_ms(b1))
    row.update(_interleaved_ms({"torch_b8_ms": _torch_call(model, shape, 8),
                                "keras_b8_ms": _keras_call(km, perm, shape, 8)}, repeats=15))
    return row


def _tflite_call(keras_model, x):
    try:
        from tracer.emitter.tflite import export_tflite
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        return None
    interp = Interpreter(model_content=export_tflite(keras_model, "fp32"), num_threads=THREADS)
    interp.allocate_tensors()
    interp.set_tensor(interp.get_input_details()[0]["index"], x.astype("float32"))
    return interp.invoke


def measure_memory() -> dict:
    """Peak conversion memory of BigMLP (>100M parameters) above the framework baseline."""
    import torch

    from tracer import convert_model
    model = _load("bench/archs.py", "BigMLP")().eval()
    param_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    x = torch.randn(1, 1024)
    _warm_up()  # the framework baseline includes TF and Keras, initialized
    base = _current_rss_mb()
    t = time.perf_counter()
    convert_model(model, x, check=False)
    seconds = time.perf_counter() - t
    peak = _rss_mb() - base
    return {"params_m": sum(p.numel() for p in model.parameters()) / 1e6, "param_mb": param_mb,
            "peak_above_baseline_mb": peak, "ratio": peak / param_mb, "convert_s": seconds}


def measure_scaling() -> dict:
    """Conversion seconds of conv-BN-ReLU stacks of growing depth: linear in the node count?"""
    import torch

    from tracer import convert_model
    _warm_up()
    rows = []
    for depth in (16, 32, 64, 128, 256):
        blocks = [m for _ in range(depth) for m in (torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.BatchNorm2d(8),
                                                     torch.nn.ReLU())]
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1), *blocks).eval()
        t = time.perf_counter()
        result = convert_model(model, torch.randn(1, 3, 16, 16), check=False)
        rows.append({"depth": depth, "nodes": result.facts()["nodes"], "seconds": time.perf_counter() - t})
    return {"rows": rows}


def _run_child(arg: str) -> dict | None:
    proc = subprocess.run([sys.executable, __file__, "--child", arg], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        print(f"  {arg}: failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}",
              file=sys.stderr)
        return None
    return json.loads(lines[-1])


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


COLUMNS = [  # header, width, row key or (numerator, denominator) for a ratio, format
    ("conv s", 7, "convert_s", ".2f"), ("peak MB", 8, "peak_mb", ".0f"), ("nodes", 6, "nodes", "d"),
    ("T def", 6, "transposes", "d"), ("T cl", 5, "transposes_cl", "d"),
    ("Tf def", 7, "transposes_fold", "d"), ("Tf cl", 6, "transposes_fold_cl", "d"),
    ("torch b1", 9, "torch_b1_ms", ".2f"), ("keras b1", 9, "keras_b1_ms", ".2f"),
    ("k/t b1", 7, ("keras_b1_ms", "torch_b1_ms"), ".2f"),
    ("torch b8", 9, "torch_b8_ms", ".2f"), ("keras b8", 9, "keras_b8_ms", ".2f"),
    ("k/t b8", 7, ("keras_b8_ms", "torch_b8_ms"), ".2f"),
    ("fold b1", 8, "keras_fold_b1_ms", ".2f"), ("f/t b1", 7, ("keras_fold_b1_ms", "torch_b1_ms"), ".2f"),
    ("xla b1", 8, "xla_fold_b1_ms", ".2f"), ("x/t b1", 7, ("xla_fold_b1_ms", "torch_b1_ms"), ".2f"),
    ("tfl b1", 8, "tflite_b1_ms", ".2f"), ("l/t b1", 7, ("tflite_b1_ms", "torch_b1_ms"), ".2f"),
]


def _cell(r: dict, key, spec: str):
    if isinstance(key, tuple):
        a, b = r.get(key[0]), r.get(key[1])
        return None if a is None or not b else a / b
    return r.get(key)


def print_table(rows: list[dict]) -> None:
    """Latencies in ms (median of 30 calls at batch 1, 15 at batch 8, after 5 warm-up ones, interleaved); ratios are Keras or TFLite over PyTorch.

    T def / T cl: Transpose ops with PyTorch-layout / channels-last I/O; Tf: the same for fold_bn=True.
    keras: tf.function of the default conversion; fold: with fold_bn=True; xla: the folded model
    under tf.function(jit_compile=True); tfl: the folded model as TFLite fp32 in LiteRT.
    """
    import statistics
    head = f"{'model':<18}{'params':>8}" + "".join(f"{h:>{w}}" for h, w, _, _ in COLUMNS)
    print(head)
    print("-" * len(head))
    for r in rows:
        cells = "".join(f"{_fmt(_cell(r, k, f), f):>{w}}" for _, w, k, f in COLUMNS)
        print(f"{r['model']:<18}{r['params'] / 1e6:>7.2f}M" + cells)
    if not rows:
        return
    med = lambda key: statistics.median(v for v in (_cell(r, key, "") for r in rows) if v is not None)  # noqa: E731
    print(f"\nmedians over {len(rows)} models: conversion {med('convert_s'):.2f} s; latency / PyTorch at batch 1: "
          f"keras {med(('keras_b1_ms', 'torch_b1_ms')):.2f}x, folded {med(('keras_fold_b1_ms', 'torch_b1_ms')):.2f}x, "
          f"folded+XLA {med(('xla_fold_b1_ms', 'torch_b1_ms')):.2f}x, TFLite {med(('tflite_b1_ms', 'torch_b1_ms')):.2f}x; "
          f"at batch 8: keras {med(('keras_b8_ms', 'torch_b8_ms')):.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="", help="comma-separated model names")
    ap.add_argument("--memory", action="store_true", help="measure conversion memory of a >100M model")
    ap.add_argument("--threads", type=int, default=THREADS, help="threads for every runtime (default 2)")
    ap.add_argument("--scaling", action="store_true", help="conversion time against node count (deep stacks)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ["TRACER_BENCH_THREADS"] = str(args.threads)  # read by the measuring subprocesses
    if args.child:
        special = {"__memory__": measure_memory, "__scaling__": measure_scaling}
        print(json.dumps(special[args.child]() if args.child in special else measure(args.child)))
        return
    if args.scaling:
        r = _run_child("__scaling__")
        for row in (r or {}).get("rows", []):
            print(f"depth {row['depth']:>4}: {row['nodes']:>5} nodes, {row['seconds']:6.2f} s, "
                  f"{1e3 * row['seconds'] / row['nodes']:.2f} ms/node")
        return
    if args.memory:
        r = _run_child("__memory__")
        if r:
            print(f"BigMLP {r['params_m']:.1f}M params ({r['param_mb']:.0f} MB fp32): peak conversion memory "
                  f"{r['peak_above_baseline_mb']:.0f} MB above baseline = {r['ratio']:.2f}x parameter bytes, "
                  f"{r['convert_s']:.1f} s")
        return
    names = [n for n in (args.only.split(",") if args.only else MODELS) if n]
    rows = []
    for name in names:
        if not (ROOT / MODELS[name][0]).exists():
            print(f"  {name}: skipped, {MODELS[name][0]} does not exist", file=sys.stderr)
            continue
        print(f"measuring {name} ...", file=sys.stderr, flush=True)
        r = _run_child(name)
        if r:
            rows.append(r)
    print_table(rows)


if __name__ == "__main__":
    main()
