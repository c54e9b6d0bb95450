"""Parsers against every real capture in ../shared/gpu-outputs/real (skipped, with the reason, when
that folder is absent: see tests/shared.py), plus our own cases and fuzzing."""

from __future__ import annotations

import contextlib
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fleetctl.telemetry.parsers
from fleetctl.errors import DriverError, ParseError, ToolMissingError
from fleetctl.telemetry.parsers import InvalidQueryError, NoGpusError, parse_gpu_output
from fleetctl.telemetry.parsers.values import MAX_EXTRA_FIELDS, MAX_EXTRA_TEXT, MAX_KEY_TEXT
from fleetctl.telemetry.snapshot import MAX_TEXT, GpuSample
from tests.shared import REAL_CAPTURES, require_shared

pytestmark = pytest.mark.no_store  # never opens a store: the PostgreSQL pass deselects it

A100_QUERY = ("nvidia-smi --query-gpu=timestamp,name,pci.bus_id,driver_version,pstate,pcie.link.gen.max,"
              "pcie.link.gen.current,temperature.gpu,utilization.gpu,utilization.memory,memory.total,"
              "memory.free,memory.used --format=csv,noheader")
ALL_FIELDS = "nvidia-smi --query-gpu=$(fields) --format=csv"  # header carries the field list

