"""Progress, one helper for every long loop: training steps, sampling steps and batches, encoding.

    for batch in track(batches, enabled=True, description="sampling", total=n): ...
    bar = StepProgress(enabled=True, total=1000, done=0, description="tiny-digits")
    bar.update("loss 0.41  520 img/s"); bar.log(step, metrics); bar.stop()

On a terminal (or Jupyter) a rich bar; otherwise (a log file, a cluster job's stdout) `track` is
silent and `StepProgress` prints one plain, flushed line per log step, since a rich bar writes
nothing to a file until it ends. Only the process that should report (rank 0) enables them.
"""
from __future__ import annotations

import time
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")


def _interactive():
    from rich.console import Console  # rich costs ~0.1 s: only loops that report load it

    console = Console()
    return console if (console.is_terminal or console.is_jupyter) else None


def _bar(console, *, stats: bool = False, transient: bool = False):
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn()]
    if stats:
        columns.append(TextColumn("{task.fields[stats]}"))
    return Progress(*columns, TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=transient)


def track(items: Iterable[T], enabled: bool, description: str, total: int | None = None,
          completed: int = 0) -> Iterator[T]:
    """`items`, with a transient progress bar (elapsed and remaining time) on a terminal when enabled."""
    console = _interactive() if enabled else None
    if console is None:
        yield from items
        return
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with _bar(console, transient=True) as progress:
        task = progress.add_task(description, total=total, completed=completed)
        for item in items:
            yield item
            progress.advance(task)


def hms(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class StepProgress:
    """A training's progress: a bar with the latest stats on a terminal; one line per log step
    (step, loss, images/s, ETA from this run's mean pace) otherwise."""

    def __init__(self, enabled: bool, total: int, done: int, description: str):
        self.bar, self.lines = None, False
        self.total, self.description, self.start_step, self.start = total, description, done, time.perf_counter()
        if not enabled:
            return
        console = _interactive()
        if console is None:
            self.lines = True
            return
        self.bar = _bar(console, stats=True)
        self.task = self.bar.add_task(description, total=total, completed=done, stats="")
        self.bar.start()

    def update(self, stats: str) -> None:
        if self.bar is not None:
            self.bar.update(self.task, advance=1, stats=stats)

    def log(self, step: int, metrics: dict) -> None:
        """At a log step (line mode): step, loss, images/s and the ETA."""
        if not self.lines:
            return
        elapsed = time.perf_counter() - self.start
        eta = (self.total - step) * elapsed / max(step - self.start_step, 1)
        print(f"{self.description} step {step}/{self.total}  loss {metrics['loss']:.4f}  "
              f"{metrics['images_per_s']:.0f} images/s  ETA {hms(eta)}", flush=True)

    def print(self, message: str) -> None:
        if self.bar is not None:
            self.bar.console.print(message)
        elif self.lines:
            print(message, flush=True)

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


__all__ = ["StepProgress", "hms", "track"]
