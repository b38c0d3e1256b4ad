"""``tracer verify OUTDIR`` and ``tracer convert --verify deep``: deep verification from the command line.

``tracer convert`` records in report.json how it built the model ("invocation"); ``tracer verify``
rebuilds the PyTorch model from that, converts it again to map every node to its Keras tensor,
runs :func:`tracer.verify.deep.deep_verify`, also checks the saved model.keras, and writes report.json
(under "verify") and report.html back into the folder.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import keras
import torch

from tracer.errors import InputError
from tracer.verify.deep import deep_verify
from tracer.verify.report import Problem
from tracer.verify.report_html import write_reports


def invocation(args: Any, shapes: list, dtypes: list) -> dict:
    """What ``tracer convert`` was given, stored in report.json so ``tracer verify`` can rebuild the model."""
    path, _, name = args.target.rpartition(":")
    return {"target": f"{Path(path).resolve()}:{name}", "init_args": args.init_args,
            "weights": str(Path(args.weights).resolve()) if args.weights else None,
            "input_shapes": shapes, "input_dtypes": dtypes, "channels_last_io": bool(args.channels_last_io),
            "inputs": [str(Path(f).resolve()) for f in args.inputs], "capture": getattr(args, "capture", "auto")}


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
    model, result, sample, keras_saved, notes = _rebuild(inv, outdir, say)
    say("deep verification: every node, gradients")
    rep = deep_verify(model, result, sample, n_inputs=args.random_inputs, distribution=args.distribution,
                      inputs=user, tol=args.tol, node_tol=args.node_tol, gradients=not args.no_gradients,
                      grad_tol=args.grad_tol)
    rep.warnings += notes
    saved = outdir / "model.keras"
    if keras_saved is not None:  # the file itself must match PyTorch too
        from tracer.verify.parity import check_parity
        arrays = [t.detach().cpu().numpy() for t in sample]
        parity = check_parity(model, keras_saved, arrays, result.input_layouts, result.output_layouts,
                              n_random=max(args.random_inputs, 1), extra=user, tol=args.tol)
        rep.facts["saved_model_parity"] = parity.to_dict()
        if not parity.ok:
            rep.problems.append(Problem("saved_model", str(saved), "model.keras does not match PyTorch:\n"
                                        + parity.summary()))
    else:
        rep.warnings.append(f"{saved} not found (parity failed at conversion?): only a fresh conversion was checked")
    html = write_reports(outdir, json.loads(rep.to_json()))
    print(rep.summary())
    print(f"wrote {html} and {path}")
    return rep.exit_code


def _rebuild(inv: dict, outdir: Path, say: Any) -> tuple:
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
    options = dict(channels_last_io=inv.get("channels_last_io", False), check=False, capture=inv.get("capture") or "auto")
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
