"""The heartbeat's health part (fleetctl.telemetry.health_beat): what it asks, and what it makes of any answer."""

from __future__ import annotations

from fleetctl.telemetry.bounded import HUNG_MARK
from fleetctl.telemetry.health_amd import AMD_MARK, PAGES_MARK, STATIC_MARK
from fleetctl.telemetry.health_beat import DCGM_FIELDS, HEALTH_MARK, JOURNAL_MARK, HostMemory, health_script, read_health, remembered
from fleetctl.telemetry.snapshot import GpuSample
from tests.shared import FIXTURES, REAL_CAPTURES, require_shared

HEALTH = FIXTURES / "health"

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


# -- AMD: amd-smi's three answers in the same exec (fleetctl.telemetry.health_amd) ------------------------
AMD_GPUS = [GpuSample(index=i, vendor="amd") for i in range(3)]


def amd_answer(metric: str | None = None, static: str | None = None, pages: str | None = None, journal: str = "") -> str:
    def text(name: str) -> str:
        return (HEALTH / name).read_text()
    metric = text("amd_smi_metric_ecc_pcie_rocm7.json") if metric is None else metric
    static = text("amd_smi_static_bus_ras.json") if static is None else static
    pages = text("amd_smi_bad_pages.json") if pages is None else pages
    return f"{AMD_MARK}\n{metric}\n{STATIC_MARK}\n{static}\n{PAGES_MARK}\n{pages}\n{JOURNAL_MARK}\n{journal}"


def test_an_amd_host_is_asked_amd_smi_in_the_same_exec_and_then_only_that() -> None:
    first = health_script(None)
    assert "amd-smi metric --ecc --pcie --json" in first and "nvidia-smi --help-query-gpu" in first
    report = read_health(amd_answer(), None, AMD_GPUS, None)
    memory = remembered(report, None)
    assert memory.tool == "amd-smi" and memory.buses == {"0000:1b:00": 0, "0000:3d:00": 1}
    later = health_script(memory)
    assert "nvidia-smi" not in later and "amd-smi bad-pages --json" in later and "journalctl -k" in later
    nvidia = remembered(read_health(answer(), None, GPUS, None), None)
    assert nvidia.tool == "nvidia-smi" and "amd-smi" not in health_script(nvidia)


def test_amd_findings_are_judged_by_the_same_table_and_exported_as_dcgm_values() -> None:
    report = read_health(amd_answer(), None, AMD_GPUS, None)
    assert [g.state for g in report.gpus] == ["ok", "failed", "ok"]
    reasons = " ".join(report.gpus[1].reasons)
    assert "uncorrectable ECC errors since the driver loaded (1)" in reasons and "x8 of x16" in reasons
    assert "bad pages past the board's threshold" in reasons
    values = dict(zip([attribute for _, attribute, _ in DCGM_FIELDS], report.gpus[1].values, strict=True))
    assert values["pcie_width_current"] == 8.0 and values["pcie_width_max"] == 16.0 and values["pcie_gen_current"] == 4.0
    assert values["ecc_uncorrected_volatile"] == 1.0 and values["retired_pages_pending"] == 1.0
    assert values["remapped_rows_pending"] is None  # AMD has no row remapping: unknown, not zero
    assert report.gpus[2].values == []  # listed by rocm-smi, not by amd-smi's metric: nothing read, nothing found


def test_an_amd_answer_that_cannot_be_read_is_unknown_and_a_lost_section_costs_only_its_fields() -> None:
    unreadable = read_health(amd_answer(metric="ERROR:root:amdgpu not found in modules"), None, AMD_GPUS, None)
    assert [g.state for g in unreadable.gpus] == ["unknown"] * 3
    no_pages = read_health(amd_answer(pages="Permission denied"), None, AMD_GPUS, None)
    assert no_pages.gpus[1].state == "failed"  # the ECC and the threshold still count
    assert not any("retirement pending" in r for r in no_pages.gpus[1].reasons)


