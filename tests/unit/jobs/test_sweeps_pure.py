"""Sweeps as pure functions: the grid, the --sweep and --sweep-file readers, the task environment,
the --max-concurrent cap and a sweep's state derived from its tasks' counts."""

from __future__ import annotations

import subprocess
from datetime import datetime, timezone
from pathlib import Path

import pytest

from fleetctl.errors import ConfigError
from fleetctl.jobs.model import JobSpec, SweepRecord, TaskRef, param_env_name, task_environment
from fleetctl.jobs.placement import concurrency_cap
from fleetctl.jobs.remote import wrapper_script
from fleetctl.jobs.sweeps import grid_params, parse_sweep_option, read_params_file


def test_the_grid_is_every_combination_first_name_slowest() -> None:
    assert grid_params({"lr": [0.1, 0.01], "batch": [32, 64]}) == [
        {"lr": 0.1, "batch": 32}, {"lr": 0.1, "batch": 64}, {"lr": 0.01, "batch": 32}, {"lr": 0.01, "batch": 64}]
    assert grid_params({"seed": [1]}) == [{"seed": 1}]


def test_sweep_options_read_values_as_json_where_they_are() -> None:
    assert parse_sweep_option("lr=0.1,0.01") == ("lr", [0.1, 0.01])
    assert parse_sweep_option("model=small,large, true ,3") == ("model", ["small", "large", True, 3])
    for bad in ("lr", "=1,2", "lr="):
        with pytest.raises(ConfigError, match="is not NAME=V1,V2"):
            parse_sweep_option(bad)


def test_a_sweep_file_is_one_object_per_line(tmp_path: Path) -> None:
    good = tmp_path / "p.jsonl"
    good.write_text('{"a": 1}\n\n{"a": 2, "b": "x"}\n')
    assert read_params_file(good) == [{"a": 1}, {"a": 2, "b": "x"}]
    for text, message in (('{"a": 1}\n[1]\n', "line 2: a JSON object is needed, not list"),
                          ("{nope\n", "line 1: not valid JSON")):
        (tmp_path / "bad.jsonl").write_text(text)
        with pytest.raises(ConfigError, match=message):
            read_params_file(tmp_path / "bad.jsonl")
    with pytest.raises(ConfigError, match="No such file"):
        read_params_file(tmp_path / "missing.jsonl")


def test_each_task_sees_its_place_and_parameters_in_its_environment(tmp_path: Path) -> None:
    task = TaskRef(parent="s0123456789", index=3, count=8, params={"lr": 0.1, "batch-size": 32, "opt": "adam", "on": True})
    assert param_env_name("batch-size") == "FLEETCTL_PARAM_BATCH_SIZE"
    assert task_environment(task) == {
        "FLEETCTL_TASK_INDEX": "3", "FLEETCTL_TASK_COUNT": "8", "FLEETCTL_SWEEP_ID": "s0123456789",
        "FLEETCTL_PARAM_LR": "0.1", "FLEETCTL_PARAM_BATCH_SIZE": "32", "FLEETCTL_PARAM_OPT": "adam", "FLEETCTL_PARAM_ON": "true"}
    # The wrapper exports them, quoted: a value with shell syntax in it arrives as it was.
    task = task.model_copy(update={"params": {"cmd": "$(touch x); 'q'"}})
    spec = JobSpec(command=["sh", "-c", 'printf %s "$FLEETCTL_PARAM_CMD" > out; echo "$FLEETCTL_TASK_INDEX" >> out'], task=task)
    (tmp_path / "run.sh").write_text(wrapper_script("j1", str(tmp_path), spec, {}))
    subprocess.run(["sh", str(tmp_path / "run.sh")], check=True, cwd=tmp_path, timeout=30)
    assert (tmp_path / "out").read_text() == "$(touch x); 'q'3\n" and not (tmp_path / "x").exists()


def test_max_concurrent_holds_back_a_task_only_when_its_own_sweep_is_full() -> None:
    task = TaskRef(parent="sa", index=0, count=10, max_concurrent=2)
    spec = JobSpec(command=["true"], task=task)
    assert concurrency_cap(spec, {"sa": 1, "sb": 5}) is None
    assert concurrency_cap(spec, {"sa": 2}) == "waiting: sweep sa already runs 2 tasks (--max-concurrent 2)"
    assert concurrency_cap(JobSpec(command=["true"], task=task.model_copy(update={"max_concurrent": None})), {"sa": 99}) is None
    assert concurrency_cap(JobSpec(command=["true"]), {"sa": 99}) is None


@pytest.mark.parametrize(("counts", "cancelled", "state", "done"), [
    ({"queued": 4}, False, "queued", False),
    ({"queued": 3, "dispatching": 1}, False, "running", False),
    ({"lost?": 1, "succeeded": 3}, False, "running", False),  # a provisionally lost task may still report
    ({"succeeded": 4}, False, "succeeded", True),
    ({"succeeded": 3, "failed": 1}, False, "failed", True),
    ({"succeeded": 1, "cancelled": 3}, True, "cancelled", True),
    ({"succeeded": 3, "lost": 1}, False, "failed", True),
])
def test_a_sweeps_state_is_derived_from_its_tasks(counts: dict[str, int], cancelled: bool, state: str, done: bool) -> None:
    now = datetime.now(timezone.utc)
    record = SweepRecord(id="sa", kind="array", spec=JobSpec(command=["true"]), count=4, submitted=now,
                         cancelled=now if cancelled else None, counts=counts)
    assert (record.state, record.done) == (state, done)
    assert record.describe_counts().startswith("4 tasks: ")
