"""Differential fuzzer: random valid models (bench/fuzz_graphs.py), converted, then checked
independently of the converter's own parity report against PyTorch in float64.

    .venv/bin/python bench/fuzz.py --n 2000 --seed 0          # counts by category, out/fuzz/summary.json

Each graph is converted (no parity check inside the conversion), then run on fresh inputs: another
batch size and inputs scaled by 4. An output fails when Keras is further than the fp32 tolerance
from PyTorch float64 *and* further than FP32_NOISE_FACTOR x PyTorch fp32's own error (the parity
verdict's rule). Every ``--reload-every``-th graph is saved as ``.keras`` and reloaded in safe
mode, every ``--tflite-every``-th is exported to fp32 TFLite and run with LiteRT (same rule).
Failures are minimized (ops dropped while the same category still fails) into standalone
reproducers under ``out/fuzz/``.

The graphs are traceable by torch.fx, so the converter's default capture takes them; every
``--export-every``-th graph is converted with ``capture="export"`` instead (torch.export, ATen
level: what models fx cannot trace get), counted on its own too (``counts_export``).

Categories: ok; refused (a TracerError: one clear error naming the op); parity (wrong numbers);
reload; tflite (export or numbers); crash:<exception type> (anything else).
"""
from __future__ import annotations

import argparse
import collections
import copy
import json
import os
import random
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.fuzz_graphs import build, random_spec, sample_inputs, spec_source  # noqa: E402

TOL = 1e-5


def _errors(model: torch.nn.Module, inputs: list[torch.Tensor], got: list[np.ndarray]) -> list[tuple]:
    """Per output: (Keras error, PyTorch fp32 error), both against float64, scaled by max(1, max|y|)."""
    from tracer.verify.parity import flatten_outputs

    with torch.no_grad():
        y32 = [t.numpy() for t in flatten_outputs(model(*[x.clone() for x in inputs]))]
        y64 = [t.numpy() for t in flatten_outputs(copy.deepcopy(model).double()(*[x.double() for x in inputs]))]
    if len(got) != len(y64):
        return [(float("inf"), 0.0)]
    out = []
    for g, e32, e64 in zip(got, y32, y64):
        if g.shape != e64.shape:
            out.append((float("inf"), 0.0))
            continue
        scale = max(1.0, float(np.max(np.abs(e64), initial=0.0)))
        k = float(np.max(np.abs(g.astype(np.float64) - e64), initial=0.0)) / scale
        out.append((k if np.isfinite(k) else float("inf"), float(np.max(np.abs(e32 - e64), initial=0.0)) / scale))
    return out


def _wrong(errors: list[tuple]) -> str | None:
    from tracer.verify.parity import FP32_NOISE_FACTOR

    bad = [(i, k, t) for i, (k, t) in enumerate(errors) if k > TOL and k > FP32_NOISE_FACTOR * t]
    return None if not bad else "; ".join(f"output {i}: Keras {k:.2e}, PyTorch fp32 {t:.2e}" for i, k, t in bad)


def check_graph(spec: dict, tflite: bool = False, reload: bool = False, capture: str = "auto") -> tuple[str, str]:
    """(category, detail) for one spec, converted with ``capture`` ("auto", "fx", "export"). Never raises."""
    from tracer import convert_model
    from tracer.errors import TracerError
    from tracer.verify.parity import run_keras

    model = build(spec)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = convert_model(model, tuple(sample_inputs(spec, 1)), check=False, capture=capture)
    except TracerError as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        return "refused", f"{type(exc).__name__}: {' | '.join(lines[:2])[:300]}"
    except Exception as exc:  # noqa: BLE001  (a crash is what the fuzzer looks for)
        return f"crash:{type(exc).__name__}", _where(exc)
    km, lin, lout = result.keras_model, result.input_layouts, result.output_layouts
    trials = [sample_inputs(spec, 2, batch=3), sample_inputs(spec, 3, scale=4.0)]
    for inputs in trials:
        if not _torch_runs(model, inputs):
            continue  # a model that runs only at the sample's batch size (x (1, C, H) + y (1, C, H, W)): no trial
        try:
            got = run_keras(km, [x.numpy() for x in inputs], lin, lout)
        except Exception as exc:  # noqa: BLE001
            return f"crash:keras-run:{type(exc).__name__}", _where(exc)
        wrong = _wrong(_errors(model, inputs, got))
        if wrong:
            return "parity", f"inputs {[tuple(x.shape) for x in inputs]}: {wrong}"
    if reload:
        found = _check_reload(km, trials[0], lin, lout)
        if found:
            return "reload", found
    if tflite:
        found = _check_tflite(model, km, trials[0], lin, lout)
        if found:
            return "tflite", found
    return "ok", ""


def _torch_runs(model: torch.nn.Module, inputs: list[torch.Tensor]) -> bool:
    try:
        with torch.no_grad():
            model(*[x.clone() for x in inputs])
    except Exception:  # noqa: BLE001  (PyTorch itself rejects this batch size)
        return False
    return True


def _check_reload(km: Any, inputs: list[torch.Tensor], lin: list, lout: list) -> str | None:
    import keras

    from tracer.verify.parity import run_keras

    arrays = [x.numpy() for x in inputs]
    with tempfile.TemporaryDirectory(prefix="tracer-fuzz-") as tmp:
        path = os.path.join(tmp, "m.keras")
        try:
            km.save(path)
            again = keras.models.load_model(path, safe_mode=True)
            a, b = run_keras(km, arrays, lin, lout), run_keras(again, arrays, lin, lout)
        except Exception as exc:  # noqa: BLE001
            return f"{type(exc).__name__}: {_where(exc)}"
    diff = max(float(np.max(np.abs(x - y), initial=0.0)) for x, y in zip(a, b))
    return None if diff == 0.0 else f"reloaded model differs by {diff:.2e}"


