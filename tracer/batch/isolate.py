"""One entry in a child process: timeout, memory limit, its log, its peak memory.

:func:`convert_isolated` is what a local worker thread and a Ray task both call: it starts
``python -m tracer.batch.worker`` in a session of its own (so a timeout kills everything it
started), writes its stdout and stderr to ``outdir/convert.log``, and reaps it with ``os.wait4``
for the peak resident memory, whatever way it ended.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tracer.batch.manifest import Entry

LOG = "convert.log"
_POLL_S = 0.05
_RUNNING: set[int] = set()  # child process groups still running (killed when the batch is interrupted)


def kill_running() -> None:
    """Kill every child still running: an interrupted batch leaves no conversions behind."""
    for pid in list(_RUNNING):
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:  # it ended meanwhile
            pass


def convert_isolated(entry: Entry, outdir: Path) -> dict:
    """Convert ``entry`` into ``outdir`` in a child process; the outcome dict (status, reason, ...)."""
    outdir.mkdir(parents=True, exist_ok=True)
    result = outdir.parent / f".{outdir.name}.result.json"
    result.unlink(missing_ok=True)
    job = {"argv": entry.argv(str(outdir)), "outdir": str(outdir), "result": str(result),
           "memory_mb": entry.memory_mb}
    env = {**os.environ, "MALLOC_ARENA_MAX": "2", "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    with open(outdir / LOG, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "tracer.batch.worker", json.dumps(job)], stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                                env=env, cwd=str(entry.model_path.parent) if entry.model_path.parent.is_dir() else None)
        _RUNNING.add(proc.pid)
        try:
            status, rusage, timed_out = _wait(proc.pid, start + entry.timeout)
        finally:
            _RUNNING.discard(proc.pid)
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here (wait4), not by Popen
    seconds = time.perf_counter() - start
    outcome = _outcome(result, proc.returncode, timed_out, entry, outdir)
    result.unlink(missing_ok=True)
    outcome.update(seconds=round(seconds, 2), peak_rss_mb=round(rusage.ru_maxrss / 1024, 1))
    return outcome


def _wait(pid: int, deadline: float) -> tuple[int, object, bool]:
    while True:
        done, status, rusage = os.wait4(pid, os.WNOHANG)
        if done:
            return status, rusage, False
        if time.perf_counter() > deadline:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:  # ended between the poll and the kill
                pass
            _, status, rusage = os.wait4(pid, 0)
            return status, rusage, True
        time.sleep(_POLL_S)


def _outcome(result: Path, code: int, timed_out: bool, entry: Entry, outdir: Path) -> dict:
    if timed_out:
        return {"status": "timeout", "reason": f"no result within the {entry.timeout:g} s timeout; killed"}
    if result.is_file() and code == 0:
        return json.loads(result.read_text())
    if code < 0:
        name = signal.Signals(-code).name
        why = " (the memory limit or the system's OOM killer)" if -code == signal.SIGKILL else ""
        return {"status": "crashed", "reason": f"the worker process died of {name}{why}; see {LOG}"}
    return {"status": "crashed", "reason": f"the worker process exited with code {code}: {_last_line(outdir / LOG)}"}


def _last_line(path: Path) -> str:
    lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()] if path.is_file() else []
    return lines[-1][:300] if lines else f"no output; see {LOG}"
