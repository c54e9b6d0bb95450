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


def test_an_empty_home_lists_nothing_and_asks_for_an_inventory_only_where_agents_are_needed(isolated_env: Path) -> None:
    # No FLEETCTL_CONFIG and no state yet: the default paths under the (empty) isolated HOME.
    listed = run_cli("jobs", "list")
    assert listed.returncode == 0 and listed.stdout.startswith("ID") and listed.stderr == ""
    exported = run_cli("telemetry", "export", "--csv", "-")
    assert exported.returncode == 0 and exported.stdout.startswith("timestamp,agent,")
    unknown = run_cli("jobs", "show", "j123")
    assert unknown.returncode == 1 and "job 'j123' does not exist" in unknown.stderr
    inventory = isolated_env / ".config" / "fleetctl" / "ssh-agents.toml"
    for needs_agents in (("heartbeat",), ("top",), ("submit", "--", "true")):
        done = run_cli(*needs_agents)
        assert done.returncode == 1 and done.stderr.startswith(f"fleetctl: error: no inventory at {inventory} ("), done.stderr
        assert done.stderr.count("\n") == 1
    assert not inventory.exists()