def test_an_amd_gpu_gone_from_amd_smi_is_missing_by_its_bus() -> None:
    memory = HostMemory(buses={"0000:1b:00": 0, "0000:3d:00": 1}, tool="amd-smi")
    static = (HEALTH / "amd_smi_static_bus_ras.json").read_text().replace('"0000:3d:00.0"', '"0000:5f:00.0"')
    report = read_health(amd_answer(static=static), memory, AMD_GPUS, None)
    assert any(f.kind == "gpu_missing" and f.bus_id == "0000:3d:00" for f in report.findings)


def test_the_real_mi300x_static_capture_gives_bus_ids_behind_its_banner() -> None:
    real = require_shared(REAL_CAPTURES) / "amd-smi_8xMI300X_rocm7.2.1_static_json_nonroot-permission-banner.txt"
    report = read_health(amd_answer(static=real.read_text()), None, AMD_GPUS, None)
    assert report.buses == {"0000:1b:00": 0, "0000:3d:00": 1}  # the GPUs metric answered for, by their real bus ids
    assert report.gpus[1].values[15] == 16.0  # DCGM_FI_DEV_PCIE_MAX_LINK_WIDTH from the real capture


def test_a_health_call_that_hung_is_tool_hung_its_gpus_unknown_and_none_missing() -> None:
    metric = (HEALTH / "amd_smi_metric_ecc_pcie_rocm7.json").read_text()
    memory = HostMemory(buses={"0000:1b:00": 0, "0000:3d:00": 1}, tool="amd-smi")
    text = f"{AMD_MARK}\n{metric}\n{STATIC_MARK}\n\n{HUNG_MARK} amd-smi\n{JOURNAL_MARK}\n"
    report = read_health(text, memory, AMD_GPUS[:2], None)
    assert report.gpus[0].state == "unknown" and report.gpus[1].state == "failed"  # what metric said still counts
    assert not any(f.kind == "gpu_missing" for f in report.findings)
    assert report.host_reasons == ["host: GPU tool did not answer (amd-smi)"]
    nvidia = read_health(f"{HEADER}\n{HUNG_MARK} nvidia-smi\n{JOURNAL_MARK}\n", HostMemory(buses={"0000:01:00": 0}), [], None)
    assert [(g.index, g.state, g.missing) for g in nvidia.gpus] == [(0, "unknown", False)]


# -- a vanished GPU on a host without bus ids: the count against the most seen since it booted ----------------
def test_fewer_gpus_than_before_without_bus_ids_is_a_gpu_missing_host_finding_until_a_reboot() -> None:
    no_bus = "\n".join(["index, uuid, ecc.errors.uncorrected.volatile.total", "0, GPU-0, 0", "1, GPU-1, 0"]) + f"\n\n{JOURNAL_MARK}\n"
    three = [GpuSample(index=i, vendor="amd") for i in range(3)]
    first = read_health(no_bus, None, three, None, booted=1000.0)
    memory = remembered(first, None)
    assert memory.count == 3 and memory.booted == 1000.0 and memory.buses == {}
    assert remembered(read_health(no_bus, memory, three, None, booted=1003.0), memory) == memory  # boot time jitter kept out
    short = read_health(no_bus, memory, three[:2], None, booted=1002.0)
    assert short.host_reasons == ["host: GPU missing since the last heartbeat (2 of 3 GPUs answer)"]
    memory = remembered(short, memory)
    assert memory.count == 3  # still missing next beat: the count is the most seen since the boot
    assert read_health(no_bus, memory, three[:2], None, booted=1001.0).host_reasons
    rebooted = read_health(no_bus, memory, three[:2], None, booted=9000.0)
    assert rebooted.host_reasons == [] and remembered(rebooted, memory).count == 2  # a reboot starts the count again


def test_the_count_is_not_used_where_bus_ids_say_which_gpu_is_gone() -> None:
    memory = HostMemory(buses={"0000:01:00": 0, "0000:02:00": 1}, count=2, booted=1000.0)
    report = read_health(answer([ROWS[0]]), memory, GPUS[:1], None, booted=1000.0)
    assert [f.gpu for f in report.findings if f.kind == "gpu_missing"] == [1]  # the bus, not the count
    assert report.gpu_count == 2