# capture file -> (command that produced it, GPU count, first GPU's typed values)
EXPECTED: dict[str, tuple[str, int, dict[str, object]]] = {
    "nvidia-smi_1xH100-80GB-HBM3_drv590.48.01_query-gpu-allfields_csv_load.txt": (ALL_FIELDS, 1, {
        "index": 0, "name": "NVIDIA H100 80GB HBM3", "uuid": "GPU-00000000-0000-0000-0000-000000000000",
        "memory_total_mib": 81559, "memory_used_mib": 19818, "memory_free_mib": 61263,
        "utilization_gpu_pct": 100, "temperature_c": 59, "power_draw_w": 631.95, "power_limit_w": 700}),
    "nvidia-smi_1xH100-MIG-enabled_drv590.48.01_query-gpu-allfields_csv_load.txt": (ALL_FIELDS, 1, {
        "utilization_gpu_pct": None, "memory_used_mib": 11125, "power_draw_w": 433.78}),
    "nvidia-smi_1xL40S_drv595.80_query-gpu-allfields_csv_load.txt": (ALL_FIELDS, 1, {
        "name": "NVIDIA L40S", "memory_total_mib": 46068, "power_limit_w": 350}),
    "nvidia-smi_1xRTX4080SUPER_drv595.71.05_query-gpu-allfields_csv_load.txt": (ALL_FIELDS, 1, {
        "name": "NVIDIA GeForce RTX 4080 SUPER", "memory_total_mib": 16376}),
    "nvidia-smi_1xRTX2080SUPER_Windows-WDDM_drv610.62_query-gpu-allfields_csv_load.txt": (ALL_FIELDS, 1, {
        "name": "NVIDIA GeForce RTX 2080 SUPER", "memory_total_mib": 8192, "utilization_gpu_pct": 7}),
    "nvidia-smi_1xTeslaP100-PCIE-16GB_query-gpu_csv-nounits_header-has-units.txt": (
        "nvidia-smi --query-gpu=name,uuid,fan.speed,pstate,memory.reserved,memory.used,memory.free,"
        "utilization.gpu,utilization.memory,temperature.gpu,power.draw,clocks.current.graphics,clocks.current.sm,"
        "clocks.current.memory,clocks.current.video --format=csv,nounits", 1, {
            "name": "Tesla P100-PCIE-16GB", "uuid": "GPU-ef1b2c9b-38d8-2090-2bd1-f567a3eb42a6",
            "memory_used_mib": 0, "memory_free_mib": 16280, "temperature_c": 37, "power_draw_w": 28.16,
            "memory_total_mib": None}),
    "nvidia-smi_4xL40S_drv570.172.08_query-gpu_csv-noheader.txt": (
        "nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader", 4, {
            "name": "NVIDIA L40S", "memory_total_mib": 46068}),
    "nvidia-smi_1xRTX4080-Laptop_Windows_drv616.92_query-gpu_csv-noheader-nounits.txt": (
        "nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader,nounits", 1, {
            "index": 0, "name": "NVIDIA GeForce RTX 4080 Laptop GPU", "memory_total_mib": 12282}),
    "nvidia-smi_1xA100-SXM4-40GB_drv555.42.06_query-gpu_csv-noheader_single-line.txt": (A100_QUERY, 1, {
        "name": "NVIDIA A100-SXM4-40GB", "memory_total_mib": 40960, "memory_free_mib": 40447, "memory_used_mib": 1,
        "temperature_c": 43, "utilization_gpu_pct": 0}),
    "nvidia-smi_3xA100-SXM4-40GB_drv555.42.06_query-gpu_csv-noheader_log-excerpt.txt": (A100_QUERY, 6, {
        "temperature_c": 44}),
    "rocm-smi_4xMI100_rocm6.0.2_json_telegraf-flags.json": ("rocm-smi --json", 4, {
        "index": 0, "name": "Arcturus GL-XL [Instinct MI100]", "uuid": "0x79ccd55167a2124a",
        "memory_total_mib": 34342961152 / 1048576, "memory_used_mib": 6750208 / 1048576, "utilization_gpu_pct": 0,
        "temperature_c": 53, "power_draw_w": 36, "power_limit_w": 290, "vendor": "amd"}),
    "rocm-smi_6xMI100_rocm5.7.1_json_telegraf-flags_leading-blank-line.json": ("rocm-smi --json", 6, {
        "name": "Arcturus GL-XL [Instinct MI100]", "power_limit_w": 290}),
    "rocm-smi_1xVega10XT_rocm4.x_json_telegraf-flags_no-final-newline.json": ("rocm-smi --json", 1, {
        "temperature_c": 39, "memory_total_mib": 16368}),
    "rocm-smi_1xMI250-GCD_drv6.2.4_a-flag_json_oneline.json": ("/usr/bin/rocm-smi -a --json", 1, {
        "name": "AMD INSTINCT MI250 (MCM) OAM AC MBA", "power_draw_w": 89, "power_limit_w": 560}),
    "rocm-smi_1xMI250X-GCD_showproductname_json_pretty-printed-by-poster.json": ("rocm-smi --showproductname --json", 1, {
        "name": "AMD INSTINCT MI200 (MCM) OAM LC MBA HPE C2"}),
    "rocm-smi_dGPU+APU_showmeminfo-vram_json_oneline.json": ("rocm-smi --showmeminfo vram --json", 2, {
        "memory_total_mib": 8573157376 / 1048576}),
    "rocm-smi_2xMI250-GCD_showid-productname-use-memuse-meminfo-P_json_DOUBTFUL-reindented.json": (
        "rocm-smi --showid --showproductname --showuse --showmemuse --showmeminfo vram -P --json", 2, {
            "utilization_gpu_pct": 50}),
    "rocm-smi_1xRX6700XT_rocm6.1.2_json_telegraf-flags_leading-blank-line_DOUBTFUL.json": ("rocm-smi --json", 1, {
        "name": "Navi 22 [Radeon RX 6700/6700 XT / 6800M]"}),
    "rocm-smi_1xR9700-0x7551_rocm-smi5.7.0-ubuntu_i-P-t-f-u-memuse-meminfo-productname_csv_DOUBTFUL-values-edited.csv": (
        "rocm-smi -i -P -t -f -u --showmemuse --showmeminfo vram --showproductname --csv", 1, {
            "memory_total_mib": 32768, "memory_used_mib": 16384, "temperature_c": 38, "utilization_gpu_pct": 3}),
    "rocm-smi_1xR9700-0x7551_rocm-smi7.1.1-ubuntu_i-P-t-f-u-memuse-meminfo-productname_csv_DOUBTFUL-values-edited.csv": (
        "rocm-smi -i -P -t -f -u --showmemuse --showmeminfo vram --showproductname --csv", 1, {
            "memory_total_mib": 32768, "power_draw_w": 15}),
    "amd-smi_8xMI300X_rocm7.2.1_static_json_nonroot-permission-banner.txt": ("amd-smi static --json", 8, {
        "index": 0, "name": "AMD Instinct MI300X OAM", "vendor": "amd"}),
}


def _read(name: str) -> str:
    path = require_shared(REAL_CAPTURES) / name
    if not path.exists():
        pytest.fail(f"missing capture {path}: the shared captures changed; update EXPECTED")
    return path.read_text(encoding="utf-8")


def test_every_gpu_capture_is_covered() -> None:
    gpu_captures = {p.name for p in require_shared(REAL_CAPTURES).iterdir()
                    if p.suffix in (".txt", ".json", ".csv") and "compute-apps" not in p.name
                    and "accounted-apps" not in p.name and "_version_" not in p.name}
    assert gpu_captures == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_real_capture_parses_to_the_values_it_shows(name: str) -> None:
    command, count, first = EXPECTED[name]
    samples = parse_gpu_output(command, _read(name))
    assert len(samples) == count
    for key, value in first.items():
        actual = getattr(samples[0], key)
        if isinstance(value, float):
            assert actual == pytest.approx(value), key
        else:
            assert actual == value, key