def _check_tflite(model: torch.nn.Module, km: Any, inputs: list[torch.Tensor], lin: list, lout: list) -> str | None:
    from tracer.emitter.tflite import export_tflite
    from tracer.verify.litert import LiteRTRunner, keras_input_names
    from tracer.verify.parity import run_keras

    try:
        runner = LiteRTRunner(export_tflite(km, "fp32", input_layouts=lin), keras_input_names(km))
        got = run_keras(runner, [x.numpy() for x in inputs], lin, lout)
    except Exception as exc:  # noqa: BLE001
        return f"export/run {type(exc).__name__}: {_where(exc)}"
    wrong = _wrong(_errors(model, inputs, got))
    return None if not wrong else f"LiteRT fp32: {wrong}"


def _where(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if "/tracer/" in f.filename or "/op_rules/" in f.filename or "/emitter/" in f.filename
            or "/fixes/" in f.filename]
    at = f" at {Path(ours[-1].filename).name}:{ours[-1].lineno}" if ours else ""
    return f"{str(exc).splitlines()[0][:240] if str(exc) else type(exc).__name__}{at}"


def minimize(spec: dict, category: str, **checks: Any) -> dict:
    """Drop ops while the spec still builds and fails in the same category."""
    best = copy.deepcopy(spec)
    changed = True
    while changed:
        changed = False
        for i in range(len(best["ops"])):
            cand = copy.deepcopy(best)
            del cand["ops"][i]
            if len(cand["inputs"]) > 1 and not any(o["op"] == "input2" for o in cand["ops"]):
                del cand["inputs"][1]
            if not _runs(cand):
                continue
            if check_graph(cand, **checks)[0] == category:
                best, changed = cand, True
                break
    return best


def _runs(spec: dict) -> bool:
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            y = build(spec)(*sample_inputs(spec, 1))
    except Exception:  # noqa: BLE001  (a shrunk spec that no longer fits together)
        return False
    return all(torch.isfinite(t).all() for t in (y if isinstance(y, tuple) else (y,)))


def graph_rng(seed: int, i: int) -> random.Random:
    return random.Random(seed * 1_000_003 + i)


def run(n: int, seed: int, out: Path, tflite_every: int = 10, reload_every: int = 10, max_ops: int = 6,
        do_minimize: bool = True, log: Any = print, start_at: int = 0, export_every: int = 5) -> dict:
    """Graphs ``start_at .. n - 1`` of the seed (graph i is the same in every run)."""
    out.mkdir(parents=True, exist_ok=True)
    counts: collections.Counter = collections.Counter()
    counts_export: collections.Counter = collections.Counter()
    failures: list[dict] = []
    summary: dict = {}
    start = time.perf_counter()
    for i in range(start_at, n):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            spec = random_spec(graph_rng(seed, i), max_ops=max_ops)
        capture = "export" if export_every > 0 and i % export_every == export_every - 1 else "auto"
        checks = {"tflite": tflite_every > 0 and i % tflite_every == 0,
                  "reload": reload_every > 0 and i % reload_every == 0, "capture": capture}
        category, detail = check_graph(spec, **checks)
        counts[category] += 1
        if capture == "export":
            counts_export[category] += 1
        if category not in ("ok", "refused"):
            small = minimize(spec, category, **checks) if do_minimize else spec
            path = out / f"repro_s{seed}_{i:05d}_{category.replace(':', '_')}.py"
            path.write_text(f"# {category} (capture={capture}): {detail}\n" + spec_source(small, capture))
            failures.append({"graph": i, "category": category, "capture": capture, "detail": detail,
                             "ops": len(spec["ops"]), "minimized_ops": [o["op"] for o in small["ops"]],
                             "reproducer": str(path)})
            log(f"[{i}] {category} (capture={capture}): {detail} -> {path}")
        elif category == "refused":
            failures.append({"graph": i, "category": category, "capture": capture, "detail": detail})
        if (i + 1) % 50 == 0 or i + 1 == n:
            log(f"{i + 1 - start_at}/{n - start_at} graphs in {time.perf_counter() - start:.0f}s: {dict(counts)}")
            summary = {"n": i + 1 - start_at, "graphs": [start_at, i + 1], "seed": seed,
                       "seconds": round(time.perf_counter() - start, 1), "counts": dict(counts),
                       "counts_export": dict(counts_export), "failures": failures}
            (out / f"summary_s{seed}_from{start_at}.json").write_text(json.dumps(summary, indent=2))
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("out/fuzz"))
    ap.add_argument("--tflite-every", type=int, default=10)
    ap.add_argument("--reload-every", type=int, default=10)
    ap.add_argument("--max-ops", type=int, default=6)
    ap.add_argument("--no-minimize", action="store_true")
    ap.add_argument("--start", type=int, default=0, help="first graph index (to split a long run)")
    ap.add_argument("--export-every", type=int, default=5, help="convert every N-th graph with capture='export' "
                    "(0: none)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    summary = run(args.n, args.seed, args.out, args.tflite_every, args.reload_every, args.max_ops,
                  not args.no_minimize, log=lambda m: print(m, flush=True), start_at=args.start,
                  export_every=args.export_every)
    print(json.dumps({"counts": summary["counts"], "counts_export": summary["counts_export"]}, indent=2))
    return 0 if set(summary["counts"]) <= {"ok", "refused"} else 1


if __name__ == "__main__":
    sys.exit(main())
