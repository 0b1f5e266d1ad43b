"""Export progress: a small reporter that any export source reports to (tensors converted, bytes
written, files hashed), shown as rich progress bars on a terminal and silent otherwise.

    with reporting(for_terminal()):
        task = current().task("converting tensors", total=291)
        task.advance()              # one tensor
        task.done()

Code deep in the exporter calls `current()`, so nothing threads a reporter through signatures;
outside `reporting` it is the silent reporter."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar


class Task:
    """One line of progress; the silent reporter's tasks do nothing."""

    def advance(self, amount: float = 1) -> None:
        pass

    def done(self) -> None:
        pass


class Reporter:
    """The silent reporter: the default, and what a script or a log file gets."""

    def task(self, description: str, total: float | None = None, unit: str = "") -> Task:
        """A new progress line; `unit` "bytes" shows sizes and speed, else counts."""
        return Task()

    def __enter__(self) -> Reporter:
        return self

    def __exit__(self, *exc) -> None:
        pass


class _RichTask(Task):
    def __init__(self, progress, task_id, total: float | None) -> None:
        self._progress, self._id, self._total = progress, task_id, total
        self._completed = 0.0

    def advance(self, amount: float = 1) -> None:
        self._completed += amount
        self._progress.advance(self._id, amount)

    def done(self) -> None:
        """Fill the bar: at its total, or at the count so far when there was no total."""
        total = self._total if self._total is not None else self._completed
        self._progress.update(self._id, total=total, completed=total)


def _count_text(task) -> str:
    """ "12/291" for counts, "1.2/3.4 GB" for bytes (rich's filesize, decimal units)."""
    from rich.filesize import decimal

    done, total = task.completed, task.total
    if task.fields.get("unit") == "bytes":
        return f"{decimal(int(done))}" + (f"/{decimal(int(total))}" if total else "")
    return f"{done:.0f}" + (f"/{total:.0f}" if total else "")


class RichReporter(Reporter):
    """rich progress bars on stderr; the finished lines stay as a record of the export."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, ProgressColumn, SpinnerColumn, TextColumn
        from rich.progress import TimeElapsedColumn as Elapsed
        from rich.text import Text

        class Count(ProgressColumn):
            def render(self, task) -> Text:
                return Text(_count_text(task))

        self._progress = Progress(
            SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), Count(), Elapsed(),
            console=Console(stderr=True),
        )  # fmt: skip

    def task(self, description: str, total: float | None = None, unit: str = "") -> Task:
        task_id = self._progress.add_task(description, total=total, unit=unit)
        return _RichTask(self._progress, task_id, total)

    def __enter__(self) -> RichReporter:
        self._progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self._progress.stop()


SILENT = Reporter()
_current: ContextVar[Reporter | None] = ContextVar("export_progress", default=None)


def current() -> Reporter:
    """The reporter of the export running in this thread (silent outside `reporting`)."""
    return _current.get() or SILENT


def for_terminal() -> Reporter:
    """Progress bars when stderr is a terminal, else the silent reporter."""
    return RichReporter() if sys.stderr.isatty() else Reporter()


@contextmanager
def reporting(reporter: Reporter) -> Iterator[Reporter]:
    """Make `reporter` current for the block (started and stopped around it)."""
    token = _current.set(reporter)
    try:
        with reporter:
            yield reporter
    finally:
        _current.reset(token)
