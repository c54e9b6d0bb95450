"""rocm-smi ``--json`` / ``--csv`` output (ROCm 4 to 7 spellings) and amd-smi JSON."""

from __future__ import annotations

import csv
import json
import re
from typing import Any

from fleetctl.errors import ParseError
from fleetctl.telemetry.parsers.values import bounded_extra, derive_memory, index_of, is_missing, number, to_mib
from fleetctl.telemetry.snapshot import GpuSample

_CARD = re.compile(r"^card([0-9]{1,9})$")  # more digits is no card index (and int() refuses 4300)
# Typed field -> rocm-smi keys across versions, compared case-insensitively, first present wins.
KEYS: dict[str, tuple[str, ...]] = {
    "uuid": ("Unique ID", "GUID"),
    "name": ("Card Series", "Device Name", "Card SKU", "Card Model", "Device ID", "GPU ID"),
    "memory_total": ("VRAM Total Memory (B)",),
    "memory_used": ("VRAM Total Used Memory (B)",),
    "memory_pct": ("GPU Memory Allocated (VRAM%)", "GPU memory use (%)"),
    "utilization_gpu_pct": ("GPU use (%)",),
    "temperature_c": ("Temperature (Sensor edge) (C)", "Temperature (Sensor junction) (C)",
                      "Temperature (Sensor memory) (C)"),
    "power_draw_w": ("Average Graphics Package Power (W)", "Current Socket Graphics Package Power (W)",
                     "Power (W)"),
    "power_limit_w": ("Max Graphics Package Power (W)",),
}


def _first_number(card: dict[str, str], keys: tuple[str, ...], used: set[str]) -> float | None:
    for key in keys:
        actual = card.get(key.lower())
        if actual is None:
            continue
        used.add(key.lower())
        parsed = number(actual)
        if parsed is not None:
            return parsed[0]
    return None


def _first_text(card: dict[str, str], keys: tuple[str, ...], used: set[str]) -> str | None:
    """First key that has a real value; every key tried is marked used (kept out of ``extra``)."""
    found = None
    for key in keys:
        value = card.get(key.lower())
        if value is not None:
            used.add(key.lower())
            if found is None and not is_missing(value):
                found = value
    return found


def _card_sample(index: int, raw: dict[str, Any]) -> GpuSample:
    original = {str(k).strip(): str(v).strip() for k, v in raw.items()}
    card = {k.lower(): v for k, v in original.items()}
    used: set[str] = set()
    name = _first_text(card, KEYS["name"], used)
    uuid = _first_text(card, KEYS["uuid"], used)
    total_b = _first_number(card, KEYS["memory_total"], used)
    used_b = _first_number(card, KEYS["memory_used"], used)
    total = to_mib(total_b, "B") if total_b is not None else None
    mem_used = to_mib(used_b, "B") if used_b is not None else None
    pct = _first_number(card, KEYS["memory_pct"], used)
    if mem_used is None and pct is not None and total is not None:
        mem_used = total * pct / 100
    total, mem_used, free = derive_memory(total, mem_used, None)
    return GpuSample(
        index=index, uuid=uuid, name=name, vendor="amd",
        memory_total_mib=total, memory_used_mib=mem_used, memory_free_mib=free,
        utilization_gpu_pct=_first_number(card, KEYS["utilization_gpu_pct"], used),
        temperature_c=_first_number(card, KEYS["temperature_c"], used),
        power_draw_w=_first_number(card, KEYS["power_draw_w"], used),
        power_limit_w=_first_number(card, KEYS["power_limit_w"], used),
        extra=bounded_extra((k, v) for k, v in original.items() if k.lower() not in used),
    )


def _believable(count: int, max_gpus: int, tool: str, stdout: str) -> None:
    if count > max_gpus:
        raise ParseError(f"{tool} reports {count} GPUs, more than {max_gpus}: not believable", stdout[:2000])


def parse_rocm_json(stdout: str, max_gpus: int = 1024) -> list[GpuSample]:
    start = stdout.find("{")
    if start == -1:
        raise ParseError("rocm-smi printed no JSON", stdout, hint="add --json to gpu_query_cmd")
    try:
        document, _ = json.JSONDecoder().raw_decode(stdout[start:])
    except json.JSONDecodeError as exc:
        raise ParseError(f"rocm-smi JSON is invalid: {exc.msg} at char {exc.pos}", stdout) from None
    cards = []  # the document is an object: it was read from its first "{"
    for key, value in document.items():
        match = _CARD.match(str(key))
        if match and isinstance(value, dict):  # "system" and other non-card keys are not GPUs
            cards.append((int(match.group(1)), value))
    _believable(len(cards), max_gpus, "rocm-smi", stdout)
    return [_card_sample(index, raw) for index, raw in sorted(cards, key=lambda c: c[0])]


