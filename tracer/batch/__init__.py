"""Many models at once: ``tracer batch MANIFEST -o OUT`` and :func:`run`.

Each manifest entry is converted in a process of its own (timeout, memory limit) through
``tracer convert``'s own path, ends with one status (ok, parity_failed, bad_input, unsupported,
crashed, timeout), and is skipped on a rerun when nothing it depends on changed. Locally with
``workers`` processes, or as Ray tasks (``ray="local"`` or a cluster address).
"""
from tracer.batch.manifest import Entry, ManifestError, load
from tracer.batch.runner import STATUSES, run

__all__ = ["Entry", "ManifestError", "STATUSES", "load", "run"]
