"""GPU health against real sshd (issue 22): the sandbox breaks a GPU, its tool output comes back over
SSH, and the parsers and the judgment find it."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from fleetctl.errors import CommandTimeout
from fleetctl.inventory.config import load_config
from fleetctl.inventory.routes import route_for
from fleetctl.sandbox import HostSpec, Sandbox
from fleetctl.ssh import connect
from fleetctl.ssh.seam import Connection
from fleetctl.telemetry.gpu_health import judge
from fleetctl.telemetry.parsers.amd_health import BAD_PAGES_COMMAND, METRIC_COMMAND, STATIC_COMMAND, findings_of_amd, parse_amd_health
from fleetctl.telemetry.parsers.nvidia_health import (
    findings_of,
    health_query_command,
    missing_gpus,
    parse_health_csv,
    parse_help_query_gpu,
)
from fleetctl.telemetry.parsers.xid import kernel_log_command, parse_kernel_log
from tests.conftest import require_sshd

pytestmark = pytest.mark.no_store  # never opens a store


@pytest.fixture(scope="module")
def sick(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    require_sshd()
    sandbox = Sandbox(tmp_path_factory.mktemp("gpu-health"),
                      [HostSpec("sick", gpus=3), HostSpec("sick-amd", vendor="amd", gpus=2, extra_tools=["amd-smi"])])
    sandbox.up()
    yield sandbox
    sandbox.down()


@pytest.fixture
def conn(sick: Sandbox) -> Iterator[Connection]:
    healthy = sick.host_state("sick")
    with connect(route_for(load_config(sick.inventory_path).get("sick"))) as connection:
        yield connection
    sick.write_host_state("sick", healthy)


def _break(sandbox: Sandbox, **changes: Any) -> None:
    sandbox.write_host_state("sick", {**sandbox.host_state("sick"), **changes})


def _health(conn: Connection) -> tuple[frozenset[str], str]:
    fields = parse_help_query_gpu(conn.run("nvidia-smi --help-query-gpu", timeout=30).stdout)
    result = conn.run(health_query_command(fields), timeout=30)
    assert result.exit_code == 0, result.stdout
    return fields, result.stdout


def test_a_healthy_host_has_no_findings_then_a_broken_gpu_is_found(sick: Sandbox, conn: Connection) -> None:
    fields, healthy = _health(conn)
    assert "clocks_event_reasons.hw_slowdown" in fields and "gpu_recovery_action" in fields
    assert findings_of(parse_health_csv(healthy)) == []
    _break(sick, faults={"1": ["ecc_dbe"], "2": ["pcie_width", "remap_pending", "hw_slowdown"]})
    _, broken = _health(conn)
    verdict = judge(findings_of(parse_health_csv(broken)), now=time.time(), gpus=range(3))
    assert {i: v.state for i, v in verdict.gpus.items()} == {0: "ok", 1: "failed", 2: "failed"}
    assert verdict.gpus[1].reason == "GPU 1: uncorrectable ECC errors since the driver loaded (2)"
    assert "GPU 2: PCIe link narrower than its max (x4 of x16)" in verdict.gpus[2].reasons


def test_xid_lines_in_the_kernel_journal_map_to_the_gpu(sick: Sandbox, conn: Connection) -> None:
    now = time.time()
    _break(sick, kernel_log=[{"at": now - 30, "gpu": 0, "xid": 13}, {"at": now - 20, "gpu": 2, "xid": 79},
                             {"at": now - 10, "message": "usb 1-1: new high-speed USB device"}])
    readings = parse_health_csv(_health(conn)[1])
    buses = {r.bus_id: r.index for r in readings if r.bus_id and r.index is not None}
    first = parse_kernel_log(conn.run(kernel_log_command(None), timeout=30).stdout, buses)
    assert first.readable and first.cursor
    assert [(f.code, f.gpu) for f in first.findings] == [("13", 0), ("79", 2)]
    verdict = judge(first.findings, now=time.time(), gpus=range(3))
    assert {i: v.state for i, v in verdict.gpus.items()} == {0: "ok", 1: "ok", 2: "failed"}
    assert verdict.gpus[2].reason.startswith("GPU 2: Xid 79 (fallen off the bus) at ")
    # From the cursor on, only what is new comes back.
    again = parse_kernel_log(conn.run(kernel_log_command(first.cursor), timeout=30).stdout, buses)
    assert again.findings == [] and again.readable


def test_a_journal_this_user_may_not_read_is_said_so(sick: Sandbox, conn: Connection) -> None:
    _break(sick, journal="denied")
    scan = parse_kernel_log(conn.run(kernel_log_command(None), timeout=30).stdout)
    assert not scan.readable and scan.problem and "systemd-journal" in scan.problem


def test_a_vanished_gpu_is_missing(sick: Sandbox, conn: Connection) -> None:
    before = parse_health_csv(_health(conn)[1])
    known = {r.bus_id: r.index for r in before if r.bus_id and r.index is not None}
    _break(sick, faults={"1": ["vanished"]})
    after = parse_health_csv(_health(conn)[1])
    assert len(after) == 2
    gone = missing_gpus(known, after)
    assert [(f.gpu, f.bus_id) for f in gone] == [(1, before[1].bus_id)]
    assert judge(gone, now=time.time(), gpus=range(3)).quarantined() == [1]


def test_an_old_driver_is_asked_only_what_it_knows(sick: Sandbox, conn: Connection) -> None:
    _break(sick, old_driver=True, faults={"0": ["hw_slowdown"]})
    fields, text = _health(conn)
    assert "clocks_throttle_reasons.hw_slowdown" in fields and "clocks_event_reasons.hw_slowdown" not in fields
    found = findings_of(parse_health_csv(text))
    assert {(f.gpu, f.kind) for f in found} == {(0, "clock_hw_slowdown")}


def test_a_hung_tool_times_out(sick: Sandbox, conn: Connection) -> None:
    _break(sick, mode="hung", hang_s=20)
    started = time.monotonic()
    with pytest.raises(CommandTimeout):
        conn.run("nvidia-smi --help-query-gpu", timeout=2)
    assert time.monotonic() - started < 15


def test_a_broken_amd_gpu_is_found_through_amd_smi(sick: Sandbox) -> None:
    healthy = sick.host_state("sick-amd")
    try:
        with connect(route_for(load_config(sick.inventory_path).get("sick-amd"))) as amd:
            def readings() -> list[Any]:
                answers = [amd.run(command, timeout=30) for command in (METRIC_COMMAND, STATIC_COMMAND, BAD_PAGES_COMMAND)]
                assert all(a.exit_code == 0 for a in answers)
                return parse_amd_health(*(a.stdout for a in answers))

            assert findings_of_amd(readings()) == []
            sick.write_host_state("sick-amd", {**healthy, "faults": {"1": ["ecc_dbe", "pcie_width", "bad_pages_pending"]}})
            verdict = judge(findings_of_amd(readings()), now=time.time(), gpus=range(2))
            assert {i: v.state for i, v in verdict.gpus.items()} == {0: "ok", 1: "failed"}
            assert "GPU 1: PCIe link narrower than its max (x4 of x16)" in verdict.gpus[1].reasons
    finally:
        sick.write_host_state("sick-amd", healthy)
