"""Write a conversion's files atomically: everything goes to a temporary folder beside the
output folder first and is moved in only when all of it was written."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any


def save_outputs(keras_model: Any, outdir: str | os.PathLike, report: dict, *, keras_file: bool = True,
                 saved_model: bool = True, extra_files: dict[str, bytes] | None = None) -> list[Path]:
    """Write model.keras, saved_model/, report.json and ``extra_files`` (file name -> bytes, e.g.
    model_int8.tflite) into ``outdir``; returns the paths written."""
    outdir = Path(outdir)
    outdir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{outdir.name}.partial-", dir=outdir.parent))
    try:
        if keras_file:
            keras_model.save(tmp / "model.keras")
        if saved_model:
            keras_model.export(str(tmp / "saved_model"), format="tf_saved_model", verbose=False)
        (tmp / "report.json").write_text(json.dumps(report, indent=2, default=str))
        for name, data in (extra_files or {}).items():
            if Path(name).name != name or name in ("model.keras", "saved_model", "report.json"):
                raise ValueError(f"extra file name {name!r} must be a plain file name other than tracer's own")
            (tmp / name).write_bytes(data)
        outdir.mkdir(exist_ok=True)
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
