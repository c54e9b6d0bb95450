"""nvidia-smi health fields: which to ask for, and what the answer means.

A host's driver is asked once which ``--query-gpu`` fields it knows (:func:`help_query_command`,
parsed by :func:`parse_help_query_gpu`); :func:`health_query_fields` then names only those, using
the old ``clocks_throttle_reasons.*`` spelling where the driver predates ``clocks_event_reasons.*``.
A field the driver lacks is left out, never an error. Drivers that know row remapping only through
``--query-remapped-rows`` (R460..R535) get :func:`remapped_rows_command` as well.

:func:`parse_health_csv` reads the answer (``--format=csv,nounits``; the header names the columns)
into :class:`HealthReading` per GPU, and :func:`findings_of` turns readings into findings.
"""

from __future__ import annotations

import csv
import functools
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from fleetctl.errors import ParseError
from fleetctl.telemetry.parsers.findings import Finding, clip, normalize_bus_id
from fleetctl.telemetry.parsers.values import index_of, is_missing, number

HELP_QUERY_COMMAND = "nvidia-smi --help-query-gpu"
IDENTITY_FIELDS = ("index", "pci.bus_id", "uuid")
# The health fields, in the order asked. Each is (new name, old name or None).
HEALTH_FIELDS: tuple[tuple[str, str | None], ...] = (
    ("ecc.errors.corrected.volatile.total", None),
    ("ecc.errors.uncorrected.volatile.total", None),
    ("ecc.errors.corrected.aggregate.total", None),
    ("ecc.errors.uncorrected.aggregate.total", None),
    ("retired_pages.single_bit_ecc.count", "retired_pages.sbe"),
    ("retired_pages.double_bit.count", "retired_pages.dbe"),
    ("retired_pages.pending", None),
    ("remapped_rows.correctable", None),
    ("remapped_rows.uncorrectable", None),
    ("remapped_rows.pending", None),
    ("remapped_rows.failure", None),
    ("clocks_event_reasons.active", "clocks_throttle_reasons.active"),
    ("clocks_event_reasons.hw_slowdown", "clocks_throttle_reasons.hw_slowdown"),
    ("clocks_event_reasons.hw_thermal_slowdown", "clocks_throttle_reasons.hw_thermal_slowdown"),
    ("clocks_event_reasons.hw_power_brake_slowdown", "clocks_throttle_reasons.hw_power_brake_slowdown"),
    ("clocks_event_reasons.sw_thermal_slowdown", "clocks_throttle_reasons.sw_thermal_slowdown"),
    ("pcie.link.gen.gpucurrent", "pcie.link.gen.current"),
    ("pcie.link.gen.max", None),
    ("pcie.link.width.current", None),
    ("pcie.link.width.max", None),
    ("gpu_recovery_action", None),
)
# Either spelling -> the one name a reading uses.
_CANONICAL = {old: new for new, old in HEALTH_FIELDS if old} | {new: new for new, _ in HEALTH_FIELDS} | {
    "pcie.link.gen.current": "pcie.link.gen.gpucurrent", "gpu_bus_id": "pci.bus_id", "gpu_uuid": "uuid"}
REMAPPED_ROWS_FIELDS = ("gpu_bus_id", "gpu_uuid", "remapped_rows.correctable", "remapped_rows.uncorrectable",
                        "remapped_rows.pending", "remapped_rows.failure")
# nvml.h clock event reason bits (nvmlClocksEventReason*), for drivers that give only the mask.
CLOCK_EVENT_BITS = {0x8: "clock_hw_slowdown", 0x20: "clock_sw_thermal_slowdown", 0x40: "clock_hw_thermal_slowdown",
                    0x80: "clock_hw_power_brake"}
_CLOCK_FIELDS = {"clocks_event_reasons.hw_slowdown": "clock_hw_slowdown",
                 "clocks_event_reasons.hw_thermal_slowdown": "clock_hw_thermal_slowdown",
                 "clocks_event_reasons.hw_power_brake_slowdown": "clock_hw_power_brake",
                 "clocks_event_reasons.sw_thermal_slowdown": "clock_sw_thermal_slowdown"}
