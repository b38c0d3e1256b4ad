"""``python -m tracer.batch.worker JOB``: one manifest entry, converted in a process of its own.

JOB is a JSON object: ``argv`` (the ``tracer convert`` arguments, through the CLI's own conversion
path :func:`tracer.cli.run_convert`), ``outdir`` (its ``-o``), ``result`` (where to write the outcome)
and ``memory_mb`` (the address-space limit set here with ``resource.setrlimit`` before torch or
TensorFlow is imported). The outcome is ``{"status", "reason", "max_abs", "transposes"}`` with status
ok, parity_failed, bad_input, unsupported or crashed; the parent adds timeout, the time and the
peak memory. The conversion's own messages go to stdout/stderr, which the parent writes to convert.log.
"""
from __future__ import annotations

import json
import os
import resource
import signal
import sys
import traceback
from pathlib import Path
from typing import Any

_OOM_TEXT = ("can't allocate memory", "std::bad_alloc", "out of memory", "Cannot allocate memory")


def limit_memory(memory_mb: int | None) -> None:
    if memory_mb:
        size = int(memory_mb) * 2**20
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        if hard != resource.RLIM_INFINITY:
            size = min(size, hard)
        resource.setrlimit(resource.RLIMIT_AS, (size, hard))


def convert(job: dict) -> dict:
    """Run the conversion; the outcome as a dict (never raises for the conversion's own failures)."""
    from tracer.cli import run_convert
    from tracer.errors import CaptureError, ConversionError, InputError, UnsupportedOpsError
    try:
        code = run_convert(job["argv"])
    except SystemExit as exc:  # argparse rejected an option: the manifest check should have caught it
        return _outcome("bad_input", f"tracer convert rejected the options (exit {exc.code}); see convert.log")
    except BaseException as exc:  # noqa: BLE001 - every failure becomes one status, the traceback goes to the log
        traceback.print_exc()
        if _is_oom(exc):
            return _outcome("crashed", f"out of memory (limit {job.get('memory_mb')} MB): {_line(exc)}")
        if isinstance(exc, UnsupportedOpsError):
            ops = ", ".join(dict.fromkeys(o["op"] for o in exc.ops))
            return _outcome("unsupported", f"{len(exc.ops)} operation(s) without a conversion rule: {ops}")
        if isinstance(exc, (CaptureError, ConversionError)):
            return _outcome("unsupported", _line(exc))
        if isinstance(exc, InputError):
            return _outcome("bad_input", _line(exc))
        if isinstance(exc, KeyboardInterrupt):
            return _outcome("crashed", "interrupted")
        return _outcome("crashed", f"internal error ({type(exc).__name__}): {_line(exc)}")
    return _from_report(Path(job["outdir"]), code)


def _from_report(outdir: Path, code: int) -> dict:
    report = json.loads((outdir / "report.json").read_text())
    parity = report.get("parity", {})
    facts = report.get("conversion", {})
    extra = {"max_abs": parity.get("max_abs"), "transposes": facts.get("transpose_ops")}
    tol = parity.get("tolerance")
    if code == 0:
        return _outcome("ok", f"parity: max abs {parity.get('max_abs', 0):.3g}, scaled {parity.get('max_rel', 0):.3g}"
                        f" <= {tol}", **extra)
    if not parity.get("ok", True):
        return _outcome("parity_failed", f"outputs differ: max abs {parity.get('max_abs', 0):.3g}, scaled "
                        f"{parity.get('max_rel', 0):.3g} > tolerance {tol}", **extra)
    bad = [k for k, t in report.get("tflite", {}).items() if not t.get("ok", True)]
    if bad:
        return _outcome("parity_failed", f"LiteRT {', '.join(bad)} differs from PyTorch", **extra)
    verdict = report.get("verify", {}).get("verdict", "failed")
    return _outcome("parity_failed", f"deep verification: {verdict}", **extra)


def _outcome(status: str, reason: str, **extra: Any) -> dict:
    return {"status": status, "reason": " ".join(reason.split())[:500], **extra}


def _line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _is_oom(exc: BaseException | None) -> bool:
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, MemoryError) or any(t in str(exc) for t in _OOM_TEXT):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def die_with_parent() -> None:
    """Linux: this process gets SIGKILL when the thread that started it ends (a killed batch or Ray task)."""
    if sys.platform.startswith("linux"):
        import ctypes
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def main(argv: list[str]) -> int:
    die_with_parent()
    job = json.loads(argv[0])
    limit_memory(job.get("memory_mb"))
    outcome = convert(job)
    sys.stdout.flush()
    sys.stderr.flush()
    result = Path(job["result"])
    tmp = result.with_name(result.name + ".partial")
    tmp.write_text(json.dumps(outcome, default=str))
    os.replace(tmp, result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
