#!/usr/bin/env python3
"""Simulated nvidia-smi / rocm-smi for sandbox hosts. Standard library only: sandbox hosts run it
as a plain script (``gpusim.py TOOL ARGS...``) with no fleetctl import.

Output follows the real tools' formats byte for byte (see shared/gpu-outputs/real): nvidia-smi
``--query-gpu`` CSV with ``, `` separators, `` [unit]`` header suffixes kept under ``nounits``,
``[N/A]`` for unsupported values; rocm-smi one-line JSON keyed ``card0``.. and CSV with a
``device`` column. The host's state comes from ``$FLEETCTL_GPUSIM_SPEC`` (JSON), re-read on each
call so a test can break a driver mid-run.

Broken GPUs (issue 22): ``faults`` maps a GPU index to what is wrong with it (see
:data:`FAULTS`): ECC double-bit errors, a pending or failed row remap, hardware slowdown, a PCIe
link at x4, ``[GPU requires reset]``, a recovery action, ``ERR!``, or a GPU that vanished from
the tool. On ``amd-smi`` (``metric``/``static``/``bad-pages --json``) a GPU's faults are :data:`AMD_FAULTS`:
uncorrectable or deferred ECC, a PCIe link at x4, pending or retired bad pages, the bad page threshold
exceeded. ``lacks`` names fields the simulated driver does not know (``old_driver`` drops every
field newer than R470's), so ``--help-query-gpu`` and refusals follow. Mode ``hung``: the tool
never answers. ``kernel_log`` lists kernel messages (``{"at": epoch, "gpu": 1, "xid": 79}`` or
``{"at": epoch, "message": "..."}``) that a ``journalctl`` stub on the host's PATH prints, with
cursors; ``journal: "denied"`` plays a user outside the ``adm`` and ``systemd-journal`` groups.

Hostile modes play a broken or malicious host: GPU names carrying terminal escapes (ESC/OSC/C1) and
rich markup, NUL bytes, invalid UTF-8 or 10 MB of text; a tool error full of escapes; a million
rows; output that never ends. Bytes that are not UTF-8 travel as surrogate escapes in ``str`` and
leave stdout as the raw bytes.
"""

from __future__ import annotations

import json
import os
import sys
import time
import zlib
from typing import Any

Spec = dict[str, Any]

