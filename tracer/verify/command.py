"""``tracer verify OUTDIR`` and ``tracer convert --verify deep``: deep verification from the command line.

``tracer convert`` records in report.json how it built the model ("invocation"); ``tracer verify``
rebuilds the PyTorch model from that, converts it again to map every node to its Keras tensor,
runs :func:`tracer.verify.deep.deep_verify`, also checks the saved model.keras, and writes report.json
(under "verify") and report.html back into the folder. With dynamic axes (``--dynamic-axis``, default:
those the conversion was given) the fresh conversion, model.keras and model_fp32.tflite are also run at
two other sizes per dynamic axis, and the error at each size is printed and kept in report.json.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import keras
import torch

from tracer.dynamic import parity_shapes, parse_dynamic_shapes
from tracer.errors import InputError
from tracer.verify.deep import deep_verify
from tracer.verify.parity import ParityReport, check_parity
from tracer.verify.report import Problem
from tracer.verify.report_html import write_reports


def invocation(args: Any, shapes: list, dtypes: list) -> dict:
    """What ``tracer convert`` was given, stored in report.json so ``tracer verify`` can rebuild the model."""
    path, _, name = args.target.rpartition(":")
    return {"target": f"{Path(path).resolve()}:{name}", "init_args": args.init_args,
            "weights": str(Path(args.weights).resolve()) if args.weights else None,
            "input_shapes": shapes, "input_dtypes": dtypes, "channels_last_io": bool(args.channels_last_io),
            "inputs": [str(Path(f).resolve()) for f in args.inputs], "capture": getattr(args, "capture", "auto"),
            "dynamic_axis": list(getattr(args, "dynamic_axis", None) or [])}


def verify_for_convert(model: torch.nn.Module, result: Any, sample: tuple, extra: list, args: Any,
                       report: dict, say: Any) -> bool:
    """``tracer convert --verify deep``: the deep check into ``report["verify"]``; True on parity."""
    say("deep verification: every node, gradients")
    rep = deep_verify(model, result, sample, n_inputs=args.random_inputs, inputs=extra, tol=args.tol)
    report["verify"] = json.loads(rep.to_json())
    print(rep.summary())
    return rep.ok


def verify_outdir(args: Any, say: Any) -> int:
    """``tracer verify OUTDIR``: rebuild the PyTorch model from report.json, re-check, rewrite the reports."""
    outdir = Path(args.outdir)
    path = outdir / "report.json"
    if not path.is_file():
        raise InputError(f"{path} not found: OUTDIR must be a folder written by tracer convert")
    inv = json.loads(path.read_text()).get("invocation")
    if not inv:
        raise InputError(f"{path} does not record how the model was built (written by an older tracer); "
                         "convert again with this version")
    from tracer.inputs import load_inputs
    user = [load_inputs(f, len(inv["input_shapes"])) for f in args.inputs]
    dynamic, recorded = _dynamic_axes(args, inv)
    model, result, sample, keras_saved, notes = _rebuild(inv, outdir, say, dynamic)
    arrays = [t.detach().cpu().numpy() for t in sample]
    dims = parse_dynamic_shapes(dynamic, sample)
    sizes = parity_shapes([x.shape for x in arrays], dims)
    fixed = [d.name for d in dims if not all(place in recorded for place in d.places)]
    if fixed:
        notes.append(f"the saved files were converted with a fixed size on {', '.join(fixed)} (no --dynamic-axis "
                     "for it): checked at other sizes on the fresh conversion only")
    saved_sizes = parity_shapes([x.shape for x in arrays], [d for d in dims if d.name not in fixed])
    say("deep verification: every node, gradients")
    rep = deep_verify(model, result, sample, n_inputs=args.random_inputs, distribution=args.distribution,
                      inputs=user, tol=args.tol, node_tol=args.node_tol, gradients=not args.no_gradients,
                      grad_tol=args.grad_tol)
    rep.warnings += notes
    saved = outdir / "model.keras"
    lines = []
    if sizes:  # the deep check runs at the sample's size; the other sizes of the dynamic axes here
        lines.append(_check_sizes(rep, "conversion", check_parity(
            model, result.keras_model, arrays, result.input_layouts, result.output_layouts, n_random=0,
            tol=args.tol, sizes=sizes), "the fresh conversion"))
    if keras_saved is not None:  # the file itself must match PyTorch too
        parity = check_parity(model, keras_saved, arrays, result.input_layouts, result.output_layouts,
                              n_random=max(args.random_inputs, 1), extra=user, tol=args.tol, sizes=saved_sizes)
        rep.facts["saved_model_parity"] = parity.to_dict()
        if not parity.ok:
            rep.problems.append(Problem("saved_model", str(saved), "model.keras does not match PyTorch:\n"
                                        + parity.summary()))
        if saved_sizes:
            lines.append("  model.keras " + _size_line(parity))
    else:
        rep.warnings.append(f"{saved} not found (parity failed at conversion?): only a fresh conversion was checked")
    lite = outdir / "model_fp32.tflite"
    if saved_sizes and lite.is_file():
        lines.append(_check_sizes(rep, "tflite", _litert_parity(model, lite, result, arrays, args.tol, saved_sizes),
                                  lite.name))
    html = write_reports(outdir, json.loads(rep.to_json()))
    print(rep.summary())
    if lines:
        print(f"dynamic axes {', '.join(sorted({label.split('=')[0] for label, _ in sizes}))}: max abs error per size")
        print("\n".join(lines))
    print(f"wrote {html} and {path}")
    return rep.exit_code


def _dynamic_axes(args: Any, inv: dict) -> tuple[tuple[dict[int, str], ...] | None, set[tuple[int, int]]]:
    """The dynamic axes to check: ``--dynamic-axis`` of ``tracer verify``, else those ``tracer convert`` was
    given (report.json); and the (input, axis) places the saved files were converted with dynamic."""
    from tracer.options import parse_dynamic_axes  # the one parser of --dynamic-axis (checks it against the shapes)
    shapes, given = inv["input_shapes"], list(inv.get("dynamic_axis") or [])
    recorded = {(i, axis) for i, axes in enumerate(parse_dynamic_axes(given, shapes) or ()) for axis in axes}
    return parse_dynamic_axes(list(getattr(args, "dynamic_axis", None) or given), shapes), recorded


def _size_line(parity: ParityReport) -> str:
    """'sample 1.2e-07 ok, time=200 3.0e-08 ok, ...': each size's worst output (the sample's: every other trial)."""
    sized = [t for t in parity.trials if "=" in t.label]
    rest = [t for t in parity.trials if "=" not in t.label]
    parts = [("sample", rest)] if rest else []
    parts += [(t.label, [t]) for t in sized]
    return ", ".join(f"{label} {max((o.max_abs for t in ts for o in t.outputs), default=0.0):.3e} "
                     f"{'ok' if all(t.ok for t in ts) else 'FAIL'}" for label, ts in parts)


def _check_sizes(rep: Any, key: str, parity: ParityReport, what: str) -> str:
    """Record one parity run over the other sizes in the report (a problem per failing size); its line."""
    rep.facts[f"{key}_dynamic_sizes"] = parity.to_dict()
    for t in parity.trials:
        if not t.ok:
            worst = max(o.max_rel for o in t.outputs)
            rep.problems.append(Problem("saved_model" if key != "tflite" else "tflite", f"{what} at {t.label}",
                                        f"does not match PyTorch at {t.label} {t.input_shapes}: scaled error "
                                        f"{worst:.3e} > {parity.tolerance:g}"))
    return f"  {what} " + _size_line(parity)


def _litert_parity(model: torch.nn.Module, path: Path, result: Any, arrays: list, tol: float,
                   sizes: list) -> ParityReport:
    """The saved fp32 .tflite in LiteRT against PyTorch at the sample's size and the other sizes."""
    from tracer.emitter.save import signature_names
    from tracer.verify.litert import check_litert, keras_input_names
    report = check_litert(model, path.read_bytes(), "fp32", arrays, result.input_layouts, result.output_layouts,
                          keras_input_names(result.keras_model), n_random=0, tol=tol, sizes=sizes,
                          output_names=signature_names(result.keras_model.output))
    return report.parity


