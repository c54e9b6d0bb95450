"""The runner's parts that talk to a host, on the shipped fake connection (fleetctl.testing):
reconciling a ``dispatching`` job by what its directory shows, and dispatch's checks around the launch."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from fleetctl.fleet import Fleet
from fleetctl.inventory.config import Agent, Inventory
from fleetctl.jobs.model import JobRecord, JobSpec
from fleetctl.jobs.runner.context import RunnerContext
from fleetctl.jobs.runner.dispatch import Dispatcher
from fleetctl.jobs.runner.reconcile import reconcile
from fleetctl.ssh.seam import CommandResult, Route
from fleetctl.testing import Answer, ScriptedConnection

DIR = "/tmp/fleetctl-job-{id}-a1-gpu1.AbCd1234"


class Rig:
    """One agent, ``gpu1``, whose connection answers from ``answers``; a queue in the state dir."""

    def __init__(self, tmp_path: Path) -> None:
        self.answers: list[Answer] = []
        self.conn: ScriptedConnection | None = None
        self.fleet = Fleet(Inventory(tmp_path / "a.toml", [Agent(name="gpu1", hostname="h.example")], {}),
                           state_dir=tmp_path / "state", connector=self._connect)
        self.ctx = RunnerContext(self.fleet.hosts)

    def _connect(self, route: Route) -> ScriptedConnection:
        self.conn = ScriptedConnection(route, self.answers)
        return self.conn

    def claimed(self, agent: str = "gpu1") -> JobRecord:
        job = self.ctx.queue.submit(JobSpec(command=["sleep", "9"]))
        assert self.ctx.queue.claim(job.id, agent, [], 1)
        return self.ctx.queue.get(job.id)

    def events(self, job_id: str) -> list[str]:
        return [event for _, event, _ in self.ctx.queue.events(job_id)]


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    built = Rig(tmp_path)
    yield built
    built.fleet.close()


def _ok(stdout: str = "") -> CommandResult:
    return CommandResult("", 0, stdout, "")


# (case, what the probe prints, the launch's exit code if it is sent, state after, last event, commands sent after the probe)
RECONCILE = [
    ("no directory made", "", None, "queued", "requeued", []),
    ("made, files missing", "partial {dir}\n", None, "queued", "requeued", ["rm -rf"]),
    ("ready: launched now", "ready {dir}\n", 0, "running", "running", ["already started"]),
    ("ready, but launched meanwhile", "ready {dir}\n", 4, "running", "running", ["already started"]),
    ("ready, launch refused", "ready {dir}\n", 3, "dispatching", "dispatching", ["already started"]),
    ("already started", "started {dir}\n", None, "running", "running", []),
    ("started, after a login banner", "Welcome to gpu-1\nstarted now\nstarted {dir}\n", None, "running", "running", []),
]


@pytest.mark.parametrize(("case", "probe", "launch", "state", "event", "sent"), RECONCILE, ids=[r[0] for r in RECONCILE])
def test_reconcile_settles_a_dispatching_job_by_its_directory(rig: Rig, case: str, probe: str, launch: int | None,
                                                              state: str, event: str, sent: list[str]) -> None:
    job = rig.claimed()
    remote_dir = DIR.format(id=job.id)
    rig.answers.append(_ok(probe.format(dir=remote_dir)))
    if launch is not None:
        rig.answers.append(CommandResult("", launch, "", ""))
    reconcile(rig.ctx)
    after = rig.ctx.queue.get(job.id)
    assert after.state == state and rig.events(job.id)[-1] == event
    assert rig.conn is not None and f"fleetctl-job-{job.id}-a1-gpu1" in rig.conn.commands[0]
    assert len(rig.conn.commands) == 1 + len(sent) and all(s in c for s, c in zip(sent, rig.conn.commands[1:], strict=True))
    if state == "running":
        assert after.remote_dir == remote_dir


def test_a_job_claimed_for_an_agent_gone_from_the_inventory_goes_back_to_the_queue(rig: Rig) -> None:
    job = rig.claimed(agent="gone")
    assert not Dispatcher(rig.ctx).dispatch(job, [])
    after = rig.ctx.queue.get(job.id)
    assert after.state == "queued" and after.agent is None and rig.conn is None  # nothing was sent anywhere
    assert rig.events(job.id)[-1] == "requeued"


def test_a_cancel_recorded_during_the_launch_round_trip_is_sent_once_the_job_runs(rig: Rig) -> None:
    job = rig.claimed()
    remote_dir = DIR.format(id=job.id)

    def launch(command: str) -> CommandResult:
        assert "already started" in command
        assert rig.ctx.queue.request_cancel(job.id, force=False)  # `jobs cancel` now: it finds the job dispatching
        return _ok("started")
    rig.answers += [_ok(remote_dir), launch, _ok("signalled")]
    assert Dispatcher(rig.ctx).dispatch(job, [])
    after = rig.ctx.queue.get(job.id)
    assert after.state == "running" and not after.cancel_requested
    assert rig.conn is not None and "kill -TERM" in rig.conn.commands[-1] and remote_dir in rig.conn.commands[-1]
    assert rig.events(job.id)[-3:] == ["cancel_requested", "running", "cancel_sent"]


def test_a_cancel_recorded_before_the_launch_means_no_launch(rig: Rig) -> None:
    job = rig.claimed()
    remote_dir = DIR.format(id=job.id)
    assert rig.ctx.queue.request_cancel(job.id, force=False)
    rig.answers += [_ok(remote_dir), _ok()]
    assert not Dispatcher(rig.ctx).dispatch(job, [])
    assert rig.ctx.queue.get(job.id).state == "cancelled"
    assert rig.conn is not None and "rm -rf" in rig.conn.commands[-1] and not any("already started" in c for c in rig.conn.commands)
