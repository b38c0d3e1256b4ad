"""``tracer batch MANIFEST -o OUT``: the command line of :func:`tracer.batch.run`.

The manifest is read and checked before anything imports torch or TensorFlow (the workers do).
Exit codes: 0 every model converted with parity; 1 some did not (see OUT/summary.html); 2 the
manifest (or an option) is unusable: one line naming the entry and field, nothing run.
"""
from __future__ import annotations

import argparse
import signal
from typing import Any

EPILOG = """\
manifest (YAML or JSON; paths relative to the manifest's folder):
  defaults: {timeout: 600, memory_mb: 8192, options: {n_random: 2}}
  models:
    - name: repvgg_a0
      model: repvgg.py:build_a0
      init_args: {num_classes: 10}
      input_shapes: [[1, 3, 32, 32]]
      options: {fold_bn: true, tflite: [fp32]}

examples:
  tracer batch examples/batch_manifest.yaml -o out/batch --workers 2
  tracer batch models.yaml -o out/batch --only resnet18 --force
  tracer batch models.yaml -o out/batch --ray local          (or --ray ray://head:10001)
"""


def add_parser(sub: Any) -> None:
    b = sub.add_parser("batch", help="convert every model of a manifest, each in its own process",
                       description="Convert the models of a YAML/JSON manifest, each in an isolated process with "
                                   "a timeout and a memory limit; resumable; writes OUT/<name>/ per model, "
                                   "OUT/summary.json and OUT/summary.html.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    b.add_argument("manifest", metavar="MANIFEST", help="models.yaml or models.json with a 'models:' list")
    b.add_argument("-o", "--output", default="tracer_batch", metavar="OUT", help="output folder (default: tracer_batch)")
    b.add_argument("--workers", type=int, default=1, metavar="N", help="conversions at a time (default 1)")
    b.add_argument("--ray", default=None, metavar="ADDRESS",
                   help="run as Ray tasks: 'local' starts a local Ray cluster, else a cluster address "
                        "(ray://head:10001 or auto); needs pip install 'fx2keras[ray]'")
    b.add_argument("--force", action="store_true", help="rerun every entry, even unchanged finished ones")
    b.add_argument("--only", action="append", default=None, metavar="NAME", help="run only this entry; repeatable")
    b.add_argument("-q", "--quiet", action="store_true", help="no progress bar, only the final counts")
    b.add_argument("--debug", action="store_true", help="show tracebacks")


def main(args: argparse.Namespace) -> int:
    from tracer.batch.manifest import ManifestError, load
    from tracer.batch.runner import run
    if args.workers < 1:
        raise ManifestError(f"--workers {args.workers}: must be at least 1")
    entries = load(args.manifest)  # checked here, before any torch / TensorFlow import
    previous = signal.signal(signal.SIGTERM, _interrupt)  # a terminated batch kills its conversions too
    try:
        with _progress_bar(args.quiet) as show:
            summary = run(entries, args.output, workers=args.workers, ray=args.ray, force=args.force,
                          only=args.only, progress=show)
    finally:
        signal.signal(signal.SIGTERM, previous)
    from tracer.batch.html import counts_line
    print(f"{len(summary['models'])} model(s) in {summary['wall_seconds']:.1f}s ({summary['skipped']} unchanged, "
          f"skipped): {counts_line(summary['counts'])} -> {args.output}/summary.html")
    return 0 if all(r["status"] == "ok" for r in summary["models"]) else 1


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


class _progress_bar:
    """A rich progress bar on stderr with the counts by status; one line per finished model."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.counts: dict[str, int] = {}

    def __enter__(self):
        if self.quiet:
            return lambda record, done, total: None
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
        self.progress = Progress(TextColumn("[bold]tracer batch"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TextColumn("{task.description}"),
                                 console=Console(stderr=True), transient=False)
        self.progress.start()
        self.task = self.progress.add_task("", total=None)
        return self.show

    def show(self, record: dict, done: int, total: int) -> None:
        from tracer.batch.html import COLOURS
        self.counts[record["status"]] = self.counts.get(record["status"], 0) + 1
        text = "  ".join(f"[{COLOURS[s]}]{s} {n}[/]" for s, n in self.counts.items())
        self.progress.update(self.task, completed=done, total=total, description=text)
        how = "unchanged, skipped" if record.get("skipped") else f"{record.get('seconds', 0):.1f}s"
        self.progress.console.print(f"[{COLOURS[record['status']]}]{record['status']:<13}[/] {record['name']}  "
                                    f"({how}) {record['reason'][:120]}", markup=True, highlight=False)

    def __exit__(self, *exc: Any) -> None:
        if not self.quiet:
            self.progress.stop()


