"""``tracer convert``'s options, in one place for the command line (tracer/cli.py) and the batch
manifest (tracer/batch/manifest.py), which reads each option's kind, choices and flag from here to
check a manifest's ``options:`` and to spell them as ``tracer convert`` arguments.

Also the one parser of ``--dynamic-axis`` values (convert's, and ``tracer verify``'s in
tracer/verify/command.py). Light: argparse and tracer.errors only (no torch, no TensorFlow), so that
all of them import it without importing each other.
"""
from __future__ import annotations

import argparse

from tracer.errors import InputError


def add_convert_options(c: argparse.ArgumentParser) -> None:
    """Every argument of ``tracer convert``, in the order ``--help`` lists them."""
    c.add_argument("target", help="path/to/module.py:ClassOrFactory")
    c.add_argument("--input-shape", action="append", required=True, metavar="N,C,H,W",
                   help="shape of one forward() input, batch first; repeat for several inputs")
    c.add_argument("--input-dtype", action="append", default=None, metavar="DTYPE",
                   help="dtype per input (default float32), e.g. int64 for token ids")
    c.add_argument("--init-args", default=None, metavar="JSON",
                   help="constructor/factory arguments: a JSON object (keywords) or list (positional)")
    c.add_argument("--weights", default=None, metavar="FILE.pt",
                   help="state_dict to load (torch.load with weights_only=True; strict key match)")
    c.add_argument("-o", "--output", default="tracer_out", metavar="OUTDIR",
                   help="output folder: model.keras, saved_model/, report.json (default: tracer_out)")
    c.add_argument("--channels-last-io", action="store_true",
                   help="image inputs/outputs in NHWC (TensorFlow's layout) instead of PyTorch's NCHW")
    c.add_argument("--fold-bn", action="store_true",
                   help="inference model: fold BatchNorm into the conv/linear before it and sum parallel "
                        "conv branches of one input into one conv (RepVGG blocks become one 3x3 conv), absorb "
                        "channel shuffles into the weights; "
                        "fewer layers, faster. By default every layer stays trainable")
    c.add_argument("--inputs", action="append", default=[], metavar="FILE",
                   help=".npy (one input) or .npz/.pt (several, in order) to also compare on; repeatable")
    c.add_argument("--random-inputs", type=int, default=3, metavar="N", help="random inputs to compare on (default 3)")
    c.add_argument("--tol", type=float, default=1e-5, help="parity tolerance (default 1e-5, fp32)")
    c.add_argument("--capture", choices=["auto", "fx", "export"], default="auto",
                   help="auto (default): torch.fx, and torch.export when fx cannot trace the model "
                        "(data-dependent control flow, shape asserts); fx or export force one")
    c.add_argument("--dynamic-axis", action="append", default=[], metavar="INPUT:AXIS[=NAME[*MULTIPLE]]",
                   help="a torch axis (besides the batch) of input INPUT (0-based) whose size may change, e.g. "
                        "0:3=time; axes sharing a NAME are one size; NAME*MULTIPLE (0:2=h*8) says the size is "
                        "always a multiple of MULTIPLE (a window size, a total stride): the input's size must "
                        "be one and the model is checked at other multiples only; repeatable")
    c.add_argument("--no-saved-model", action="store_true", help="skip the TensorFlow SavedModel export")
    c.add_argument("--keep-on-mismatch", action="store_true", help="write the model even when parity fails")
    _add_tflite_arguments(c)
    c.add_argument("--verify", choices=["basic", "deep"], default="basic",
                   help="basic: outputs only (default); deep: also every intermediate node, gradients and one "
                        "training step, written to report.html and report.json")
    c.add_argument("--debug", action="store_true", help="show tracebacks")
    c.add_argument("-q", "--quiet", action="store_true", help="print only errors and the verdict")


def _add_tflite_arguments(c: argparse.ArgumentParser) -> None:
    t = c.add_argument_group("LiteRT / TFLite export", "each kind is written as model_KIND.tflite and run in "
                             "LiteRT on the parity inputs: fp32 must match, the others are reported")
    t.add_argument("--tflite", action="append", default=[], metavar="KIND", choices=["fp32", "fp16", "dynamic", "int8"],
                   help="fp32, fp16, dynamic (int8 weights) or int8 (full integer); repeatable")
    t.add_argument("--calib", default=None, metavar="FILE.npy|DIR",
                   help="int8 calibration samples in PyTorch layout: a .npy of N samples, or a folder of "
                        ".npy/.npz/image files (images scaled to [0, 1])")
    t.add_argument("--int8-io", action="store_true", help="int8 model inputs/outputs (default: float)")
    t.add_argument("--random-calibration", action="store_true",
                   help="int8 without --calib: calibrate on random inputs (accuracy is then meaningless)")
    t.add_argument("--allow-flex", action="store_true", help="allow Select TF (Flex) ops in the .tflite files")


def convert_options() -> dict[str, argparse.Action]:
    """``tracer convert``'s arguments by destination name (``tol``, ``fold_bn``, ...), from a parser of their own."""
    parser = argparse.ArgumentParser(prog="tracer convert", add_help=False)
    add_convert_options(parser)
    return {a.dest: a for a in parser._actions}


def parse_dynamic_axes(texts: list[str], shapes: list[list[int]]) -> tuple[dict[int, str], ...] | None:
    """``--dynamic-axis INPUT:AXIS[=NAME[*MULTIPLE]]`` values as ``convert_model``'s ``dynamic_shapes``
    (None for none); a multiple stays in the name (``"h*8"``), which tracer/dynamic.py reads."""
    if not texts:
        return None
    found: list[dict[int, str]] = [{} for _ in shapes]
    for text in texts:
        spec, _, name = text.partition("=")
        where, sep, axis = spec.partition(":")
        try:
            i, a = int(where), int(axis)
        except ValueError:
            raise InputError(f"--dynamic-axis {text!r} must be INPUT:AXIS[=NAME[*MULTIPLE]], e.g. 0:3=time "
                             "or 0:2=h*8") from None
        if not sep or not 0 <= i < len(shapes) or not -len(shapes[i]) <= a < len(shapes[i]):
            raise InputError(f"--dynamic-axis {text!r}: there is no input {where} with an axis {axis} "
                             f"(input shapes {', '.join('x'.join(map(str, s)) for s in shapes)})")
        a %= len(shapes[i])
        if a == 0:
            raise InputError(f"--dynamic-axis {text!r}: axis 0 is the batch axis, which is always dynamic")
        found[i][a] = _axis_name(text, name, f"input{i}_axis{a}")
    return tuple(found)


def _axis_name(text: str, name: str, default: str) -> str:
    """``NAME``, ``NAME*MULTIPLE`` or ``*MULTIPLE`` checked; the default name where none is given."""
    base, star, times = name.partition("*")
    if base and not base.isidentifier():
        raise InputError(f"--dynamic-axis {text!r}: the name {base!r} must be an identifier (letters, digits, _)")
    if star and (not times.isdigit() or int(times) < 1):
        raise InputError(f"--dynamic-axis {text!r}: after '*' comes the number the size is a multiple of, a whole "
                         f"number >= 1 (e.g. 0:2=h*8), not {times!r}")
    return f"{base or default}*{int(times)}" if star else base or default
