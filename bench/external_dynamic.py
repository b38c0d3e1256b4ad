"""Convert public models once with dynamic axes and check parity at the sample's size and two others.

Issue 14's closing table: torchvision CNNs and dense heads over dynamic height and width, a
torchvision ViT (a clear refusal expected at other sizes), Hugging Face text encoders/decoders over a
dynamic sequence length (``torch.export.Dim`` with a max within the config's positions), HF audio
encoders over a dynamic time axis, torch's recurrent layers and the CRNN keyword spotter over a dynamic
time axis. The models are bench/external.py's builders (random weights, constant tensors perturbed,
BatchNorm statistics randomized); each converts once, in its own subprocess with a timeout, and is
checked in Keras and in fp32 LiteRT at every size (scaled error: max abs / max(1, max|y|), held to
1e-5). Needs torchvision and transformers, so it runs in ``.venv-zoo``::

    .venv-zoo/bin/python bench/external_dynamic.py --jobs 1
    .venv-zoo/bin/python bench/external_dynamic.py --models resnet18,hf_bert --json out/dyn.json --no-tflite
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.external import MODELS as EXTERNAL  # noqa: E402
from bench.external import _tokens, hf, rnn  # noqa: E402
from bench.zoo import RESULT_TAG, _first_line, _fmt, perturb  # noqa: E402
from bench.zoo import child_row as zoo_child_row  # noqa: E402

TOL = 1e-5  # fp32: max abs <= 1e-5 x max(1, max|y|)


def hw(sample: Any) -> tuple:
    return ({2: "h", 3: "w"},)


def axis(index: int, name: str, low: int | None = None, high: int | None = None) -> Callable[[Any], tuple]:
    """One dynamic axis of the first input: a name, or a torch.export.Dim when a range is given."""
    def spec(sample: Any) -> tuple:
        if low is None and high is None:
            return ({index: name},)
        import torch
        return ({index: torch.export.Dim(name, min=low or 2, max=high)},)
    return spec


def crnn_kws_example() -> tuple:
    """examples/crnn_kws.py (a conv front end, a 2-layer bidirectional GRU) on a (1, 1, 40, 100) log-mel map."""
    import torch

    from examples import crnn_kws
    return crnn_kws.build(), torch.randn(*crnn_kws.SAMPLE_SHAPE, generator=torch.Generator().manual_seed(0))


def fixed_arity(model: Any) -> Any:
    """``model`` behind ``forward(self, x, mask=None)`` when its forward takes ``*args`` (bench/external.py's
    ``Main``): tracer's torch.export fallback passes ``dynamic_shapes`` flat, which torch.export refuses for
    ``*args`` (a converter bug reported with issue 14's table; static conversion is unaffected)."""
    import inspect

    import torch
    params = inspect.signature(model.forward).parameters.values()
    if not any(p.kind is p.VAR_POSITIONAL for p in params):
        return model

    class FixedArity(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, x, mask=None):
            return self.inner(x) if mask is None else self.inner(x, mask)

    return FixedArity().eval()


def _ids_and_mask() -> tuple:
    """bench/external.py's 16 token ids and an attention mask with the last 3 positions padded."""
    import torch
    ids = _tokens()
    mask = torch.ones_like(ids)
    mask[:, -3:] = 0
    return ids, mask


def _masked(name: str) -> Callable:
    """bench/external.py's text model ``name`` (its config) called as model(input_ids, attention_mask)."""
    import inspect
    config = inspect.getclosurevars(EXTERNAL[name][1]).nonlocals
    return hf(config["model_cls"], config["config_cls"], _ids_and_mask, **config["config"])


def _ext(name: str) -> Callable:
    return EXTERNAL[name][1]


SEQ = axis(1, "seq", 2, 64)  # the text configs' 64 positions (RoBERTa's 66 less its padding offset of 2)


def seq_both(sample: Any) -> tuple:
    """One dynamic length shared by the token ids and the attention mask."""
    import torch
    seq = torch.export.Dim("seq", min=2, max=64)
    return ({1: seq}, {1: seq})


def hw32(sample: Any) -> tuple:
    """Height and width, each a multiple of 32."""
    return ({2: "h*32", 3: "w*32"},)


def swin_small_cfg() -> tuple:
    """torchvision's SwinTransformer (shifted windows, patch merging) in a small configuration, 64x64."""
    import torch
    from torchvision.models.swin_transformer import SwinTransformer
    model = SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 2], window_size=[4, 4],
                            stochastic_depth_prob=0.0, num_classes=10)
    return model, torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))

