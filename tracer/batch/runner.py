"""Run a manifest: skip what is done, convert the rest in isolated processes (local threads or Ray
tasks), place each result in ``OUT/<name>/`` and write ``OUT/summary.json`` and ``OUT/summary.html``.

Every entry ends with one status. A finished entry's folder holds what ``tracer convert`` writes,
its ``convert.log`` and ``batch.json`` (its summary record and resume key). An entry is skipped on a
rerun when its key (the entry as written, defaults merged, the model's source file, the weights
file and tracer's version, by content) is unchanged, its last status is one the same inputs give
again (ok, parity_failed, bad_input, unsupported: not crashed or timeout) and its files are all there.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Callable, Sequence

from tracer.batch.isolate import LOG, convert_isolated, kill_running
from tracer.batch.manifest import Entry, ManifestError, load

STATUSES = ("ok", "parity_failed", "bad_input", "unsupported", "crashed", "timeout")
REPEATABLE = {"ok", "parity_failed", "bad_input", "unsupported"}  # the same inputs give the same status
RECORD = "batch.json"
WORK = ".work"
Progress = Callable[[dict, int, int], None]  # (record, done, total)


def run(manifest: str | Path | Sequence[Entry], out: str | Path, *, workers: int = 1, ray: str | None = None,
        force: bool = False, only: Sequence[str] | None = None, progress: Progress | None = None) -> dict:
    """Convert every model of ``manifest`` into ``out/<name>/``; returns the summary (also in
    ``out/summary.json`` and ``out/summary.html``). ``workers``: local processes at a time; ``ray``:
    a Ray address or ``"local"`` (then ``workers`` caps the local cluster's CPUs); ``force``: rerun
    finished entries; ``only``: names to run (the others keep their last results)."""
    entries = list(manifest) if not isinstance(manifest, (str, Path)) else load(manifest)
    chosen = _select(entries, only)
    out = Path(out)
    (out / WORK).mkdir(parents=True, exist_ok=True)
    from tracer import __version__
    started, records, todo = time.perf_counter(), {}, []
    report = progress or (lambda record, done, total: None)
    for e in entries:
        key = e.key(__version__)
        previous = _previous(out, e, key, must_be_complete=e.name in chosen)
        if previous is not None and (not force or e.name not in chosen):
            records[e.name] = {**previous, "skipped": True}
        elif e.name not in chosen:
            continue
        elif (missing := e.missing_file()) is not None:  # tracer convert's own bad-input check, without a process
            records[e.name] = _place(out, e, key, {"status": "bad_input", "reason": missing}, None)
        else:
            todo.append((e, key))
    done = [0]
    total = len(chosen)
    for name in (n for n in records if n in chosen):
        done[0] += 1
        report(records[name], done[0], total)

    def finish(entry: Entry, key: str, outcome: dict, workdir: Path) -> None:
        records[entry.name] = _place(out, entry, key, outcome, workdir)
        done[0] += 1
        report(records[entry.name], done[0], total)

    try:
        if ray is not None:
            from tracer.batch.ray_tasks import run_on_ray
            run_on_ray(todo, out / WORK, ray, workers, finish)
        else:
            _run_local(todo, out / WORK, max(1, workers), finish)
    except BaseException:
        kill_running()
        raise
    summary = {"models": [records[e.name] for e in entries if e.name in records],
               "counts": {s: sum(r["status"] == s for r in records.values()) for s in STATUSES},
               "skipped": sum(bool(r.get("skipped")) for r in records.values()),
               "wall_seconds": round(time.perf_counter() - started, 2),
               "backend": f"ray {ray}" if ray is not None else f"local, {max(1, workers)} worker(s)"}
    _write_summary(out, summary)
    return summary


def _select(entries: list[Entry], only: Sequence[str] | None) -> set[str]:
    names = {e.name for e in entries}
    if not only:
        return names
    unknown = [n for n in only if n not in names]
    if unknown:
        raise ManifestError(f"--only {unknown[0]}: no such entry in the manifest (entries: {', '.join(sorted(names))})")
    return set(only)


def _run_local(todo: list, work: Path, workers: int, finish: Callable) -> None:
    for e, _ in todo:  # what an interrupted run left
        shutil.rmtree(work / e.name, ignore_errors=True)
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        futures = {pool.submit(convert_isolated, e, work / e.name): (e, key) for e, key in todo}
        for future in as_completed(futures):
            entry, key = futures[future]
            finish(entry, key, future.result(), work / entry.name)
    except BaseException:  # Ctrl-C: nothing more starts, the running children are killed, their threads end
        pool.shutdown(wait=False, cancel_futures=True)
        kill_running()
        raise
    pool.shutdown()


def expected_files(entry: Entry, status: str) -> list[str]:
    """What ``tracer convert`` writes for this entry and status (report.json at least)."""
    opts = entry.options
    if status == "parity_failed" and not opts.get("keep_on_mismatch"):
        return ["report.json"] + (["report.html"] if opts.get("verify") == "deep" else [])
    if status not in ("ok", "parity_failed"):
        return []
    files = ["report.json", "model.keras"] + ([] if opts.get("no_saved_model") else ["saved_model"])
    files += [f"model_{k}.tflite" for k in opts.get("tflite") or []]
    return files + (["report.html"] if opts.get("verify") == "deep" else [])


def _previous(out: Path, entry: Entry, key: str, must_be_complete: bool) -> dict | None:
    path = out / entry.name / RECORD
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):  # never run, or a folder batch did not write
        return None
    if not must_be_complete:
        return record
    if record.get("key") != key or record.get("status") not in REPEATABLE:
        return None
    if not all((out / entry.name / f).exists() for f in expected_files(entry, record["status"])):
        return None
    return record


def _place(out: Path, entry: Entry, key: str, outcome: dict, workdir: Path | None) -> dict:
    """Move the finished work folder to ``out/<name>/`` (the old one goes only now) and record it."""
    final = out / entry.name
    workdir = workdir or (out / WORK / entry.name)
    workdir.mkdir(parents=True, exist_ok=True)
    files = sorted(p.name for p in workdir.iterdir() if p.name not in (LOG, RECORD) and not p.name.startswith("."))
    record = {"name": entry.name, "model": entry.model, "status": outcome["status"], "reason": outcome["reason"],
              "seconds": outcome.get("seconds", 0.0), "peak_rss_mb": outcome.get("peak_rss_mb"),
              "max_abs": outcome.get("max_abs"), "transposes": outcome.get("transposes"),
              "outputs": [f"{entry.name}/{f}" for f in files],
              "log": f"{entry.name}/{LOG}" if (workdir / LOG).is_file() else None, "skipped": False, "key": key}
    (workdir / RECORD).write_text(json.dumps(record, indent=2, default=str))
    old = out / WORK / f".{entry.name}.old"
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(workdir, final)
    shutil.rmtree(old, ignore_errors=True)
    return record


def _write_summary(out: Path, summary: dict) -> None:
    from tracer.batch.html import write_summary_html
    tmp = out / "summary.json.partial"
    tmp.write_text(json.dumps(summary, indent=2, default=str))
    os.replace(tmp, out / "summary.json")
    write_summary_html(out, summary)
