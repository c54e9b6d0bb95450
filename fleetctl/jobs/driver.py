"""The one loop that moves the job queue, whoever runs it.

``serve`` drives it for its lifetime: :meth:`Driver.take_over` for the agents it has just leased,
then :meth:`Driver.tick` on every scheduler tick. Without a ``serve``, ``job.wait()`` and
``fleetctl jobs wait`` drive it in-process, one :meth:`Driver.cycle` (reconcile, heartbeat round,
tick) at a time. The controller lock in the state dir (on a shared store, the leases) makes sure
only one process drives each agent at a time."""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path

from fleetctl.errors import StoreError
from fleetctl.hosts.core import Hosts
from fleetctl.jobs.runner import JobRunner
from fleetctl.store.leases import FenceSource, Membership, live_controllers

LOCK_NAME = "controller.lock"
# A driver touches the lock file every tick; `jobs wait` lets go of the lock between its cycles, so
# "live" is "the lock is held, or was used this recently".
LIVE_S = 5.0
NO_CONTROLLER = "no controller is driving the queue"


@contextlib.contextmanager
def controller_lock(state_dir: Path, *, wait_s: float = 0.0) -> Iterator[bool]:
    """Yields True if this process now drives the queue, False if another still held the lock
    after ``wait_s`` seconds (a ``jobs wait`` holds it for one short cycle at a time; a ``serve``
    holds it for its lifetime)."""
    try:
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        handle = open(state_dir / LOCK_NAME, "a")  # noqa: SIM115 (closed by the with below)
    except OSError as exc:  # a read-only or foreign state dir: one line, not `internal error: OSError`
        raise StoreError(f"cannot take the controller lock in {state_dir}: {exc.strerror or exc}",
                         hint="make the state dir writable, or pick another with --state-dir / FLEETCTL_STATE_DIR") from exc
    deadline = time.monotonic() + wait_s
    with handle:
        while True:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    yield False
                    return
                time.sleep(0.1)
        try:
            yield True
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def mark_driving(state_dir: Path) -> None:
    with contextlib.suppress(OSError):
        os.utime(state_dir / LOCK_NAME)


def controller_live(hosts: Hosts) -> bool:
    """Is some process driving the queue now: a live ``serve`` on the shared store, or one holding
    (or lately using) the lock in this state dir? Never blocks."""
    if hosts.store.shared and live_controllers(hosts.store):
        return True
    state_dir = hosts.state_dir
    try:
        if time.time() - (state_dir / LOCK_NAME).stat().st_mtime < LIVE_S:
            return True
        with controller_lock(state_dir) as free:
            return not free
    except (OSError, StoreError):
        return False  # no lock file (never driven) or a state dir we cannot use


def no_controller_reason(job_id: str) -> str:
    return f"{NO_CONTROLLER}: run `fleetctl serve` or `fleetctl jobs wait {job_id}`"


class Driver:
    """Drives the job queue of ``hosts`` through one :class:`JobRunner`."""

    def __init__(self, hosts: Hosts) -> None:
        self.hosts = hosts
        self.runner = JobRunner(hosts)
        self._membership: Membership | None = None  # cycle() on a shared store: a controller for a while

    def take_over(self, agents: set[str], fences: FenceSource | None = None) -> None:
        """Agents this controller just leased: settle their ``dispatching`` jobs with the hosts (the
        remote job directory is the truth, as after a restart)."""
        if agents:
            self.runner.use_fence(fences)
            self.runner.reconcile(agents)

    def tick(self, fences: FenceSource | None = None) -> None:
        """One scheduler tick: say that this process drives (``jobs list`` and ``submit`` tell a live
        controller by the lock file's time), then collect, observe, cancel, resolve and dispatch, on
        the agents the current fence leases (all of them without ``fences``)."""
        mark_driving(self.hosts.state_dir)
        self.runner.use_fence(fences)
        self.runner.tick()

    def cycle(self) -> bool:
        """One in-process cycle, when no other process drives the queue: take the controller lock,
        reconcile (a ``serve`` may have stopped since the last cycle), a heartbeat round, a tick.
        True if it drove, False if another process holds the lock. On a shared store this process
        drives only while no ``serve`` is live there, as a controller with leases of its own."""
        with controller_lock(self.hosts.state_dir) as mine:
            if not mine:
                return False
            fences: FenceSource | None = None
            if self.hosts.store.shared:
                own = self._membership.id if self._membership else None
                if live_controllers(self.hosts.store, excluding=own):
                    self.close()
                    return False
                if self._membership is None:
                    self._membership = Membership(self.hosts.store, self.hosts.inventory.names(),
                                                  self.hosts.settings.lease_s)
                membership = self._membership
                membership.renew()
                fences = lambda: membership.fence  # noqa: E731
            fence = fences() if fences else None
            self.runner.use_fence(fences)
            self.runner.reconcile()
            if fence is None or fence.agents():  # (an empty list would mean every agent)
                self.hosts.heartbeat(sorted(fence.agents()) if fence else None, fence=fence)
            self.tick(fences)
            return True

    def close(self) -> None:
        """Give back the leases a :meth:`cycle` took, at once (not after ``lease_s``)."""
        if self._membership is not None:
            self._membership.leave()
            self._membership = None
