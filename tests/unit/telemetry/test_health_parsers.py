"""GPU health parsers (issue 22) on the real captures in ../shared/gpu-outputs/real, our fixtures in
tests/fixtures/gpu/health (see its README for where each came from), and hostile input."""

from __future__ import annotations

from pathlib import Path

import pytest

from fleetctl.errors import ParseError
from fleetctl.telemetry.parsers.amd_health import findings_of_amd, parse_amd_health
from fleetctl.telemetry.parsers.findings import Finding, normalize_bus_id
from fleetctl.telemetry.parsers.nvidia_health import (
    HEALTH_FIELDS,
    fields_after_refusal,
    findings_of,
    health_query_command,
    health_query_fields,
    merge_remapped_rows,
    missing_gpus,
    needs_remapped_rows_query,
    parse_health_cached,
    parse_health_csv,
    parse_help_query_gpu,
    refused_field,
)
from fleetctl.telemetry.parsers.xid import kernel_log_command, parse_kernel_log
from tests.shared import FIXTURES, REAL_CAPTURES, require_shared

HEALTH = FIXTURES / "health"


def _text(name: str) -> str:
    return (HEALTH / name).read_text()


def _kinds(findings: list[Finding], gpu: int | None) -> set[str]:
    return {f.key for f in findings if f.gpu == gpu}


# --- learning a driver's fields ----------------------------------------------------------------------


def test_help_of_r535_lists_both_spellings_and_lacks_remapped_rows() -> None:
    fields = parse_help_query_gpu(_text("nvidia_help_r535_excerpt.txt"))
    assert {"clocks_event_reasons.hw_slowdown", "clocks_throttle_reasons.hw_slowdown", "retired_pages.sbe",
            "gpu_bus_id", "pcie.link.width.max", "retired_pages.pending"} <= fields
    assert "remapped_rows.pending" not in fields and "gpu_recovery_action" not in fields
    asked = health_query_fields(fields)
    assert asked[:3] == ["index", "pci.bus_id", "uuid"]
    assert "clocks_event_reasons.hw_slowdown" in asked and "clocks_throttle_reasons.hw_slowdown" not in asked
    assert "gpu_recovery_action" not in asked and not any(f.startswith("remapped_rows") for f in asked)
    assert needs_remapped_rows_query(fields)  # R535 has them only through --query-remapped-rows


def test_help_of_an_old_driver_gives_the_throttle_spelling() -> None:
    fields = parse_help_query_gpu(_text("nvidia_help_old_throttle_excerpt.txt"))
    asked = health_query_fields(fields)
    assert "clocks_throttle_reasons.hw_slowdown" in asked and "clocks_throttle_reasons.active" in asked
    assert not any(f.startswith("clocks_event_reasons") for f in asked)
    assert "pcie.link.gen.current" in asked  # the old name of gpucurrent
    assert "retired_pages.single_bit_ecc.count" in asked
    command = health_query_command(fields)
    assert command.startswith("nvidia-smi --query-gpu=index,pci.bus_id,uuid,") and command.endswith("--format=csv,nounits")


def test_every_health_field_the_newest_driver_knows_is_asked_for() -> None:
    every = {name for pair in HEALTH_FIELDS for name in pair if name} | {"index", "pci.bus_id", "uuid"}
    asked = health_query_fields(every)
    assert len(asked) == 3 + len(HEALTH_FIELDS) and not needs_remapped_rows_query(every)


@pytest.mark.parametrize("text", ["", "garbage\n" * 1000, "\x00\xff" * 5000, '"' * 100_000, "NVIDIA-SMI has failed"])
def test_help_that_is_not_help_gives_no_fields(text: str) -> None:
    assert parse_help_query_gpu(text) == frozenset()
    assert health_query_fields(frozenset()) == ["index", "pci.bus_id", "uuid"]


def test_a_refused_field_is_named_and_dropped() -> None:
    refusal = 'Field "gpu_recovery_action" is not a valid field to query.\n\n'
    assert refused_field(refusal) == "gpu_recovery_action"
    assert refused_field("all fine") is None
    asked = ["index", "pci.bus_id", "gpu_recovery_action"]
    assert fields_after_refusal(asked, refusal) == ["index", "pci.bus_id"]
    assert fields_after_refusal(asked, "0, 00000000:18:00.0, None") is None
    assert fields_after_refusal(["index"], refusal) is None  # not ours to drop: no loop


