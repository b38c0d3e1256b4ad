"""``--ray ADDRESS`` / ``--ray local``: the same isolated conversions as Ray tasks.

Each entry is one task that requests its ``cpus`` and ``memory_mb`` (Ray schedules by them) and
runs :func:`tracer.batch.isolate.convert_isolated` on the worker node, so the timeout, the memory
limit, the log and the statuses are the local ones. The task converts into a temporary folder on
its node and returns it packed (tar.gz) with the outcome; the driver unpacks it and places it like
a local result, so ``OUT`` need not be shared with the cluster. The model files (and weights,
calibration and input files) must be readable at the same paths on every node.
"""
from __future__ import annotations

import io
import os
import tarfile
import tempfile
from pathlib import Path
from typing import Callable

from tracer.batch.manifest import Entry, ManifestError


def _convert_task(entry: Entry) -> tuple[dict, bytes]:
    from tracer.batch.isolate import convert_isolated
    with tempfile.TemporaryDirectory(prefix="tracer-batch-") as tmp:
        workdir = Path(tmp) / entry.name
        outcome = convert_isolated(entry, workdir)
        outcome["node"] = os.uname().nodename
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tar:
            tar.add(workdir, arcname=entry.name)
        return outcome, buf.getvalue()


def run_on_ray(todo: list, work: Path, address: str, workers: int, finish: Callable) -> None:
    """Submit every entry as a Ray task; ``finish(entry, key, outcome, workdir)`` as each one ends."""
    try:
        import ray
    except ImportError:
        raise ManifestError("--ray needs Ray: pip install 'fx2keras[ray]' (or pip install ray)") from None
    started_here = not ray.is_initialized()
    if started_here:
        if address == "local":
            ray.init(num_cpus=max(1, workers), include_dashboard=False, log_to_driver=False,
                     configure_logging=False)
        else:
            ray.init(address=address, log_to_driver=False, configure_logging=False)
    try:
        task = ray.remote(_convert_task)
        capacity = ray.cluster_resources() if address == "local" else {}
        pending = {}
        for entry, key in todo:
            pending[task.options(**_requests(entry, capacity)).remote(entry)] = (entry, key)
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            entry, key = pending.pop(ready[0])
            workdir = work / entry.name
            try:
                outcome, packed = ray.get(ready[0])
            except Exception as exc:  # the task itself failed (its node died): that entry crashed, the rest go on
                outcome = {"status": "crashed", "reason": f"Ray task failed: {type(exc).__name__}: "
                                                          f"{str(exc).strip().splitlines()[-1][:300]}"}
                workdir.mkdir(parents=True, exist_ok=True)
            else:
                _unpack(packed, work, workdir)
            finish(entry, key, outcome, workdir)
    finally:
        if started_here:
            ray.shutdown()


def _requests(entry: Entry, capacity: dict) -> dict:
    """The task's CPU and memory request; on a local cluster, one it can never grant is an error now."""
    options = {"num_cpus": entry.cpus, "max_retries": 0}
    if entry.memory_mb:
        options["memory"] = int(entry.memory_mb) * 2**20
    for resource, asked in (("CPU", entry.cpus), ("memory", options.get("memory", 0))):
        if capacity and asked > capacity.get(resource, 0):
            have = capacity.get(resource, 0) / (2**20 if resource == "memory" else 1)
            raise ManifestError(f"{entry.name}: asks for {asked / (2**20 if resource == 'memory' else 1):g} "
                                f"{'MB memory' if resource == 'memory' else 'CPUs'}, the local Ray cluster has "
                                f"{have:g}: lower its {'memory_mb' if resource == 'memory' else 'cpus'}")
    return options


def _unpack(packed: bytes, work: Path, workdir: Path) -> None:
    import shutil
    shutil.rmtree(workdir, ignore_errors=True)
    with tarfile.open(fileobj=io.BytesIO(packed), mode="r:gz") as tar:
        tar.extractall(work, filter="data")
