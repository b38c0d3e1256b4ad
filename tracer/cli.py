"""Command line: ``tracer convert path/to/module.py:Model --input-shape 1,3,224,224 -o out/``.

Exit codes: 0 converted with parity; 1 converted, parity failed; 2 bad input (file, name,
shapes, weights); 3 could not convert (unsupported ops, a rule failed).
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import warnings
from typing import Any

from pathlib import Path

from tracer.backends import exit_on_interrupt, import_quietly
from tracer.inputs import (check_dtypes, check_file, check_output_dir, check_runs, check_target, check_weights_file,
                           load_inputs, load_model, load_weights, make_sample, parse_init, parse_shape)
from tracer.options import add_convert_options, parse_dynamic_axes  # noqa: F401 (tracer.cli.parse_dynamic_axes)
from tracer.progress import Progress

EXIT_OK, EXIT_PARITY, EXIT_INPUT, EXIT_CONVERT, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
INTERRUPTED, NOTHING_WRITTEN = "interrupted", "; nothing written"

EPILOG = """\
examples:
  tracer convert examples/repvgg.py:build_a0 --input-shape 1,3,32,32 -o out/repvgg
      a factory's model; writes out/repvgg/model.keras, saved_model/, report.json
  tracer convert models.py:ResNet --init-args '{"depth": 18}' --weights resnet.pt \\
      --input-shape 1,3,224,224 --channels-last-io -o out/resnet
      build ResNet(depth=18), load a state_dict, take NHWC input in the Keras model
  tracer convert net.py:TwoInputs --input-shape 1,3,64,64 --input-shape 1,6 -o out/net
      one --input-shape per forward() argument, in order
  tracer convert bert.py:Encoder --input-shape 1,128 --input-dtype int64 -o out/bert
      token ids: integer inputs
  tracer convert net.py:Net --input-shape 1,3,224,224 --fold-bn --tflite fp32 --tflite int8 \\
      --calib samples/ -o out/mobile
      inference model for phones: BatchNorm folded, fp32 and int8 .tflite files checked in
      LiteRT; int8 is calibrated on your samples (PyTorch layout, preprocessed as in training)
  tracer convert net.py:Net --input-shape 1,3,64,64 --inputs batch.npy --verify deep -o out/net
      also compare on your own inputs, then every node, the gradients and one training step
      (report.html shows where a mismatch starts)
  tracer verify out/net
      re-run the deep checks on a folder written by tracer convert

parity: the PyTorch model and the Keras model run on the sample input (a fixed normal
draw, or the first --inputs file), --random-inputs random ones (the last with another
batch size) and your --inputs files; each output must satisfy
max|diff| <= tol * max(1, max|y|).

progress: each stage (start-up, capture, passes, emission, parity, tflite, verify, writing)
is shown with its time, as a live bar on a terminal and as plain lines otherwise; the last
line gives every stage's time and the total. -q prints only errors and the verdict.

