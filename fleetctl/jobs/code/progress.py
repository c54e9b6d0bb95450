"""How a snapshot or an upload reports its progress, to whoever shows it (the CLI draws a bar on a
terminal; a library caller or ``serve`` shows nothing).

The dispatch that uploads runs deep inside the queue's driver, in the thread of whoever drives it
(``submit --wait``, ``jobs wait``), so the reporter travels as a context variable set around that
call rather than as an argument through the driver, the runner and the dispatch."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Protocol


class CodeProgress(Protocol):
    def start(self, what: str, total_bytes: int, total_files: int) -> None:
        """A phase begins: ``what`` says which (``snapshot of DIR``, ``upload to AGENT``)."""
        ...

    def advance(self, done_bytes: int, done_files: int) -> None:
        """So much more of the phase is done."""
        ...

    def finish(self) -> None: ...


_reporter: ContextVar[CodeProgress | None] = ContextVar("fleetctl_code_progress", default=None)


@contextmanager
def reporting(progress: CodeProgress) -> Iterator[None]:
    """Snapshots and uploads in this context report to ``progress``."""
    token = _reporter.set(progress)
    try:
        yield
    finally:
        _reporter.reset(token)


class _Silent:
    def start(self, what: str, total_bytes: int, total_files: int) -> None:
        pass

    def advance(self, done_bytes: int, done_files: int) -> None:
        pass

    def finish(self) -> None:
        pass


def current() -> CodeProgress:
    """The reporter of this context; one that shows nothing if none was set."""
    return _reporter.get() or _Silent()