MAX_HELP_TEXT = 1_000_000  # the real help is ~60 KB; more is not nvidia-smi
MAX_FIELDS = 2048
_HELP_LINE = re.compile(r'^"([A-Za-z0-9_.\-]+)"((?:\s+or\s+"[A-Za-z0-9_.\-]+")*)\s*$')
_ALIAS = re.compile(r'"([A-Za-z0-9_.\-]+)"')
_INVALID_FIELD = re.compile(r'Field "([^"]{1,200})" is not a valid field to query')


def help_query_command(tool: str = "nvidia-smi") -> str:
    return f"{tool} --help-query-gpu"


def parse_help_query_gpu(text: str) -> frozenset[str]:
    """Every field name (and alias) ``nvidia-smi --help-query-gpu`` lists. Empty when the text is
    not that help: the caller then knows nothing, and asks for no health field."""
    names: set[str] = set()
    for line in text[:MAX_HELP_TEXT].splitlines():
        match = _HELP_LINE.match(line.strip())
        if not match:
            continue
        names.add(match.group(1))
        names.update(_ALIAS.findall(match.group(2)))
        if len(names) >= MAX_FIELDS:
            break
    return frozenset(names)


def refused_field(text: str) -> str | None:
    """The field a query was refused for (``Field "x" is not a valid field to query``): a host whose
    help was not read learns its fields this way, one refusal at a time."""
    match = _INVALID_FIELD.search(text[:100_000])
    return match.group(1) if match else None


def health_query_fields(supported: Iterable[str]) -> list[str]:
    """The identity fields, then each health field the driver knows, in its new or old spelling."""
    known = frozenset(supported)
    fields = [f for f in IDENTITY_FIELDS if f in known or not known]
    for new, old in HEALTH_FIELDS:
        if new in known:
            fields.append(new)
        elif old and old in known:
            fields.append(old)
    return fields


def health_query_command(supported: Iterable[str], tool: str = "nvidia-smi") -> str:
    """``nvidia-smi --query-gpu=... --format=csv,nounits``; the header stays, as the columns' truth."""
    return f"{tool} --query-gpu={','.join(health_query_fields(supported))} --format=csv,nounits"


def needs_remapped_rows_query(supported: Iterable[str]) -> bool:
    """Drivers that know remapped rows only through ``--query-remapped-rows`` (older than R550)."""
    known = frozenset(supported)
    return bool(known) and "remapped_rows.pending" not in known


def remapped_rows_command(tool: str = "nvidia-smi") -> str:
    return f"{tool} --query-remapped-rows={','.join(REMAPPED_ROWS_FIELDS)} --format=csv,nounits"


@dataclass(frozen=True)
class HealthReading:
    """One GPU's health fields, typed. None: the driver lacks the field or the GPU does not say."""

    index: int | None = None
    bus_id: str | None = None
    uuid: str | None = None
    utilization_gpu_pct: float | None = None
    ecc_corrected_volatile: int | None = None
    ecc_uncorrected_volatile: int | None = None
    ecc_corrected_aggregate: int | None = None
    ecc_uncorrected_aggregate: int | None = None
    retired_pages_sbe: int | None = None
    retired_pages_dbe: int | None = None
    retired_pages_pending: bool | None = None
    remapped_rows_correctable: int | None = None
    remapped_rows_uncorrectable: int | None = None
    remapped_rows_pending: bool | None = None
    remapped_rows_failure: bool | None = None
    clock_events_active: int | None = None   # the nvml bitmask
    clock_events: frozenset[str] = frozenset()  # finding kinds of the active hardware slowdowns
    pcie_gen_current: int | None = None
    pcie_gen_max: int | None = None
    pcie_width_current: int | None = None
    pcie_width_max: int | None = None
    recovery_action: str | None = None
    requires_reset: tuple[str, ...] = ()  # fields that read "[GPU requires reset]"
    errors: tuple[str, ...] = ()          # fields that read "ERR!" or "Unknown Error"
    raw: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)


