"""Progress on a terminal, nothing anywhere else: a transient bar on stderr while many hosts are
contacted (the first heartbeat round's handshakes, ``agents import``), a spinner while one is.

When stderr is not a TTY (cron, CI, a pipe) nothing is drawn and nothing extra is written. Lines
the command prints meanwhile go above the bar (:meth:`HostProgress.print`); stdout goes through the
bar only when stdout is a terminal too, so ``fleetctl agents import f > log`` keeps its lines in ``log``.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn

from fleetctl.cli.common import err, out

# Fewer hosts than this answer too fast for a bar to say anything.
MIN_HOSTS = 2


def _on_terminal() -> bool:
    # The stream itself, not rich's is_terminal: FORCE_COLOR (set by many CI systems) must not draw bars into logs.
    return sys.stderr is not None and sys.stderr.isatty() and not err.quiet


class HostProgress:
    """One command's progress over hosts; every method is a no-op (or a plain print) off a terminal."""

    def __init__(self, bar: Progress | None = None, task: TaskID | None = None) -> None:
        self._bar = bar
        self._task = task

    def working(self, label: str) -> None:
        """Show ``label`` (the host now being contacted) beside the bar."""
        if self._bar is not None and self._task is not None:
            self._bar.update(self._task, label=label)

    def done(self, label: str | None = None) -> None:
        """One host finished (``label``: shown beside the bar). Safe from several threads (the heartbeat pool calls it)."""
        if self._bar is not None and self._task is not None:
            if label is None:
                self._bar.advance(self._task)
            else:
                self._bar.update(self._task, advance=1, label=label)

    def print(self, text: str, *, error: bool = False) -> None:
        """A line of the command's output (``error``: to stderr), above the bar while one is drawn.
        rich's consoles write past its stdout redirection, so a terminal's stdout line goes through the bar's console."""
        if error:
            err.print(text)  # the bar's own console: rich puts the line above the bar
        elif self._bar is not None and sys.stdout is not None and sys.stdout.isatty():
            self._bar.console.print(text)
        else:
            out.print(text)


@contextmanager
def host_progress(description: str, total: int) -> Iterator[HostProgress]:
    """A transient bar on stderr over ``total`` hosts; nothing off a terminal or below MIN_HOSTS hosts."""
    if total < MIN_HOSTS or not _on_terminal():
        yield HostProgress()
        return
    bar = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[label]}"), TimeElapsedColumn(), console=err, transient=True,
                   redirect_stdout=False, redirect_stderr=False)
    task = bar.add_task(description, total=total, label="")
    with bar:
        yield HostProgress(bar, task)


@contextmanager
def host_status(message: str) -> Iterator[None]:
    """A transient spinner with ``message`` while one host is contacted; nothing off a terminal."""
    if not _on_terminal():
        yield
        return
    with err.status(message):
        yield