def _rebuild(inv: dict, outdir: Path, say: Any, dynamic: Any = None) -> tuple:
    """The PyTorch model as ``tracer convert`` built it, its fresh conversion (every node mapped to a Keras
    tensor), the sample input, the saved model.keras (or None) and notes on what could not be restored.

    Without ``--weights`` the model was converted with its initial random weights; they are taken
    back from model.keras through the parameter map (:func:`tracer.verify.gradcheck_params.restore_torch_weights`)
    and the model is converted again.
    """
    from tracer.api import convert_model
    from tracer.inputs import load_model, load_weights, make_sample
    say(f"rebuilding {inv['target']}")
    model = load_model(inv["target"], inv["init_args"])
    if inv.get("weights"):
        load_weights(model, inv["weights"])
    model.eval()  # as tracer convert compares it
    sample = make_sample(inv["input_shapes"], inv["input_dtypes"], inv.get("inputs") or [])
    options = dict(channels_last_io=inv.get("channels_last_io", False), check=False, capture=inv.get("capture") or "auto",
                   dynamic_shapes=dynamic)
    say("converting again to map every node to its Keras tensor")
    result = convert_model(model, sample, progress=say, **options)
    saved = outdir / "model.keras"
    keras_saved = keras.saving.load_model(saved) if saved.is_file() else None
    notes = []
    if not inv.get("weights"):
        if keras_saved is None:
            notes.append(f"no --weights recorded and no {saved}: PyTorch model rebuilt with fresh random weights")
        else:
            from tracer.verify.gradcheck_params import restore_torch_weights
            done, missing = restore_torch_weights(model, result.keras_model, keras_saved)
            notes.append(f"no --weights recorded: {len(done)} PyTorch tensors restored from {saved}"
                         + (f"; not restorable (fresh values): {', '.join(missing)}" if missing else ""))
            result = convert_model(model, sample, **options)
    return model, result, sample, keras_saved, notes
