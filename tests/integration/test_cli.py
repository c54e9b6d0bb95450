"""The ``fleetctl`` CLI as a user runs it (subprocess, no stdin), against the sandbox fleet."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest

from fleetctl.inventory.config import load_config
from fleetctl.sandbox import Sandbox
from fleetctl.telemetry.frames import COLUMNS
from tests.conftest import needs_netns, run_cli


def _agent(sandbox: Sandbox, name: str):  # type: ignore[no-untyped-def]
    return load_config(sandbox.inventory_path).get(name)


@needs_netns
def test_register_through_two_hop_chain_pins_every_fingerprint(fleet_sandbox: Sandbox, tmp_path: Path) -> None:
    config = tmp_path / "agents.toml"
    agent = _agent(fleet_sandbox, "deep-nv")
    bastions = [b.address for b in agent.bastions()]
    result = run_cli("register-ssh", "--config", str(config), "--host", agent.address,
                     "--key", str(fleet_sandbox.client_key), "--bastion", bastions[0], "--bastion", bastions[1],
                     "--label", "gpu_type=h100", "--name", "deep")
    assert result.returncode == 0, result.stderr
    saved = load_config(config).get("deep")
    assert saved.host_key_fingerprint == fleet_sandbox.fingerprints["deep-nv"]
    assert [b.host_key_fingerprint for b in saved.bastions()] == [
        fleet_sandbox.fingerprints["bastion-1"], fleet_sandbox.fingerprints["bastion-2"]]
    assert saved.gpu_query_cmd and saved.gpu_query_cmd.startswith("nvidia-smi --query-gpu=")
    assert saved.labels == {"gpu_type": "h100"}
    assert oct(config.stat().st_mode & 0o777) == "0o600"
    listed = json.loads(run_cli("agents", "list", "--json", "--config", str(config)).stdout)
    assert listed[0]["name"] == "deep"


def test_register_failures_write_nothing(fleet_sandbox: Sandbox, tmp_path: Path) -> None:
    config = tmp_path / "agents.toml"
    config.write_text('[[agents]]\nname = "keep"\nhostname = "h"\n')
    before = config.read_text()
    other = tmp_path / "other"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    direct = _agent(fleet_sandbox, "direct-nv")
    refused = _agent(fleet_sandbox, "refused")
    cases = [
        (["--host", direct.address, "--key", str(other)], "refused"),
        (["--host", refused.address, "--key", str(fleet_sandbox.client_key)], "connection refused"),
        (["--host", direct.address, "--key", str(tmp_path / "missing")], "not found"),
    ]
    for args, expected in cases:
        result = run_cli("register-ssh", "--config", str(config), *args)
        assert result.returncode == 1, result
        assert expected in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
        assert config.read_text() == before


def test_register_refuses_host_key_that_differs_from_existing_pin(fleet_sandbox: Sandbox, tmp_path: Path) -> None:
    config = tmp_path / "agents.toml"
    direct = _agent(fleet_sandbox, "direct-nv")
    assert run_cli("register-ssh", "--config", str(config), "--host", direct.address,
                   "--key", str(fleet_sandbox.client_key), "--name", "box").returncode == 0
    text = config.read_text().replace(fleet_sandbox.fingerprints["direct-nv"], fleet_sandbox.fingerprints["direct-amd"])
    config.write_text(text)
    result = run_cli("register-ssh", "--config", str(config), "--host", direct.address,
                     "--key", str(fleet_sandbox.client_key), "--name", "box")
    assert result.returncode == 1
    assert "host key of" in result.stderr and "changed" in result.stderr
    assert config.read_text() == text


def test_agents_show_remove_and_import(fleet_sandbox: Sandbox, tmp_path: Path) -> None:
    config = tmp_path / "agents.toml"
    nv, amd = _agent(fleet_sandbox, "direct-nv"), _agent(fleet_sandbox, "direct-amd")
    workers = tmp_path / "workers"
    workers.write_text(f"# two hosts\n{nv.ssh_user}@{nv.hostname}:{nv.ssh_port}\n{amd.hostname}:{amd.ssh_port}  # amd\n")
    result = run_cli("agents", "import", str(workers), "--key", str(fleet_sandbox.client_key), "--config", str(config))
    assert result.returncode == 0, result.stderr
    names = load_config(config).names()
    assert names == [f"127.0.0.1-{nv.ssh_port}", f"127.0.0.1-{amd.ssh_port}"]
    assert load_config(config).get(names[1]).gpu_query_cmd.startswith("rocm-smi")  # type: ignore[union-attr]
    shown = run_cli("agents", "show", names[0], "--config", str(config))
    assert "host_key_fingerprint: SHA256:" in shown.stdout
    assert run_cli("agents", "remove", names[0], "--config", str(config)).returncode == 0
    assert load_config(config).names() == [names[1]]
    missing = run_cli("agents", "show", "nope", "--config", str(config))
    assert missing.returncode == 1 and "no agent named 'nope'" in missing.stderr
    workers.write_text("a.example\nb.example\na.example:22\n")
    dup = run_cli("agents", "import", str(workers), "--key", str(fleet_sandbox.client_key), "--config", str(config))
    assert dup.returncode == 1 and "already listed on line 1" in dup.stderr


def test_heartbeat_cli_statuses_csv_and_exit_code(fleet_sandbox: Sandbox, tmp_path: Path) -> None:
    csv_path = tmp_path / "logs" / "gpus.csv"
    csv_path.parent.mkdir()  # fleetctl never creates a missing CSV directory (a typo must fail)
    started = time.monotonic()
    result = run_cli("heartbeat", "--json", "--csv", str(csv_path), "--config", str(fleet_sandbox.inventory_path),
                     "--state-dir", str(tmp_path / "state"))
    elapsed = time.monotonic() - started
    assert result.returncode == 3, result.stderr
    statuses = {s["agent"]: s["status"] for s in json.loads(result.stdout)}
    expected = {"direct-nv": "ok", "direct-amd": "ok", "lan-nv": "ok", "deep-nv": "ok",
                "broken-driver": "driver_error", "no-tool": "tool_missing", "refused": "unreachable"}
    if "blackholed" in statuses:
        expected["blackholed"] = "timeout"
    assert statuses == expected
    # Hosts run in parallel: the round costs about one connect timeout (3 s), not their sum.
    assert elapsed < 3 * 2 + 5
    rows = pd.read_csv(csv_path)
    assert list(rows.columns) == COLUMNS
    per_agent = rows.groupby("agent").size().to_dict()
    gpus = {"direct-nv": 2, "direct-amd": 2, "lan-nv": 4, "deep-nv": 2}
    assert per_agent == {name: gpus.get(name, 1) for name in expected}
    failed = rows[rows["agent"] == "broken-driver"].iloc[0]
    assert failed["status"] == "driver_error" and "NVIDIA driver" in failed["error"] and pd.isna(failed["gpu_index"])
    assert set(rows[rows["agent"] == "direct-amd"]["vendor"]) == {"amd"}
    # A second run appends without a second header.
    run_cli("heartbeat", "--csv", str(csv_path), "--agent", "direct-nv", "--config", str(fleet_sandbox.inventory_path),
            "--state-dir", str(tmp_path / "state"))
    assert len(pd.read_csv(csv_path)) == len(rows) + 2
    assert csv_path.read_text().count("timestamp,agent") == 1
    ok = run_cli("heartbeat", "--agent", "direct-nv", "--agent", "lan-nv", "--config", str(fleet_sandbox.inventory_path))
    assert ok.returncode == 0 and "NVIDIA H100 80GB HBM3" in ok.stdout


@pytest.mark.parametrize(("args", "code", "expected"), [
    (["agents", "list", "--config", "/nonexistent.toml"], 1, "no inventory at /nonexistent.toml"),
    (["agents", "list", "--bogus"], 2, "No such option"),
    (["register-ssh", "--host", "root@", "--key", "/dev/null"], 1, "empty host"),
])
def test_cli_errors_are_one_line_with_exit_codes(args: list[str], code: int, expected: str) -> None:
    result = run_cli(*args)
    assert result.returncode == code
    assert expected in result.stderr and "Traceback" not in result.stderr


def test_bad_config_is_one_line_naming_file_and_field(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('[[agents]]\nname = "a"\nhostname = "h"\nssh_port = 99999\n')
    result = run_cli("heartbeat", "--config", str(config))
    assert result.returncode == 1
    assert result.stderr.strip() == (f"fleetctl: error: {config}: agent 'a' (agents[0]): ssh_port: "
                                     "Input should be less than or equal to 65535 (got 99999)")


def test_config_from_environment(fleet_sandbox: Sandbox) -> None:
    result = run_cli("agents", "list", env={"FLEETCTL_CONFIG": str(fleet_sandbox.inventory_path)})
    assert result.returncode == 0 and "direct-nv" in result.stdout


def test_sandbox_up_and_down_from_the_cli(tmp_path: Path) -> None:
    directory = tmp_path / "sb"
    up = run_cli("sandbox", "up", "--hosts", "2", "--dir", str(directory))
    assert up.returncode == 0, up.stderr
    pids = list(json.loads((directory / "sandbox.json").read_text())["pids"].values())
    try:
        beat = run_cli("heartbeat", "--config", str(directory / "ssh-agents.toml"))
        assert beat.returncode == 0, beat.stdout + beat.stderr
        again = run_cli("sandbox", "up", "--dir", str(directory))
        assert again.returncode == 1 and "already runs" in again.stderr
    finally:
        down = run_cli("sandbox", "down", "--dir", str(directory))
    assert down.returncode == 0
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()


def test_demo_runs_end_to_end() -> None:
    result = run_cli("demo", timeout=120)
    assert result.returncode == 0, result.stderr
    assert "registered gpu-3" in result.stdout and "steady-state round" in result.stdout
