"""Failpoints: the one hook through which tests stop a controller at a named step of a dispatch, as a
crash or a ``kill`` there would. Nothing else in the package reads the variable below.

Set ``FLEETCTL_FAILPOINT=<name>`` in the environment of the process that dispatches (read once, at
import). Unset, every :func:`reached` returns at once and changes nothing. The names, in dispatch order:

    sigterm-after-mkdir   after ``mktemp -d`` made the attempt's directory: SIGTERM to this process
                          (``serve`` stops and closes its connections), then the dispatch goes on once
                          the stop has closed the connection, as a dispatch racing a real SIGTERM would
    after-upload          after job.json and run.sh were written: SIGKILL (an orphan ``new`` directory)
    after-launch          after the launch step, before the job is marked running: SIGKILL (a started
                          job still ``dispatching``, for reconciliation to settle)

Used by tests/integration/test_jobs.py and test_jobs_faults.py; documented in docs/development.md."""

from __future__ import annotations

import os
import signal
import time

from fleetctl.ssh.seam import Connection

ENV = "FLEETCTL_FAILPOINT"
NAMES = ("sigterm-after-mkdir", "after-upload", "after-launch")
_ARMED = os.environ.get(ENV, "")


def reached(name: str, conn: Connection | None = None) -> None:
    """The dispatch reached step ``name``: do what its failpoint says, if it is the one armed."""
    if name not in NAMES:
        raise ValueError(f"unknown failpoint {name!r}: one of {', '.join(NAMES)}")
    if name != _ARMED:
        return
    if not name.startswith("sigterm-"):
        os.kill(os.getpid(), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGTERM)
    deadline = time.monotonic() + 10
    while conn is not None and conn.is_open and time.monotonic() < deadline:
        time.sleep(0.05)