# name -> (family, builder, dynamic_shapes(sample), expected: "ok" or "refused")
MODELS: dict[str, tuple[str, Callable, Callable, str]] = {
    "resnet18": ("tv-cls", _ext("resnet18"), hw, "ok"),
    "mobilenet_v3_small": ("tv-cls", _ext("mobilenet_v3_small"), hw, "ok"),
    "efficientnet_b0": ("tv-cls", _ext("efficientnet_b0"), hw, "ok"),
    "regnet_y_400mf": ("tv-cls", _ext("regnet_y_400mf"), hw, "ok"),
    "shufflenet_v2_x0_5": ("tv-cls", _ext("shufflenet_v2_x0_5"), hw, "ok"),
    "deeplabv3_mobilenet_v3_large": ("tv-dense", _ext("deeplabv3_mobilenet_v3_large"), hw, "ok"),
    "lraspp_mobilenet_v3_large": ("tv-dense", _ext("lraspp_mobilenet_v3_large"), hw, "ok"),
    "vit_small_64": ("tv-cls", _ext("vit_small_64"), hw, "refused"),  # fixed image_size, learned positions
    "hf_bert": ("hf-text", _ext("hf_bert"), SEQ, "ok"),
    "hf_distilbert": ("hf-text", _ext("hf_distilbert"), SEQ, "ok"),
    "hf_roberta": ("hf-text", _ext("hf_roberta"), SEQ, "ok"),
    "hf_gpt2": ("hf-text", _ext("hf_gpt2"), SEQ, "ok"),
    "hf_t5_encoder": ("hf-text", _ext("hf_t5_encoder"), SEQ, "ok"),
    "hf_bert_mask": ("hf-text", _masked("hf_bert"), seq_both, "ok"),
    "hf_distilbert_mask": ("hf-text", _masked("hf_distilbert"), seq_both, "ok"),
    "hf_roberta_mask": ("hf-text", _masked("hf_roberta"), seq_both, "ok"),
    "hf_t5_encoder_mask": ("hf-text", _masked("hf_t5_encoder"), seq_both, "ok"),
    "hf_whisper_encoder": ("hf-audio", _ext("hf_whisper_encoder"), axis(2, "frames"), "refused"),  # fixed length
    "hf_wav2vec2": ("hf-audio", _ext("hf_wav2vec2"), axis(1, "samples", 400, 16000), "ok"),
    "lstm_batch_first": ("rnn", _ext("lstm_batch_first"), axis(1, "time"), "ok"),
    "lstm_2layer_bidir": ("rnn", _ext("lstm_2layer_bidir"), axis(1, "time"), "ok"),
    "gru_2layer": ("rnn", rnn("GRU", num_layers=2), axis(1, "time"), "ok"),
    "rnn_tanh": ("rnn", _ext("rnn_tanh"), axis(1, "time"), "ok"),
    "lstm_seq_first": ("rnn", _ext("lstm_seq_first"), axis(0, "time"), "ok"),  # (T, B, C): time is torch axis 0
    "crnn_kws": ("rnn", crnn_kws_example, axis(3, "time"), "ok"),
    "crnn_gru_last": ("rnn", _ext("crnn_kws"), axis(3, "time"), "ok"),
    # windowed attention: H and W multiples of 32 (patch 4, one merge, window 4), so every stage tiles its windows
    "swin_small_cfg": ("tv-cls", swin_small_cfg, hw32, "ok"),
    "hf_swin": ("hf-img", _ext("hf_swin"), hw32, "ok"),
}



