"""Conversion speed and memory, converted-model latency next to PyTorch's, Transpose counts.

    .venv/bin/python bench/speed.py            # every model, one table
    .venv/bin/python bench/speed.py --only resnet18,repvgg_a0
    .venv/bin/python bench/speed.py --memory   # conversion memory of a >100M-parameter model

Each model runs in its own subprocess so peak memory (ru_maxrss) is its own. Conversion time
excludes interpreter and framework import; latency is the median of repeated calls after
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


def _median_ms(fn, repeats: int = 30, warmup: int = 5) -> float:
    import numpy as np
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return float(np.median(times))


def _rss_mb() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure(name: str) -> dict:
    import numpy as np
    import tensorflow as tf
    import torch

    from tracer import convert_model

    torch.set_num_threads(2)
    tf.config.threading.set_intra_op_parallelism_threads(2)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    path, factory, shape = MODELS[name]
    model = _load(path, factory)().eval()
    x = torch.randn(*shape)
    params = sum(p.numel() for p in model.parameters())
    base = _current_rss_mb()
    t = time.perf_counter()
    result = convert_model(model, x, check=False)
    seconds = time.perf_counter() - t
    peak = _rss_mb() - base
    row = {"model": name, "params": params, "convert_s": seconds, "peak_mb": peak,
           "transposes": result.transpose_count,
           "transposes_cl": convert_model(model, x, check=False, channels_last_io=True).transpose_count}
    km = result.keras_model
    perm = result.input_layouts[0].perm
    for batch in (1, 8):
        xb = torch.randn(batch, *shape[1:])
        kb = tf.constant(np.transpose(xb.numpy(), perm))
        call = tf.function(lambda t: km(t, training=False))
        with torch.no_grad():
            row[f"torch_b{batch}_ms"] = _median_ms(lambda: model(xb))
        row[f"keras_b{batch}_ms"] = _median_ms(lambda: call(kb))
    row["tflite_b1_ms"] = _tflite_latency(km, np.transpose(x.numpy(), perm))
    return row


def _tflite_latency(keras_model, x) -> float | None:
    try:
        from emitter.tflite import export_tflite
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        return None
    interp = Interpreter(model_content=export_tflite(keras_model, "fp32"), num_threads=2)
    interp.allocate_tensors()
    inp = interp.get_input_details()[0]["index"]
    interp.set_tensor(inp, x.astype("float32"))
    return _median_ms(interp.invoke)


def measure_memory() -> dict:
    """Peak conversion memory of BigMLP (>100M parameters) above the framework baseline."""
    import torch

    from tracer import convert_model
    model = _load("bench/archs.py", "BigMLP")().eval()
    param_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    x = torch.randn(1, 1024)
    import keras  # noqa: F401  (framework baseline includes TF)
    base = _current_rss_mb()
    t = time.perf_counter()
    convert_model(model, x, check=False)
    seconds = time.perf_counter() - t
    peak = _rss_mb() - base
    return {"params_m": sum(p.numel() for p in model.parameters()) / 1e6, "param_mb": param_mb,
            "peak_above_baseline_mb": peak, "ratio": peak / param_mb, "convert_s": seconds}


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


def print_table(rows: list[dict]) -> None:
    head = (f"{'model':<18}{'params':>10}{'conv s':>8}{'peak MB':>9}{'T def':>6}{'T cl':>6}"
            f"{'torch b1':>10}{'keras b1':>10}{'k/t b1':>8}{'torch b8':>10}{'keras b8':>10}{'k/t b8':>8}{'tfl b1':>9}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['model']:<18}{r['params'] / 1e6:>9.2f}M{r['convert_s']:>8.2f}{r['peak_mb']:>9.0f}"
              f"{r['transposes']:>6}{r['transposes_cl']:>6}"
              f"{r['torch_b1_ms']:>9.2f}m{r['keras_b1_ms']:>9.2f}m{r['keras_b1_ms'] / r['torch_b1_ms']:>8.2f}"
              f"{r['torch_b8_ms']:>9.2f}m{r['keras_b8_ms']:>9.2f}m{r['keras_b8_ms'] / r['torch_b8_ms']:>8.2f}"
              f"{_fmt(r.get('tflite_b1_ms'), '8.2f')}m")
    if rows:
        import statistics
        print(f"\nmedian conversion {statistics.median(r['convert_s'] for r in rows):.2f} s; "
              f"median Keras/PyTorch latency at batch 1: "
              f"{statistics.median(r['keras_b1_ms'] / r['torch_b1_ms'] for r in rows):.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="", help="comma-separated model names")
    ap.add_argument("--memory", action="store_true", help="measure conversion memory of a >100M model")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure_memory() if args.child == "__memory__" else measure(args.child)))
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
        print(f"measuring {name} ...", file=sys.stderr, flush=True)
        r = _run_child(name)
        if r:
            rows.append(r)
    print_table(rows)


if __name__ == "__main__":
    main()
