"""Write a conversion's files atomically: everything goes to a temporary folder beside the
output folder first and is moved in only when all of it was written. What an earlier conversion
left there (tracer's own files only: model.keras, saved_model/, report.json, report.html,
model_*.tflite) is removed at the same moment, so one folder never mixes two conversions;
other files in the folder are left alone."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

OWN_FILES = ("model.keras", "saved_model", "report.json", "report.html")
OWN_PATTERNS = ("model_*.tflite",)


def own_outputs(outdir: Path) -> list[Path]:
    """The files and folders a tracer conversion writes that exist in ``outdir``."""
    found = [outdir / name for name in OWN_FILES if (outdir / name).exists()]
    return found + sorted(p for pattern in OWN_PATTERNS for p in outdir.glob(pattern))


def save_outputs(keras_model: Any, outdir: str | os.PathLike, report: dict, *, keras_file: bool = True,
                 saved_model: bool = True, extra_files: dict[str, bytes] | None = None,
                 progress: Callable[[str], None] | None = None) -> list[Path]:
    """Write model.keras, saved_model/, report.json and ``extra_files`` (file name -> bytes, e.g.
    model_int8.tflite) into ``outdir``, replacing an earlier conversion's files there; returns the
    paths written. ``progress`` (a ``tracer.progress.Progress`` or ``say(message)``) hears each file."""
    outdir = Path(outdir)
    outdir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{outdir.name}.partial-", dir=outdir.parent))
    step = _stepper(progress)
    try:
        if keras_file:
            with step("model.keras"):
                keras_model.save(tmp / "model.keras")
        if saved_model:
            with step("saved_model/"):
                export_saved_model(keras_model, tmp / "saved_model")
        (tmp / "report.json").write_text(json.dumps(report, indent=2, default=str))
        for name, data in (extra_files or {}).items():
            if Path(name).name != name or name in OWN_FILES:
                raise ValueError(f"extra file name {name!r} must be a plain file name other than tracer's own")
            (tmp / name).write_bytes(data)
        outdir.mkdir(exist_ok=True)
        for stale in own_outputs(outdir):  # an earlier conversion's files never stay beside this one's
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale)
            else:
                stale.unlink()
        written = []
        for item in sorted(tmp.iterdir()):
            dest = outdir / item.name
            if dest.is_dir():
                shutil.rmtree(dest)
            elif dest.exists():
                dest.unlink()
            os.replace(item, dest)
            written.append(dest)
        return written
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _stepper(progress: Callable[[str], None] | None) -> Callable[[str], Any]:
    """``with step(name):`` says what is being written and how long it took."""
    @contextlib.contextmanager
    def step(name: str) -> Iterator[None]:
        started = time.perf_counter()
        yield
        if progress is not None:
            progress(f"  {name} written in {time.perf_counter() - started:.2f}s")
    return step


# ---- outputs as the user wrote them: names of the leaves of an output structure ----------------

def output_paths(value: Any) -> list[str]:
    """Where each tensor of an output structure sits, in order: "0" for one tensor, "0", "1" for a
    tuple, the keys for a dict ("logits", "aux.0" for {"logits": x, "aux": (y, z)})."""
    if isinstance(value, dict):
        return [f"{k}{'.' + p if p != '0' or _nested(v) else ''}" for k, v in value.items() for p in output_paths(v)]
    if isinstance(value, (list, tuple)):
        return [f"{i}{'.' + p if _nested(v) else ''}" for i, v in enumerate(value) for p in output_paths(v)]
    return ["0"]


def _nested(value: Any) -> bool:
    return isinstance(value, (dict, list, tuple))


def output_leaves(value: Any) -> list[Any]:
    """The tensors of an output structure in the order of :func:`output_paths`."""
    if isinstance(value, dict):
        return [t for v in value.values() for t in output_leaves(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in output_leaves(v)]
    return [value]


def signature_names(value: Any) -> list[str]:
    """SavedModel / TFLite signature output names: a dict's keys ("aux_0" for nested entries), else
    output_0, output_1, ... (a SavedModel signature holds one flat dict of tensors)."""
    prefix = "" if isinstance(value, dict) else "output_"
    return [prefix + p.replace(".", "_") for p in output_paths(value)]


def export_saved_model(keras_model: Any, path: str | os.PathLike) -> None:
    """A SavedModel whose 'serving_default' calls the model with training=False and returns its
    outputs by :func:`signature_names` (the dict keys of a model with dict outputs)."""
    import keras
    import tensorflow as tf

    names = signature_names(keras_model.output)

    def serve(x: Any) -> dict[str, Any]:
        return dict(zip(names, output_leaves(keras_model(x, training=False))))

    archive = keras.export.ExportArchive()
    archive.track(keras_model)
    specs = [tf.TensorSpec(t.shape, dtype=t.dtype, name=t.name) for t in keras_model.inputs]
    archive.add_endpoint("serve", serve, [specs] if len(specs) > 1 else specs)
    archive.write_out(str(path), verbose=False)