_INT_FIELDS = {
    "ecc.errors.corrected.volatile.total": "ecc_corrected_volatile",
    "ecc.errors.uncorrected.volatile.total": "ecc_uncorrected_volatile",
    "ecc.errors.corrected.aggregate.total": "ecc_corrected_aggregate",
    "ecc.errors.uncorrected.aggregate.total": "ecc_uncorrected_aggregate",
    "retired_pages.single_bit_ecc.count": "retired_pages_sbe",
    "retired_pages.double_bit.count": "retired_pages_dbe",
    "remapped_rows.correctable": "remapped_rows_correctable",
    "remapped_rows.uncorrectable": "remapped_rows_uncorrectable",
    "pcie.link.gen.gpucurrent": "pcie_gen_current",
    "pcie.link.gen.max": "pcie_gen_max",
    "pcie.link.width.current": "pcie_width_current",
    "pcie.link.width.max": "pcie_width_max",
}
_BOOL_FIELDS = {"retired_pages.pending": "retired_pages_pending", "remapped_rows.pending": "remapped_rows_pending",
                "remapped_rows.failure": "remapped_rows_failure"}
_TRUE = {"yes", "1", "true", "active", "enabled"}
_FALSE = {"no", "0", "false", "not active", "disabled"}
_ERROR_VALUES = {"err!", "[err!]", "unknown error", "[unknown error]"}
_FLAGGED_FIRST = frozenset("[EeUu")  # the first letters of "[GPU requires reset]", "ERR!", "Unknown Error"
MAX_GPUS = 1024
MAX_COUNT = 2**53  # a counter past this is no counter


def parse_health_csv(stdout: str, max_gpus: int = MAX_GPUS, *, fields: Sequence[str] | None = None) -> list[HealthReading]:
    """``--query-gpu=<health fields> --format=csv[,nounits]`` (or ``--query-remapped-rows``) -> one
    reading per row. The header names the columns; without one (``noheader``, as the heartbeat's own
    query prints), ``fields`` must: the heartbeat's query may then carry the health fields too, and
    one answer feeds both parsers. Raises :class:`ParseError` (one line) on anything else."""
    lines = [line.rstrip("\r") for line in stdout.splitlines() if line.strip()]
    if not lines:
        return []
    if len(lines) > max_gpus + 1:
        raise ParseError(f"nvidia-smi printed more than {max_gpus} GPUs: not believable", stdout[:2000])
    try:
        rows = list(csv.reader(lines, skipinitialspace=True))
    except csv.Error as exc:
        raise ParseError(f"nvidia-smi health output is not readable CSV: {exc}", stdout[:2000]) from None
    header = [cell.strip().partition(" [")[0] for cell in rows[0]]
    if fields is not None and not _is_header(header):
        header, rows = list(fields), [[], *rows]
    if not _is_header(header):
        raise ParseError(f"nvidia-smi health output has no header naming health fields: {clip(lines[0])!r}",
                         stdout[:2000], hint="query with --format=csv (not noheader)")
    names = [_CANONICAL.get(name, name) for name in header]
    readings = []
    for number_, row in enumerate(rows[1:], start=1):
        if len(row) != len(names):
            raise ParseError(f"nvidia-smi health row {number_} has {len(row)} values for {len(names)} fields",
                             stdout[:2000])
        readings.append(_reading(dict(zip(names, map(str.strip, row), strict=True))))
    return readings


def _is_header(cells: list[str]) -> bool:
    return any(name in _CANONICAL or name in IDENTITY_FIELDS for name in cells)


def fields_after_refusal(asked: Sequence[str], output: str) -> list[str] | None:
    """``asked`` less the field the driver refused in ``output``; None when ``output`` is no refusal.
    A host whose ``--help-query-gpu`` could not be read learns its fields this way."""
    refused = refused_field(output)
    if refused is None or refused not in asked:
        return None
    return [f for f in asked if f != refused]


