"""GPU health wired end to end against real sshd (issue 22): a sandbox GPU broken in each way shows up
within one heartbeat in ``agents show``, ``/metrics`` and a queued job's reason; no job is placed on a
quarantined GPU; a single Xid 13 quarantines nothing; ``agents clear-gpu`` returns a GPU to service."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from fleetctl.fleet import Fleet
from fleetctl.jobs.api import drive_once
from fleetctl.sandbox import HostSpec, Sandbox
from fleetctl.serve.metrics import FleetCollector, registry_for
from tests.conftest import require_sshd, run_cli


@pytest.fixture(scope="module")
def sick(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    require_sshd()
    sandbox = Sandbox(tmp_path_factory.mktemp("quarantine"), [HostSpec("sick", gpus=2)])
    sandbox.up()
    yield sandbox
    sandbox.down()


@pytest.fixture
def fleet(sick: Sandbox, tmp_path: Path) -> Iterator[Fleet]:
    healthy = sick.host_state("sick")
    with Fleet.from_config(sick.inventory_path, state_dir=tmp_path / "state") as fleet:
        beat = fleet.hosts.heartbeat().snapshots[0]  # the GPUs as they were, healthy: a vanished one is missed later
        assert beat.gpu_health is not None and [g.state for g in beat.gpu_health.gpus] == ["ok", "ok"], beat
        yield fleet
    sick.write_host_state("sick", healthy)


def _break(sandbox: Sandbox, **changes: Any) -> None:
    sandbox.write_host_state("sick", {**sandbox.host_state("sick"), **changes})


def _cli(fleet: Fleet, *args: str) -> Any:
    result = run_cli(*args, "--config", str(fleet.inventory.path), "--state-dir", str(fleet.hosts.state_dir))
    assert result.returncode == 0, result.stderr
    return result.stdout


def _metrics(fleet: Fleet) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(registry_for(FleetCollector(fleet.hosts.store))).decode()
    return {(s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k in ("gpu", "state")))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


FAULTS = [
    pytest.param({"faults": {"1": ["ecc_dbe"]}}, "failed", "uncorrectable ECC errors since the driver loaded", id="ecc-dbe"),
    pytest.param({"faults": {"1": ["remap_pending"]}}, "failed", "row remap pending", id="remap-pending"),
    pytest.param({"faults": {"1": ["remap_failure"]}}, "failed", "row remap failed", id="remap-failure"),
    pytest.param({"faults": {"1": ["retired_pending"]}}, "failed", "page retirement pending", id="retired-pending"),
    pytest.param({"faults": {"1": ["recovery_reset"]}}, "failed", "driver asks for a reset", id="recovery-action"),
    pytest.param({"faults": {"1": ["vanished"]}}, "failed", "GPU missing since the last heartbeat", id="vanished"),
    pytest.param({"kernel_log": "xid79"}, "failed", "Xid 79 (fallen off the bus)", id="xid-79"),
    pytest.param({"faults": {"1": ["hw_slowdown"]}}, "degraded", "hardware slowdown", id="hw-slowdown"),
    pytest.param({"faults": {"1": ["pcie_width"]}}, "degraded", "PCIe link narrower than its max (x4 of x16)", id="pcie-width"),
]


@pytest.mark.parametrize(("fault", "state", "reason"), FAULTS)
def test_a_broken_gpu_shows_in_one_heartbeat_everywhere(sick: Sandbox, fleet: Fleet, fault: dict[str, Any], state: str,
                                                        reason: str) -> None:
    if fault.get("kernel_log") == "xid79":
        fault = {"kernel_log": [{"at": time.time() - 5, "gpu": 1, "xid": 79}]}
    _break(sick, **fault)
    fleet.hosts.heartbeat()  # one beat

    shown = json.loads(_cli(fleet, "agents", "show", "sick", "--json"))
    gpus = {g["index"]: g for g in shown["gpu_health"]}
    assert gpus[0]["state"] == "ok" and gpus[1]["state"] == state, gpus
    assert any(reason in r for r in gpus[1]["reasons"]), gpus[1]
    assert (gpus[1]["quarantined"] is not None) == (state == "failed")
    assert f"GPU 1 {state}" in _cli(fleet, "agents", "show", "sick")

    metrics = _metrics(fleet)
    assert metrics[("fleetctl_gpu_health", (("gpu", "1"), ("state", state)))] == 1.0
    assert metrics[("fleetctl_gpu_health", (("gpu", "0"), ("state", "ok")))] == 1.0
    assert metrics[("fleetctl_gpu_quarantined", (("gpu", "1"),))] == (1.0 if state == "failed" else 0.0)

    job = fleet.submit("true", gpus=2, agent="sick")
    drive_once(fleet.hosts)
    record = fleet.job(job.id).record
    if state == "failed":  # waits, naming the GPU; never placed on it
        assert record.state == "queued" and "sick GPU 1 quarantined: " in (record.reason or ""), record
        single = fleet.submit("true", gpus=1, agent="sick")
        drive_once(fleet.hosts)
        assert fleet.job(single.id).record.gpus == ["0"]
    else:  # degraded: warn, keep placing
        assert record.state != "queued", record


def test_the_dcgm_fields_are_exported_under_their_names(sick: Sandbox, fleet: Fleet) -> None:
    _break(sick, faults={"1": ["ecc_dbe", "pcie_width"]}, kernel_log=[{"at": time.time() - 5, "gpu": 1, "xid": 48}])
    fleet.hosts.heartbeat()
    metrics = _metrics(fleet)
    assert metrics[("DCGM_FI_DEV_ECC_DBE_VOL_TOTAL", (("gpu", "1"),))] == 2.0
    assert metrics[("DCGM_FI_DEV_ECC_DBE_VOL_TOTAL", (("gpu", "0"),))] == 0.0
    assert metrics[("DCGM_FI_DEV_PCIE_LINK_WIDTH", (("gpu", "1"),))] == 4.0
    assert metrics[("DCGM_FI_DEV_PCIE_MAX_LINK_WIDTH", (("gpu", "1"),))] == 16.0
    assert metrics[("DCGM_FI_DEV_XID_ERRORS", (("gpu", "1"),))] == 48.0
    assert metrics[("DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS", (("gpu", "0"),))] == 0.0
    assert metrics[("DCGM_FI_DEV_CLOCKS_EVENT_REASONS", (("gpu", "0"),))] == 0.0


def test_a_single_xid_13_quarantines_nothing_and_clear_gpu_returns_a_gpu(sick: Sandbox, fleet: Fleet) -> None:
    _break(sick, kernel_log=[{"at": time.time() - 5, "gpu": 1, "xid": 13}])
    snap = fleet.hosts.heartbeat().snapshots[0]
    assert snap.gpu_health is not None and [g.state for g in snap.gpu_health.gpus] == ["ok", "ok"]
    assert "Xid 13" in snap.gpu_health.gpus[1].reason  # recorded, not held against the GPU

    _break(sick, kernel_log=[{"at": time.time() - 5, "gpu": 1, "xid": 13}, {"at": time.time() - 1, "gpu": 1, "xid": 79}])
    fleet.hosts.heartbeat()
    job = fleet.submit("true", gpus=2, agent="sick")
    drive_once(fleet.hosts)
    assert "sick GPU 1 quarantined: Xid 79" in (fleet.job(job.id).record.reason or "")
    fleet.hosts.heartbeat()  # nothing new in the journal: still quarantined
    assert json.loads(_cli(fleet, "agents", "show", "sick", "--json"))["gpu_health"][1]["state"] == "failed"
    top = _cli(fleet, "top", "--once")  # a fresh process: the quarantine is the store's, not a memory
    assert "GPU HEALTH" in top and "failed: Xid 79 (fallen off the bus)" in top and "1 GPU failed" in top, top
    assert "1 failed, 1 ok" in _cli(fleet, "agents", "list")

    assert "sick GPU 1 returned to service" in _cli(fleet, "agents", "clear-gpu", "sick", "1")
    assert json.loads(_cli(fleet, "agents", "show", "sick", "--json"))["gpu_health"][1]["state"] == "ok"
    drive_once(fleet.hosts)
    record = fleet.job(job.id).record
    assert record.state != "queued" and sorted(record.gpus) == ["0", "1"], record
    events = [tuple(row) for row in fleet.hosts.store.query("SELECT gpu, event FROM gpu_events WHERE agent = 'sick' ORDER BY ts")]
    assert events == [(1, "quarantined"), (1, "cleared")]
    again = run_cli("agents", "clear-gpu", "sick", "1", "--config", str(fleet.inventory.path),
                    "--state-dir", str(fleet.hosts.state_dir))
    assert again.returncode == 1 and "not quarantined" in again.stderr


def test_an_unreadable_kernel_log_is_said_so(sick: Sandbox, fleet: Fleet) -> None:
    _break(sick, journal="denied")
    fleet.hosts.heartbeat()
    shown = _cli(fleet, "agents", "show", "sick")
    assert "kernel log:" in shown and "systemd-journal" in shown
    doctor = run_cli("doctor", "sick", "--config", str(fleet.inventory.path), "--state-dir", str(fleet.hosts.state_dir))
    line = next(line for line in doctor.stdout.splitlines() if "kernel log" in line)
    assert line.startswith("FAIL") and "systemd-journal" in line, doctor.stdout


def test_the_journal_is_read_from_the_stored_cursor_by_a_cold_controller(sick: Sandbox, fleet: Fleet, tmp_path: Path) -> None:
    _break(sick, kernel_log=[{"at": time.time() - 5, "gpu": 1, "xid": 13}])
    fleet.hosts.heartbeat()
    fleet.hosts.heartbeat()
    # A second controller from cold (a cron heartbeat) goes on from the cursor: the old Xid 13 is not read again.
    with Fleet.from_config(sick.inventory_path, state_dir=fleet.hosts.state_dir) as cold:
        snap = cold.hosts.heartbeat(record=False).snapshots[0]
    assert snap.gpu_health is not None and not [f for f in snap.gpu_health.findings if f.kind == "xid"]


def test_an_old_driver_is_asked_its_own_fields_and_remapped_rows_apart(sick: Sandbox, fleet: Fleet, tmp_path: Path) -> None:
    _break(sick, old_driver=True, faults={"1": ["remap_pending", "hw_slowdown"]})
    with Fleet.from_config(sick.inventory_path, state_dir=tmp_path / "old") as old:
        first = old.hosts.heartbeat().snapshots[0]  # learns the fields from the help in this very beat
        assert first.gpu_health is not None and "clocks_throttle_reasons.hw_slowdown" in first.gpu_health.fields
        second = old.hosts.heartbeat().snapshots[0]  # asks just those, and --query-remapped-rows beside them
    assert second.gpu_health is not None and second.gpu_health.gpus[1].state == "failed"
    reasons = " ".join(second.gpu_health.gpus[1].reasons)
    assert "row remap pending" in reasons and "hardware slowdown" in reasons


@pytest.fixture(scope="module")
def sick_amd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    require_sshd()
    sandbox = Sandbox(tmp_path_factory.mktemp("quarantine-amd"),
                      [HostSpec("sick-amd", vendor="amd", gpus=2, extra_tools=["amd-smi"])])
    sandbox.up()
    yield sandbox
    sandbox.down()


@pytest.mark.parametrize(("fault", "reason"), [
    pytest.param("bad_pages_pending", "page retirement pending", id="bad-pages-pending"),
    pytest.param("ecc_dbe", "uncorrectable ECC errors since the driver loaded", id="ecc-uncorrectable"),
])
def test_an_amd_gpu_is_read_through_amd_smi_quarantined_and_cleared(sick_amd: Sandbox, tmp_path: Path, fault: str,
                                                                    reason: str) -> None:
    healthy = sick_amd.host_state("sick-amd")
    try:
        with Fleet.from_config(sick_amd.inventory_path, state_dir=tmp_path / "state") as fleet:
            first = fleet.hosts.heartbeat().snapshots[0]  # rocm-smi answers the query, amd-smi the health
            assert first.status == "ok" and first.gpu_health is not None, first
            assert [g.state for g in first.gpu_health.gpus] == ["ok", "ok"] and first.gpu_health.gpus[1].bus_id
            sick_amd.write_host_state("sick-amd", {**healthy, "faults": {"1": [fault, "pcie_width"]}})
            fleet.hosts.heartbeat()  # one beat
            shown = json.loads(_cli(fleet, "agents", "show", "sick-amd", "--json"))
            gpus = {g["index"]: g for g in shown["gpu_health"]}
            assert gpus[0]["state"] == "ok" and gpus[1]["state"] == "failed" and gpus[1]["quarantined"] is not None, gpus
            assert any(reason in r for r in gpus[1]["reasons"]), gpus[1]
            assert any("PCIe link narrower than its max (x4 of x16)" in r for r in gpus[1]["reasons"]), gpus[1]
            metrics = _metrics(fleet)
            assert metrics[("fleetctl_gpu_quarantined", (("gpu", "1"),))] == 1.0
            assert metrics[("DCGM_FI_DEV_PCIE_LINK_WIDTH", (("gpu", "1"),))] == 4.0
            job = fleet.submit("true", gpus=2, agent="sick-amd")
            drive_once(fleet.hosts)
            assert "sick-amd GPU 1 quarantined: " in (fleet.job(job.id).record.reason or "")

            sick_amd.write_host_state("sick-amd", healthy)  # the board replaced, say
            assert "sick-amd GPU 1 returned to service" in _cli(fleet, "agents", "clear-gpu", "sick-amd", "1")
            after = fleet.hosts.heartbeat().snapshots[0]
            assert after.gpu_health is not None and [g.state for g in after.gpu_health.gpus] == ["ok", "ok"]
            drive_once(fleet.hosts)
            assert fleet.job(job.id).record.state != "queued"
    finally:
        sick_amd.write_host_state("sick-amd", healthy)


def test_a_hung_tool_is_stopped_on_the_host_the_host_stays_online_and_its_gpus_read_unknown(sick: Sandbox,
                                                                                          fleet: Fleet) -> None:
    _break(sick, mode="hung", hang_s=60)
    snap = fleet.hosts.heartbeat().snapshots[0]
    # Bounded on the host: the beat answers ("ok"), it never reaches the controller's command timeout ("timeout").
    assert snap.status == "ok" and snap.gpus == [] and "did not answer within" in (snap.error or ""), snap
    assert snap.gpu_health is not None and [g.state for g in snap.gpu_health.gpus] == ["unknown", "unknown"]
    assert "host: GPU tool did not answer (nvidia-smi)" in snap.gpu_health.host_reasons, snap.gpu_health
    shown = json.loads(_cli(fleet, "agents", "show", "sick", "--json"))
    assert shown["health"] == "online" and [g["state"] for g in shown["gpu_health"]] == ["unknown", "unknown"], shown
    assert _metrics(fleet)[("fleetctl_gpu_health", (("gpu", "1"), ("state", "unknown")))] == 1.0
    job = fleet.submit("true", gpus=1, agent="sick")
    drive_once(fleet.hosts)
    assert fleet.job(job.id).record.state == "queued"  # no GPU is placed on while the tool does not answer

    _break(sick, mode="ok")
    again = fleet.hosts.heartbeat().snapshots[0]
    assert again.gpu_health is not None and [g.state for g in again.gpu_health.gpus] == ["ok", "ok"], again


def test_an_amd_gpu_gone_where_no_bus_id_is_read_is_found_by_the_count(sick_amd: Sandbox, tmp_path: Path) -> None:
    healthy = sick_amd.host_state("sick-amd")
    sick_amd.write_host_state("sick-amd", {**healthy, "bus_ids": False})
    try:
        with Fleet.from_config(sick_amd.inventory_path, state_dir=tmp_path / "state") as fleet:
            first = fleet.hosts.heartbeat().snapshots[0]
            assert first.gpu_health is not None and first.gpu_health.buses == {} and first.gpu_health.host_reasons == []
            sick_amd.write_host_state("sick-amd", {**healthy, "bus_ids": False, "faults": {"1": ["vanished"]}})
            fleet.hosts.heartbeat()
        # A cold controller (a fresh process) still knows the count from the store.
        shown = json.loads(_cli(fleet, "agents", "show", "sick-amd", "--json"))
        assert shown["gpu_host"] == ["host: GPU missing since the last heartbeat (1 of 2 GPUs answer)"], shown
        with Fleet.from_config(sick_amd.inventory_path, state_dir=tmp_path / "state") as cold:
            again = cold.hosts.heartbeat().snapshots[0]
        assert again.gpu_health is not None and "(1 of 2 GPUs answer)" in " ".join(again.gpu_health.host_reasons)
        assert "1 of 2 GPUs answer" in run_cli("agents", "show", "sick-amd", "--config", str(sick_amd.inventory_path),
                                               "--state-dir", str(tmp_path / "state")).stdout
    finally:
        sick_amd.write_host_state("sick-amd", healthy)
