"""Jobs under faults, against real sshd: partitions longer than the offline threshold (with and
without retries, runs counted by a marker file the job appends to), serve SIGTERMed mid-dispatch,
and a queue that says why each job waits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fleetctl.fleet import Fleet
from fleetctl.jobs.api import cancel_job, drive_once
from fleetctl.jobs.driver import no_controller_reason
from fleetctl.jobs.queue import JobQueue
from fleetctl.sandbox import HostSpec, Sandbox
from tests.conftest import require_sshd, run_cli
from tests.integration.test_jobs import _drive_until
from tests.jobs_fleet import job_config, job_fleet
from tests.waiting import wait_for

# The job appends its attempt number to a marker file: the sandbox hosts share this filesystem.
COUNTED = ('a=$(python3 -c "import json, os; print(json.load(open(os.environ[\'FLEETCTL_JOB_FILE\']))[\'attempt\'])"); '
           'sleep {sleep}; echo "$a" >> {marker}')


@pytest.fixture
def hosts(tmp_path: Path) -> Iterator[Sandbox]:
    """'one': 1 GPU (h100); 'big': 4 GPUs (a100-80g)."""
    require_sshd()
    sandbox = Sandbox(tmp_path / "sb", [HostSpec("one", gpus=1, labels={"gpu_type": "h100"}),
                                        HostSpec("big", gpus=4, labels={"gpu_type": "a100-80g"})])
    sandbox.up()
    yield sandbox
    sandbox.down()


def _until(what: str, check: object, timeout: float = 30) -> None:
    wait_for(what, check, timeout)  # type: ignore[arg-type]


def _events(fleet: Fleet, job_id: str) -> list[str]:
    return [event for _, event, _ in JobQueue(fleet.hosts.store).events(job_id)]


def test_partition_without_retries_is_lost_provisionally_then_succeeds_and_the_child_runs(
        hosts: Sandbox, tmp_path: Path) -> None:
    marker = tmp_path / "runs"
    with job_fleet(hosts, tmp_path) as fleet:
        job = fleet.submit(COUNTED.format(sleep=3, marker=marker), agent="one")
        child = fleet.submit(f"echo child >> {marker}", after=[job.id])
        _drive_until(fleet, job.id, lambda r: r.state == "running")
        hosts.stop_host("one")
        lost = _drive_until(fleet, job.id, lambda r: r.state == "lost")
        assert lost.lost_provisionally and not lost.done and lost.reason == "agent one went offline"
        drive_once(fleet.hosts)
        assert fleet.job(child.id).record.state == "queued"  # a provisional loss fails no child
        assert fleet.job(child.id).record.reason == f"waiting for dependency {job.id} (lost for now; its host may come back)"
        config, state = str(job_config(hosts, tmp_path)), str(tmp_path / "state")
        waited = run_cli("jobs", "wait", job.id, "--timeout", "2s", "--config", config, "--state-dir", state)
        assert waited.returncode == 1 and "still lost" in waited.stderr, waited.stderr  # kept waiting, not exit 3
        _until("the run to finish while its host is cut off", lambda: marker.exists())
        hosts.restart_host("one")
        record = _drive_until(fleet, job.id, lambda r: r.done)
        assert record.state == "succeeded" and "after the job was marked lost" in (record.reason or "")
        assert _drive_until(fleet, child.id, lambda r: r.done).state == "succeeded"
    assert marker.read_text() == "1\nchild\n"


def test_partition_with_retries_runs_each_job_exactly_once(hosts: Sandbox, tmp_path: Path) -> None:
    """One job finishes while its host is away (collected, not retried); one still runs when the
    host comes back (resumed, not retried). No other agent can take them meanwhile."""
    finished, still = tmp_path / "finished", tmp_path / "still"
    with job_fleet(hosts, tmp_path) as fleet:
        quick = fleet.submit(COUNTED.format(sleep=1, marker=finished), labels={"gpu_type": "h1*"}, retries=1)
        slow = fleet.submit(COUNTED.format(sleep=8, marker=still), labels={"gpu_type": "h1*"}, retries=1)
        _drive_until(fleet, quick.id, lambda r: r.state == "running")
        _drive_until(fleet, slow.id, lambda r: r.state == "running")
        hosts.stop_host("one")
        requeued = _drive_until(fleet, quick.id, lambda r: r.state == "queued" and "not online" in (r.reason or ""))
        assert requeued.reason == "waiting for an agent matching gpu_type=h1*: one is not online"
        _drive_until(fleet, slow.id, lambda r: r.state == "queued")
        _until("the quick run to finish while its host is cut off", lambda: finished.exists())
        hosts.restart_host("one")
        record = _drive_until(fleet, quick.id, lambda r: r.done)
        assert record.state == "succeeded" and record.attempt == 1 and "no retry ran" in (record.reason or "")
        assert _drive_until(fleet, slow.id, lambda r: r.done, timeout=40).state == "succeeded"
        assert "resumed" in _events(fleet, slow.id)
        for job in (quick, slow):
            assert _events(fleet, job.id).count("dispatching") == 1
    assert finished.read_text() == "1\n" and still.read_text() == "1\n"


def test_a_true_duplicate_is_reported_and_the_first_finished_attempt_is_the_result(hosts: Sandbox, tmp_path: Path) -> None:
    marker = tmp_path / "runs"
    with job_fleet(hosts, tmp_path) as fleet:
        fleet.drain("one")  # attempt 1 goes to 'big'; its retry (4 s longer) to 'one'
        job = fleet.submit(COUNTED.format(sleep="$((a * 4))", marker=marker), retries=1)
        assert _drive_until(fleet, job.id, lambda r: r.state == "running").agent == "big"
        fleet.drain("one", False)
        hosts.stop_host("big")
        assert _drive_until(fleet, job.id, lambda r: r.state == "running" and r.attempt == 2).agent == "one"
        _until("attempt 1 to finish while its host is cut off", lambda: marker.exists())
        hosts.restart_host("big")
        record = _drive_until(fleet, job.id, lambda r: r.done)
        assert record.state == "succeeded" and record.result is not None and record.result.attempt == 1
        _drive_until(fleet, job.id, lambda r: _events(fleet, r.id).count("duplicate") == 2, timeout=30)
        assert fleet.job(job.id).record.result.attempt == 1  # type: ignore[union-attr]
    assert marker.read_text() == "1\n2\n"  # the retry had started: both ran, and that was reported


def test_serve_sigtermed_during_dispatch_leaves_no_directory_behind(hosts: Sandbox, tmp_path: Path) -> None:
    marker = tmp_path / "runs"
    config = job_config(hosts, tmp_path, "heartbeat_interval_s = 0.5\norphan_age_s = 1\n")
    state = str(tmp_path / "state")
    job_id = run_cli("submit", "--agent", "one", "--config", str(config), "--state-dir", state, "--",
                     "sh", "-c", f"echo ran >> {marker}").stdout.strip()
    serve = subprocess.run([sys.executable, "-m", "fleetctl", "serve", "--config", str(config), "--state-dir", state],
                           env={**os.environ, "FLEETCTL_FAILPOINT": "sigterm-after-mkdir"}, stdin=subprocess.DEVNULL,
                           capture_output=True, text=True, timeout=60)
    assert serve.returncode == 0 and "Traceback" not in serve.stderr, serve.stderr
    with Fleet.from_config(config, state_dir=state) as fleet:
        assert fleet.job(job_id).record.state == "queued" and "requeued" in _events(fleet, job_id)
        record = _drive_until(fleet, job_id, lambda r: r.done)
        assert record.state == "succeeded" and record.attempt == 2 and record.remote_dir
        tmp = Path(record.remote_dir).parent  # the sandbox host's TMPDIR is on this machine

        def clean(_: object) -> bool:
            return "orphan_removed" in _events(fleet, job_id) and not list(tmp.glob(f"fleetctl-job-{job_id}-*"))
        _drive_until(fleet, job_id, clean)
    assert marker.read_text() == "ran\n"


def test_a_job_for_a_drained_agent_says_why_it_waits(hosts: Sandbox, tmp_path: Path) -> None:
    with job_fleet(hosts, tmp_path) as fleet:
        fleet.drain("big")
        job = fleet.submit("true", gpus=4, labels={"gpu_type": "a100*"})
        child = fleet.submit("true", after=[job.id])
        _drive_until(fleet, job.id, lambda r: (r.reason or "").startswith("waiting for 4"))
        assert fleet.job(job.id).record.reason == \
            "waiting for 4 free GPUs on agents matching gpu_type=a100*: big has 4 free but is draining"
        assert fleet.job(child.id).record.reason == f"waiting for dependency {job.id} (queued)"
        fleet.drain("big", False)
        assert _drive_until(fleet, child.id, lambda r: r.done).state == "succeeded"


def test_without_a_controller_submit_and_list_say_so(hosts: Sandbox, tmp_path: Path) -> None:
    config, state = str(job_config(hosts, tmp_path)), str(tmp_path / "state")
    submitted = run_cli("submit", "--config", config, "--state-dir", state, "--", "true")
    job_id = submitted.stdout.strip()
    assert submitted.returncode == 0 and len(submitted.stderr.strip().splitlines()) == 1
    assert "no controller is driving the queue" in submitted.stderr and job_id in submitted.stderr
    listed = json.loads(run_cli("jobs", "list", "--json", "--config", config, "--state-dir", state).stdout)
    assert [(j["id"], j["reason"]) for j in listed] == [(job_id, no_controller_reason(job_id))]
    with Fleet.from_config(config, state_dir=state) as fleet:
        fleet.drain("one")
        fleet.drain("big")
        drive_once(fleet.hosts)  # a driver replaces it with what it sees
        assert fleet.job(job_id).record.reason == "waiting for an agent: one is draining; big is draining"
        fleet.drain("one", False)
    waited = run_cli("submit", "--wait", "--agent", "one", "--config", config, "--state-dir", state, "--", "true")
    assert waited.returncode == 0 and "no controller" not in waited.stderr


class _CancelDuringLaunch:
    """The host's real connection; its launch command's answer comes back only after ``cancel`` ran
    (a `jobs cancel` recorded while the launch's round trip was in flight)."""

    def __init__(self, conn: Any, cancel: Callable[[], object]) -> None:
        self._conn, self._cancel = conn, cancel

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)

    def run(self, command: str, **options: Any) -> Any:
        result = self._conn.run(command, **options)
        if "already started" in command and self._cancel is not None:  # the launch step (fleetctl.jobs.remote)
            self._cancel()
            self._cancel = None  # type: ignore[assignment]
        return result


