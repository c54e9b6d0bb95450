"""The runner's decisions (fleetctl.jobs.runner.decide), table-driven: one row per case, inputs -> action."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import pytest

from fleetctl.jobs.model import JobRecord, JobResult, JobSpec
from fleetctl.jobs.runner.decide import Action, after_loss, decide, decide_directory, orphan_due
from fleetctl.settings import ControllerSettings
from fleetctl.telemetry.health import Health
from fleetctl.telemetry.history import AgentStatus
from fleetctl.telemetry.jobdirs import parse_scan_line
from fleetctl.telemetry.snapshot import TelemetrySnapshot

T0 = 1_700_000_000.0  # when the job started (and, for a lost one, when it was marked lost)
DIR = "/tmp/fleetctl-job-j0a1b2c3d4e-a1-gpu1.AbCd1234"
OTHER = "/tmp/fleetctl-job-j0a1b2c3d4e-a2-gpu1.ZyXw9876"  # attempt 2's directory
SETTINGS = ControllerSettings()  # lost_grace_s 3600, orphan_age_s 600


def _at(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, timezone.utc)


def job(state: str = "running", *, attempt: int = 1, remote_dir: str | None = DIR, lost: bool = False,
        reason: str | None = None, result: JobResult | None = None, retries: int = 0) -> JobRecord:
    """A job on agent gpu1; ``lost``: provisionally (``finished`` empty), else a lost one is final."""
    return JobRecord(id="j0a1b2c3d4e", state=state, spec=JobSpec(command=["true"], retries=retries), agent="gpu1",  # type: ignore[arg-type]
                     remote_dir=remote_dir, attempt=attempt, submitted=_at(T0 - 5), started=_at(T0),
                     finished=None if lost or state != "lost" else _at(T0 + 1), reason=reason, result=result)


def status(health: str = "online", *, scanned: float = T0 + 10, beat: str = "ok", dirs: dict[str, str] | None = None,
           snapshot: bool = True) -> AgentStatus:
    snap = TelemetrySnapshot(agent="gpu1", timestamp=_at(scanned), status=beat, job_dirs=dirs or {}) if snapshot else None  # type: ignore[arg-type]
    return AgentStatus("gpu1", Health(state=health), False, snap)  # type: ignore[arg-type]


RUNNING, LOST = job(), job("lost", lost=True, reason="agent gpu1 went offline")

# (case, job, agent status, now, when it was lost, expected action, a part of its why)
DECIDE: list[tuple[str, JobRecord, AgentStatus | None, float, float | None, str, str]] = [
    ("no status yet", RUNNING, None, T0 + 20, None, "nothing", ""),
    ("agent offline", RUNNING, status("offline"), T0 + 20, None, "lose", "agent gpu1 went offline"),
    ("dispatching, agent offline", job("dispatching"), status("offline"), T0 + 20, None, "lose", "went offline"),
    ("dispatching is reconcile's", job("dispatching"), status(dirs={DIR: "done"}), T0 + 20, None, "nothing", ""),
    ("beat failed: the scan says nothing", RUNNING, status(beat="unreachable"), T0 + 20, None, "nothing", ""),
    ("no snapshot", RUNNING, status(snapshot=False), T0 + 20, None, "nothing", ""),
    ("tool missing: the scan still ran", RUNNING, status(beat="tool_missing", dirs={DIR: "done"}), T0 + 20, None, "collect", ""),
    ("result there", RUNNING, status(dirs={DIR: "done"}), T0 + 20, None, "collect", ""),
    ("still running", RUNNING, status(dirs={DIR: "running"}), T0 + 20, None, "nothing", ""),
    ("processes vanished", RUNNING, status(dirs={DIR: "vanished"}), T0 + 20, None, "lose", "vanished without a result"),
    ("directory gone", RUNNING, status(dirs={}), T0 + 20, None, "lose", "directory on gpu1 disappeared"),
    ("directory not in a scan from before the start", RUNNING, status(scanned=T0 + 0.5), T0 + 20, None, "nothing", ""),
    ("starting, within the grace", RUNNING, status(dirs={DIR: "starting"}), T0 + 60, None, "nothing", ""),
    ("starting, past the grace", RUNNING, status(dirs={DIR: "starting"}), T0 + 121, None, "lose", "never started on gpu1"),
    ("new, past the grace", RUNNING, status(dirs={DIR: "new"}), T0 + 121, None, "lose", "never started"),
    ("lost, host still away", LOST, status("offline"), T0 + 60, T0, "nothing", ""),
    ("lost, host away past lost_grace_s", LOST, status("offline"), T0 + 3600, T0, "finalize_lost",
     "agent gpu1 went offline; no result within lost_grace_s (3600s)"),
    ("lost, no status at all past the grace", LOST, None, T0 + 3601, T0, "finalize_lost", "no result within"),
    ("lost, back with a result", LOST, status(dirs={DIR: "done"}), T0 + 20, T0, "collect", ""),
    ("lost, back and still running", LOST, status(dirs={DIR: "running"}), T0 + 20, T0, "resume",
     "attempt 1 on gpu1 is still running"),
    ("lost, back and the run is gone", LOST, status(dirs={}), T0 + 20, T0, "finalize_lost", "back online, the run is gone"),
    ("lost, back and the run vanished", LOST, status(dirs={DIR: "vanished"}), T0 + 20, T0, "finalize_lost",
     "the run vanished without a result"),
    ("lost, back but the scan predates the loss", LOST, status(scanned=T0 - 1, dirs={}), T0 + 20, T0, "nothing", ""),
    ("lost, back, directory never launched", LOST, status(dirs={DIR: "new"}), T0 + 20, T0, "nothing", ""),
    ("lost before its directory existed, back", job("lost", lost=True, remote_dir=None, reason="r"), status(), T0 + 20, T0,
     "finalize_lost", "r; back online, the run is gone"),
    ("lost, when unknown: counted from now", LOST, status("offline"), T0 + 9999, None, "nothing", ""),
    ("finally lost", job("lost"), status(dirs={DIR: "done"}), T0 + 20, T0, "nothing", ""),
    ("queued", job("queued"), status(dirs={DIR: "done"}), T0 + 20, None, "nothing", ""),
    ("succeeded", job("succeeded"), status("offline"), T0 + 20, None, "nothing", ""),
]


@pytest.mark.parametrize(("case", "record", "agent", "now", "lost_since", "kind", "why"), DECIDE, ids=[row[0] for row in DECIDE])
def test_decide(case: str, record: JobRecord, agent: AgentStatus | None, now: float, lost_since: float | None,
                kind: str, why: str) -> None:
    action = decide(record, agent, SETTINGS, now, lost_since)
    assert action.kind == kind and why in action.why, action


def _found(state: str, path: str = DIR) -> Any:
    found = parse_scan_line(f"{state} {path}")
    assert found is not None
    return found


COLLECTED = JobResult(exit_code=0, agent="gpu1", attempt=1)
# (case, job, the scanned directory, expected action)
DIRECTORY: list[tuple[str, JobRecord, Any, str]] = [
    ("its own running attempt", RUNNING, _found("running"), "nothing"),
    ("its own provisionally lost attempt", LOST, _found("done"), "nothing"),
    ("a dispatch in flight", job("dispatching", remote_dir=None), _found("new"), "nothing"),
    ("collected, its removal cut short", job("succeeded", result=COLLECTED), _found("done"), "remove"),
    ("an earlier attempt finished", job("running", attempt=2, remote_dir=OTHER), _found("done"), "collect"),
    ("a requeued job's attempt finished", job("queued"), _found("done"), "collect"),
    ("a requeued job's attempt still runs", job("queued"), _found("running"), "resume"),
    ("a duplicate still running", job("running", attempt=2, remote_dir=OTHER), _found("running"), "nothing"),
    ("vanished, no result", job("running", attempt=2, remote_dir=OTHER), _found("vanished"), "remove_orphan"),
    ("new, of no current attempt", job("queued", attempt=2, remote_dir=None), _found("new"), "age_orphan"),
    ("starting, of no current attempt", job("succeeded", attempt=2, remote_dir=OTHER), _found("starting"), "age_orphan"),
]


@pytest.mark.parametrize(("case", "record", "found", "kind"), DIRECTORY, ids=[row[0] for row in DIRECTORY])
def test_decide_directory(case: str, record: JobRecord, found: Any, kind: str) -> None:
    assert decide_directory(record, found).kind == kind


def test_a_requeued_attempt_that_still_runs_is_resumed_with_its_detail() -> None:
    assert decide_directory(job("queued"), _found("running")) == \
        Action("resume", "attempt 1 on gpu1 is still running; no retry needed")


@pytest.mark.parametrize(("retries", "losses", "expected"), [(0, 0, "lose"), (2, 0, "retry"), (2, 1, "retry"), (2, 2, "lose")])
def test_a_lost_attempt_is_retried_while_retries_are_left(retries: int, losses: int, expected: str) -> None:
    assert after_loss(job(retries=retries), losses) == expected


@pytest.mark.parametrize(("first_seen", "now", "due"), [(T0, T0, False), (T0, T0 + 599, False), (T0, T0 + 600, True)])
def test_an_orphan_is_removed_after_orphan_age_s(first_seen: float, now: float, due: bool) -> None:
    assert orphan_due(first_seen, now, SETTINGS) is due