def test_extra_keeps_every_other_field_by_the_tools_own_name() -> None:
    name = "nvidia-smi_1xH100-80GB-HBM3_drv590.48.01_query-gpu-allfields_csv_load.txt"
    sample = parse_gpu_output(ALL_FIELDS, _read(name))[0]
    assert sample.extra["driver_version"] == "590.48.01"
    assert sample.extra["pci.bus_id"] == "00000000:00:09.0"
    assert "memory.total" not in sample.extra


def test_rocm_secondary_die_power_is_none() -> None:
    name = "rocm-smi_2xMI250-GCD_showid-productname-use-memuse-meminfo-P_json_DOUBTFUL-reindented.json"
    samples = parse_gpu_output("rocm-smi --json", _read(name))
    assert samples[1].power_draw_w is None


def test_noheader_any_field_order_reads_the_command() -> None:
    out = "87 %, 40960, GPU-1, 3\n"
    gpu = parse_gpu_output("nvidia-smi --query-gpu=utilization.gpu,memory.total,uuid,index --format=csv,noheader", out)[0]
    assert (gpu.utilization_gpu_pct, gpu.memory_total_mib, gpu.uuid, gpu.index) == (87, 40960, "GPU-1", 3)


@pytest.mark.parametrize("marker", ["[N/A]", "N/A", "[Not Supported]", "[Unknown Error]", "[Insufficient Permissions]",
                                    "[GPU requires reset]", "[Requested functionality has been deprecated]", ""])
def test_missing_markers_become_none(marker: str) -> None:
    gpu = parse_gpu_output("nvidia-smi --query-gpu=index,power.draw --format=csv,noheader", f"0, {marker}\n")[0]
    assert gpu.power_draw_w is None


def test_used_and_free_are_derived_only_when_missing() -> None:
    cmd = "nvidia-smi --query-gpu=memory.total,memory.free --format=csv,noheader,nounits"
    assert parse_gpu_output(cmd, "100, 30\n")[0].memory_used_mib == 70


def test_gib_units_convert_to_mib() -> None:
    cmd = "nvidia-smi --query-gpu=memory.total --format=csv,noheader"
    assert parse_gpu_output(cmd, "80 GiB\n")[0].memory_total_mib == 80 * 1024


def test_crlf_windows_output() -> None:
    cmd = "nvidia-smi --query-gpu=index,name --format=csv"
    assert parse_gpu_output(cmd, "index, name\r\n0, RTX\r\n")[0].name == "RTX"


def test_rocm_warning_lines_before_json() -> None:
    text = "WARNING: AMD GPU device(s) is/are in a low-power state. Check power control/runtime_status\n\n" \
           '{"card1": {"GPU use (%)": "5"}, "system": {"Driver version": "6.3.6"}}\n'
    samples = parse_gpu_output("rocm-smi --showuse --json", text)
    assert [(s.index, s.utilization_gpu_pct) for s in samples] == [(1, 5)]


def test_amd_smi_value_unit_objects() -> None:
    text = '{"gpu_data": [{"gpu": 0, "usage": {"gfx_activity": {"value": 42, "unit": "%"}}, ' \
           '"mem_usage": {"total_vram": {"value": 196592, "unit": "MB"}, "used_vram": {"value": 1024, "unit": "MB"}}, ' \
           '"power": {"socket_power": {"value": 140, "unit": "W"}}, "temperature": {"edge": {"value": 40, "unit": "C"}}}]}'
    gpu = parse_gpu_output("amd-smi metric --json", text)[0]
    assert (gpu.utilization_gpu_pct, gpu.memory_total_mib, gpu.memory_free_mib, gpu.power_draw_w, gpu.temperature_c) == \
        (42, 196592, 195568, 140, 40)


@pytest.mark.parametrize(("stdout", "exit_code", "error"), [
    ("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. Make sure that the latest "
     "NVIDIA driver is installed and running.\n", 9, DriverError),
    ("Failed to initialize NVML: Driver/library version mismatch\n", 18, DriverError),
    ("No devices were found\n", 6, NoGpusError),
    ("Failed to initialize NVML: No supported GPUs were found\nUnable to determine the number of GPUs\n", 255, NoGpusError),
    ('Field "memory.tota" is not a valid field to query.\n\n', 2, InvalidQueryError),
    ("", 127, ToolMissingError),
    ("garbage without commas", 0, ParseError),
    ("1, 2, 3\n", 0, ParseError),  # three values for two fields
])
def test_known_failures_are_typed(stdout: str, exit_code: int, error: type[Exception]) -> None:
    with pytest.raises(error):
        parse_gpu_output("nvidia-smi --query-gpu=index,name --format=csv,noheader", stdout, exit_code=exit_code)