def test_noheader_output_reads_with_the_fields_the_command_named() -> None:
    text = "0, 00000000:18:00.0, 97, 81559, 2, Yes\n1, 00000000:2A:00.0, 0, 81559, 0, No\n"
    fields = ["index", "pci.bus_id", "utilization.gpu", "memory.total", "ecc.errors.uncorrected.volatile.total",
              "remapped_rows.pending"]
    readings = parse_health_csv(text, fields=fields)
    assert [(r.index, r.ecc_uncorrected_volatile, r.remapped_rows_pending) for r in readings] == [(0, 2, True), (1, 0, False)]
    with pytest.raises(ParseError):
        parse_health_csv(text)


# --- the CSV ----------------------------------------------------------------------------------------

REAL_ALLFIELDS = [
    "nvidia-smi_1xH100-80GB-HBM3_drv590.48.01_query-gpu-allfields_csv_load.txt",
    "nvidia-smi_1xH100-MIG-enabled_drv590.48.01_query-gpu-allfields_csv_load.txt",
    "nvidia-smi_1xL40S_drv595.80_query-gpu-allfields_csv_load.txt",
    "nvidia-smi_1xRTX2080SUPER_Windows-WDDM_drv610.62_query-gpu-allfields_csv_load.txt",
    "nvidia-smi_1xRTX4080SUPER_drv595.71.05_query-gpu-allfields_csv_load.txt",
]


@pytest.mark.parametrize("name", REAL_ALLFIELDS)
def test_real_captures_are_healthy_gpus(name: str) -> None:
    readings = parse_health_csv((require_shared(REAL_CAPTURES) / name).read_text())
    assert len(readings) == 1
    reading = readings[0]
    assert reading.index == 0 and reading.bus_id and reading.uuid
    assert reading.pcie_width_current == reading.pcie_width_max == 16
    assert reading.recovery_action is None and reading.clock_events_active == 0  # "None": nothing to do and not reading.clock_events
    assert not reading.requires_reset and not reading.errors
    assert findings_of(readings) == []  # healthy: no finding at all


def test_real_h100_reads_ecc_and_remapped_rows_and_mig_reads_them_unknown() -> None:
    h100 = parse_health_csv((require_shared(REAL_CAPTURES) / REAL_ALLFIELDS[0]).read_text())[0]
    assert (h100.ecc_uncorrected_volatile, h100.ecc_corrected_aggregate) == (0, 0)
    assert (h100.remapped_rows_pending, h100.remapped_rows_failure, h100.remapped_rows_uncorrectable) == (False, False, 0)
    assert h100.retired_pages_pending is None and h100.retired_pages_sbe is None  # [N/A] on HBM3: unknown, not 0
    mig = parse_health_csv((require_shared(REAL_CAPTURES) / REAL_ALLFIELDS[1]).read_text())[0]
    assert mig.remapped_rows_pending is None and mig.remapped_rows_uncorrectable is None
    windows = parse_health_csv((require_shared(REAL_CAPTURES) / REAL_ALLFIELDS[3]).read_text())[0]
    assert windows.ecc_uncorrected_volatile is None and windows.pcie_gen_max == 3


def test_faulty_gpus_give_their_findings() -> None:
    found = findings_of(parse_health_csv(_text("nvidia_health_faults.csv")))
    assert _kinds(found, 0) == set()
    assert _kinds(found, 1) == {"ecc_uncorrected_volatile", "ecc_uncorrected_aggregate", "ecc_corrected_volatile",
                                "remap_uncorrectable", "remap_pending"}
    assert _kinds(found, 2) == {"remap_failure", "clock_hw_slowdown", "clock_hw_thermal_slowdown", "pcie_width_degraded",
                                "pcie_gen_degraded", "recovery_action:reset"}
    # GPU 3 is idle: its link at gen 1 saves power and is no finding; Drain P2P is.
    assert _kinds(found, 3) == {"recovery_action:drain_p2p"}
    width = next(f for f in found if f.kind == "pcie_width_degraded")
    assert width.detail == "x4 of x16" and width.bus_id == "0000:3a:00"


