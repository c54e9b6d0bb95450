"""Jobs against real sshd: placement, detached runs, collection, cancel, timeouts and faults."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fleetctl.fleet import Fleet
from fleetctl.jobs.api import drive_once
from fleetctl.jobs.driver import controller_lock
from fleetctl.jobs.model import JobRecord
from fleetctl.jobs.queue import JobQueue
from fleetctl.sandbox import HostSpec, Sandbox
from tests.conftest import require_sshd, run_cli
from tests.jobs_fleet import CONTROLLER, job_config, job_fleet
from tests.waiting import poll, wait_for


@pytest.fixture
def two_hosts(tmp_path: Path) -> Iterator[Sandbox]:
    """'one': 1 GPU; 'two': 4 GPUs of which 0 and 2 are used by a foreign process."""
    require_sshd()
    sandbox = Sandbox(tmp_path / "sb", [HostSpec("one", gpus=1, labels={"gpu_type": "h100"}),
                                        HostSpec("two", gpus=4, busy=[0, 2], labels={"gpu_type": "a100-80g"})])
    sandbox.up()
    yield sandbox
    sandbox.down()


def _drive_until(fleet: Fleet, job_id: str, done: Callable[[JobRecord], bool], timeout: float = 30) -> JobRecord:
    def driven() -> JobRecord | None:
        drive_once(fleet.hosts)
        record = fleet.job(job_id).record
        return record if done(record) else None

    return poll(f"job {job_id} to move on (now {fleet.job(job_id).record.state})", driven, timeout, interval=0.2)


def _finished_on_host(sandbox: Sandbox, name: str, count: int = 1) -> bool:
    """The host's detached jobs wrote their result.json (read on the host's disk: its sshd is away)."""
    return len(list((sandbox.host_dir(name) / "tmp").glob("*/result.json"))) >= count


def test_submit_two_gpus_from_the_cli_end_to_end(two_hosts: Sandbox, tmp_path: Path) -> None:
    config, state = job_config(two_hosts, tmp_path), tmp_path / "state"
    code = ("import json, os; job = json.load(open(os.environ['FLEETCTL_JOB_FILE'])); "
            "json.dump({'seen': os.environ['CUDA_VISIBLE_DEVICES'], 'sum': sum(job['payload']['xs'])}, "
            "open(os.environ['FLEETCTL_OUTPUT_FILE'], 'w')); print('hello from', os.environ['FLEETCTL_JOB_ID'])")
    payload = tmp_path / "payload.json"
    payload.write_text('{"xs": [1, 2, 3]}')
    submitted = run_cli("submit", "--gpus", "2", "--payload", str(payload), "--wait", "--config", str(config),
                        "--state-dir", str(state), "--", "python3", "-c", code)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    shown = json.loads(run_cli("jobs", "show", job_id, "--json", "--config", str(config), "--state-dir", str(state)).stdout)
    assert shown["state"] == "succeeded" and shown["agent"] == "two" and shown["gpus"] == ["1", "3"]
    uuids = {gpu["index"]: gpu["uuid"] for gpu in json.loads(run_cli(
        "heartbeat", "--json", "--agent", "two", "--config", str(config), "--state-dir", str(state)).stdout)[0]["gpus"]}
    assert shown["result"]["output"] == {"seen": f"{uuids[1]},{uuids[3]}", "sum": 6}
    logs = run_cli("jobs", "logs", job_id, "--config", str(config), "--state-dir", str(state))
    assert logs.stdout.strip() == f"hello from {job_id}"
    assert not Path(shown["remote_dir"]).exists()  # the sandbox host's /tmp is this machine's
    assert [e["event"] for e in shown["events"]] == ["submitted", "dispatching", "running", "succeeded"]


def test_placement_labels_drain_dependencies_and_impossible_jobs(two_hosts: Sandbox, tmp_path: Path) -> None:
    with job_fleet(two_hosts, tmp_path) as fleet:
        fleet.drain("one")
        on_two = fleet.submit("true", gpus=1, labels={"gpu_type": "*"})
        assert _drive_until(fleet, on_two.id, lambda r: r.done).agent == "two"
        fleet.drain("one", False)
        labelled = fleet.submit(["true"], gpus=1, labels={"gpu_type": "h1*"})
        assert _drive_until(fleet, labelled.id, lambda r: r.done).agent == "one"
        parent = fleet.submit("exit 3")
        child = fleet.submit("true", after=[parent.id])
        record = _drive_until(fleet, child.id, lambda r: r.done)
        assert record.state == "failed" and f"dependency {parent.id} ended failed" in (record.reason or "")
        assert fleet.job(parent.id).record.reason == "exit code 3"
        good = fleet.submit("true")
        follows = fleet.submit("true", after=[good.id])
        assert _drive_until(fleet, follows.id, lambda r: r.done).state == "succeeded"
        impossible = fleet.submit("true", gpus=3)  # 'two' has 4 GPUs but 2 are busy: waits, not impossible
        huge = fleet.submit("true", gpus=5)
        assert "the most any matching agent has is 4" in (_drive_until(fleet, huge.id, lambda r: r.done).reason or "")
        assert fleet.job(impossible.id).status == "queued"
        assert set(fleet.jobs()["state"]) == {"succeeded", "failed", "queued"}


def test_cancel_and_timeout_of_a_job_that_ignores_sigterm(two_hosts: Sandbox, tmp_path: Path) -> None:
    with job_fleet(two_hosts, tmp_path) as fleet:
        stubborn = fleet.submit("trap '' TERM; sleep 60", timeout_s=2, agent="one")
        polite = fleet.submit(["sleep", "60"], agent="two")
        _drive_until(fleet, polite.id, lambda r: r.state == "running")
        started = time.monotonic()
        polite.cancel()
        assert _drive_until(fleet, polite.id, lambda r: r.done).state == "cancelled"
        assert time.monotonic() - started < 10
        record = _drive_until(fleet, stubborn.id, lambda r: r.done)
        assert record.state == "timed_out" and record.signal == 9  # SIGTERM ignored, SIGKILL after the grace


def test_ssh_dropped_mid_job_is_collected_after_reconnect(two_hosts: Sandbox, tmp_path: Path) -> None:
    with job_fleet(two_hosts, tmp_path) as fleet:
        job = fleet.submit("sleep 2; echo survived", agent="one")
        _drive_until(fleet, job.id, lambda r: r.state == "running")
        two_hosts.stop_host("one")  # sshd and every SSH session die; the detached job does not
        wait_for("the job to finish while its host's sshd is away", lambda: _finished_on_host(two_hosts, "one"), 30)
        two_hosts.restart_host("one")
        record = _drive_until(fleet, job.id, lambda r: r.done)
        assert record.state == "succeeded" and job.logs() == "survived\n"


@pytest.mark.parametrize("failpoint", ["after-upload", "after-launch"])
def test_controller_killed_during_dispatch_never_runs_a_job_twice(two_hosts: Sandbox, tmp_path: Path, failpoint: str) -> None:
    config, state = str(job_config(two_hosts, tmp_path)), str(tmp_path / "state")
    runs = tmp_path / "runs"
    submitted = run_cli("submit", "--agent", "one", "--config", config, "--state-dir", state, "--",
                        "sh", "-c", f"echo ran >> {runs}")
    job_id = submitted.stdout.strip()
    crashed = subprocess.run([sys.executable, "-m", "fleetctl", "jobs", "wait", job_id, "--config", config, "--state-dir", state],
                             env={**os.environ, "FLEETCTL_FAILPOINT": failpoint}, capture_output=True, timeout=60)
    assert crashed.returncode == -9
    shown = json.loads(run_cli("jobs", "show", job_id, "--json", "--config", config, "--state-dir", state).stdout)
    assert shown["state"] == "dispatching"
    resumed = run_cli("jobs", "wait", job_id, "--config", config, "--state-dir", state)
    assert resumed.returncode == 0, resumed.stderr
    assert runs.read_text() == "ran\n"  # the job succeeded: its one run wrote this before it ended


def test_host_lost_then_back_records_the_late_result_and_reports_the_duplicate(two_hosts: Sandbox, tmp_path: Path) -> None:
    with job_fleet(two_hosts, tmp_path) as fleet:
        once = fleet.submit("sleep 2; echo first", agent="one")
        retried = fleet.submit("sleep 2; echo again", labels={"gpu_type": "*"}, retries=1)
        _drive_until(fleet, once.id, lambda r: r.state == "running")
        first_host = _drive_until(fleet, retried.id, lambda r: r.state == "running").agent
        assert first_host == "two"  # least loaded: 'one' already runs a job
        two_hosts.stop_host("one")
        two_hosts.stop_host("two")
        assert _drive_until(fleet, once.id, lambda r: r.state == "lost").reason == "agent one went offline"
        assert fleet.job(retried.id).status == "queued"  # retries left: back in the queue
        for host in ("one", "two"):  # both first runs finish while their hosts are away
            wait_for(f"the first run on {host} to finish", lambda host=host: _finished_on_host(two_hosts, host), 30)
        two_hosts.restart_host("one")
        late = _drive_until(fleet, once.id, lambda r: r.state != "lost")
        assert late.state == "succeeded" and "after the job was marked lost" in (late.reason or "")
        assert _drive_until(fleet, retried.id, lambda r: r.done).agent == "one"  # the retry ran on 'one'
        two_hosts.restart_host("two")
        events = _drive_until(fleet, retried.id, lambda r: any(
            e == "duplicate" for _, e, _ in JobQueue(fleet.hosts.store).events(r.id)), timeout=30)
        assert events.state == "succeeded"


def test_a_hundred_mib_of_logs_comes_back_as_the_last_ten(two_hosts: Sandbox, tmp_path: Path) -> None:
    with job_fleet(two_hosts, tmp_path) as fleet:
        job = fleet.submit("head -c 104857600 /dev/zero | tr '\\0' x; echo; echo tail-marker", agent="one")
        record = _drive_until(fleet, job.id, lambda r: r.done, timeout=60)
        assert record.state == "succeeded" and record.result is not None and record.result.logs_truncated
        stdout = Path(record.result.stdout_path or "")
        assert stdout.stat().st_size == 10 * 1024 * 1024 and stdout.read_bytes().endswith(b"tail-marker\n")
        assert record.remote_dir and not Path(record.remote_dir).exists()


@pytest.mark.sqlite_only(reason="serve holds the state dir's lock file on SQLite only (on PostgreSQL: leases in the store)")
def test_serve_drives_the_queue_while_the_cli_submits_and_waits(two_hosts: Sandbox, tmp_path: Path) -> None:
    config = tmp_path / "agents.toml"
    config.write_text(CONTROLLER.replace("[controller]\n", "[controller]\nheartbeat_interval_s = 0.5\n")
                      + two_hosts.inventory_path.read_text())
    state = str(tmp_path / "state")
    serve = subprocess.Popen([sys.executable, "-m", "fleetctl", "serve", "--config", str(config), "--state-dir", state],
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        def serve_holds_the_lock() -> bool:
            with controller_lock(Path(state)) as free:
                return not free

        wait_for("serve to hold the controller lock", serve_holds_the_lock, 20)
        with controller_lock(Path(state), wait_s=0.5) as free:
            assert not free  # serve holds the queue; a second serve would wait, then refuse
        done = run_cli("submit", "--gpus", "1", "--wait", "--config", str(config), "--state-dir", state, "--", "echo", "ok")
        assert done.returncode == 0, done.stderr
    finally:
        serve.terminate()
        _, stderr = serve.communicate(timeout=30)
    assert serve.returncode == 0 and "Traceback" not in stderr


def test_submit_mistakes_are_one_line_errors_and_queue_nothing(two_hosts: Sandbox, tmp_path: Path) -> None:
    config, state = str(job_config(two_hosts, tmp_path)), str(tmp_path / "state")
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{not json")
    cases = [(["--payload", str(bad_json)], "not valid JSON"), (["--timeout", "soon"], "--timeout 'soon' is not a duration"),
             (["--agent", "onw"], "did you mean 'one'?"), (["--env", "1BAD=x"], "not a valid environment variable name")]
    for args, expected in cases:
        result = run_cli("submit", *args, "--config", config, "--state-dir", state, "--", "true")
        assert result.returncode == 1 and expected in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    listed = run_cli("jobs", "list", "--json", "--config", config, "--state-dir", state)
    assert json.loads(listed.stdout or "[]") == []