NVIDIA_FIELDS: dict[str, tuple[str | None, str]] = {
    # field: (unit, key into the per-GPU value table)
    "timestamp": (None, "timestamp"), "driver_version": (None, "driver"), "count": (None, "count"),
    "name": (None, "name"), "gpu_name": (None, "name"), "serial": (None, "serial"),
    "uuid": (None, "uuid"), "gpu_uuid": (None, "uuid"), "pci.bus_id": (None, "bus_id"),
    "gpu_bus_id": (None, "bus_id"), "index": (None, "index"), "fan.speed": ("%", "fan"),
    "pstate": (None, "pstate"), "memory.total": ("MiB", "mem_total"), "memory.used": ("MiB", "mem_used"),
    "memory.free": ("MiB", "mem_free"), "memory.reserved": ("MiB", "mem_reserved"),
    "utilization.gpu": ("%", "util"), "utilization.memory": ("%", "util_mem"),
    "temperature.gpu": (None, "temp"), "temperature.memory": (None, "temp_mem"),
    "power.draw": ("W", "power"), "power.draw.instant": ("W", "power"), "power.limit": ("W", "power_limit"),
    "enforced.power.limit": ("W", "power_limit"), "clocks.current.sm": ("MHz", "clock_sm"),
    "clocks.sm": ("MHz", "clock_sm"), "mig.mode.current": (None, "mig"), "compute_mode": (None, "compute_mode"),
    "compute_cap": (None, "compute_cap"), "ecc.errors.uncorrected.volatile.total": (None, "ecc"),
    # Health fields (issue 22). Old drivers spell clock event reasons clocks_throttle_reasons.*.
    "ecc.errors.corrected.volatile.total": (None, "ecc_corr"), "ecc.errors.corrected.aggregate.total": (None, "ecc_corr"),
    "ecc.errors.uncorrected.aggregate.total": (None, "ecc"),
    "retired_pages.single_bit_ecc.count": (None, "retired_sbe"), "retired_pages.sbe": (None, "retired_sbe"),
    "retired_pages.double_bit.count": (None, "retired_dbe"), "retired_pages.dbe": (None, "retired_dbe"),
    "retired_pages.pending": (None, "retired_pending"),
    "remapped_rows.correctable": (None, "remap_corr"), "remapped_rows.uncorrectable": (None, "remap_uncorr"),
    "remapped_rows.pending": (None, "remap_pending"), "remapped_rows.failure": (None, "remap_failure"),
    "clocks_event_reasons.active": (None, "clock_active"), "clocks_throttle_reasons.active": (None, "clock_active"),
    "clocks_event_reasons.hw_slowdown": (None, "hw_slowdown"), "clocks_throttle_reasons.hw_slowdown": (None, "hw_slowdown"),
    "clocks_event_reasons.hw_thermal_slowdown": (None, "hw_thermal"),
    "clocks_throttle_reasons.hw_thermal_slowdown": (None, "hw_thermal"),
    "clocks_event_reasons.hw_power_brake_slowdown": (None, "hw_brake"),
    "clocks_throttle_reasons.hw_power_brake_slowdown": (None, "hw_brake"),
    "clocks_event_reasons.sw_thermal_slowdown": (None, "sw_thermal"),
    "clocks_throttle_reasons.sw_thermal_slowdown": (None, "sw_thermal"),
    "pcie.link.gen.current": (None, "pcie_gen"), "pcie.link.gen.gpucurrent": (None, "pcie_gen"),
    "pcie.link.gen.max": (None, "pcie_gen_max"), "pcie.link.width.current": (None, "pcie_width"),
    "pcie.link.width.max": (None, "pcie_width_max"), "gpu_recovery_action": (None, "recovery"),
}
# The pairs --help-query-gpu prints as '"new" or "old"'.
NVIDIA_ALIASES = {"name": "gpu_name", "uuid": "gpu_uuid", "pci.bus_id": "gpu_bus_id", "clocks.current.sm": "clocks.sm",
                  "retired_pages.single_bit_ecc.count": "retired_pages.sbe", "retired_pages.double_bit.count": "retired_pages.dbe",
                  **{f"clocks_event_reasons.{r}": f"clocks_throttle_reasons.{r}"
                     for r in ("active", "hw_slowdown", "hw_thermal_slowdown", "hw_power_brake_slowdown", "sw_thermal_slowdown")}}
# Fields an R470-era driver does not know.
NEWER_FIELDS = ("clocks_event_reasons.", "remapped_rows.", "gpu_recovery_action", "pcie.link.gen.gpucurrent", "power.draw.instant")
REMAPPED_ROWS_QUERY = {"gpu_bus_id": "bus_id", "gpu_uuid": "uuid", "remapped_rows.correctable": "remap_corr",
                       "remapped_rows.uncorrectable": "remap_uncorr", "remapped_rows.pending": "remap_pending",
                       "remapped_rows.failure": "remap_failure"}
HEALTHY = {"ecc_corr": "0", "retired_sbe": "0", "retired_dbe": "0", "retired_pending": "No", "remap_corr": "0",
           "remap_uncorr": "0", "remap_pending": "No", "remap_failure": "No", "clock_active": "0x0000000000000000",
           "hw_slowdown": "Not Active", "hw_thermal": "Not Active", "hw_brake": "Not Active", "sw_thermal": "Not Active",
           "pcie_gen": "5", "pcie_gen_max": "5", "pcie_width": "16", "pcie_width_max": "16", "recovery": "None"}
# Fault -> the values it changes (applied in order; "vanished" drops the GPU from every listing).
FAULTS: dict[str, dict[str, str]] = {
    "ecc_dbe": {"ecc": "2"},
    "remap_pending": {"remap_uncorr": "1", "remap_pending": "Yes"},
    "remap_failure": {"remap_failure": "Yes"},
    "retired_pending": {"retired_dbe": "1", "retired_pending": "Yes"},
    "hw_slowdown": {"hw_slowdown": "Active", "clock_active": "0x0000000000000008"},
    "pcie_width": {"pcie_width": "4"},
    "recovery_reset": {"recovery": "Reset"},
    "requires_reset": {key: "[GPU requires reset]" for key in ("ecc", "ecc_corr", "remap_uncorr", "remap_pending",
                                                                "remap_failure", "util", "temp", "power")},
    "value_error": {"temp": "ERR!", "power": "ERR!"},
    "vanished": {},
}
DRIVER_FAILURE = ("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. "
                  "Make sure that the latest NVIDIA driver is installed and running.\n\n")
