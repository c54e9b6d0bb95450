"""Everything the state dir alone can answer works without an inventory file: jobs list/show/logs,
telemetry export and fleet.history(); what needs agents says, in one line, that there are none."""

from __future__ import annotations

from pathlib import Path

import pytest

from fleetctl.fleet import Fleet
from fleetctl.sandbox import Sandbox
from tests.conftest import run_cli


def test_store_only_commands_need_no_inventory(own_sandbox: Sandbox, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state = tmp_path / "state"
    config = str(own_sandbox.inventory_path)
    submitted = run_cli("submit", "--wait", "--config", config, "--state-dir", str(state), "--", "sh", "-c", "echo done")
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    absent = str(tmp_path / "no-such-inventory.toml")
    env = {"FLEETCTL_CONFIG": absent, "FLEETCTL_STATE_DIR": str(state)}
    listed = run_cli("jobs", "list", env=env)
    assert listed.returncode == 0 and job_id in listed.stdout, listed.stderr
    shown = run_cli("jobs", "show", job_id, env=env)
    assert shown.returncode == 0 and "succeeded" in shown.stdout
    logs = run_cli("jobs", "logs", job_id, env=env)
    assert logs.returncode == 0 and logs.stdout == "done\n"
    exported = run_cli("telemetry", "export", "--csv", "-", env=env)
    assert exported.returncode == 0 and "solo" in exported.stdout
    beat = run_cli("heartbeat", env=env)
    assert beat.returncode == 1 and beat.stderr.count("\n") == 1 and f"no inventory at {absent}" in beat.stderr
    monkeypatch.setenv("FLEETCTL_CONFIG", absent)
    with Fleet.from_config(state_dir=state) as fleet:
        assert set(fleet.history()["agent"]) == {"solo"}
        assert list(fleet.jobs()["id"]) == [job_id]
