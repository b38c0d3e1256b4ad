"""Convert a zoo of timm architectures with random weights and report parity, time and Transposes.

Needs timm, which the project's own venv does not have: ``bash dev.sh zoo`` sets up
``.venv-zoo`` (torch, torchvision, timm and this project) and runs this script there.

Each model is converted in its own subprocess with a timeout, so one that hangs or exhausts
memory costs only its own row. The table has, for each model: whether parity held (fp32,
``max|keras - torch| <= 1e-5 * max(1, max|torch|)``), the largest absolute difference, the
conversion time, the number of Transpose ops, and for failures the reason: the unsupported
ops of an ``UnsupportedOpsError``, or the first line of any other error. Totals and the
missing ops grouped by how many models need them follow. Weights are timm's random
initialization with every constant-initialized tensor perturbed (:func:`perturb`).

    python bench/zoo.py                         # every model below
    python bench/zoo.py --models resnet18,vit_tiny_patch16_224 --timeout 300 --json out/zoo.json
    python bench/zoo.py --report out/zoo.json out/zoo2.json   # the table of saved runs, merged
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

# (timm name, family, input side, create_model kwargs): small inputs where the architecture allows
ZOO: list[tuple[str, str, int, dict]] = [
    ("resnet18", "cnn", 128, {}),
    ("resnet50", "cnn", 128, {}),
    ("seresnext26d_32x4d", "cnn", 128, {}),
    ("resnest14d", "cnn", 128, {}),
    ("res2net50_14w_8s", "cnn", 128, {}),
    ("mobilenetv2_100", "cnn", 128, {}),
    ("mobilenetv3_small_100", "cnn", 128, {}),
    ("mobilenetv3_large_100", "cnn", 128, {}),
    ("efficientnet_b0", "cnn", 128, {}),
    ("tf_efficientnet_lite0", "cnn", 128, {}),
    ("mixnet_s", "cnn", 128, {}),
    ("mnasnet_100", "cnn", 128, {}),
    ("fbnetc_100", "cnn", 128, {}),
    ("lcnet_050", "cnn", 128, {}),
    ("ghostnet_100", "cnn", 128, {}),
    ("rexnet_100", "cnn", 128, {}),
    ("regnetx_002", "cnn", 128, {}),
    ("regnety_002", "cnn", 128, {}),
    ("repvgg_a0", "cnn", 128, {}),
    ("mobileone_s0", "cnn", 128, {}),
    ("convnext_atto", "cnn", 128, {}),
    ("densenet121", "cnn", 128, {}),
    ("dla34", "cnn", 128, {}),
    ("hrnet_w18_small", "cnn", 128, {}),
    ("cspresnet50", "cnn", 128, {}),
    ("ese_vovnet19b_dw", "cnn", 128, {}),
    ("selecsls42b", "cnn", 128, {}),
    ("nf_resnet26", "cnn", 128, {}),
    ("vit_tiny_patch16_224", "vit", 96, {"img_size": 96}),
    ("deit_tiny_distilled_patch16_224", "vit", 96, {"img_size": 96}),
    ("swin_tiny_patch4_window7_224", "vit", 224, {}),
    ("cait_xxs24_224", "vit", 96, {"img_size": 96}),
    ("pit_ti_224", "vit", 224, {}),
    ("levit_128s", "vit", 224, {}),
    ("xcit_nano_12_p16_224", "vit", 96, {"img_size": 96}),
    ("crossvit_tiny_240", "vit", 240, {}),
    ("twins_pcpvt_small", "vit", 128, {}),
    ("twins_svt_small", "vit", 128, {}),
    ("tiny_vit_5m_224", "vit", 224, {}),
    ("poolformer_s12", "hybrid", 128, {}),
    ("mobilevit_xxs", "hybrid", 128, {}),
    ("mobilevitv2_050", "hybrid", 128, {}),
    ("coat_lite_tiny", "hybrid", 224, {}),
    ("convit_tiny", "hybrid", 224, {}),
    ("efficientformer_l1", "hybrid", 224, {}),
    ("efficientformerv2_s0", "hybrid", 224, {}),
    ("edgenext_xx_small", "hybrid", 128, {}),
    ("visformer_tiny", "hybrid", 224, {}),
    ("fastvit_t8", "hybrid", 128, {}),
    ("mixer_s16_224", "mlp", 96, {"img_size": 96}),
    ("resmlp_12_224", "mlp", 96, {"img_size": 96}),
    ("gmlp_ti16_224", "mlp", 96, {"img_size": 96}),
    ("sequencer2d_s", "mlp", 224, {}),
]

RESULT_TAG = "ZOO-RESULT "


@dataclass
class Row:
    model: str
    family: str
    input: int | str  # side of the square image (zoo) or the input's shape (external)
    status: str = "error"  # ok | mismatch | unsupported | error | timeout | setup
    params_m: float = 0.0
    max_abs: float | None = None
    max_rel: float | None = None
    seconds: float | None = None
    transposes: int | None = None
    capture: str = ""
    reason: str = ""
    missing_ops: list[str] = field(default_factory=list)


def convert_one(name: str, family: str, side: int, kwargs: dict, batch: int = 1) -> Row:
    """Build ``name`` with random weights and convert it (runs inside the child process)."""
    import timm
    import torch

    row = Row(name, family, side)
    try:
        torch.manual_seed(0)
        model = perturb(timm.create_model(name, pretrained=False, **kwargs)).eval()
        row.params_m = round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
        x = torch.randn(batch, 3, side, side, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            model(x)
    except Exception as e:  # the model itself, not the converter: reported as a setup failure
        row.status, row.reason = "setup", _first_line(e)
        return row
    return measure(row, model, x)


def measure(row: Row, model: "torch.nn.Module", sample: Any) -> Row:
    """Convert ``model`` on ``sample`` and fill ``row``: parity, max abs/scaled, seconds, Transposes,
    capture method, or the failure reason (the missing ops, or the error's first line). Shared with
    bench/external.py."""
    from tracer import convert_model
    from tracer.errors import UnsupportedOpsError

    start = time.perf_counter()
    try:
        result = convert_model(model, sample, n_random=1, raise_on_mismatch=False)
    except UnsupportedOpsError as e:
        row.status, row.missing_ops = "unsupported", [o["op"] for o in e.ops]
        row.reason = "no rule: " + ", ".join(row.missing_ops)
        return row
    except Exception as e:
        row.reason = f"{type(e).__name__}: {_first_line(e)}"
        return row
    finally:
        row.seconds = round(time.perf_counter() - start, 1)
    report = result.report
    row.status = "ok" if report.ok else "mismatch"
    checks = [e for t in report.trials for e in t.exactness]
    if checks:  # how far each side is from PyTorch in float64 on the failing inputs
        worst = max(checks, key=lambda e: e.keras)
        kind = "fp32-limited" if all(e.fp32_limited for e in checks) else "conversion error"
        row.reason = f"{kind}: vs float64, PyTorch fp32 {worst.torch_fp32:.1e}, Keras {worst.keras:.1e}"
    row.max_abs, row.max_rel = report.max_abs, report.max_rel
    row.transposes = result.transpose_count
    row.capture = result.facts()["capture"].get("method", "")
    return row


def perturb(model: "torch.nn.Module", seed: int = 0) -> "torch.nn.Module":
    """Make constant-initialized tensors random, so parity cannot pass on a dead branch.

    timm initializes classifier heads of several models to zeros (the output would be all zeros),
    layer scales to 1e-5 (residual branches nearly invisible), biases to zeros and BatchNorm
    statistics to (0, 1). Every parameter or BatchNorm statistic whose values are all equal gets
    noise: ``value + 0.1 * N(0, 1)``, running variances ``1 + U(0, 0.5)``.
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.numel() > 1 and torch.all(p == p.reshape(-1)[0]):
                p.add_(0.1 * torch.randn(p.shape, generator=g))
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.add_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(1 + 0.5 * torch.rand(m.running_var.shape, generator=g))
    return model


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    first = lines[0] if lines else text
    first = re.sub(r" at \S+:\d+\s+\(.*?\) with rule", " with rule", first)  # keep the node, drop the source
    cause = e.__cause__
    if cause is not None and str(cause).strip():
        first += f" <- {type(cause).__name__}: {str(cause).strip().splitlines()[0]}"
    return first[:500]


def run_child(entry: tuple, timeout: float, batch: int = 1) -> Row:
    """Convert one model in a subprocess; a timeout or a crash becomes that model's row."""
    name, family, side, kwargs = entry
    return child_row(os.path.abspath(__file__), [name, family, side, kwargs, batch], timeout, Row(name, family, side))


def child_row(script: str, payload: list, timeout: float, row: Row) -> Row:
    """Run ``script --child <payload as JSON>`` in a subprocess and read the Row it prints after
    RESULT_TAG; a timeout or a crash fills ``row`` (which names the model) instead."""
    cmd = [sys.executable, script, "--child", json.dumps(payload)]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONWARNINGS="ignore")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        row.status, row.seconds, row.reason = "timeout", timeout, f"over {timeout:.0f} s"
        return row
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            return type(row)(**json.loads(line[len(RESULT_TAG):]))  # zoo's Row or another bench's
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    row.status, row.reason = "error", f"child exited {proc.returncode}: {tail[:300]}"
    return row


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def table(rows: list[Row]) -> str:
    w = max([4] + [len(str(r.input)) for r in rows])
    head = f"{'model':34} {'family':6} {'in':>{w}} {'Mparams':>8} {'parity':11} {'max abs':>9} {'scaled':>9} " \
           f"{'sec':>6} {'Transp':>6}  reason"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r.model:34} {r.family:6} {str(r.input):>{w}} {r.params_m:>8.2f} {r.status:11} "
                     f"{_fmt(r.max_abs, '.2e'):>9} {_fmt(r.max_rel, '.2e'):>9} {_fmt(r.seconds, '.1f'):>6} "
                     f"{_fmt(r.transposes, 'd'):>6}  {r.reason}")
    return "\n".join(lines)