def test_a_slow_pcie_generation_counts_only_on_a_busy_gpu() -> None:
    text = "index, pci.bus_id, pcie.link.gen.gpucurrent, pcie.link.gen.max\n0, 00000000:18:00.0, 1, 5\n"
    readings = parse_health_csv(text)
    assert findings_of(readings) == [] and findings_of(readings, {0: 12.0}) == []
    assert [f.kind for f in findings_of(readings, {0: 99.0})] == ["pcie_gen_degraded"]


def test_the_cached_parse_returns_the_same_readings() -> None:
    text = _text("nvidia_health_faults.csv")
    first = parse_health_cached(text)
    assert parse_health_cached(text) is first and list(first) == parse_health_csv(text)


def test_an_old_driver_reads_throttle_spelling_and_retired_pages() -> None:
    readings = parse_health_csv(_text("nvidia_health_old_driver.csv"))
    assert readings[1].clock_events == frozenset({"clock_hw_slowdown"}) and readings[1].pcie_gen_current == 3
    found = findings_of(readings)
    assert _kinds(found, 0) == set()
    assert _kinds(found, 1) == {"clock_hw_slowdown", "pcie_width_degraded", "retired_pages_sbe", "retired_pages_dbe",
                                "retired_pages_limit", "retired_pages_pending"}


def test_remapped_rows_from_their_own_query_join_by_bus_id() -> None:
    readings = parse_health_csv(_text("nvidia_health_old_driver.csv"))
    remapped = parse_health_csv(_text("nvidia_remapped_rows.csv"))
    assert remapped[1].remapped_rows_pending is True and remapped[0].remapped_rows_failure is False
    merged = merge_remapped_rows(readings, remapped)
    assert merged[1].remapped_rows_pending is True and merged[1].remapped_rows_uncorrectable == 1
    assert "remap_pending" in _kinds(findings_of(merged), 1) and "remap_pending" not in _kinds(findings_of(merged), 0)


def test_mig_and_vgpu_values_are_unknown_never_findings() -> None:
    readings = parse_health_csv(_text("nvidia_health_mig_vgpu.csv"))
    assert readings[1].ecc_uncorrected_volatile is None and readings[1].pcie_width_current is None
    assert readings[1].utilization_gpu_pct == 12 and readings[0].utilization_gpu_pct is None
    assert findings_of(readings) == []


def test_requires_reset_and_err_values_are_findings() -> None:
    found = findings_of(parse_health_csv(_text("nvidia_health_errors.csv")))
    assert _kinds(found, 0) == {"gpu_requires_reset"}
    assert _kinds(found, 1) == {"value_error"}
    assert "utilization.gpu" in next(f.detail for f in found if f.gpu == 1)


def test_a_vanished_gpu_is_missing_by_bus_id_or_by_count() -> None:
    readings = parse_health_csv(_text("nvidia_health_old_driver.csv"))
    gone = missing_gpus({"0000:04:00": 0, "0000:05:00": 1, "0000:06:00": 2}, readings)
    assert [(f.kind, f.gpu, f.bus_id) for f in gone] == [("gpu_missing", 2, "0000:06:00")]
    assert missing_gpus({}, readings, previous_count=3)[0].gpu is None
    assert missing_gpus({"0000:04:00": 0}, readings, previous_count=2) == []


HOSTILE_CSV = [
    ("garbage", "\x00\x01\x02 not csv at all"),
    ("no header", "0, 00000000:18:00.0, GPU-x, 0\n"),
    ("truncated row", "index, pci.bus_id, ecc.errors.uncorrected.volatile.total\n0, 00000000:18:00.0\n"),
    ("gigantic", "index, pci.bus_id\n" + "0, 00000000:18:00.0\n" * 5000),
    ("huge field", "index, uuid\n0, " + "x" * 200_000 + "\n"),
]


@pytest.mark.parametrize(("what", "text"), HOSTILE_CSV, ids=[w for w, _ in HOSTILE_CSV])
def test_hostile_csv_raises_one_line_parse_errors(what: str, text: str) -> None:
    with pytest.raises(ParseError) as caught:
        parse_health_csv(text)
    assert "\n" not in str(caught.value) and len(str(caught.value)) < 300