def test_parse_error_carries_raw_text() -> None:
    with pytest.raises(ParseError) as caught:
        parse_gpu_output("rocm-smi --json", "{not json")
    assert caught.value.raw == "{not json"


COMMANDS = ["nvidia-smi --query-gpu=index,name,memory.total --format=csv", "nvidia-smi --query-gpu=index --format=csv,noheader",
            "rocm-smi --json", "rocm-smi --csv", "amd-smi metric --json", "some-wrapper"]


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(COMMANDS), st.text(max_size=400), st.integers(-1, 255))
def test_fuzz_only_parse_errors(command: str, text: str, exit_code: int) -> None:
    with contextlib.suppress(ParseError):
        parse_gpu_output(command, text, exit_code=exit_code)


JSONISH = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                       lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                       max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(["rocm-smi --json", "amd-smi metric --json"]), JSONISH)
def test_fuzz_structured_json(command: str, document: object) -> None:
    with contextlib.suppress(ParseError):
        parse_gpu_output(command, json.dumps({"card0": document, "gpu_data": [document]}))


@pytest.mark.parametrize("command", COMMANDS)
def test_hostile_outputs_raise_only_parse_errors_and_stay_bounded(command: str) -> None:
    hostile = ["0, " + "x" * 10_000_000 + "\n",  # a 10 MB field (csv's limit is 128 KiB)
               "0, a\x00b\n", "0, \ufffd\ufffd\n",  # NUL bytes, invalid UTF-8 as decoded
               "0, x\n" * 100_000,  # far more rows than GPUs
               "[" * 100_000, '{"card0": ' * 50_000,  # deep JSON
               '{"gpu_data": [' + ",".join(['{"gpu": 1}'] * 5000) + "]}",
               "{" + ",".join(f'"card{i}": {{"GPU use (%)": "1"}}' for i in range(5000)) + "}"]
    for text in hostile:
        with contextlib.suppress(ParseError):
            samples = parse_gpu_output(command, text)
            assert len(samples) <= 1024
            assert all(len(s.name or "") <= 256 for s in samples)


MILLION_ROWS = {"nvidia-smi --query-gpu=index,name --format=csv,noheader": "0, x{sep}",
                "rocm-smi --csv": "card1,5{sep}", "wrapper-without-tool": "0, x{sep}"}


@pytest.mark.parametrize("sep", ["\n", "\r"])  # the others: test_fuzz_more_rows_than_gpus
@pytest.mark.parametrize("command", sorted(MILLION_ROWS))
def test_a_million_rows_are_refused_whatever_ends_their_lines(command: str, sep: str) -> None:
    # str.splitlines() breaks at \r, \x1e, \u2028...: a count of "\n" alone let these through (10 s each).
    text = "device,GPU use (%)" + sep + MILLION_ROWS[command].format(sep=sep) * 1_000_000
    with pytest.raises(ParseError, match="more than 1024"):
        parse_gpu_output(command, text)


@pytest.mark.parametrize(("command", "text"), [
    ("nvidia-smi --query-gpu=index,name --format=csv,noheader", "0, " + "x" * 10_000_000 + "\n"),
    ("rocm-smi --csv", "device,Card Series\ncard0," + "x" * 10_000_000 + "\n"),
])
def test_a_field_past_csvs_limit_is_a_parse_error(command: str, text: str) -> None:
    with pytest.raises(ParseError, match="not readable CSV: field larger than field limit") as caught:
        parse_gpu_output(command, text)
    assert len(caught.value.raw or "") <= 2000


def test_a_failed_tools_message_is_one_bounded_line() -> None:
    with pytest.raises(ParseError) as caught:
        parse_gpu_output("rocm-smi --json", "{" + "x" * 10_000_000, exit_code=1)
    assert str(caught.value).startswith("rocm-smi exited 1: {xxx") and len(str(caught.value)) < 300
    with pytest.raises(ToolMissingError, match="^the GPU tool is not installed"):
        parse_gpu_output("", "", exit_code=127)


def test_anything_a_parser_overlooked_becomes_a_parse_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(stdout: str, max_gpus: int) -> list[GpuSample]:
        raise KeyError("gpu")
    monkeypatch.setattr(fleetctl.telemetry.parsers, "parse_amd_smi", broken)
    with pytest.raises(ParseError, match="unreadable amd-smi output: KeyError") as caught:
        parse_gpu_output("amd-smi metric --json", "[]")
    assert isinstance(caught.value.__cause__, KeyError)


