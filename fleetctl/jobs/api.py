"""The job handle users hold: ``job = fleet.submit(...)``; ``job.wait()``, ``job.result``,
``job.logs()``, ``job.cancel()``.

A ``serve`` process normally drives the queue. Without one, ``wait()`` drives it in-process
(heartbeat, then a runner tick, once a second), so a notebook needs nothing else running. The
controller lock in the state dir makes sure only one process drives at a time."""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from fleetctl.errors import JobError, StoreError
from fleetctl.jobs.model import JobRecord, JobResult, JobSpec, JobState
from fleetctl.jobs.queue import JobQueue

if TYPE_CHECKING:
    import pandas as pd

    from fleetctl.fleet import Fleet

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


def controller_live(state_dir: Path) -> bool:
    """Is some process driving the queue now? Never blocks."""
    try:
        if time.time() - (state_dir / LOCK_NAME).stat().st_mtime < LIVE_S:
            return True
        with controller_lock(state_dir) as free:
            return not free
    except (OSError, StoreError):
        return False  # no lock file (never driven) or a state dir we cannot use


def no_controller_reason(job_id: str) -> str:
    return f"{NO_CONTROLLER}: run `fleetctl serve` or `fleetctl jobs wait {job_id}`"


def refresh_reasons(fleet: Fleet) -> bool:
    """What a reader of the queue does when nobody drives it: every queued job says so. True if a
    controller is live (its tick keeps the reasons current)."""
    queue = JobQueue(fleet.store)
    queued = queue.list(("queued",))
    if not queued or controller_live(fleet.state_dir):
        return True
    for job in queued:
        queue.set_reason(job.id, no_controller_reason(job.id))
    return False


def drive_once(fleet: Fleet) -> bool:
    """One heartbeat round and one runner tick, if no other process is driving. True if it drove."""
    from fleetctl.jobs.runner import JobRunner

    with controller_lock(fleet.state_dir) as mine:
        if not mine:
            return False
        runner = JobRunner(fleet)
        runner.reconcile()
        fleet.heartbeat()
        runner.tick()
        return True


class Job:
    def __init__(self, fleet: Fleet, job_id: str) -> None:
        self.fleet = fleet
        self.id = job_id

    @property
    def record(self) -> JobRecord:
        return JobQueue(self.fleet.store).get(self.id)

    @property
    def status(self) -> JobState:
        return self.record.state

    @property
    def result(self) -> JobResult | None:
        return self.record.result

    def wait(self, timeout: float | None = None, poll_s: float = 1.0) -> JobRecord:
        """Until the job ends; drives the queue itself when no ``serve`` is running."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            record = self.record
            if record.done:
                return record
            if deadline is not None and time.monotonic() >= deadline:
                raise JobError(f"job {self.id} still {record.state} after {timeout:g}s",
                               hint=f"`fleetctl jobs wait {self.id}` to keep waiting")
            started = time.monotonic()
            drive_once(self.fleet)
            time.sleep(max(0.0, poll_s - (time.monotonic() - started)))

    def logs(self, stream: str = "stdout") -> str:
        """The collected log once the job ended; while it runs, the remote log so far."""
        record = self.record
        if record.result is not None:
            path = record.result.stdout_path if stream == "stdout" else record.result.stderr_path
            return Path(path).read_text(errors="replace") if path and os.path.exists(path) else ""
        if record.state == "running" and record.remote_dir and record.agent:
            conn = self.fleet.connection(self.fleet.inventory.get(record.agent))
            return conn.read_bytes(f"{record.remote_dir}/{stream}.log", max_bytes=10 * 1024 * 1024).decode(errors="replace")
        return ""

    def cancel(self, force: bool = False) -> JobRecord:
        return cancel_job(self.fleet, self.id, force=force)

    def __repr__(self) -> str:
        try:
            record = self.record
        except (StoreError, JobError):  # a repr never raises, even with the fleet closed
            return f"<Job {self.id}>"
        where = f" on {record.agent}" if record.agent else ""
        return f"<Job {self.id} {record.state}{where}, {record.spec.gpus} GPUs>"

    def _repr_html_(self) -> str:
        return str(jobs_frame([self.record]).to_html(index=False, na_rep=""))


def submit(fleet: Fleet, command: list[str] | str, **options: Any) -> Job:
    """Queue a job; durable when this returns. ``command`` is argv (a string runs via ``sh -c``)."""
    argv = ["sh", "-c", command] if isinstance(command, str) else list(command)
    if options.get("agent"):
        fleet.inventory.get(options["agent"])  # an unknown name fails now, with a did-you-mean
    try:
        spec = JobSpec(command=argv, **options)
    except ValidationError as exc:
        error = exc.errors()[0]
        field = ".".join(str(p) for p in error["loc"]) or "job"
        raise JobError(f"job {field}: {str(error['msg']).removeprefix('Value error, ')}") from None
    queue = JobQueue(fleet.store)
    job = queue.submit(spec)
    live = controller_live(fleet.state_dir)
    queue.set_reason(job.id, "waiting for the controller's next tick" if live else no_controller_reason(job.id))
    return Job(fleet, job.id)


def cancel_job(fleet: Fleet, job_id: str, force: bool = False) -> JobRecord:
    """Queued: cancelled at once. Running: SIGTERM now (SIGKILL after a grace period, or now with
    ``force``); the job reads ``cancelled`` once its result is collected."""
    from fleetctl.jobs.runner import JobRunner

    queue = JobQueue(fleet.store)
    job = queue.get(job_id)
    if job.done:
        raise JobError(f"job {job.id} already ended ({job.state})")
    if queue.finish(job.id, expect=("queued",), state="cancelled", reason="cancelled before it started"):
        return queue.get(job.id)
    if job.lost_provisionally and queue.finish(
            job.id, expect=("lost",), state="cancelled",
            reason="cancelled while its host was unreachable; a run there that still ends is reported as an event"):
        return queue.get(job.id)
    queue.request_cancel(job.id, force=force)
    if job.state == "running":
        JobRunner(fleet).signal(queue.get(job.id), force)
    return queue.get(job.id)


JOB_COLUMNS = ["id", "name", "state", "agent", "gpus", "attempt", "submitted", "started", "finished", "exit_code",
               "reason", "command"]


def jobs_frame(records: list[JobRecord]) -> pd.DataFrame:
    import pandas as pd

    rows = [{"id": r.id, "name": r.name, "state": r.state, "agent": r.agent, "gpus": ",".join(r.gpus),
             "attempt": r.attempt, "submitted": r.submitted, "started": r.started, "finished": r.finished,
             "exit_code": r.exit_code, "reason": r.reason, "command": " ".join(r.spec.command)} for r in records]
    return pd.DataFrame(rows, columns=JOB_COLUMNS)