def test_hostile_values_are_unknown_not_crashes() -> None:
    text = ("index, pci.bus_id, uuid, ecc.errors.uncorrected.volatile.total, pcie.link.width.current, pcie.link.width.max, "
            "clocks_event_reasons.active, gpu_recovery_action\n"
            "-1, zz:zz, \x1b[2J, 1e400, -4, nan, 0xZZ, \x1b]0;owned\x07Reset\n"
            "99999999999, 00000000:18:00.0, u, 99999999999999999999, 4.5, inf, 0x" + "F" * 40 + ", None\n")
    readings = parse_health_csv(text)
    assert readings[0].index is None and readings[0].bus_id is None and readings[0].ecc_uncorrected_volatile is None
    assert readings[1].ecc_uncorrected_volatile is None and readings[1].clock_events_active is None
    assert "\x1b" not in (readings[0].uuid or "") and "\x1b" not in (readings[0].recovery_action or "")
    assert all("\x1b" not in f.detail for f in findings_of(readings))


def test_bus_ids_normalize_across_spellings() -> None:
    assert normalize_bus_id("00000000:3B:00.0") == normalize_bus_id("PCI:0000:3b:00".removeprefix("PCI:")) == "0000:3b:00"
    assert normalize_bus_id("3b:00.0") == "0000:3b:00"
    assert normalize_bus_id("garbage") is None and normalize_bus_id("100000000:3b:00.0") is None


# --- kernel log ---------------------------------------------------------------------------------------

BUSES = {"00000000:3B:00.0": 0, "00000000:86:00.0": 1, "00000000:AF:00.0": 2}


def test_journal_xids_map_to_gpus_with_times_and_cursor() -> None:
    scan = parse_kernel_log(_text("journal_short_iso.txt"), BUSES)
    assert scan.readable and scan.cursor and scan.cursor.startswith("s=8f2c1d7e")
    assert [(f.code, f.gpu) for f in scan.findings] == [("13", 0), ("31", 1), ("79", 2), ("48", 0), ("63", 0)]
    fallen = scan.findings[2]
    assert fallen.bus_id == "0000:af:00" and fallen.detail.startswith("pid='<unknown>'")
    assert fallen.at is not None and fallen.at % 86400 == 9 * 3600 + 14 * 60 + 31  # 09:14:31 UTC


def test_the_multiline_fallen_off_the_bus_counts_as_xid_79_and_dmesg_uptime_dates_with_boot_time() -> None:
    scan = parse_kernel_log(_text("dmesg_raw_fallen_multiline.txt"), {"0000:b3:00.0": 5}, boot_time=1_700_000_000.0)
    assert [(f.code, f.gpu, f.bus_id) for f in scan.findings] == [("79", 5, "0000:b3:00"), ("32", None, "0000:01:00")]
    assert scan.findings[0].at == pytest.approx(1_700_000_000.0 + 1843.308145)
    assert parse_kernel_log(_text("dmesg_raw_fallen_multiline.txt")).findings[0].at is None


def test_dmesg_iso_and_journal_short_formats() -> None:
    iso = parse_kernel_log(_text("dmesg_iso.txt"))
    assert [f.code for f in iso.findings] == ["79", "119"] and iso.findings[1].at == pytest.approx(1705287605.123456)
    short = parse_kernel_log(_text("journal_short_default.txt"))
    assert [(f.code, f.at) for f in short.findings] == [("79", None)] and short.cursor is None


@pytest.mark.parametrize("name", ["journal_denied.txt", "dmesg_denied.txt"])
def test_an_unreadable_log_says_which_group_grants_it(name: str) -> None:
    scan = parse_kernel_log(_text(name))
    assert not scan.readable and scan.findings == []
    assert scan.problem and "adm" in scan.problem and "systemd-journal" in scan.problem and "\n" not in scan.problem


def test_an_empty_log_is_readable_with_no_findings() -> None:
    scan = parse_kernel_log("-- No entries --\n")
    assert scan.readable and scan.findings == [] and scan.cursor is None


