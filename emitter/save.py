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
                keras_model.export(str(tmp / "saved_model"), format="tf_saved_model", verbose=False)
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