def totals(rows: list[Row]) -> str:
    n = len(rows)
    by_status = Counter(r.status for r in rows)
    ok = by_status.get("ok", 0)
    lines = [f"parity ok: {ok}/{n} ({100.0 * ok / max(n, 1):.0f}%)  "
             + "  ".join(f"{k}: {v}" for k, v in sorted(by_status.items()) if k != "ok")]
    for fam in sorted({r.family for r in rows}):
        sub = [r for r in rows if r.family == fam]
        lines.append(f"  {fam:6} {sum(r.status == 'ok' for r in sub)}/{len(sub)}")
    missing = Counter(op for r in rows for op in dict.fromkeys(r.missing_ops))
    if missing:
        lines.append("missing ops (number of models that need each):")
        for op, k in missing.most_common():
            users = ", ".join(r.model for r in rows if op in r.missing_ops)
            lines.append(f"  {k:3d}  {op}  ({users})")
    return "\n".join(lines)


def select(spec: str | None) -> list[tuple]:
    if not spec:
        return list(ZOO)
    known = {e[0]: e for e in ZOO}
    out = []
    for name in (s.strip() for s in spec.split(",") if s.strip()):
        out.append(known.get(name, (name, "other", 224, {})))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", help="comma-separated timm names (default: the whole zoo); names not in the "
                                     "zoo list are built with timm defaults at 224x224")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per model (default 600)")
    ap.add_argument("--batch", type=int, default=1, help="batch size of the sample input (default 1; the random "
                                                             "inputs of the parity check include another)")
    ap.add_argument("--json", metavar="PATH", help="also write the rows as JSON here")
    ap.add_argument("--report", nargs="+", metavar="JSON", help="print the table of saved --json runs (merged, "
                                                                 "the last file wins for a model) instead of running")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.report:
        _print_results(_load_rows(args.report))
        return 0
    if args.child:
        print(RESULT_TAG + json.dumps(asdict(convert_one(*json.loads(args.child)))), flush=True)
        return 0
    rows = []
    for entry in select(args.models):
        row = run_child(entry, args.timeout, args.batch)
        rows.append(row)
        print(f"[zoo] {row.model}: {row.status} {_fmt(row.seconds, '.1f')} s {row.reason}"[:200], flush=True)
        if args.json:
            _write_json(args.json, rows)
    _print_results(rows)
    return 0


def _print_results(rows: list[Row]) -> None:
    print()
    print(table(rows))
    print()
    print(totals(rows))


def _load_rows(paths: list[str]) -> list[Row]:
    """Rows of saved runs, one per model (the last file wins), in zoo order, unknown models last."""
    merged: dict[str, Row] = {}
    for path in paths:
        with open(path) as f:
            merged.update((d["model"], Row(**d)) for d in json.load(f))
    order = {e[0]: i for i, e in enumerate(ZOO)}
    return sorted(merged.values(), key=lambda r: order.get(r.model, len(order)))


def _write_json(path: str, rows: list[Row]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump([asdict(r) for r in rows], f, indent=1)
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
