"""AMD GPU health in the heartbeat's one exec: the amd-smi part of the health script, and its reading.

Where ``amd-smi`` is on the PATH (ROCm 6 and later ship it beside ``rocm-smi``, whichever the GPU query
uses), the health part asks it three things in the same exec, each behind its own marker::

    amd-smi metric --ecc --pcie --json   ECC totals, the PCIe link's width and speed now
    amd-smi static --bus --ras --json    bus id, the link's max width and speed, the bad page threshold
    amd-smi bad-pages --json             retired, pending and unreservable pages

:mod:`fleetctl.telemetry.parsers.amd_health` reads them; one answer that cannot be read costs only its
own fields (a non-root user's ``bad-pages`` says ``N/A``), while an unreadable ``metric`` means nothing
is known (``health_unreadable``: the GPUs are unknown, never healthy). The findings are judged by the
same table as NVIDIA's. Pure: text in, findings and values out.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace

from fleetctl.errors import ParseError
from fleetctl.telemetry.bounded import BOUNDED, HUNG_EXIT, hung_note
from fleetctl.telemetry.parsers.amd_health import (
    BAD_PAGES_COMMAND,
    METRIC_COMMAND,
    STATIC_COMMAND,
    AmdHealthReading,
    findings_of_amd,
    parse_amd_health,
)
from fleetctl.telemetry.parsers.findings import Finding, clip

AMD_MARK = "\x1efleetctl-amd"
STATIC_MARK = "\x1efleetctl-amd-static"
PAGES_MARK = "\x1efleetctl-amd-pages"
TOOL = "amd-smi"
# PCIe transfer rate (GT/s) -> link generation, so AMD links export as DCGM_FI_DEV_PCIE_LINK_GEN does.
_GENERATIONS = {2.5: 1, 5.0: 2, 8.0: 3, 16.0: 4, 32.0: 5, 64.0: 6}


def amd_health_query() -> str:
    """Shell printing the three answers behind their markers, each call bounded; after a call that hung,
    amd-smi is not asked again this beat (fleetctl.telemetry.bounded)."""
    return (f"printf '{AMD_MARK}\\n'; {BOUNDED}{METRIC_COMMAND} 2>&1; r=$?; "
            f"if [ \"$r\" != {HUNG_EXIT} ]; then printf '\\n{STATIC_MARK}\\n'; {BOUNDED}{STATIC_COMMAND} 2>&1; r=$?; fi; "
            f"if [ \"$r\" != {HUNG_EXIT} ]; then printf '\\n{PAGES_MARK}\\n'; {BOUNDED}{BAD_PAGES_COMMAND} 2>&1; r=$?; fi; "
            + hung_note(TOOL))


def is_amd_answer(text: str) -> bool:
    return text.startswith(AMD_MARK)


@dataclass(frozen=True)
class AmdParsed:
    findings: tuple[Finding, ...]
    buses: tuple[tuple[str, int], ...]                                # bus id -> index, where static answered
    values: tuple[tuple[int, Mapping[str, float | None]], ...]        # index -> DCGM attribute -> value
    count: int                                                        # GPUs that answered metric


def _merge(into: AmdHealthReading, more: AmdHealthReading) -> AmdHealthReading:
    return replace(into, **{f.name: v for f in fields(more) if f.name != "index" and (v := getattr(more, f.name)) is not None})


def _generation(speed: float | None) -> float | None:
    generation = _GENERATIONS.get(speed) if speed is not None else None
    return None if generation is None else float(generation)


def _values(r: AmdHealthReading) -> dict[str, float | None]:
    def num(value: int | None) -> float | None:
        return None if value is None else float(value)
    return {"ecc_corrected_volatile": num(r.ecc_correctable), "ecc_uncorrected_volatile": num(r.ecc_uncorrectable),
            "retired_pages_dbe": num(r.bad_pages_retired), "retired_pages_pending": num(r.bad_pages_pending),
            "pcie_gen_current": _generation(r.pcie_speed_gts), "pcie_gen_max": _generation(r.pcie_speed_max_gts),
            "pcie_width_current": num(r.pcie_width), "pcie_width_max": num(r.pcie_width_max)}


@functools.lru_cache(maxsize=256)
def read_amd(text: str, known_buses: tuple[tuple[str, int], ...]) -> AmdParsed:
    """The amd-smi part's answer (from its marker on) -> findings, bus ids and values; never raises.
    Remembered: a healthy host prints the same answer beat after beat."""
    body = text.removeprefix(AMD_MARK).lstrip("\n")
    metric, _, rest = body.partition(f"\n{STATIC_MARK}\n")
    static, _, pages = rest.partition(f"\n{PAGES_MARK}\n")
    try:
        readings = {r.index: r for r in parse_amd_health(metric=metric)}
    except ParseError as exc:
        return AmdParsed((Finding("health_unreadable", detail=clip(f"{TOOL}: {exc}")),), (), (), 0)
    if not readings:
        return AmdParsed((Finding("health_unreadable", detail=clip(metric.strip()[:200]) or f"no answer from {TOOL}"),),
                         (), (), 0)
    count = len(readings)
    for name, answer in (("static", static), ("bad_pages", pages)):
        try:  # a section amd-smi cannot answer (not root, an old version) costs only its own fields
            more = parse_amd_health(**{name: answer}) if answer.strip() else []
        except ParseError:
            continue
        for reading in more:
            if reading.index in readings:
                readings[reading.index] = _merge(readings[reading.index], reading)
    ordered = [readings[i] for i in sorted(readings)]
    found = findings_of_amd(ordered)
    seen = {r.bus_id for r in ordered if r.bus_id}
    if seen:  # bus ids answered: a GPU seen before is missing by its bus (the count fallback is the caller's)
        found += [Finding("gpu_missing", gpu=index, bus_id=bus) for bus, index in known_buses if bus not in seen]
    buses = tuple((r.bus_id, r.index) for r in ordered if r.bus_id)
    return AmdParsed(tuple(found), buses, tuple((r.index, _values(r)) for r in ordered), count)
