"""Sweeps and arrays: one parent and its tasks, in one transaction, against real sshd (and the queue
itself on SQLite and PostgreSQL). Each task is an ordinary job that knows its place in the sweep."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fleetctl.errors import JobError
from fleetctl.fleet import Fleet
from fleetctl.jobs.api import drive_once
from fleetctl.jobs.model import JobSpec
from fleetctl.jobs.queue import JobQueue
from fleetctl.sandbox import HostSpec, Sandbox
from fleetctl.store import Store
from tests.conftest import require_sshd, run_cli
from tests.jobs_fleet import job_config, job_fleet
from tests.waiting import wait_for

# The task's own record of when it ran (this machine's clock: the sandbox hosts share it), and its place.
STAMP = ('printf \'{"start": %s, "index": %s, "count": %s}\' "$(date +%s.%N)" "$FLEETCTL_TASK_INDEX" '
         '"$FLEETCTL_TASK_COUNT" > "$FLEETCTL_OUTPUT_FILE"')


@pytest.fixture
def three_hosts(tmp_path: Path) -> Iterator[Sandbox]:
    require_sshd()
    sandbox = Sandbox(tmp_path / "sb", [HostSpec("a", gpus=1), HostSpec("b", gpus=1), HostSpec("c", gpus=2)])
    sandbox.up()
    yield sandbox
    sandbox.down()


# -- the queue alone, on both stores -----------------------------------------------------------------
def test_a_sweep_and_its_tasks_are_one_transaction(make_store: Callable[[], Store]) -> None:
    queue = JobQueue(make_store())
    template = JobSpec(command=["true"], name="train")
    sweep = queue.submit_sweep(template, [{"lr": 0.1 * i} for i in range(1000)], "list", max_concurrent=4)
    assert sweep.count == 1000 and sweep.counts == {"queued": 1000} and sweep.state == "queued" and not sweep.done
    tasks = queue.tasks(sweep.id)
    assert [t.spec.task.index for t in tasks if t.spec.task] == list(range(1000))
    assert tasks[7].name == "train[7]" and tasks[7].spec.task and tasks[7].spec.task.params == {"lr": 0.1 * 7}
    assert queue.list(tasks=False) == [] and len(queue.list()) == 1000
    assert queue.get_sweep(sweep.id[:6]).id == sweep.id
    # A claim, then a cancel: the queued ones end at once, the claimed one is marked; nothing is claimed after.
    assert queue.claim(tasks[0].id, "a", [], 1)
    assert queue.cancel_sweep(sweep.id, force=False) == 999
    assert not queue.claim(tasks[1].id, "a", [], 1)
    after = queue.get_sweep(sweep.id)
    assert after.counts == {"dispatching": 1, "cancelled": 999} and after.cancelled is not None
    assert queue.get(tasks[0].id).cancel_requested
    assert queue.cancelled_sweeps([sweep.id, "snope"]) == {sweep.id}
    assert [e for _, e, _ in queue.events(tasks[5].id)] == ["submitted", "cancelled"]


def test_a_sweep_that_cannot_be_stored_leaves_nothing(make_store: Callable[[], Store]) -> None:
    queue = JobQueue(make_store())
    with pytest.raises(JobError, match="does not exist"):
        queue.submit_sweep(JobSpec(command=["true"], after=["jnothere00"]), [{}], "array")
    with pytest.raises(JobError, match="sweep 'snothere' does not exist"):
        queue.submit_sweep(JobSpec(command=["true"], after=["snothere"]), [{}], "array")
    assert queue.list() == [] and queue.sweeps() == []


def test_a_claim_refuses_a_task_once_its_sweep_runs_max_concurrent(make_store: Callable[[], Store]) -> None:
    """The cap is the claim's own check, in its transaction: a caller that counted before (a tick of
    another controller) cannot take one more."""
    queue = JobQueue(make_store())
    tasks = queue.tasks(queue.submit_sweep(JobSpec(command=["true"]), [{}] * 4, "array", max_concurrent=2).id)
    free = queue.tasks(queue.submit_sweep(JobSpec(command=["true"]), [{}] * 3, "array").id)
    single = queue.submit(JobSpec(command=["true"]))
    assert queue.claim(tasks[0].id, "a", [], 1) and queue.claim(tasks[1].id, "b", [], 1)
    assert not queue.claim(tasks[2].id, "c", [], 1) and queue.get(tasks[2].id).state == "queued"
    assert all(queue.claim(t.id, "a", [], 1) for t in free) and queue.claim(single.id, "a", [], 1)  # no cap, no limit
    assert queue.mark_running(tasks[0].id, "/tmp/x", attempt=1)
    assert not queue.claim(tasks[2].id, "c", [], 1)  # running counts as dispatching does
    assert queue.finish(tasks[0].id, "collect_succeeded", reason="exit code 0", attempt=1)
    assert queue.claim(tasks[2].id, "c", [], 1) and not queue.claim(tasks[3].id, "c", [], 1)
    assert queue.get_sweep(tasks[0].spec.task.parent).counts == {"succeeded": 1, "dispatching": 2, "queued": 1}  # type: ignore[union-attr]


def _claim_at_once(start: threading.Barrier, won: list[bool], queue: JobQueue, task_id: str) -> None:
    start.wait(timeout=30)
    won.append(queue.claim(task_id, "a", [], 1))


def test_controllers_claiming_at_once_never_overshoot_max_concurrent(make_store: Callable[[], Store]) -> None:
    """Eight controllers (each its own store connection) claim eight tasks of a sweep capped at 3, all
    at the same moment, in several rounds: exactly 3 claims win each round."""
    queues = [JobQueue(make_store()) for _ in range(8)]
    for _ in range(3):
        sweep = queues[0].submit_sweep(JobSpec(command=["true"]), [{}] * 8, "array", max_concurrent=3)
        tasks = queues[0].tasks(sweep.id)
        start = threading.Barrier(len(queues))
        won: list[bool] = []

        threads = [threading.Thread(target=_claim_at_once, args=(start, won, q, t.id)) for q, t in zip(queues, tasks, strict=True)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert len(won) == 8 and won.count(True) == 3, won
        assert queues[0].get_sweep(sweep.id).counts == {"dispatching": 3, "queued": 5}


# -- against real sshd ---------------------------------------------------------------------------------
def test_a_grid_sweep_runs_each_task_once_and_reads_back_as_a_table(three_hosts: Sandbox, tmp_path: Path) -> None:
    code = ("import json, os; job = json.load(open(os.environ['FLEETCTL_JOB_FILE'])); "
            "env = {k: v for k, v in os.environ.items() if k.startswith('FLEETCTL_PARAM_') or k.startswith('FLEETCTL_TASK_')}; "
            "json.dump({'task': job['task'], 'env': env, 'score': job['task']['params']['lr'] * job['task']['params']['batch']}, "
            "open(os.environ['FLEETCTL_OUTPUT_FILE'], 'w'))")
    with job_fleet(three_hosts, tmp_path) as fleet:
        sweep = fleet.submit_sweep(["python3", "-c", code], grid={"lr": [0.1, 0.01], "batch": [32, 64]}, name="grid")
        after = fleet.submit(["true"], after=[sweep.id])  # --after a whole sweep
        record = sweep.wait(timeout=60, poll_s=0.2)
        assert record.state == "succeeded" and record.counts == {"succeeded": 4}
        table = sweep.results()
        assert list(table.columns) == ["index", "lr", "batch", "state", "exit_code", "output", "id", "agent", "reason"]
        assert table[["index", "lr", "batch"]].values.tolist() == [[0, 0.1, 32], [1, 0.1, 64], [2, 0.01, 32], [3, 0.01, 64]]
        assert (table["state"] == "succeeded").all() and (table["exit_code"] == 0).all()
        first = table["output"][1]
        assert first["task"] == {"parent": sweep.id, "index": 1, "count": 4, "params": {"lr": 0.1, "batch": 64}}
        assert first["env"] == {"FLEETCTL_TASK_INDEX": "1", "FLEETCTL_TASK_COUNT": "4", "FLEETCTL_PARAM_LR": "0.1",
                                "FLEETCTL_PARAM_BATCH": "64"}
        assert [o["score"] for o in table["output"]] == pytest.approx([3.2, 6.4, 0.32, 0.64])
        assert all(t.attempt == 1 for t in sweep.tasks)
        ended = after.wait(timeout=30, poll_s=0.2)
        assert ended.state == "succeeded"
        assert ended.dispatched and ended.dispatched >= max(t.finished for t in sweep.tasks if t.finished)


def test_the_cli_submits_lists_shows_and_waits_on_a_sweep_as_one(three_hosts: Sandbox, tmp_path: Path) -> None:
    config, state = job_config(three_hosts, tmp_path), tmp_path / "state"
    where = ("--config", str(config), "--state-dir", str(state))
    params = tmp_path / "params.jsonl"
    params.write_text('{"name": "x", "n": 1}\n\n{"name": "y", "n": 2}\n{"name": "z", "n": 3, "extra-flag": true}\n')
    submitted = run_cli("submit", "--sweep-file", str(params), "--name", "file", *where, "--", "sh", "-c",
                        'test "$FLEETCTL_PARAM_NAME" != y && echo "$FLEETCTL_PARAM_N $FLEETCTL_PARAM_EXTRA_FLAG"')
    assert submitted.returncode == 0, submitted.stderr
    sweep_id = submitted.stdout.strip()
    assert sweep_id.startswith("s") and "no controller" in submitted.stderr
    single = run_cli("submit", *where, "--", "true").stdout.strip()
    listed = run_cli("jobs", "list", *where).stdout
    assert sweep_id in listed and single in listed and "3 tasks: 3 queued" in listed
    waited = run_cli("jobs", "wait", sweep_id, "--timeout", "60s", *where, timeout=90)
    assert waited.returncode == 3, waited.stderr  # one task failed: the sweep did
    assert f"sweep {sweep_id} failed: 3 tasks: 2 succeeded, 1 failed" in waited.stderr
    shown = json.loads(run_cli("jobs", "show", sweep_id, "--json", *where).stdout)
    assert [(t["index"], t["params"], t["state"]) for t in shown["tasks"]] == [
        (0, {"name": "x", "n": 1}, "succeeded"), (1, {"name": "y", "n": 2}, "failed"),
        (2, {"name": "z", "n": 3, "extra-flag": True}, "succeeded")]
    assert run_cli("jobs", "logs", shown["tasks"][2]["id"], *where).stdout == "3 true\n"
    as_json = {entry["id"]: entry for entry in json.loads(run_cli("jobs", "list", "--json", *where).stdout)}
    assert as_json[sweep_id]["counts"] == {"succeeded": 2, "failed": 1} and as_json[sweep_id]["state"] == "failed"
    assert set(as_json) == {sweep_id, single}
    logs = run_cli("jobs", "logs", sweep_id, *where)
    assert logs.returncode == 1 and "a sweep's id?" in logs.stderr and f"jobs show {sweep_id}" in logs.stderr
    every = run_cli("jobs", "list", "--tasks", *where).stdout
    assert all(t["id"] in every for t in shown["tasks"])
    text = run_cli("jobs", "show", sweep_id, *where).stdout
    assert f"sweep {sweep_id} (file): failed, 3 tasks: 2 succeeded, 1 failed" in text and '"extra-flag": true' in text
    wrong = run_cli("submit", "--array", "2", "--sweep", "a=1", *where, "--", "true")
    assert wrong.returncode != 0 and "--array and --sweep cannot be combined" in wrong.stderr and "Traceback" not in wrong.stderr
    bad = run_cli("submit", "--sweep", "lr", *where, "--", "true")
    assert bad.returncode != 0 and "--sweep 'lr' is not NAME=V1,V2" in bad.stderr


def test_max_concurrent_caps_the_tasks_running_at_once(three_hosts: Sandbox, tmp_path: Path) -> None:
    with job_fleet(three_hosts, tmp_path) as fleet:
        sweep = fleet.submit_sweep(["sh", "-c", STAMP + '; sleep 1; date +%s.%N'], array=6, max_concurrent=2)
        record = sweep.wait(timeout=90, poll_s=0.2)
        assert record.counts == {"succeeded": 6}
        spans = []
        for task in sweep.tasks:
            assert task.result is not None and task.result.stdout_path
            spans.append((task.result.output["start"], float(Path(task.result.stdout_path).read_text())))
        # At the moment any task started, at most 2 (itself included) were running; and the cap was used.
        overlaps = [sum(1 for s, e in spans if s <= start < e) for start, _ in spans]
        assert max(overlaps) == 2, spans


def test_an_array_of_200_cancelled_half_way_starts_nothing_after_and_nothing_twice(three_hosts: Sandbox,
                                                                                    tmp_path: Path) -> None:
    config = job_config(three_hosts, tmp_path)
    with Fleet.from_config(config, state_dir=tmp_path / "state") as fleet, \
            Fleet.from_config(config, state_dir=tmp_path / "state") as driver_fleet:
        sweep = fleet.submit_sweep(["sh", "-c", STAMP + "; sleep 2"], array=200)
        stop = threading.Event()

        def drive() -> None:  # the controller, as `jobs wait` or `serve` would run it, racing the cancel below
            while not stop.is_set():
                drive_once(driver_fleet.hosts)

        thread = threading.Thread(target=drive, daemon=True)
        thread.start()
        try:
            wait_for("half the tasks claimed", lambda: sweep.record.counts.get("queued", 200) <= 100, timeout=120)
            cancelled = sweep.cancel()
            assert cancelled.cancelled is not None
            cancel_at = cancelled.cancelled.timestamp()
            wait_for("every task ended", lambda: sweep.record.done, timeout=120)
        finally:
            stop.set()
            thread.join(timeout=60)
        record = sweep.record
        assert record.state == "cancelled" and sum(record.counts.values()) == 200
        assert set(record.counts) <= {"succeeded", "cancelled"}, record.counts
        queue = JobQueue(fleet.hosts.store)
        ran = never = 0
        for task in sweep.tasks:
            events = [e for _, e, _ in queue.events(task.id)]
            assert events.count("dispatching") <= 1 and "duplicate" not in events, (task.id, events)  # none twice
            assert task.attempt <= 1
            if task.result is not None and isinstance(task.result.output, dict):
                ran += 1
                # Started before the cancel was recorded (allowing the one SSH round trip of a launch
                # decided just before it), never after.
                assert task.result.output["start"] <= cancel_at + 1.0, (task.id, task.result.output, cancel_at)
            else:
                never += 1
                assert task.state == "cancelled" and task.started is None, (task.id, task.state, events)
        assert ran >= 1 and never >= 90, (ran, never)
        assert not list(Path("/tmp").glob(f"fleetctl-job-{sweep.tasks[0].id}-*"))  # collected and removed


def test_bad_sweeps_are_one_line_errors(three_hosts: Sandbox, tmp_path: Path) -> None:
    with job_fleet(three_hosts, tmp_path) as fleet:
        for kwargs, message in (({}, "exactly one of params=, grid= or array="),
                                ({"array": 2, "grid": {"a": [1]}}, "got grid, array"),
                                ({"array": 0}, "at least 1"), ({"grid": {"lr": []}}, "non-empty list"),
                                ({"params": [{"a-b": 1, "a_b": 2}]}, "would both be $FLEETCTL_PARAM_A_B"),
                                ({"params": [{"1x": 1}]}, "is not usable"), ({"array": 2, "max_concurrent": 0}, "at least 1")):
            with pytest.raises(JobError, match=message.replace("$", r"\$").replace("(", r"\(")):
                fleet.submit_sweep(["true"], **kwargs)  # type: ignore[arg-type]
        assert JobQueue(fleet.hosts.store).sweeps() == []
        started = time.monotonic()
        sweep = fleet.submit_sweep(["true"], array=3, retries=2, gpus=1, labels={"x": "*"})
        assert time.monotonic() - started < 5
        assert sweep.record.spec.retries == 2 and all(t.spec.gpus == 1 for t in sweep.tasks)