exit codes: 0 converted with parity, 1 parity failed (report.json written, model not
unless --keep-on-mismatch), 2 bad input (checked before anything is imported or
converted), 3 could not convert (e.g. unsupported ops: the message lists each op, its
source line and a rule stub to add), 130 interrupted (Ctrl-C).
"""

TOP_EPILOG = """\
examples:
  tracer convert net.py:Net --input-shape 1,3,224,224 -o out/net     convert and check parity
  tracer convert --help                                             every option, more examples
  tracer verify out/net                                             deep checks of a conversion
  tracer batch models.yaml -o out/                                  many models, one process each
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tracer", description="Convert PyTorch models to Keras 3 / TensorFlow "
                                "with proof that both compute the same thing.", epilog=TOP_EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("convert", help="convert a model defined in a Python file",
                       description="Convert module.py:Name (an nn.Module class or a factory returning one) "
                                   "to Keras and check parity.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_convert_options(c)
    _add_verify_command(sub)
    from tracer.batch.command import add_parser as add_batch_command  # light: no torch / TensorFlow
    add_batch_command(sub)
    return p


def _add_verify_command(sub: Any) -> None:
    v = sub.add_parser("verify", help="re-run the deep checks on a conversion output folder",
                       description="Rebuild the PyTorch model recorded in OUTDIR/report.json, compare it node by "
                                   "node and in training mode with the conversion, and write OUTDIR/report.html.")
    v.add_argument("outdir", metavar="OUTDIR", help="a folder written by tracer convert")
    v.add_argument("--random-inputs", type=int, default=3, metavar="N", help="random inputs (default 3)")
    v.add_argument("--distribution", choices=["normal", "uniform"], default="normal",
                   help="random inputs: standard normal (default) or uniform in [0, 1)")
    v.add_argument("--inputs", action="append", default=[], metavar="FILE",
                   help=".npy (one input) or .npz/.pt (several, in order) to also compare on; repeatable")
    v.add_argument("--dynamic-axis", action="append", default=[], metavar="INPUT:AXIS[=NAME]",
                   help="also check at other sizes of this axis (as for convert; default: the axes convert was given)")
    v.add_argument("--tol", type=float, default=1e-5, help="output tolerance (default 1e-5, fp32)")
    v.add_argument("--node-tol", type=float, default=None, help="per-node tolerance (default: --tol)")
    v.add_argument("--grad-tol", type=float, default=1e-3, help="gradient tolerance, relative (default 1e-3)")
    v.add_argument("--no-gradients", action="store_true", help="skip the training-mode checks")
    v.add_argument("--debug", action="store_true", help="show tracebacks")
    v.add_argument("-q", "--quiet", action="store_true", help="print only errors and the verdict")


def _verify_command(args: argparse.Namespace) -> int:
    from tracer.errors import InputError
    report = Path(args.outdir) / "report.json"
    if not report.is_file():  # before TensorFlow is imported, like every bad input
        raise InputError(f"{report} not found: OUTDIR must be a folder written by tracer convert")
    for path in args.inputs:
        check_file(path, "inputs")
    say = (lambda m: None) if args.quiet else (lambda m: print(f"[tracer] {m}", file=sys.stderr, flush=True))
    with exit_on_interrupt(f"tracer: {INTERRUPTED}{NOTHING_WRITTEN}", EXIT_INTERRUPTED):  # see _until_writing;
        import_quietly()                                   # the reports are written last (report.json whole)
        from tracer.verify.command import verify_outdir
        return verify_outdir(args, say)


def _tflite_options(args: argparse.Namespace) -> dict:
    return {"tflite": args.tflite, "calib": args.calib, "int8_io": args.int8_io,
            "random_calibration": args.random_calibration, "allow_flex": args.allow_flex}


def _tflite_outputs(result: Any) -> tuple[dict, dict[str, bytes]]:
    """The report.json "tflite" section and the files to write, for each exported kind."""
    files = {f"model_{kind}.tflite": data for kind, data in result.tflite.items()}
    section = {kind: {"file": f"model_{kind}.tflite", "size_bytes": len(data),
                      **(result.tflite_reports[kind].to_dict() if kind in result.tflite_reports else {"checked": False})}
               for kind, data in result.tflite.items()}
    return section, files


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    track = Progress(quiet=args.quiet)
    try:
        with warnings.catch_warnings():
            if not args.debug:
                warnings.showwarning = _warning_line
            if args.command == "batch":
                from tracer.batch.command import main as batch_main
                return batch_main(args)
            if args.command == "verify":
                return _verify_command(args)
            return _convert(args, track, exit_on_ctrl_c=True)
    except KeyboardInterrupt:
        track.close()
        wrote = "writing" in track.times or track.current == "writing"
        print(f"tracer: {INTERRUPTED}{'' if wrote else NOTHING_WRITTEN}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # one clear line (or the rule listing) unless --debug
        track.close()
        from tracer.errors import InputError, TracerError
        if args.debug:
            raise
        code = EXIT_INPUT if isinstance(exc, InputError) else EXIT_CONVERT
        kind = "error" if isinstance(exc, TracerError) else f"internal error ({type(exc).__name__})"
        print(f"tracer: {kind}: {exc}", file=sys.stderr)
        if not isinstance(exc, TracerError):
            print("  rerun with --debug for the traceback", file=sys.stderr)
        return code
    finally:
        track.close()


def _warning_line(message: Any, category: type, filename: str, lineno: int, file: Any = None,
                  line: str | None = None) -> None:
    """A warning on the command line: one "tracer: warning:" line, without Python's source line."""
    print(f"tracer: warning: {message}", file=sys.stderr)


def run_convert(argv: list[str]) -> int:
    """``tracer convert ARGV`` without the one-line error handling: exceptions propagate (for
    ``tracer batch``, which classifies them). Returns the exit code of a finished conversion."""
    args = build_parser().parse_args(["convert", *argv])
    track = Progress(quiet=args.quiet)
    try:
        return _convert(args, track)
    finally:
        track.close()


def check_convert_args(args: argparse.Namespace) -> tuple[list[list[int]], list[str]]:
    """Everything about the command line that can be wrong, checked before torch or TensorFlow is
    imported (each error is one line, exit 2, in well under a second): shapes, dtypes, the model
    file, --init-args, the files named, the TFLite options and the output folder."""
    from tracer.errors import InputError
    shapes = [parse_shape(s) for s in args.input_shape]
    dtypes = args.input_dtype or ["float32"] * len(shapes)
    check_dtypes(dtypes, len(shapes))
    check_target(args.target)
    parse_init(args.init_args)
    if args.weights:
        check_weights_file(args.weights)
    for path in args.inputs:
        check_file(path, "inputs")
    if args.int8_io and "int8" not in args.tflite:
        raise InputError("--int8-io applies to the int8 model only; add --tflite int8")
    if "int8" in args.tflite and args.calib is None and not args.random_calibration:
        raise InputError("--tflite int8 needs calibration data: --calib FILE.npy|DIR with real samples "
                         "(--random-calibration calibrates on noise, which makes the int8 accuracy meaningless)")
    if args.calib is not None and not Path(args.calib).exists():
        raise InputError(f"calibration path {args.calib} does not exist")
    check_output_dir(args.output)
    parse_dynamic_axes(args.dynamic_axis, shapes)
    return shapes, dtypes


def _convert(args: argparse.Namespace, track: Progress, exit_on_ctrl_c: bool = False) -> int:
    shapes, dtypes = check_convert_args(args)
    with _until_writing(track, exit_on_ctrl_c):
        result, report, ok, deep_ok = _convert_and_check(args, track, shapes, dtypes)
    _write(args, track, result, report, keep=ok or args.keep_on_mismatch)
    facts = result.facts()
    track.close()
    print(f"converted in {track.total():.2f}s: {facts['nodes']} ops, {facts['transpose_ops']} Transpose, "
          f"{facts['keras_params']:,} parameters -> {args.output}/")
    if not args.quiet:
        print(track.summary())
    return EXIT_OK if ok and deep_ok else EXIT_PARITY


def _convert_and_check(args: argparse.Namespace, track: Progress, shapes: list, dtypes: list) -> tuple:
    """Everything before the first file is written: (result, report, parity ok, deep checks ok)."""
    with track.stage("start-up", "importing torch and TensorFlow, building the model"):
        model = load_model(args.target, args.init_args)  # torch only: a model that does not build or fit
        if args.weights:                                 # is refused before TensorFlow loads
            load_weights(model, args.weights)
        sample = make_sample(shapes, dtypes, args.inputs)
        check_runs(model, sample, shapes)
        extra = [load_inputs(f, len(shapes)) for f in args.inputs]
        import_quietly()
        from tracer.api import convert_model
    result = convert_model(model, sample, channels_last_io=args.channels_last_io, fold_bn=args.fold_bn,
                           n_random=args.random_inputs,
                           extra_inputs=extra, tol=args.tol, raise_on_mismatch=False, progress=track, capture=args.capture,
                           dynamic_shapes=parse_dynamic_axes(args.dynamic_axis, shapes), **_tflite_options(args))
    report = {"target": args.target, "input_shapes": shapes, "parity": result.report.to_dict(),
              "conversion": result.facts(), "invocation": _invocation(args, shapes, dtypes)}
    tflite_section, _ = _tflite_outputs(result)
    if tflite_section:
        report["tflite"] = tflite_section
    print(result.report.summary())
    for tflite_report in result.tflite_reports.values():
        print(tflite_report.summary())
    ok = result.report.ok and all(r.ok for r in result.tflite_reports.values())
    deep_ok = True
    if args.verify == "deep":  # the model is written on output parity; the exit code includes the deep checks
        from tracer.verify.command import verify_for_convert
        with track.stage("verify", "every node, gradients and one training step"):
            deep_ok = verify_for_convert(model, result, sample, extra, args, report, track)
    return result, report, ok, deep_ok


def _write(args: argparse.Namespace, track: Progress, result: Any, report: dict, keep: bool) -> None:
    from tracer.emitter.save import save_outputs
    _, tflite_files = _tflite_outputs(result)
    files = ("model.keras" + ("" if args.no_saved_model else ", saved_model/") + ", " if keep else "") + "report.json"
    with track.stage("writing", f"{args.output}/ ({files}{''.join(', ' + f for f in tflite_files) if keep else ''})"):
        report["stage_seconds"] = {k: round(v, 3) for k, v in track.times.items()}
        report["total_seconds"] = round(track.total(), 3)  # up to writing; the printed total includes it
        if keep:
            save_outputs(result.keras_model, args.output, report, saved_model=not args.no_saved_model,
                         extra_files=tflite_files, progress=track)
        else:
            save_outputs(result.keras_model, args.output, report, keras_file=False, saved_model=False)
        if args.verify == "deep":
            from tracer.verify.report_html import write_html
            write_html(args.output, report)
    if not keep:
        print(f"tracer: parity failed; wrote only {args.output}/report.json "
              "(--keep-on-mismatch writes the model too)", file=sys.stderr)


def _until_writing(track: Progress, exit_now: bool) -> Any:
    """Ctrl-C before the first file is written: one line and exit 130 at once (tracer.backends.exit_on_interrupt).
    torch and TensorFlow import lazily all along (TensorFlow at start-up, sympy and torch._dynamo
    in capture, ...) and a KeyboardInterrupt raised inside those imports does not always unwind: it
    was swallowed (the conversion went on and wrote its files) or left half-imported modules behind
    (RecursionError or AttributeError, exit 3), in the TFLite export too. From writing on, it unwinds
    as usual (save_outputs removes its partial folder). ``tracer batch``'s workers (run_convert) keep
    the KeyboardInterrupt, which they report as their outcome."""
    if not exit_now:
        return contextlib.nullcontext()
    return exit_on_interrupt(f"tracer: {INTERRUPTED}{NOTHING_WRITTEN}", EXIT_INTERRUPTED, before=track.close)


def _invocation(args: argparse.Namespace, shapes: list, dtypes: list) -> dict:
    from tracer.verify.command import invocation  # what `tracer verify OUTDIR` needs to rebuild the model
    return invocation(args, shapes, dtypes)


if __name__ == "__main__":
    sys.exit(main())
