"""Stages of a conversion with their true times: a live bar on a terminal, plain lines elsewhere.

``tracer convert`` makes one :class:`Progress` and passes it as ``progress=`` to
:func:`tracer.api.convert_model` and :func:`tracer.emitter.save.save_outputs`; each stage that
takes time (start-up, capture, passes, emission, parity, tflite, verify, writing) runs inside
``with progress.stage(name, message):``. On a terminal, rich (a Keras dependency, so nothing
more to install) draws a spinner, the stage's own progress where it is known (nodes emitted)
and the elapsed time; otherwise (a pipe, CI) every stage prints one line when it starts and one
with its time when it ends. :meth:`Progress.summary` gives every stage's time and the total.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import Any, Callable, Iterator, TextIO

STAGES = ("start-up", "capture", "passes", "emission", "parity", "tflite", "verify", "writing")


class Progress:
    """Messages and timed stages. Calling it with a message prints the message (``say``)."""

    def __init__(self, sink: Callable[[str], None] | None = None, *, quiet: bool = False, bar: bool | None = None,
                 stream: TextIO | None = None, prefix: str = "[tracer] "):
        self.stream = stream or sys.stderr
        self.sink, self.quiet, self.prefix = sink, quiet, prefix
        self.bar = (not quiet and sink is None and _is_terminal(self.stream)) if bar is None else bar
        self.start = time.perf_counter()
        self.times: dict[str, float] = {}  # stage -> seconds, in the order the stages ran
        self._current: str | None = None
        self._live: Any = None  # rich.progress.Progress while a bar is shown
        self._task: Any = None

    # ---- messages ------------------------------------------------------------------------
    def __call__(self, message: str) -> None:
        if self.quiet:
            return
        if self.sink is not None:
            self.sink(message)
        elif self._live is not None:
            self._live.console.print(f"{self.prefix}{message}", markup=False, highlight=False)
        else:
            print(f"{self.prefix}{message}", file=self.stream, flush=True)

    # ---- stages --------------------------------------------------------------------------
    @contextlib.contextmanager
    def stage(self, name: str, message: str = "") -> Iterator["Progress"]:
        """Time the block as stage ``name`` (times of a stage run twice add up)."""
        outer, self._current = self._current, name
        outer_task = self._task
        if self.bar:
            self._show(name, message)  # the bar shows the message while the stage runs (a nested one below)
        elif message:
            self(f"{name}: {message}")
        started, finished = time.perf_counter(), False
        try:
            yield self
            finished = True
        finally:
            seconds = time.perf_counter() - started
            self.times[name] = self.times.get(name, 0.0) + seconds
            self._current = name if not finished else outer  # an error or Ctrl-C names the stage it stopped
            if self._live is not None and self._task is not None and self._task != outer_task:
                self._live.remove_task(self._task)
            self._task = outer_task
            if finished:
                self(f"{name}: {seconds:.2f}s" + (f" ({message})" if message and self._live is not None else ""))

    def advance(self, done: int, total: int) -> None:
        """Progress inside the current stage (``done`` of ``total`` steps)."""
        if self._live is not None and self._task is not None:
            self._live.update(self._task, completed=done, total=total, steps=f"{done}/{total}")
        elif total > 200 and done in {total // 4, total // 2, 3 * total // 4}:
            self(f"  {done}/{total} {'nodes emitted' if self._current == 'emission' else 'done'}")

    @property
    def current(self) -> str | None:
        """The stage running now (None between stages)."""
        return self._current

    def total(self) -> float:
        return time.perf_counter() - self.start

    def summary(self) -> str:
        """``time: capture 1.20s, ..., total 9.87s`` (the total counts everything since the start)."""
        parts = [f"{name} {seconds:.2f}s" for name, seconds in self.times.items()]
        return "time: " + ", ".join(parts + [f"total {self.total():.2f}s"])

    def close(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None

    # ---- the bar ---------------------------------------------------------------------------
    def _show(self, name: str, message: str) -> None:
        if self._live is None:
            from rich.console import Console
            from rich.progress import BarColumn, Progress as Bar, SpinnerColumn, TextColumn, TimeElapsedColumn

            self._live = Bar(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                             TextColumn("{task.fields[steps]}"), TimeElapsedColumn(),
                             console=Console(file=self.stream, soft_wrap=True), transient=True,
                             redirect_stdout=_is_terminal(sys.stdout))  # stdout to a file stays in the file
            self._live.start()
        self._task = self._live.add_task(f"{name}" + (f": {message}" if message else ""), total=None, steps="")


def as_progress(progress: Any) -> Progress:
    """A :class:`Progress` as given, or one that sends its lines to a plain ``say(message)`` callable."""
    if isinstance(progress, Progress):
        return progress
    if callable(progress):
        return Progress(progress, bar=False)
    raise TypeError(f"progress must be a tracer.progress.Progress or a callable taking a message, "
                    f"got {type(progress).__name__}")


def _is_terminal(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty()) and os.environ.get("TERM") != "dumb" and not os.environ.get("CI")
