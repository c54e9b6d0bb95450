"""The heartbeat's health part (fleetctl.telemetry.health_beat): what it asks, and what it makes of any answer."""

from __future__ import annotations

from fleetctl.telemetry.health_beat import HEALTH_MARK, JOURNAL_MARK, HostMemory, health_script, read_health, remembered
from fleetctl.telemetry.snapshot import GpuSample

GPUS = [GpuSample(index=i, vendor="nvidia") for i in range(2)]
HEADER = "index, pci.bus_id, uuid, ecc.errors.uncorrected.volatile.total, pcie.link.width.current, pcie.link.width.max, driver_version"
ROWS = ["0, 00000000:01:00.0, GPU-0, 0, 16, 16, 550.1", "1, 00000000:02:00.0, GPU-1, 0, 16, 16, 550.1"]


def answer(rows: list[str] = ROWS, journal: str = "") -> str:
    return "\n".join([HEADER, *rows]) + f"\n\n{JOURNAL_MARK}\n{journal}"


def test_a_host_not_seen_before_learns_its_fields_in_the_same_exec() -> None:
    script = health_script(None)
    assert "--help-query-gpu" in script and HEALTH_MARK in script and "journalctl -k" in script
    report = read_health(answer(), None, GPUS, None)
    assert [g.state for g in report.gpus] == ["ok", "ok"] and report.driver_version == "550.1"
    memory = remembered(report, None)
    assert memory.fields is not None and "pcie.link.width.max" in memory.fields
    later = health_script(memory)
    assert "--help-query-gpu" not in later and f"--query-gpu={','.join(memory.fields)}" in later


def test_a_new_driver_relearns_and_the_cursor_is_kept() -> None:
    memory = HostMemory(fields=("index", "pci.bus_id", "uuid", "x"), driver_version="535.1", cursor="c1")
    report = read_health(answer(), memory, GPUS, None)
    after = remembered(report, memory)
    assert after.fields is None and after.cursor == "c1"
    assert "--after-cursor=c1" in health_script(after)


def test_a_calm_beat_costs_one_lookup_and_a_broken_one_is_judged() -> None:
    first, second = read_health(answer(), None, GPUS, None), read_health(answer(), None, GPUS, None)
    assert first == second and first is not second  # the same report, handed out as a copy
    broken = read_health(answer([ROWS[0], "1, 00000000:02:00.0, GPU-1, 3, 4, 16, 550.1"]), None, GPUS, None)
    assert [g.state for g in broken.gpus] == ["ok", "failed"]
    assert broken.gpus[1].values[1] == 3.0  # DCGM_FI_DEV_ECC_DBE_VOL_TOTAL


def test_any_text_is_a_report_never_an_exception() -> None:
    for text in ("", "garbage\x00\udcff", "index\n1, 2, 3, 4", f"{HEADER}\n{ROWS[0]}\n\n{JOURNAL_MARK}\nNVRM: Xid (PCI:0000:02:00): 79"):
        report = read_health(text, HostMemory(buses={"0000:02:00": 1}), GPUS, None)
        assert {g.index for g in report.gpus} >= {0, 1}
    unreadable = read_health("Failed to initialize NVML: Unknown Error", None, GPUS, None)
    assert [g.state for g in unreadable.gpus] == ["unknown", "unknown"]  # never shown as healthy


def test_a_vanished_gpu_is_missing_against_the_remembered_buses() -> None:
    memory = HostMemory(buses={"0000:01:00": 0, "0000:02:00": 1})
    report = read_health(answer([ROWS[0]]), memory, GPUS[:1], None)
    assert report.of(1) is not None and report.of(1).missing and report.of(1).state == "failed"  # type: ignore[union-attr]