def parse_rocm_csv(stdout: str, max_gpus: int = 1024) -> list[GpuSample]:
    lines = stdout.splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip().lower().startswith("device,")), None)
    if start is None:
        raise ParseError("rocm-smi CSV has no 'device,' header line", stdout)
    table = [line.strip() for line in lines[start:] if line.strip()]
    _believable(len(table) - 1, max_gpus, "rocm-smi", stdout)  # before csv reads a million rows
    try:
        return _rocm_csv_rows(table, stdout)
    except csv.Error as exc:  # a field past csv.field_size_limit() (128 KiB), for one
        raise ParseError(f"rocm-smi output is not readable CSV: {exc}", stdout[:2000]) from None


def _rocm_csv_rows(table: list[str], stdout: str) -> list[GpuSample]:
    samples = []
    for row in csv.DictReader(table):
        device = (row.pop("device", None) or "").strip()
        match = _CARD.match(device)
        if not match:
            continue
        if None in row:
            raise ParseError(f"rocm-smi CSV row for {device} has more values than the header", stdout)
        samples.append(_card_sample(int(match.group(1)), {k: v for k, v in row.items() if v is not None}))
    return samples


def _amd_value(node: Any) -> tuple[float, str] | None:
    if isinstance(node, dict) and "value" in node:
        parsed = number(str(node["value"]))
        return (parsed[0], str(node.get("unit") or "")) if parsed else None
    if isinstance(node, (int, float)) and not isinstance(node, bool):
        return float(node), ""
    if isinstance(node, str):
        return number(node)
    return None


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    if isinstance(node, dict) and not ("value" in node and "unit" in node):
        for key, value in node.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
    else:
        flat[prefix.rstrip(".")] = node
    return flat


_AMD_SMI: dict[str, tuple[str, ...]] = {
    "memory_total_mib": ("mem_usage.total_vram", "vram.size", "vram.total"),
    "memory_used_mib": ("mem_usage.used_vram", "vram.used"),
    "memory_free_mib": ("mem_usage.free_vram", "vram.free"),
    "utilization_gpu_pct": ("usage.gfx_activity", "usage.gfx_usage"),
    "temperature_c": ("temperature.edge", "temperature.hotspot"),
    "power_draw_w": ("power.socket_power", "power.average_socket_power", "power.current_socket_power"),
    "power_limit_w": ("power.power_limit", "limit.max_power", "limit.ppt0.max_power_limit"),
}


def _amd_index(node: Any, position: int) -> int:
    """amd-smi's ``"gpu": 3`` (a number or a digit string), else the GPU's place in the list."""
    if isinstance(node, str) and node.isascii() and node.isdigit() and len(node) <= 9:
        node = int(node)
    if isinstance(node, int) and not isinstance(node, bool):
        index = index_of(float(node)) if node.bit_length() < 64 else None
        return position if index is None else index
    return position


def parse_amd_smi(stdout: str, max_gpus: int = 1024) -> list[GpuSample]:
    starts = [i for i in (stdout.find("{"), stdout.find("[")) if i != -1]
    if not starts:
        raise ParseError("amd-smi printed no JSON", stdout, hint="add --json to gpu_query_cmd")
    try:
        document, _ = json.JSONDecoder().raw_decode(stdout[min(starts):])
    except json.JSONDecodeError as exc:
        raise ParseError(f"amd-smi JSON is invalid: {exc.msg} at char {exc.pos}", stdout) from None
    gpus = document.get("gpu_data", []) if isinstance(document, dict) else document
    if not isinstance(gpus, list):
        raise ParseError("amd-smi JSON has no GPU list", stdout)
    _believable(len(gpus), max_gpus, "amd-smi", stdout)
    samples = []
    for position, gpu in enumerate(g for g in gpus if isinstance(g, dict)):
        flat = _flatten(gpu)
        used: set[str] = {"gpu"}
        typed: dict[str, Any] = {}
        for target, keys in _AMD_SMI.items():
            for key in keys:
                if key not in flat:
                    continue
                used.add(key)
                parsed = _amd_value(flat[key])
                if parsed is None or target in typed:
                    continue
                value, unit = parsed
                if target.startswith("memory_"):
                    value = to_mib(value, unit or "MB") or value  # amd-smi says MB and means MiB
                typed[target] = value
        total, mem_used, free = derive_memory(typed.get("memory_total_mib"), typed.get("memory_used_mib"),
                                              typed.get("memory_free_mib"))
        typed.update(memory_total_mib=total, memory_used_mib=mem_used, memory_free_mib=free)
        name = next((str(flat[k]) for k in ("asic.market_name", "board.product_name")
                     if k in flat and not is_missing(str(flat[k]))), None)
        uuid = next((str(flat[k]) for k in ("asic.asic_serial", "board.product_serial")
                     if k in flat and not is_missing(str(flat[k]))), None)
        extra = bounded_extra((k, json.dumps(v) if isinstance(v, (dict, list)) else str(v))
                              for k, v in flat.items() if k not in used)
        samples.append(GpuSample(index=_amd_index(gpu.get("gpu"), position), uuid=uuid, name=name,
                                 vendor="amd", extra=extra, **typed))
    return samples