def test_a_storm_is_bounded_to_the_newest_lines() -> None:
    storm = "".join(f"2026-09-14T09:14:{i % 60:02d}+0000 h kernel: NVRM: Xid (PCI:0000:3b:00): 45, pid={i}, x\n"
                    for i in range(10_000)) + "-- cursor: s=abc\n"
    scan = parse_kernel_log(storm, max_lines=500)
    assert scan.truncated and len(scan.findings) == 500 and scan.cursor == "s=abc"
    assert scan.findings[-1].detail.startswith("pid=9999")


@pytest.mark.parametrize("text", ["\x00" * 100_000, "NVRM: Xid (PCI:0000:3b:00): " + "9" * 5000, "[" * 50_000,
                                  "NVRM: Xid (PCI:zz:zz:zz): 79, x", "NVRM: Xid (PCI:0000:3b:00): 79" + "\x1b[2J" * 1000,
                                  "x" * 1_000_000])
def test_hostile_kernel_logs_never_raise(text: str) -> None:
    scan = parse_kernel_log(text)
    assert all(len(f.detail) <= 160 and "\x1b" not in f.detail for f in scan.findings)


def test_the_kernel_log_command_quotes_the_cursor_and_always_exits_0() -> None:
    command = kernel_log_command("s=abc;i=1'$(reboot)", max_lines=100)
    assert "--after-cursor='s=abc;i=1'\"'\"'$(reboot)'" in command and command.endswith("; true")
    assert "journalctl -k -o short-iso" in command and "dmesg --time-format iso" in command
    assert "--after-cursor" not in kernel_log_command(None)


# --- AMD ---------------------------------------------------------------------------------------------


def test_amd_smi_ecc_pcie_bad_pages_and_threshold() -> None:
    readings = parse_amd_health(_text("amd_smi_metric_ecc_pcie_rocm7.json"), _text("amd_smi_static_bus_ras.json"),
                                _text("amd_smi_bad_pages.json"))
    assert [r.index for r in readings] == [0, 1, 2]
    assert readings[1].pcie_width == 8 and readings[1].pcie_width_max == 16 and readings[1].bus_id == "0000:3d:00"
    assert readings[2].bad_pages_retired is None  # "N/A": unknown, never zero
    found = findings_of_amd(readings)
    assert _kinds(found, 0) == set()
    assert _kinds(found, 1) == {"ecc_uncorrected_volatile", "ecc_deferred", "ecc_corrected_volatile",
                                "retired_pages_pending", "retired_pages_dbe", "bad_page_threshold_exceeded",
                                "pcie_width_degraded"}
    assert _kinds(found, 2) == set()


def test_amd_smi_rocm6_list_shape_with_na_counts_and_the_real_static_capture() -> None:
    readings = parse_amd_health(_text("amd_smi_metric_rocm6_list.json"))
    assert readings[0].pcie_width == 8 and readings[0].ecc_uncorrectable is None and findings_of_amd(readings) == []
    real = require_shared(REAL_CAPTURES) / "amd-smi_8xMI300X_rocm7.2.1_static_json_nonroot-permission-banner.txt"
    static = parse_amd_health(static=real.read_text())
    assert len(static) == 8 and all(r.pcie_width_max == 16 and r.bad_page_threshold_exceeded is None for r in static)
    assert static[0].bus_id == "0000:1b:00"


@pytest.mark.parametrize("text", ["no json here", "{", "[" * 100_000 + "]" * 100_000, '{"gpu_data": 5}',
                                  "[" + ",".join(["{}"] * 2000) + "]"])
def test_hostile_amd_json_raises_one_line_parse_errors(text: str) -> None:
    with pytest.raises(ParseError) as caught:
        parse_amd_health(metric=text)
    assert "\n" not in str(caught.value)


def test_no_amd_answer_is_no_reading() -> None:
    assert parse_amd_health("", None, "") == []


def test_amd_values_of_wrong_types_are_unknown() -> None:
    text = '[{"gpu": "0", "ecc": {"total_uncorrectable_count": true, "total_deferred_count": -1}, "pcie": {"width": "x16"}}]'
    assert findings_of_amd(parse_amd_health(text)) == []


def test_fixture_readme_names_every_fixture(tmp_path: Path) -> None:
    readme = (HEALTH / "README.md").read_text()
    for path in HEALTH.iterdir():
        if path.name != "README.md":
            assert f"`{path.name}`" in readme, f"{path.name} has no source line in {HEALTH / 'README.md'}"