@dataclass
class Row:
    model: str
    family: str
    expect: str = "ok"
    status: str = "error"  # ok | mismatch | refused (a clear refusal) | error | tflite-fail | timeout | setup
    axes: str = ""  # "h,w" or "seq[2..64]"
    axes_names: list[str] = field(default_factory=list)
    sample_sizes: list[int] = field(default_factory=list)  # each dynamic name's size in the sample
    sizes: list[str] = field(default_factory=list)  # "sample", "h=128", ... in the order of the errors
    keras: dict[str, float] = field(default_factory=dict)  # label -> max scaled error
    tflite: dict[str, float] = field(default_factory=dict)
    transposes: int | None = None  # Keras Transpose layers
    tflite_transposes: int | None = None  # TRANSPOSE ops in the fp32 .tflite
    seconds: float | None = None
    capture: str = ""
    reason: str = ""


def by_size(trials: list) -> dict[str, float]:
    """Max scaled error at the sample's size (every trial without '=') and at each other size."""
    out = {"sample": max((o.max_rel for t in trials if "=" not in t.label for o in t.outputs), default=0.0)}
    out.update({t.label: max((o.max_rel for o in t.outputs), default=0.0) for t in trials if "=" in t.label})
    return out


def reason(e: BaseException) -> str:
    """The error's type and first line; for a list ("3 operation(s) would fix ...:"), its first item too."""
    text = f"{type(e).__name__}: {_first_line(e)}"
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    if len(lines) > 1 and lines[0].endswith(":"):
        text = f"{type(e).__name__}: {lines[0]} {lines[1]}"
    return text[:600]


def refusal(e: BaseException) -> bool:
    """Whether ``e`` is tracer refusing the model (its own error, naming what and why) rather than a
    conversion that broke: the Keras model failing at another size, or a rule crashing inside Keras."""
    if type(e).__name__ not in ("ConversionError", "InputError", "UnsupportedOpsError"):
        return False
    text = str(e)
    if text.startswith("the converted Keras model fails"):
        return False
    return not text.startswith("while converting") or isinstance(e.__cause__, NotImplementedError)


def convert_one(name: str, tflite: bool = True, odd: bool = True) -> Row:
    """Build ``name``, convert it once with its dynamic axes, check Keras and fp32 LiteRT (in the child)."""
    import torch

    from examples.common import randomize_bn_stats
    from tracer.dynamic import parse_dynamic_shapes

    family, build, spec, expect = MODELS[name]
    row = Row(name, family, expect)
    dynamic: tuple = ()
    try:
        torch.manual_seed(0)
        model, sample = build()
        model = fixed_arity(randomize_bn_stats(perturb(model.eval())).eval())
        inputs = sample if isinstance(sample, tuple) else (sample,)
        with torch.no_grad():
            model(*inputs)
        dynamic = spec(sample)
        dims = parse_dynamic_shapes(dynamic, inputs)
    except Exception as e:  # the model or the spec itself, not the converter
        row.axes = ",".join(str(getattr(v, "__name__", v)) for d in dynamic if d for v in d.values())
        row.status, row.reason = ("refused" if type(e).__name__ == "InputError" else "setup"), reason(e)
        return row
    row.axes = ",".join(d.name + (f"[{d.low}..{d.high}]" if d.high else "") for d in dims)
    row.axes_names, row.sample_sizes = [d.name for d in dims], [d.size for d in dims]
    row.sizes = ["sample"] + [f"{d.name}={s}" for d in dims for s in d.others()]
    start = time.perf_counter()
    try:
        _convert(row, model, inputs, dynamic, dims, tflite, odd)
    except Exception as e:
        row.status, row.reason = ("refused" if refusal(e) else "error"), reason(e)
    finally:
        row.seconds = round(time.perf_counter() - start, 1)
    if row.status == "mismatch" and not row.reason:
        over = [f"{side} {', '.join(k for k, v in errs.items() if v > TOL)}"
                for side, errs in (("Keras", row.keras), ("TFLite", row.tflite)) if any(v > TOL for v in errs.values())]
        row.reason = f"over {TOL:g} at: " + "; ".join(over)
    return row