def _reading(values: dict[str, str]) -> HealthReading:
    typed: dict[str, object] = {}
    requires_reset: list[str] = []
    errors: list[str] = []
    for name, raw in values.items():
        if raw[:1] in _FLAGGED_FIRST:  # cheap test first: a beat reads ~30 values per GPU
            lowered = raw.lower()
            if lowered == "[gpu requires reset]":
                requires_reset.append(name)
                continue
            if lowered in _ERROR_VALUES:
                errors.append(name)
                continue
        target = _INT_FIELDS.get(name)
        if target is not None:
            if raw.isdigit() and len(raw) < 16:
                typed[target] = int(raw)
            else:
                parsed = number(raw)
                if parsed is not None and parsed[0].is_integer() and 0 <= parsed[0] < MAX_COUNT:
                    typed[target] = int(parsed[0])
            continue
        target = _BOOL_FIELDS.get(name)
        if target is not None:
            lowered = raw.lower()
            if lowered in _TRUE:
                typed[target] = True
            elif lowered in _FALSE:
                typed[target] = False
        elif name == "index":
            parsed = number(raw)
            typed["index"] = index_of(parsed[0]) if parsed else None
        elif name == "pci.bus_id":
            typed["bus_id"] = normalize_bus_id(raw)
        elif name == "uuid" and not is_missing(raw):
            typed["uuid"] = clip(raw)
        elif name == "utilization.gpu":
            parsed = number(raw)
            typed["utilization_gpu_pct"] = parsed[0] if parsed else None
        elif name == "clocks_event_reasons.active":
            hex_digits = raw[2:] if raw[:2] in ("0x", "0X") else ""
            if hex_digits and len(hex_digits) <= 16 and all(c in "0123456789abcdefABCDEF" for c in hex_digits):
                typed["clock_events_active"] = int(hex_digits, 16)
        elif name == "gpu_recovery_action" and not is_missing(raw):
            typed["recovery_action"] = clip(raw)
    events = {kind for name, kind in _CLOCK_FIELDS.items() if values.get(name, "").lower() == "active"}
    mask = typed.get("clock_events_active")
    if isinstance(mask, int) and not any(name in values for name in _CLOCK_FIELDS):
        events |= {kind for bit, kind in CLOCK_EVENT_BITS.items() if mask & bit}  # the mask alone
    raw_values = values if len(values) <= 256 else dict(list(values.items())[:256])
    return HealthReading(clock_events=frozenset(events), requires_reset=tuple(requires_reset), errors=tuple(errors),
                         raw=raw_values, **typed)  # type: ignore[arg-type]


def merge_remapped_rows(readings: list[HealthReading], remapped: list[HealthReading]) -> list[HealthReading]:
    """Readings with the remapped-rows fields from a ``--query-remapped-rows`` answer, matched by bus id."""
    by_bus = {r.bus_id: r for r in remapped if r.bus_id}
    merged = []
    for reading in readings:
        extra = by_bus.get(reading.bus_id) if reading.bus_id else None
        if extra is None:
            merged.append(reading)
            continue
        changes = {name: getattr(extra, name) for name in ("remapped_rows_correctable", "remapped_rows_uncorrectable",
                                                           "remapped_rows_pending", "remapped_rows_failure")
                   if getattr(extra, name) is not None}
        merged.append(replace(reading, requires_reset=reading.requires_reset + extra.requires_reset,
                              errors=reading.errors + extra.errors, **changes))
    return merged


RETIRED_PAGES_LIMIT = 60  # NVIDIA: a board with 60+ retired pages qualifies for replacement
BUSY_PCT = 50.0  # a PCIe generation below max counts only on a busy GPU (idle links slow down to save power)


