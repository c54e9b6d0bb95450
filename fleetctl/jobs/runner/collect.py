"""Collecting a finished attempt: pull result, logs, output and declared outputs over SFTP, record
the job's end (a transition of the table), remove the remote directory.

Idempotent: files are overwritten with the same bytes and the state change is a compare-and-set. The
job's result is the first attempt that finished; any other is kept beside it and reported as a
duplicate (or, for a job already finally lost, a late result that changes nothing)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from fleetctl._durations import utc
from fleetctl._text import one_line
from fleetctl.errors import RemoteFileNotFound, TransportError
from fleetctl.jobs.model import ACTIVE_STATES, JobRecord, JobResult, JobState
from fleetctl.jobs.remote import working_dir
from fleetctl.jobs.runner.context import RunnerContext
from fleetctl.jobs.states import collected
from fleetctl.ssh.seam import Connection

log = logging.getLogger("fleetctl.jobs")
LOG_TAIL_BYTES = 10 * 1024 * 1024


class Collector:
    def __init__(self, ctx: RunnerContext) -> None:
        self.ctx = ctx
        self.queue = ctx.queue
        self.results_dir = ctx.fleet.state_dir / "jobs"

    def collect(self, job_id: str, agent_name: str, remote_dir: str, attempt: int) -> JobRecord | None:
        """Pull, record, remove; the job as it is now, or None when nothing was recorded (the host
        could not be reached, the lease lapsed, or the job moved on meanwhile: the next scan looks again)."""
        agent = self.ctx.agent(agent_name)
        if agent is None or not self.ctx.mine(agent_name):
            return None
        job = self.queue.get(job_id)
        pointed = job.remote_dir == remote_dir and job.attempt == attempt
        # A retry already running, and this earlier attempt finished first: its result is the job's.
        earlier = job.state in ACTIVE_STATES and attempt < job.attempt and job.result is None
        owner = earlier or (pointed and (job.state in ACTIVE_STATES or job.lost_provisionally or job.state == "queued"))
        local = self.results_dir / job.id
        if not owner:
            local = local / f"attempt-{attempt}"  # a duplicate run: keep it beside, not over, the result
        try:
            conn = self.ctx.fleet.connection(agent)
            result = pull(conn, job, agent_name, remote_dir, attempt, local)
        except TransportError as exc:
            log.warning("job %s: collecting from %s failed, will retry: %s", job.id, agent_name, one_line(str(exc)))
            return None
        if not self.ctx.mine(agent_name):
            return None  # the lease lapsed during the pull: the new holder collects and removes it
        state, reason = final_state(job, result)
        where = f"attempt {attempt} on {agent_name}"
        if not owner:
            event = "late_result_ignored" if job.state == "lost" else "duplicate"
            self.queue.note(job.id, event, f"{where} also ran and ended: {reason}; its files are in {local}", agent=agent_name)
            log.warning("job %s: %s also ran (%s): the job ran twice", job.id, where, reason)
        elif not self._record(job, state, reason, result, where, earlier, agent=agent_name, remote_dir=remote_dir):
            return None  # the job moved on meanwhile: the next scan looks again
        self.ctx.remove(agent_name, remote_dir)
        return self.queue.get(job.id)

    def _record(self, job: JobRecord, state: JobState, reason: str, result: JobResult, where: str, earlier: bool,
                **location: str) -> bool:
        if earlier:
            done = self.queue.finish(job.id, collected(state), attempt=job.attempt, result=result,
                                     log_as="late_result", detail=f"{where} finished first: {reason}",
                                     reason=f"{reason} ({where}, collected after a retry had started)", **location)
            if done:
                self.queue.note(job.id, "duplicate", f"attempt {job.attempt} on {job.agent} had already started; it runs "
                                f"on and is reported when it ends", agent=location.get("agent"))
            return done
        if job.state in ACTIVE_STATES:
            return self.queue.finish(job.id, collected(state), attempt=job.attempt, reason=reason, result=result)
        # The host came back and the run had finished after all: record its true result.
        after = "marked lost" if job.state == "lost" else "requeued; no retry ran"
        return self.queue.finish(job.id, collected(state, late=True), attempt=job.attempt, result=result,
                                 log_as="late_result", detail=f"{where}: {reason}",
                                 reason=f"{reason} (collected after the job was {after})", **location)


def pull(conn: Connection, job: JobRecord, agent_name: str, remote_dir: str, attempt: int, local: Path) -> JobResult:
    """The attempt's files into ``local``: result.json (it must be there), the logs' tails, output.json
    and the declared outputs (each only if there)."""
    local.mkdir(parents=True, exist_ok=True, mode=0o700)
    raw = conn.read_bytes(f"{remote_dir}/result.json")
    (local / "result.json").write_bytes(raw)
    try:
        facts = json.loads(raw)
    except ValueError:
        facts = {}
    result = JobResult(exit_code=facts.get("exit_code"), signal=facts.get("signal"), agent=agent_name,
                       gpus=job.gpus, started=utc(facts.get("started")), finished=utc(facts.get("finished")),
                       timed_out=bool(facts.get("timed_out")), cancelled=bool(facts.get("cancelled")), attempt=attempt)
    for stream in ("stdout", "stderr"):
        data = _optional(conn, f"{remote_dir}/{stream}.log", LOG_TAIL_BYTES)
        target = local / f"{stream}.log"
        target.write_bytes(data or b"")
        setattr(result, f"{stream}_path", str(target))
        result.logs_truncated |= data is not None and len(data) >= LOG_TAIL_BYTES
    output = _optional(conn, f"{remote_dir}/output.json", LOG_TAIL_BYTES)
    if output is not None:
        (local / "output.json").write_bytes(output)
        try:
            result.output = json.loads(output)
        except ValueError:
            result.output = {"error": "output.json is not valid JSON", "path": str(local / "output.json")}
    base = working_dir(job.spec, remote_dir)
    for declared in job.spec.outputs:
        remote = declared if declared.startswith("/") else f"{base.rstrip('/')}/{declared}"
        if remote.startswith("~/"):
            remote = remote[2:]  # SFTP paths are relative to the login directory
        data = _optional(conn, remote, None)
        if data is not None:
            target = local / "outputs" / Path(declared).name
            target.parent.mkdir(exist_ok=True)
            target.write_bytes(data)
            result.outputs[declared] = str(target)
    return result


def final_state(job: JobRecord, result: JobResult) -> tuple[JobState, str]:
    """How the run ended, and the reason the job's record gives for it."""
    if result.timed_out:
        return "timed_out", f"exceeded its timeout of {job.spec.timeout_s:g}s and was killed"
    if result.cancelled:
        return "cancelled", "cancelled" + (f" (signal {result.signal})" if result.signal else "")
    if result.exit_code == 0:
        return "succeeded", "exit code 0"
    if result.signal:
        return "failed", f"killed by signal {result.signal}"
    return "failed", f"exit code {result.exit_code}"


def _optional(conn: Connection, path: str, max_bytes: int | None) -> bytes | None:
    try:
        return conn.read_bytes(path, max_bytes=max_bytes)
    except RemoteFileNotFound:
        return None
