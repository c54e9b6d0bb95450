#!/usr/bin/env python3
"""Simulated nvidia-smi / rocm-smi for sandbox hosts. Standard library only: sandbox hosts run it
as a plain script (``gpusim.py TOOL ARGS...``) with no fleetctl import.

Output follows the real tools' formats byte for byte (see shared/gpu-outputs/real): nvidia-smi
``--query-gpu`` CSV with ``, `` separators, `` [unit]`` header suffixes kept under ``nounits``,
``[N/A]`` for unsupported values; rocm-smi one-line JSON keyed ``card0``.. and CSV with a
``device`` column. The host's state comes from ``$FLEETCTL_GPUSIM_SPEC`` (JSON), re-read on each
call so a test can break a driver mid-run.

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
        "compute_cap": spec.get("compute_cap", "9.0"), "ecc": "0",
    }


def nvidia_smi(spec: Spec, args: list[str]) -> int:
    mode = spec.get("mode", "ok")
    if mode == "driver_error":
        sys.stdout.write(DRIVER_FAILURE)
        return 9
    if mode == "hostile_error":
        sys.stdout.write(HOSTILE_TEXT + " " + DRIVER_FAILURE)
        sys.stderr.write(HOSTILE_TEXT + "\n")
        return 9
    count = int(spec.get("count", 1)) if mode != "no_gpus" else 0
    query = next((a.split("=", 1)[1] for a in args if a.startswith("--query-gpu=")), None)
    fmt = next((a.split("=", 1)[1] for a in args if a.startswith("--format=")), "")
    if "-L" in args or "--list-gpus" in args:
        if not count:
            sys.stdout.write("No devices were found\n")
            return 6
        for i in range(count):
            v = nvidia_values(spec, i)
            sys.stdout.write(f"GPU {i}: {v['name']} (UUID: {v['uuid']})\n")
        return 0
    if query is None:
        sys.stdout.write("NVIDIA-SMI (fleetctl sandbox): use --query-gpu=... --format=csv\n")
        return 0 if count else 6
    if not count:
        sys.stdout.write("No devices were found\n")
        return 6
    fields = [f.strip() for f in query.split(",")]
    for field in fields:
        if field not in NVIDIA_FIELDS:
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
        for field in fields:
            unit, key = NVIDIA_FIELDS[field]
            value = values[key]
            cells.append(value if unit is None or value.startswith("[") or "nounits" in options else f"{value} {unit}")
        return ", ".join(cells)
    if mode in VOLUME_MODES:
        sys.stdout.write("".join(line + "\n" for line in lines))
        _flood(lambda i: row(i) + "\n", VOLUME_MODES[mode])
        return 0
    lines.extend(row(i) for i in range(count))
    sys.stdout.write("\n".join(lines) + "\n")
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


def rocm_smi(spec: Spec, args: list[str]) -> int:
    mode = spec.get("mode", "ok")
    count = 0 if mode == "no_gpus" else int(spec.get("count", 1))
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
    except BrokenPipeError:
        # The reader stopped (an output limit): exit quietly, as a real tool dies of SIGPIPE.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    sys.stderr.write(f"gpusim: unknown tool {tool}\n")
    return 127


if __name__ == "__main__":
    sys.exit(main(sys.argv))