@functools.lru_cache(maxsize=512)
def parse_health_cached(stdout: str, fields: tuple[str, ...] | None = None) -> tuple[HealthReading, ...]:
    """:func:`parse_health_csv`, remembered: a healthy host prints the same health text beat after
    beat (utilization, which changes, is not a health field), so most beats cost one lookup."""
    return tuple(parse_health_csv(stdout, fields=fields))


def findings_of(readings: Iterable[HealthReading], utilization: Mapping[int, float] | None = None) -> list[Finding]:
    """What is wrong with each GPU, as findings; a healthy GPU gives none. ``utilization`` (GPU index ->
    percent, from the same beat's telemetry) tells a busy GPU, whose slow PCIe generation counts."""
    found: list[Finding] = []
    for position, r in enumerate(readings):
        gpu = r.index if r.index is not None else position
        busy = r.utilization_gpu_pct if r.utilization_gpu_pct is not None else (utilization or {}).get(gpu)

        def add(kind: str, value: float | None = None, code: str | None = None, detail: str = "",
                gpu: int = gpu, r: HealthReading = r) -> None:
            found.append(Finding(kind, gpu=gpu, code=code, value=value, bus_id=r.bus_id, detail=detail))

        for kind, count in (("ecc_uncorrected_volatile", r.ecc_uncorrected_volatile),
                            ("ecc_uncorrected_aggregate", r.ecc_uncorrected_aggregate),
                            ("ecc_corrected_volatile", r.ecc_corrected_volatile),
                            ("retired_pages_dbe", r.retired_pages_dbe), ("retired_pages_sbe", r.retired_pages_sbe),
                            ("remap_uncorrectable", r.remapped_rows_uncorrectable)):
            if count:
                add(kind, float(count))
        if (r.retired_pages_sbe or 0) + (r.retired_pages_dbe or 0) >= RETIRED_PAGES_LIMIT:
            add("retired_pages_limit", float((r.retired_pages_sbe or 0) + (r.retired_pages_dbe or 0)))
        if r.retired_pages_pending:
            add("retired_pages_pending")
        if r.remapped_rows_pending:
            add("remap_pending")
        if r.remapped_rows_failure:
            add("remap_failure")
        for kind in sorted(r.clock_events):
            add(kind)
        if r.pcie_width_current and r.pcie_width_max and r.pcie_width_current < r.pcie_width_max:
            add("pcie_width_degraded", float(r.pcie_width_current), detail=f"x{r.pcie_width_current} of x{r.pcie_width_max}")
        if (r.pcie_gen_current and r.pcie_gen_max and r.pcie_gen_current < r.pcie_gen_max
                and (busy or 0) >= BUSY_PCT):
            add("pcie_gen_degraded", float(r.pcie_gen_current), detail=f"gen {r.pcie_gen_current} of {r.pcie_gen_max}")
        if r.recovery_action and r.recovery_action.lower() not in ("none", "n/a", "[n/a]"):
            add("recovery_action", code=r.recovery_action.lower().replace(" ", "_"), detail=r.recovery_action)
        if r.requires_reset:
            add("gpu_requires_reset", detail=", ".join(r.requires_reset[:3]))
        if r.errors:
            add("value_error", detail=", ".join(r.errors[:3]))
    return found


def missing_gpus(previous: Mapping[str, int], readings: Iterable[HealthReading], previous_count: int | None = None,
                 ) -> list[Finding]:
    """``gpu_missing`` for each bus id seen before (``previous``: bus id -> index) and not now; when the
    host's bus ids are unknown, one host finding if fewer GPUs answer than ``previous_count``."""
    current = list(readings)
    seen = {r.bus_id for r in current if r.bus_id}
    gone = [Finding("gpu_missing", gpu=index, bus_id=bus) for bus, index in sorted(previous.items()) if bus not in seen]
    if not gone and previous_count is not None and len(current) < previous_count:
        gone.append(Finding("gpu_missing", value=float(previous_count - len(current)),
                            detail=f"{len(current)} of {previous_count} GPUs answer"))
    return gone