# Clear screen, set the window title, an OSC 8 link, a C1 CSI, and rich markup that would link,
# blink or (a lone ``[/]``) raise MarkupError if a table read it as markup.
HOSTILE_TEXT = ("\x1b[2J\x1b]0;owned\x07\x1b]8;;http://x\x1b\\H100\x1b]8;;\x1b\\ \x9b31m "
                "[link=http://x]click[/link] [/] [blink]x[/blink]")
# Mode -> the name every GPU reports.
NAME_MODES = {
    "hostile_names": HOSTILE_TEXT,
    "nul_bytes": "NVIDIA\x00H100\x00 80GB",
    "invalid_utf8": "NVIDIA \udcff\udcfe\udcc3( H100",  # the bytes ff fe c3 28: no UTF-8 decoder accepts them
    "huge_name": "N" * 10_000_000,
}
# Mode -> GPU rows printed (None: never stops).
VOLUME_MODES: dict[str, int | None] = {"million_rows": 1_000_000, "endless": None}


def load_spec() -> Spec:
    path = os.environ.get("FLEETCTL_GPUSIM_SPEC", "")
    with open(path, encoding="utf-8") as handle:
        spec: Spec = json.load(handle)
        return spec


def gpu_name(spec: Spec, default: str) -> str:
    return str(NAME_MODES.get(spec.get("mode", "ok")) or spec.get("model", default))


def _noise(spec: Spec, index: int, salt: str, modulo: int) -> int:
    return zlib.crc32(f"{spec.get('seed', 0)}/{index}/{salt}".encode()) % modulo


