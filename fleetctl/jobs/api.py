"""The job handle users hold: ``job = fleet.submit(...)``; ``job.wait()``, ``job.result``,
``job.logs()``, ``job.cancel()``.

A ``serve`` process normally drives the queue. Without one, ``wait()`` drives it in-process with the
same :class:`~fleetctl.jobs.driver.Driver` (heartbeat, then a runner tick, once a second), so a
notebook needs nothing else running. The controller lock in the state dir makes sure only one
process drives at a time."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import ValidationError

from fleetctl.errors import JobError, StoreError
from fleetctl.hosts.core import Hosts
from fleetctl.jobs.code.snapshot import take_snapshot
from fleetctl.jobs.code.store import CodeStore
from fleetctl.jobs.driver import Driver, controller_live, no_controller_reason
from fleetctl.jobs.model import CodeRef, JobRecord, JobResult, JobSpec, JobState, SweepRecord
from fleetctl.jobs.queue import JobQueue
from fleetctl.jobs.runner import JobRunner

if TYPE_CHECKING:
    import pandas as pd

def refresh_reasons(fleet: Hosts) -> bool:
    """What a reader of the queue does when nobody drives it: every queued job says so. True if a
    controller is live (its tick keeps the reasons current)."""
    queue = JobQueue(fleet.store)
    queued = queue.list(("queued",))
    if not queued or controller_live(fleet):
        return True
    for job in queued:
        queue.set_reason(job.id, no_controller_reason(job.id))
    return False


R = TypeVar("R", JobRecord, SweepRecord)


def wait_driving(hosts: Hosts, read: Callable[[], R], still: Callable[[R], str], job_id: str,
                 timeout: float | None, poll_s: float) -> R:
    """``read()`` until its record is done, driving the queue meanwhile (a no-op while a ``serve``
    holds it); past ``timeout`` a JobError that says ``still(record)`` and how to keep waiting."""
    deadline = None if timeout is None else time.monotonic() + timeout
    driver = Driver(hosts)
    try:
        while True:
            record = read()
            if record.done:
                return record
            if deadline is not None and time.monotonic() >= deadline:
                raise JobError(f"{still(record)} after {timeout:g}s", hint=f"`fleetctl jobs wait {job_id}` to keep waiting")
            started = time.monotonic()
            driver.cycle()
            time.sleep(max(0.0, poll_s - (time.monotonic() - started)))
    finally:
        driver.close()


def drive_once(hosts: Hosts) -> bool:
    """One in-process cycle of the queue (:meth:`Driver.cycle`), if no other process is driving. True if it drove."""
    driver = Driver(hosts)
    try:
        return driver.cycle()
    finally:
        driver.close()


class Job:
    def __init__(self, fleet: Hosts, job_id: str) -> None:
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
        return wait_driving(self.fleet, lambda: self.record, lambda record: f"job {self.id} still {record.state}",
                            self.id, timeout, poll_s)

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


def submit(fleet: Hosts, command: list[str] | str, **options: Any) -> Job:
    """Queue a job; durable when this returns. ``command`` is argv (a string runs via ``sh -c``).
    ``code="DIR"``: the job runs in a snapshot of DIR taken now (:mod:`fleetctl.jobs.code`)."""
    code = options.pop("code", None)
    spec = job_spec(fleet, command, options)
    queue = JobQueue(fleet.store)
    if code is not None:  # after the spec is known to be valid: a snapshot can take a while
        spec = spec.model_copy(update={"code": snapshot_code(fleet, code)})
    job = queue.submit(spec)
    if code is not None:
        prune_snapshots(fleet, queue)
    live = controller_live(fleet)
    queue.set_reason(job.id, "waiting for the controller's next tick" if live else no_controller_reason(job.id))
    return Job(fleet, job.id)


def job_spec(fleet: Hosts, command: list[str] | str, options: dict[str, Any]) -> JobSpec:
    """The spec of ``submit``'s arguments, or a one-line :class:`JobError` naming the bad field."""
    argv = ["sh", "-c", command] if isinstance(command, str) else list(command)
    if options.get("agent"):
        fleet.inventory.get(options["agent"])  # an unknown name fails now, with a did-you-mean
    if "task" in options:
        raise JobError("job task: set by submit_sweep, not by hand", hint="use fleet.submit_sweep(...) for tasks")
    try:
        return JobSpec(command=argv, **options)
    except ValidationError as exc:
        error = exc.errors()[0]
        field = ".".join(str(p) for p in error["loc"]) or "job"
        raise JobError(f"job {field}: {str(error['msg']).removeprefix('Value error, ')}") from None


def snapshot_code(fleet: Hosts, code: str | os.PathLike[str] | CodeRef) -> CodeRef:
    """A snapshot of the directory ``code`` in the state dir's code store (a :class:`CodeRef` is
    taken as it is: a snapshot already there)."""
    store = CodeStore(fleet.state_dir)
    if isinstance(code, CodeRef):
        store.manifest(code.manifest)  # still there
        return code
    return take_snapshot(code, store, fleet.settings.code_max_bytes)


def prune_snapshots(fleet: Hosts, queue: JobQueue) -> int:
    """Drop the snapshots no job that may still dispatch names, once unused for ``code_cache_max_age_s``."""
    keep = {job.spec.code.manifest for job in queue.list(("queued", "dispatching", "running", "lost")) if job.spec.code}
    settings = fleet.settings
    return CodeStore(fleet.state_dir).prune(keep, settings.code_cache_max_age_s, settings.code_cache_prune_interval_s)


def cancel_job(fleet: Hosts, job_id: str, force: bool = False) -> JobRecord:
    """Queued: cancelled at once. Running: SIGTERM now (SIGKILL after a grace period, or now with
    ``force``); the job reads ``cancelled`` once its result is collected."""
    queue = JobQueue(fleet.store)
    job = queue.get(job_id)
    if job.done:
        raise JobError(f"job {job.id} already ended ({job.state})")
    if queue.finish(job.id, "cancel", reason="cancelled before it started"):
        return queue.get(job.id)
    if job.lost_provisionally and queue.finish(
            job.id, "cancel_lost",
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