def test_a_cancel_recorded_while_the_launch_is_in_flight_stops_the_job(
        hosts: Sandbox, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The cancel finds the job ``dispatching`` (nobody signals it then) after the check before the
    launch had passed: the job is signalled once it runs, never left running un-cancelled."""
    with job_fleet(hosts, tmp_path) as fleet:
        job = fleet.submit(["sleep", "300"], agent="one")
        real = fleet.hosts.connection
        cancelled: list[str] = []

        def cancel() -> None:
            assert fleet.job(job.id).record.state == "dispatching"
            cancelled.append(cancel_job(fleet.hosts, job.id).state)
        monkeypatch.setattr(fleet.hosts, "connection", lambda agent: _CancelDuringLaunch(real(agent), cancel))
        record = _drive_until(fleet, job.id, lambda r: r.state != "queued")
        assert cancelled == ["dispatching"] and record.state == "running"
        # Sent by the dispatch as soon as the job ran, or still marked (its process group was not
        # written yet) for the next tick to send: never running with the cancel forgotten.
        assert "cancel_sent" in _events(fleet, job.id) or record.cancel_requested
        record = _drive_until(fleet, job.id, lambda r: r.done, timeout=30)  # `sleep 300` ends only if signalled
        assert record.state == "cancelled" and record.result is not None and record.result.cancelled, record.reason
        events = _events(fleet, job.id)
        assert events.count("cancel_requested") == 1 and "cancel_sent" in events and "running" in events, events
