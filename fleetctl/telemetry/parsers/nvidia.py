"""nvidia-smi ``--query-gpu=... --format=csv[,noheader][,nounits]`` -> GpuSample list."""

from __future__ import annotations

import csv
import functools
import re
import shlex

from fleetctl.errors import ParseError
from fleetctl.telemetry.parsers.values import bounded_extra, derive_memory, index_of, is_missing, number, to_mib
from fleetctl.telemetry.snapshot import GpuSample

# Typed field -> the query names that feed it, first found wins.
FIELD_SOURCES: dict[str, tuple[str, ...]] = {
    "index": ("index",),
    "uuid": ("uuid", "gpu_uuid"),
    "name": ("name", "gpu_name"),
    "memory_total_mib": ("memory.total",),
    "memory_used_mib": ("memory.used",),
    "memory_free_mib": ("memory.free",),
    "utilization_gpu_pct": ("utilization.gpu",),
    "temperature_c": ("temperature.gpu",),
    "power_draw_w": ("power.draw", "power.draw.average", "power.draw.instant"),
    "power_limit_w": ("power.limit", "enforced.power.limit"),
}
_MEMORY = {"memory_total_mib", "memory_used_mib", "memory_free_mib"}
_DEFAULT_UNITS = {"memory.total": "MiB", "memory.used": "MiB", "memory.free": "MiB"}


def query_of(command: str) -> tuple[list[str] | None, set[str]]:
    """The ``--query-gpu`` fields and the ``--format`` options named in a command line."""
    fields, options = _query_of(command)
    return (None if fields is None else list(fields)), set(options)


@functools.lru_cache(maxsize=256)
def _query_of(command: str) -> tuple[tuple[str, ...] | None, frozenset[str]]:
    # Cached: a fleet sends the same few commands every beat, and shlex is slow.
    try:
        words = shlex.split(command)
    except ValueError:
        words = command.split()
    fields: list[str] | None = None
    options: set[str] = set()
    for i, word in enumerate(words):
        for flag in ("--query-gpu", "--format"):
            value = None
            if word.startswith(flag + "="):
                value = word.split("=", 1)[1]
            elif word == flag and i + 1 < len(words):
                value = words[i + 1]
            if value is None:
                continue
            if flag == "--query-gpu":
                fields = [f.strip() for f in value.split(",") if f.strip()]
            else:
                options = {o.strip() for o in value.split(",")}
    return (None if fields is None else tuple(fields)), frozenset(options)


def _split_header(cell: str) -> tuple[str, str | None]:
    name, _, rest = cell.strip().partition(" [")
    return name, rest.rstrip("]") if rest else None


_HEADER_CELL = re.compile(r"^[a-z_][a-z0-9_.]*( \[[^\]]+\])?$")


def _looks_like_header(cells: list[str]) -> bool:
    return all(_HEADER_CELL.match(c.strip()) for c in cells) and not any(number(c) for c in cells)


def parse_nvidia_csv(command: str, stdout: str, max_gpus: int = 1024) -> list[GpuSample]:
    fields, options = query_of(command)
    lines = [line.rstrip("\r") for line in stdout.splitlines() if line.strip()]
    if not lines:
        return []
    # Counted before the csv module sees any: splitlines() also breaks at \r, \x1e, \u2028..., so a
    # count of "\n" alone cannot bound the rows (a million of them takes csv 10 s).
    if len(lines) > max_gpus + 1:  # one header at most
        raise ParseError(f"nvidia-smi printed more than {max_gpus} GPUs: not believable", stdout[:2000])
    try:
        rows = list(csv.reader(lines, skipinitialspace=True))
    except csv.Error as exc:  # a field past csv.field_size_limit() (128 KiB), for one
        raise ParseError(f"nvidia-smi output is not readable CSV: {exc}", stdout[:2000]) from None
    units: dict[str, str | None] = {}
    has_header = "noheader" not in options if "csv" in options else _looks_like_header(rows[0])
    if has_header:
        # The header is the truth about column order (accounted-apps even renames fields).
        for cell in rows[0]:
            name, unit = _split_header(cell)
            units[name] = unit
        fields = list(units)
        rows = rows[1:]
    if fields is None:
        raise ParseError("nvidia-smi output has no header and the command names no --query-gpu fields",
                         stdout, hint="use --query-gpu=... --format=csv in gpu_query_cmd")
    samples = []
    for number_, row in enumerate(rows, start=1):
        if len(row) != len(fields):
            raise ParseError(f"nvidia-smi row {number_} has {len(row)} values for {len(fields)} fields", stdout)
        samples.append(_sample(dict(zip(fields, (c.strip() for c in row), strict=False)), units))
    return samples


def _sample(values: dict[str, str], units: dict[str, str | None]) -> GpuSample:
    typed: dict[str, object] = {}
    used: set[str] = set()
    for target, sources in FIELD_SOURCES.items():
        for source in sources:
            if source not in values:
                continue
            used.add(source)
            if target in typed:
                continue
            raw = values[source]
            if target in ("uuid", "name"):
                if not is_missing(raw):
                    typed[target] = raw
                continue
            parsed = number(raw)
            if parsed is None:
                continue
            value, unit = parsed
            if target in _MEMORY:
                converted = to_mib(value, unit or units.get(source) or _DEFAULT_UNITS.get(source, "MiB"))
                if converted is None:
                    continue
                value = converted
            if target == "index":
                index = index_of(value)
                if index is not None:
                    typed[target] = index
                continue
            typed[target] = value
    total, mem_used, free = derive_memory(typed.get("memory_total_mib"), typed.get("memory_used_mib"),  # type: ignore[arg-type]
                                          typed.get("memory_free_mib"))  # type: ignore[arg-type]
    typed.update(memory_total_mib=total, memory_used_mib=mem_used, memory_free_mib=free)
    extra = bounded_extra((k, v) for k, v in values.items() if k not in used)
    return GpuSample(vendor="nvidia", extra=extra, **typed)  # type: ignore[arg-type]