def odd_sizes(shapes: list[tuple], dims: list) -> list[tuple[str, list[tuple]]]:
    """(label, input shapes) at one more odd size per dynamic name besides the converter's own (2x, and 1.5x
    rounded up to odd): the sample + 1 (one more multiple for an axis declared "h*32"), the nearest size whose
    parity differs, where strided windows and padding that depend on the size's parity show up. [] where the
    range holds no such size."""
    from tracer.dynamic import resized_shapes
    out = []
    for d in dims:
        k = getattr(d, "multiple", 1)  # an axis declared a multiple ("h*32") is promised multiples only
        odd = d.size + k if (d.size // k) % 2 == 0 else d.size + 2 * k
        if odd not in d.others() and (d.high is None or odd <= d.high):
            out.append((f"{d.name}={odd}", resized_shapes(shapes, d, odd)))
    return out


def _convert(row: Row, model: Any, inputs: tuple, dynamic: tuple, dims: list, tflite: bool, odd: bool) -> None:
    from tracer import convert_model
    from tracer.dynamic import parity_shapes
    from tracer.verify.parity import check_parity

    x = [t.detach().cpu().numpy() for t in inputs]
    shapes = [a.shape for a in x]
    extra = odd_sizes(shapes, dims) if odd else []
    row.sizes = ["sample"] + [f"{d.name}={v}" for d in dims for v in d.others() + [
        int(lb.split("=")[1]) for lb, _ in extra if lb.startswith(d.name + "=")]]
    result = convert_model(model, inputs, dynamic_shapes=dynamic, n_random=1, raise_on_mismatch=False)
    row.keras, row.transposes = by_size(result.report.trials), result.transpose_count
    row.capture = result.facts()["capture"].get("method", "")
    row.status = "ok" if result.report.ok else "mismatch"
    if extra:
        model.eval()  # convert_model restores the mode it found
        try:
            more = check_parity(model, result.keras_model, x, result.input_layouts, result.output_layouts,
                                n_random=0, sizes=extra, graph=result.graph, node_tensors=result.node_tensors)
        except Exception as e:  # the Keras model fails at the odd size
            row.status, row.reason = "mismatch", f"Keras at {', '.join(lb for lb, _ in extra)}: {reason(e)}"
            return
        row.keras.update({k: v for k, v in by_size(more.trials).items() if k != "sample"})
        row.status = "ok" if result.report.ok and more.ok else "mismatch"
    if tflite:
        _litert(row, model, result, x, parity_shapes(shapes, dims) + extra)


def _litert(row: Row, model: Any, result: Any, x: list, sizes: list) -> None:
    """fp32 TFLite exported and run in LiteRT at the sample's size and each of ``sizes``."""
    from tracer.emitter.tflite import op_counts
    from tracer.verify.litert import export_and_check
    try:
        files, reports = export_and_check(model, result.keras_model, ("fp32",), x, result.input_layouts,
                                          result.output_layouts, n_random=1, sizes=sizes)
    except Exception as e:
        row.status, row.reason = "tflite-fail", reason(e)
        return
    row.tflite_transposes = op_counts(files["fp32"]).get("TRANSPOSE", 0)
    if "fp32" not in reports:  # Select TF ops: not run in LiteRT
        row.status, row.reason = "tflite-fail", "uses Select TF ops: " + ", ".join(op_counts(files["fp32"]))
        return
    row.tflite = by_size(reports["fp32"].parity.trials)
    if not reports["fp32"].ok:
        row.status = "mismatch"


def child_row(name: str, timeout: float, tflite: bool, odd: bool = True) -> Row:
    """Convert one model in a subprocess (bench/zoo.py's runner); a timeout or a crash becomes its row."""
    family, _, _, expect = MODELS[name]
    return zoo_child_row(os.path.abspath(__file__), [name, tflite, odd], timeout, Row(name, family, expect))


def _errors(errors: dict[str, float], sizes: list[str]) -> str:
    return "/".join(_fmt(errors.get(s), ".1e") for s in sizes) if errors else "-"


def _sizes(r: Row) -> str:
    """'h=64,128,96 w=64,128,96': each dynamic name at the sample's size, then the others tried."""
    names = dict.fromkeys(s.split("=")[0] for s in r.sizes[1:])
    sample = dict(zip(r.axes_names, r.sample_sizes))
    tried = {n: [str(sample.get(n, "?"))] + [s.split("=")[1] for s in r.sizes if s.startswith(n + "=")] for n in names}
    return " ".join(f"{n}={','.join(v)}" for n, v in tried.items())


def table(rows: list[Row]) -> str:
    err = max([17] + [len(_errors(e, r.sizes)) for r in rows for e in (r.keras, r.tflite)])
    size = max([21] + [len(_sizes(r)) for r in rows])
    head = (f"{'model':29} {'family':8} {'axes':20} {'sizes (sample,others)':{size}} {'Keras scaled err':{err}} "
            f"{'TFLite scaled err':{err}} {'Transp K/T':>10} {'sec':>6} {'status':11} reason")
    lines = [head, "(errors: max |keras - torch| / max(1, max|torch|) at the sample's size, then each other size "
                   "in the order of the sizes column)", "-" * len(head)]
    for r in rows:
        transp = f"{_fmt(r.transposes, 'd')}/{_fmt(r.tflite_transposes, 'd')}"
        status = r.status + ("" if (r.status == "ok") == (r.expect == "ok") else "!")
        lines.append(f"{r.model:29} {r.family:8} {r.axes:20} {_sizes(r):{size}} {_errors(r.keras, r.sizes):{err}} "
                     f"{_errors(r.tflite, r.sizes):{err}} {transp:>10} {_fmt(r.seconds, '.1f'):>6} {status:11} "
                     f"{r.reason[:220]}")
    return "\n".join(lines)


def totals(rows: list[Row]) -> str:
    ok = [r for r in rows if r.status == "ok"]
    expected = [r for r in rows if (r.status == "ok") == (r.expect == "ok")]
    within = [r for r in ok if all(v <= TOL for v in [*r.keras.values(), *r.tflite.values()])]
    return (f"parity at every size: {len(ok)}/{len(rows)} (all within {TOL:g}: {len(within)});  as expected "
            f"(ok, or a refusal where one is expected): {len(expected)}/{len(rows)};  '!' marks the others")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", help="comma-separated names (default: all); " + ", ".join(MODELS))
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per model (default 600)")
    ap.add_argument("--jobs", type=int, default=1, help="models converted at once, each in its own process (default 1)")
    ap.add_argument("--json", metavar="PATH", help="also write the rows as JSON here")
    ap.add_argument("--no-tflite", action="store_true", help="check Keras only (no fp32 LiteRT)")
    ap.add_argument("--no-odd", action="store_true",
                    help="only the converter's own sizes (2x, 1.5x the sample's), not one odd size per axis too")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        name, tflite, odd = json.loads(args.child)
        print(RESULT_TAG + json.dumps(asdict(convert_one(name, tflite, odd))), flush=True)
        return 0
    names = [n.strip() for n in (args.models or ",".join(MODELS)).split(",") if n.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        ap.error(f"unknown models: {', '.join(unknown)}")
    done: dict[str, Row] = {}

    def one(name: str) -> None:
        row = child_row(name, args.timeout, not args.no_tflite, not args.no_odd)
        done[name] = row
        print(f"[external_dynamic] {row.model}: {row.status} {_fmt(row.seconds, '.1f')} s {row.reason}"[:240],
              flush=True)
        if args.json:
            _write_json(args.json, [done[n] for n in names if n in done])

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        list(pool.map(one, names))
    rows = [done[n] for n in names]
    print()
    print(table(rows))
    print()
    print(totals(rows))
    return 0


def _write_json(path: str, rows: list[Row]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump([asdict(r) for r in rows], f, indent=1)
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    sys.exit(main())