def test_extra_fields_and_their_values_are_bounded() -> None:
    card = {f"k{i}": "v" for i in range(100_000)} | {"a" * 1000: "y" * 10_000_000}
    rocm = parse_gpu_output("rocm-smi --json", json.dumps({"card0": dict(reversed(card.items()))}))[0]
    assert len(rocm.extra) == MAX_EXTRA_FIELDS and max(map(len, rocm.extra.values())) == MAX_EXTRA_TEXT
    assert max(map(len, rocm.extra)) == MAX_KEY_TEXT
    header = ",".join(f"f{i}" for i in range(5000))
    nvidia = parse_gpu_output("nvidia-smi --query-gpu=x --format=csv", header + "\n" + ",".join("1" * 5000) + "\n")[0]
    assert len(nvidia.extra) == MAX_EXTRA_FIELDS
    amd = parse_gpu_output("amd-smi metric --json", json.dumps([{"gpu": 0, "x": "z" * 100_000}]))[0]
    assert len(amd.extra["x"]) == MAX_EXTRA_TEXT


@pytest.mark.parametrize(("command", "text"), [
    ("nvidia-smi --query-gpu=index,name --format=csv,noheader", "1e300, a\n"),
    ("nvidia-smi --query-gpu=index,name --format=csv,noheader", "-1, a\n"),
    ("nvidia-smi --query-gpu=index,name --format=csv,noheader", "2.5, a\n"),
    ("amd-smi metric --json", '[{"gpu": ' + "9" * 30 + "}]"),  # 5000 digits: json refuses them, a ParseError
    ("amd-smi metric --json", '[{"gpu": "' + "9" * 5000 + '"}]'),
    ("amd-smi metric --json", '[{"gpu": -3}]'),
])
def test_an_index_no_store_can_hold_is_no_index(command: str, text: str) -> None:
    gpu = parse_gpu_output(command, text)[0]
    assert gpu.index in (None, 0)  # amd-smi falls back to the GPU's place in its list


def test_a_card_number_past_nine_digits_is_not_a_card() -> None:
    text = json.dumps({"card" + "9" * 5000: {"GPU use (%)": "1"}, "card2": {"GPU use (%)": "2"}})
    assert [(s.index, s.utilization_gpu_pct) for s in parse_gpu_output("rocm-smi --json", text)] == [(2, 2)]


SEPARATORS = st.sampled_from(["\n", "\r\n", "\r", "\x1e", "\x0b", "\u2028", "\x85"])


@settings(max_examples=25, deadline=None)
@given(st.integers(1025, 20_000), SEPARATORS, st.sampled_from(sorted(MILLION_ROWS)))
def test_fuzz_more_rows_than_gpus(rows: int, sep: str, command: str) -> None:
    text = "device,GPU use (%)" + sep + MILLION_ROWS[command].format(sep=sep) * rows
    with pytest.raises(ParseError, match="more than 1024"):
        parse_gpu_output(command, text)


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 300_000), st.text(alphabet=st.characters(blacklist_categories=("Cs", "Zl", "Zp", "Cc")),
                                         min_size=1, max_size=3), st.sampled_from(["nvidia", "rocm", "amd"]))
def test_fuzz_long_names_and_uuids_are_cut(length: int, unit: str, tool: str) -> None:
    long = (unit * (length // len(unit) + 1))[:length].replace(",", ".").replace('"', "'").replace("\\", "/").strip() or "x"
    if tool == "nvidia":
        samples = parse_gpu_output("nvidia-smi --query-gpu=index,name,uuid --format=csv,noheader",
                                   f"0, {long[:100_000]}, {long[:100_000]}\n")
    elif tool == "rocm":
        samples = parse_gpu_output("rocm-smi --json", json.dumps({"card0": {"Card Series": long, "Unique ID": long}}))
    else:
        samples = parse_gpu_output("amd-smi static --json", json.dumps(
            [{"gpu": 0, "asic": {"market_name": long, "asic_serial": long}}]))
    for sample in samples:
        assert len(sample.name or "") <= MAX_TEXT and len(sample.uuid or "") <= MAX_TEXT
        assert all(len(v) <= MAX_EXTRA_TEXT for v in sample.extra.values())


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_undecodable_bytes(raw: bytes) -> None:
    text = raw.decode("utf-8", "replace")
    for command in COMMANDS:
        with contextlib.suppress(ParseError):
            parse_gpu_output(command, text)