def nvidia_values(spec: Spec, index: int) -> dict[str, str]:
    total = int(spec.get("memory_total_mib", 81559))
    reserved = 479 if total > 40000 else 103
    busy = index in spec.get("busy", [])
    used = (total // 2 + _noise(spec, index, "mem", 4000)) if busy else 0
    mig = spec.get("mode") == "mig"
    util = "[N/A]" if mig else str(95 + _noise(spec, index, "u", 6) if busy else 0)
    return {
        "timestamp": time.strftime("%Y/%m/%d %H:%M:%S.") + f"{int(time.time() * 1000) % 1000:03d}",
        "driver": spec.get("driver", "590.48.01"), "count": str(spec.get("count", 1)),
        "name": gpu_name(spec, "NVIDIA H100 80GB HBM3"), "serial": f"{1320000000000 + index:013d}",
        "uuid": "GPU-{:08x}-{:04x}-{:04x}-{:04x}-{:012x}".format(
            zlib.crc32(f"{spec.get('seed', 0)}/{index}".encode()), index, 0x4000 + index, 0x8000, spec.get("seed", 0)),
        "bus_id": f"00000000:{0x18 + index * 0x10:02X}:00.0", "index": str(index), "fan": "[N/A]", "pstate": "P0",
        "mem_total": str(total), "mem_used": str(used), "mem_free": str(total - used - reserved),
        "mem_reserved": str(reserved), "util": util, "util_mem": "[N/A]" if mig else str(_noise(spec, index, "m", 30)),
        "temp": str(33 + _noise(spec, index, "t", 30)), "temp_mem": str(35 + _noise(spec, index, "tm", 25)),
        "power": f"{(520 if busy else 70) + _noise(spec, index, 'p', 10000) / 100:.2f}",
        "power_limit": f"{spec.get('power_limit_w', 700):.2f}", "clock_sm": "1980",
        "mig": "Enabled" if mig else "Disabled", "compute_mode": "Default",
        "compute_cap": spec.get("compute_cap", "9.0"), "ecc": "0", **HEALTHY,
        **{k: v for fault in faults_of(spec, index) for k, v in FAULTS.get(fault, {}).items()},
    }


def faults_of(spec: Spec, index: int) -> list[str]:
    faults = spec.get("faults", {})
    return list(faults.get(str(index), [])) if isinstance(faults, dict) else []


def visible(spec: Spec, count: int) -> list[int]:
    """The GPUs the tool lists: every one but those that vanished."""
    return [i for i in range(count) if "vanished" not in faults_of(spec, i)]


def known_fields(spec: Spec) -> set[str]:
    lacks = set(spec.get("lacks", []))
    old = bool(spec.get("old_driver"))
    return {f for f in NVIDIA_FIELDS if f not in lacks and not (old and f.startswith(NEWER_FIELDS))}


def help_query_gpu(spec: Spec) -> str:
    known = known_fields(spec)
    lines = ['List of valid properties to query for the switch "--query-gpu":', ""]
    aliases = set(NVIDIA_ALIASES.values())
    for name in NVIDIA_FIELDS:
        if name in aliases:
            continue  # printed beside its new spelling
        names = [n for n in (name, NVIDIA_ALIASES.get(name)) if n and n in known]
        if names:
            lines += [" or ".join(f'"{n}"' for n in names), f"The {name} of the GPU (fleetctl sandbox).", ""]
    return "\n".join(lines) + "\n"


def hang(spec: Spec) -> None:
    """A tool stuck in the driver: answers nothing for ``hang_s`` seconds (600 unless the spec says), then gives up, so
    a caller that walked away leaves no process behind for long."""
    time.sleep(float(spec.get("hang_s", 600)))
    sys.exit(1)


def nvidia_smi(spec: Spec, args: list[str]) -> int:
    mode = spec.get("mode", "ok")
    if mode == "driver_error":
        sys.stdout.write(DRIVER_FAILURE)
        return 9
    if mode == "hostile_error":
        sys.stdout.write(HOSTILE_TEXT + " " + DRIVER_FAILURE)
        sys.stderr.write(HOSTILE_TEXT + "\n")
        return 9
    if mode == "hung":
        hang(spec)
    if "--help-query-gpu" in args:
        sys.stdout.write(help_query_gpu(spec))
        return 0
    count = int(spec.get("count", 1)) if mode != "no_gpus" else 0
    shown = visible(spec, count)
    remapped = next((a.split("=", 1)[1] for a in args if a.startswith("--query-remapped-rows=")), None)
    if remapped is not None:
        return remapped_rows(spec, shown, remapped, args)
    query = next((a.split("=", 1)[1] for a in args if a.startswith("--query-gpu=")), None)
    fmt = next((a.split("=", 1)[1] for a in args if a.startswith("--format=")), "")
    if "-L" in args or "--list-gpus" in args:
        if not count:
            sys.stdout.write("No devices were found\n")
            return 6
        for position, i in enumerate(shown):
            v = nvidia_values(spec, i)
            sys.stdout.write(f"GPU {position}: {v['name']} (UUID: {v['uuid']})\n")
        return 0
    if query is None:
        sys.stdout.write("NVIDIA-SMI (fleetctl sandbox): use --query-gpu=... --format=csv\n")
        return 0 if count else 6
    if not count:
        sys.stdout.write("No devices were found\n")
        return 6
    fields = [f.strip() for f in query.split(",")]
    known = known_fields(spec)
    for field in fields:
        if field not in known:
            sys.stdout.write(f'Field "{field}" is not a valid field to query.\n\n')
            return 2
    options = fmt.split(",")
    if "csv" not in options:
        sys.stdout.write('"--format=" switch is missing or invalid.\n')
        return 2
    lines = []
    if "noheader" not in options:
        lines.append(", ".join(f + (f" [{NVIDIA_FIELDS[f][0]}]" if NVIDIA_FIELDS[f][0] else "") for f in fields))
    def row(index: int) -> str:
        values, cells = nvidia_values(spec, index), []
        if index in shown:  # the tool numbers the GPUs it sees from 0
            values["index"] = str(shown.index(index))
        for field in fields:
            unit, key = NVIDIA_FIELDS[field]
            value = values[key]
            cells.append(value if unit is None or value.startswith("[") or "nounits" in options else f"{value} {unit}")
        return ", ".join(cells)
    if mode in VOLUME_MODES:
        sys.stdout.write("".join(line + "\n" for line in lines))
        _flood(lambda i: row(i) + "\n", VOLUME_MODES[mode])
        return 0
    lines.extend(row(i) for i in shown)
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


def remapped_rows(spec: Spec, shown: list[int], query: str, args: list[str]) -> int:
    fields = [f.strip() for f in query.split(",")]
    for field in fields:
        if field not in REMAPPED_ROWS_QUERY:
            sys.stdout.write(f'Field "{field}" is not a valid field to query.\n\n')
            return 2
    fmt = next((a.split("=", 1)[1] for a in args if a.startswith("--format=")), "")
    lines = [] if "noheader" in fmt else [", ".join(fields)]
    for i in shown:
        values = nvidia_values(spec, i)
        lines.append(", ".join(values[REMAPPED_ROWS_QUERY[f]] for f in fields))
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


JOURNAL_DENIED = ("Hint: You are currently not seeing messages from other users and the system.\n"
                  "      Users in groups 'adm', 'systemd-journal' can see all messages.\n"
                  "      Pass -q to turn off this notice.\n")


def kernel_message(spec: Spec, entry: dict[str, Any]) -> str:
    if "message" in entry:
        return str(entry["message"])
    index = int(entry.get("gpu", 0))
    bus = 0x18 + index * 0x10
    text = {79: "GPU has fallen off the bus.", 48: "An uncorrectable double bit error (DBE) has been detected on GPU",
            13: "Graphics Exception: ESR 0x404490=0x80000001", 31: "Ch 00000008, intr 10000000. MMU Fault"}
    return (f"NVRM: Xid (PCI:0000:{bus:02x}:00): {entry.get('xid', 13)}, pid=4242, name=python3, "
            f"{text.get(int(entry.get('xid', 13)), 'sandbox Xid')}")


def journalctl(spec: Spec, args: list[str]) -> int:
    """``journalctl -k -o short-iso [--show-cursor] [-n N] [--after-cursor=C]`` over ``kernel_log``."""
    if spec.get("journal") == "denied":
        sys.stdout.write(JOURNAL_DENIED + "-- No entries --\n")
        return 0
    entries = [e for e in spec.get("kernel_log", []) if isinstance(e, dict)]
    after = next((a.split("=", 1)[1] for a in args if a.startswith("--after-cursor=")), None)
    start = int(after.rsplit("=", 1)[-1]) + 1 if after and after.rsplit("=", 1)[-1].isdigit() else 0
    limit = next((int(args[i + 1]) for i, a in enumerate(args) if a == "-n" and i + 1 < len(args) and args[i + 1].isdigit()),
                 None)
    chosen = list(range(start, len(entries)))
    if limit is not None:
        chosen = chosen[-limit:] if limit else []
    host = os.environ.get("FLEETCTL_SANDBOX_HOST", "sandbox")
    if not chosen:
        sys.stdout.write("-- No entries --\n")
        return 0
    for i in chosen:
        at = time.strftime("%Y-%m-%dT%H:%M:%S+0000", time.gmtime(float(entries[i].get("at", time.time()))))
        sys.stdout.write(f"{at} {host} kernel: {kernel_message(spec, entries[i])}\n")
    if "--show-cursor" in args:
        sys.stdout.write(f"-- cursor: s=fleetctl-sandbox;i={chosen[-1]}\n")
    return 0


def _flood(item: Any, total: int | None) -> None:
    """``item(i)`` for i = 0.. ``total`` (forever if None), written in batches as it is made: the
    simulator itself stays small however much it prints."""
    index = 0
    while total is None or index < total:
        stop = index + 1000 if total is None else min(index + 1000, total)
        sys.stdout.write("".join(item(i) for i in range(index, stop)))
        index = stop


def rocm_card(spec: Spec, index: int, args: list[str]) -> dict[str, str]:
    total = int(spec.get("memory_total_mib", 32752)) * 1024 * 1024
    busy = index in spec.get("busy", [])
    used = total // 2 if busy else 6750208
    flags = set(args)
    want_all = "-a" in flags or "--showall" in flags
    card: dict[str, str] = {}
    model = gpu_name(spec, "Arcturus GL-XL [Instinct MI100]")
    if want_all or flags & {"-i", "--showid"}:
        card.update({"Device Name": model, "Device ID": "0x738c",
                     "Device Rev": "0x01", "Subsystem ID": "0x0c34", "GUID": str(17000 + index)})
    if want_all or "--showuniqueid" in flags:
        card["Unique ID"] = "0x{:016x}".format(zlib.crc32(f"{spec.get('seed', 0)}/{index}".encode()))
    if want_all or flags & {"-t", "--showtemp"}:
        edge = 30 + _noise(spec, index, "t", 30)
        card.update({"Temperature (Sensor edge) (C)": f"{edge}.0", "Temperature (Sensor junction) (C)": f"{edge + 2}.0",
                     "Temperature (Sensor memory) (C)": f"{edge + 1}.0"})
    if want_all or flags & {"-P", "--showpower"}:
        card["Average Graphics Package Power (W)"] = f"{(250 if busy else 36)}.0"
    if want_all or "--showmaxpower" in flags or "-M" in flags:
        card["Max Graphics Package Power (W)"] = f"{spec.get('power_limit_w', 290)}.0"
    if want_all or flags & {"-u", "--showuse"}:
        card["GPU use (%)"] = str(97 if busy else 0)
    if want_all or "--showmemuse" in flags:
        card.update({"GPU Memory Allocated (VRAM%)": str(used * 100 // total), "GPU Memory Read/Write Activity (%)": "0",
                     "Memory Activity": "N/A", "Avg. Memory Bandwidth": "0"})
    if want_all or "--showmeminfo" in flags:
        card.update({"VRAM Total Memory (B)": str(total), "VRAM Total Used Memory (B)": str(used)})
    if want_all or "--showproductname" in flags:
        card.update({"Card Series": model, "Card Model": "0x0c34",
                     "Card Vendor": "Advanced Micro Devices, Inc. [AMD/ATI]", "Card SKU": "D3431401",
                     "Subsystem ID": "0x0c34", "Device Rev": "0x01", "Node ID": str(index + 2),
                     "GUID": str(17000 + index), "GFX Version": "gfx908"})
    if want_all or "--showdriverversion" in flags:
        card["Driver version"] = spec.get("driver", "6.3.6")
    return card


AMD_FAULTS: dict[str, dict[str, Any]] = {"ecc_dbe": {"uncorrectable": 2}, "ecc_deferred": {"deferred": 1}, "pcie_width": {"width": 4},
              "bad_pages_pending": {"pending": 1}, "bad_pages_retired": {"retired": 2},
              "bad_page_threshold": {"threshold_exceeded": True}}


def amd_state(spec: Spec, index: int) -> dict[str, Any]:
    state: dict[str, Any] = {"uncorrectable": 0, "deferred": 0, "width": 16, "pending": 0, "retired": 0,
                             "threshold_exceeded": False}
    for fault in faults_of(spec, index):
        state.update(AMD_FAULTS.get(fault, {}))
    return state


def _pages(count: int, status: str, base: int) -> Any:
    if not count:
        return "No bad pages found."
    return [{"page_address": hex(base + 0x1000 * i), "page_size": 4096, "status": status} for i in range(count)]


def amd_smi(spec: Spec, args: list[str]) -> int:
    """``amd-smi metric|static|bad-pages ... --json`` in ROCm 7's shape (``{"gpu_data": [...]}``)."""
    mode = spec.get("mode", "ok")
    if mode == "hung":
        hang(spec)
    count = 0 if mode == "no_gpus" else int(spec.get("count", 1))
    shown = visible(spec, count)
    command = args[0] if args else ""
    total_mb = int(spec.get("memory_total_mib", 32752))
    gpus: list[dict[str, Any]] = []
    for position, i in enumerate(shown):
        state, busy = amd_state(spec, i), i in spec.get("busy", [])
        # "bus_ids": false plays an amd-smi that cannot read them (a vanished GPU is then found by the count).
        bdf = f"0000:{0x1b + i * 0x22:02x}:00.0" if spec.get("bus_ids", True) else "N/A"
        if command == "bad-pages":
            gpus.append({"gpu": position, "retired": _pages(state["retired"], "RESERVED", 0x7FC58000),
                         "pending": _pages(state["pending"], "PENDING", 0x8A140000), "un_res": "No bad pages found."})
        elif command == "static":
            gpus.append({"gpu": position, "bus": {"bdf": bdf, "max_pcie_width": 16, "max_pcie_speed": {"value": 16, "unit": "GT/s"},
                                                  "pcie_interface_version": "Gen 4", "slot_type": "PCIE"},
                         "ras": {"eeprom_version": "0x10000", "bad_page_threshold": 655,
                                 "bad_page_threshold_exceeded": str(state["threshold_exceeded"])}})
        else:
            gpus.append({"gpu": position,
                         "usage": {"gfx_activity": {"value": 97 if busy else 0, "unit": "%"}},
                         "power": {"socket_power": {"value": 250 if busy else 36, "unit": "W"}},
                         "temperature": {"edge": {"value": 30 + _noise(spec, i, "t", 30), "unit": "C"}},
                         "mem_usage": {"total_vram": {"value": total_mb, "unit": "MB"},
                                       "used_vram": {"value": total_mb // 2 if busy else 6, "unit": "MB"}},
                         "pcie": {"width": state["width"], "speed": {"value": 16, "unit": "GT/s"}, "bandwidth": "N/A",
                                  "replay_count": 0},
                         "ecc": {"total_correctable_count": 0, "total_uncorrectable_count": state["uncorrectable"],
                                 "total_deferred_count": state["deferred"], "cache_correctable_count": 0,
                                 "cache_uncorrectable_count": 0}})
    if command == "bad-pages":
        sys.stdout.write(json.dumps(gpus, indent=4) + "\n")  # amd-smi prints bad pages as a bare list
    else:
        sys.stdout.write(json.dumps({"gpu_data": gpus}, indent=4) + "\n")
    return 0


def rocm_smi(spec: Spec, args: list[str]) -> int:
    mode = spec.get("mode", "ok")
    count = 0 if mode == "no_gpus" else int(spec.get("count", 1))
    if mode not in VOLUME_MODES:
        count = len(visible(spec, count))
    if mode == "hung":
        hang(spec)
    if mode in ("driver_error", "hostile_error"):
        hostile = HOSTILE_TEXT + " " if mode == "hostile_error" else ""
        sys.stdout.write(f"ERROR:root:{hostile}Driver not initialized (amdgpu not found in modules)\n")
        return 2
    if not count:
        sys.stdout.write("WARNING: No AMD GPUs specified\n")
        return 0
    if mode in VOLUME_MODES and "--json" in args:
        # One JSON object that is a million cards long, or never closes.
        sys.stdout.write("{")
        _flood(lambda i: ("" if i == 0 else ", ") + f'"card{i}": ' + json.dumps(rocm_card(spec, i, args)),
               VOLUME_MODES[mode])
        sys.stdout.write("}\n")
        return 0
    if mode in VOLUME_MODES:
        count = VOLUME_MODES[mode] or sys.maxsize  # the CSV and text forms below stream per card
    if "--json" in args:
        sys.stdout.write(json.dumps({f"card{i}": rocm_card(spec, i, args) for i in range(count)}) + "\n")
    elif "--csv" in args:
        keys = list(rocm_card(spec, 0, args))  # every card has the same keys
        sys.stdout.write(",".join(["device", *keys]) + "\n")
        for i in range(count):
            card = rocm_card(spec, i, args)
            # rocm-smi drops commas from values in CSV output.
            sys.stdout.write(",".join([f"card{i}", *(card.get(k, "N/A").replace(",", "") for k in keys)]) + "\n")
    else:
        sys.stdout.write("\n\n========================================= ROCm System Management Interface =========================================\n")
        for i in range(count):
            for key, value in rocm_card(spec, i, args).items():
                sys.stdout.write(f"GPU[{i}]\t\t: {key}: {value}\n")
        sys.stdout.write("==================================================== End of ROCm SMI Log ====================================================\n")
    return 0


def main(argv: list[str]) -> int:
    tool, args = os.path.basename(argv[1]), argv[2:]
    spec = load_spec()
    for stream in (sys.stdout, sys.stderr):
        stream.reconfigure(errors="surrogateescape")  # type: ignore[union-attr]
    try:
        if tool == "nvidia-smi":
            return nvidia_smi(spec, args)
        if tool == "rocm-smi":
            return rocm_smi(spec, args)
        if tool == "amd-smi":
            return amd_smi(spec, args)
        if tool == "journalctl":
            return journalctl(spec, args)
    except BrokenPipeError:
        # The reader stopped (an output limit): exit quietly, as a real tool dies of SIGPIPE.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    sys.stderr.write(f"gpusim: unknown tool {tool}\n")
    return 127


if __name__ == "__main__":
    sys.exit(main(sys.argv))
