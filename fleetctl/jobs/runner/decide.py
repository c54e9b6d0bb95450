"""What the runner does about a job, decided from what is known of it and its host. Pure: no I/O,
no clock (``now`` is an argument), no store; the runner's parts carry the action out.

Inputs: the job's record; its agent's latest :class:`~fleetctl.telemetry.history.AgentStatus`
(health online/offline, the snapshot's status and time, and the heartbeat's scan of job directories);
the controller settings; the current time; and, for a provisionally lost job, when it was lost.

    decide(job, status, settings, now, lost_since)   the attempt the record names (active or lost?)
    decide_directory(job, found)                     a scanned directory of another attempt
    after_loss(job, losses)                          a lost attempt: retry, or lose the job

A scan is valid only when the heartbeat's exec ran (:data:`EXEC_RAN`); a directory missing from a
scan taken before the job started says nothing (``fresh``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from fleetctl.jobs.model import ACTIVE_STATES, JobRecord
from fleetctl.settings import ControllerSettings
from fleetctl.telemetry.history import AgentStatus
from fleetctl.telemetry.jobdirs import RemoteJobDir
from fleetctl.telemetry.snapshot import TelemetrySnapshot

EXEC_RAN = ("ok", "no_gpus", "tool_missing", "driver_error")  # the heartbeat exec ran, so its job scan is valid
STARTING_GRACE_S = 120.0  # a launched job whose wrapper has not started by then never will

ActionKind = Literal[
    "nothing",
    "collect",        # its result is on the host: pull and record it
    "lose",           # the attempt is gone (``why``): requeue for a retry, or lost (:func:`after_loss`)
    "resume",         # a lost or requeued attempt still runs: running again, no retry (``why``: the detail)
    "finalize_lost",  # a provisionally lost job ends lost (``why``: the reason)
    "remove",         # a collected attempt's directory left behind (a collection cut short): remove it
    "remove_orphan",  # a directory of no current attempt that will never run (``why``): remove it
    "age_orphan",     # a directory of no current attempt a launch may still be in flight for: remove it after orphan_age_s
]


@dataclass(frozen=True)
class Action:
    kind: ActionKind
    why: str = ""


NOTHING = Action("nothing")


def scan_valid(snapshot: TelemetrySnapshot | None) -> bool:
    return snapshot is not None and snapshot.status in EXEC_RAN


def decide(job: JobRecord, status: AgentStatus | None, settings: ControllerSettings, now: float,
           lost_since: float | None = None) -> Action:
    """The attempt the job's record names: an active job (dispatching, running) or a provisionally
    lost one. ``lost_since``: when the job was marked lost (unknown: ``now``)."""
    if job.state in ACTIVE_STATES:
        return _active(job, status, now)
    if job.lost_provisionally:
        return _lost(job, status, settings, now, now if lost_since is None else lost_since)
    return NOTHING


def _active(job: JobRecord, status: AgentStatus | None, now: float) -> Action:
    if status is None:
        return NOTHING
    if status.health.state == "offline":
        return Action("lose", f"agent {job.agent} went offline")
    snap = status.snapshot
    if snap is None or not scan_valid(snap) or job.remote_dir is None or job.state != "running":
        return NOTHING  # a dispatching job is reconcile's (fleetctl.jobs.runner.reconcile)
    seen = snap.job_dirs.get(job.remote_dir)
    started = job.started.timestamp() if job.started is not None else None
    fresh = started is not None and snap.timestamp.timestamp() > started + 1  # the scan was taken after the launch
    if seen == "done":
        return Action("collect")
    if seen == "vanished":
        return Action("lose", f"the job's processes on {job.agent} vanished without a result (host rebooted or killed?)")
    if seen is None and fresh:
        return Action("lose", f"the job's directory on {job.agent} disappeared")
    if seen in ("new", "starting") and fresh and started is not None and now - started > STARTING_GRACE_S:
        return Action("lose", f"the job never started on {job.agent}")
    return NOTHING


def _lost(job: JobRecord, status: AgentStatus | None, settings: ControllerSettings, now: float, since: float) -> Action:
    """Back to running, collected, or finally lost once its host answers again (with a scan taken
    after the loss) or ``lost_grace_s`` has passed."""
    snap = status.snapshot if status is not None else None
    back = (status is not None and status.health.state == "online" and snap is not None and scan_valid(snap)
            and snap.timestamp.timestamp() > since)
    seen = snap.job_dirs.get(job.remote_dir) if back and snap is not None and job.remote_dir else None
    if back and job.remote_dir and seen == "done":
        return Action("collect")
    if back and job.remote_dir and seen == "running":
        return Action("resume", f"attempt {job.attempt} on {job.agent} is still running")
    if back and seen in (None, "vanished"):
        gone = "vanished without a result" if seen else "is gone"
        return Action("finalize_lost", f"{job.reason}; back online, the run {gone}")
    grace = settings.lost_grace_s
    if now - since >= grace:
        return Action("finalize_lost", f"{job.reason}; no result within lost_grace_s ({grace:g}s)")
    return NOTHING


def decide_directory(job: JobRecord, found: RemoteJobDir) -> Action:
    """A scanned directory the active and lost passes do not cover: the last attempt of a requeued
    job (its result ends the job, no retry needed), a duplicate of a retried job, leftovers of a
    collection interrupted by a crash, and orphans of an interrupted dispatch."""
    pointed = job.attempt == found.attempt and job.remote_dir == found.path  # the attempt the record names
    if pointed and (job.state in ACTIVE_STATES or job.lost_provisionally):
        return NOTHING  # decide() owns it
    if job.state == "dispatching" and job.attempt == found.attempt:
        return NOTHING  # reconciliation owns it
    if found.state == "done":
        collected = (job.result is not None and job.result.agent == found.agent and job.result.attempt == found.attempt
                     and job.remote_dir == found.path)
        return Action("remove") if collected else Action("collect")
    if found.state == "running":
        if pointed and job.state == "queued":
            return Action("resume", f"attempt {job.attempt} on {found.agent} is still running; no retry needed")
        return NOTHING  # a duplicate still running: collected and reported when it ends
    if found.state == "vanished":
        return Action("remove_orphan", "its processes are gone and it left no result")
    return Action("age_orphan", f"{found.state}, never launched by a current attempt")


def after_loss(job: JobRecord, losses: int) -> Literal["retry", "lose"]:
    """A lost attempt, the job already lost ``losses`` times: requeued while retries are left (the
    attempt is remembered, so its result still counts if its host comes back before a retry starts)."""
    return "retry" if losses < job.spec.retries else "lose"


def orphan_due(first_seen: float, now: float, settings: ControllerSettings) -> bool:
    """An orphan first seen at ``first_seen`` is removed once ``orphan_age_s`` has passed (a launch
    in flight for it has long ended by then)."""
    return now - first_seen >= settings.orphan_age_s
