"""A job's code on a terminal: a transient bar (bytes and files) while a snapshot or an upload takes
more than a moment; nothing off a terminal, nothing for one that is over at once."""

from __future__ import annotations

import sys
import time

from rich.progress import BarColumn, DownloadColumn, Progress, TaskID, TextColumn, TimeRemainingColumn, TransferSpeedColumn

from fleetctl.cli.common import err

MOMENT_S = 0.5  # shorter than this and a bar would only flicker


class TerminalCodeProgress:
    """A :class:`~fleetctl.jobs.code.progress.CodeProgress` drawing on stderr once a phase lasts ``after_s``."""

    def __init__(self, after_s: float = MOMENT_S, force: bool = False) -> None:
        self.after_s = after_s
        self.enabled = force or (sys.stderr is not None and sys.stderr.isatty() and not err.quiet)
        self._bar: Progress | None = None
        self._task: TaskID | None = None
        self._what = ""
        self._totals = (0, 0)
        self._done = [0, 0]
        self._started = 0.0

    def start(self, what: str, total_bytes: int, total_files: int) -> None:
        self.finish()
        self._what, self._totals, self._done, self._started = what, (total_bytes, total_files), [0, 0], time.monotonic()

    def advance(self, done_bytes: int, done_files: int) -> None:
        self._done[0] += done_bytes
        self._done[1] += done_files
        if self._bar is None and self.enabled and time.monotonic() - self._started >= self.after_s:
            self._bar = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TextColumn("{task.fields[files]}"),
                                 TransferSpeedColumn(), TimeRemainingColumn(), console=err, transient=True,
                                 redirect_stdout=False, redirect_stderr=False)
            self._task = self._bar.add_task(self._what, total=self._totals[0] or 1, completed=self._done[0],
                                            files=f"{self._done[1]}/{self._totals[1]} files")
            self._bar.start()
        if self._bar is not None and self._task is not None:
            self._bar.update(self._task, completed=self._done[0], files=f"{self._done[1]}/{self._totals[1]} files")

    def finish(self) -> None:
        if self._bar is not None:
            self._bar.stop()
        self._bar, self._task = None, None

    @property
    def shown(self) -> bool:
        """Whether a bar is on the screen now (for tests)."""
        return self._bar is not None
