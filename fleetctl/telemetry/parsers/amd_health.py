"""amd-smi health: ECC counts, PCIe link and bad pages, as findings.

Three JSON answers, each optional (ROCm 6 prints a list of GPUs, ROCm 7 ``{"gpu_data": [...]}``;
a permission banner may come first)::

    amd-smi metric --ecc --pcie --json   ecc.total_{correctable,uncorrectable,deferred}_count, pcie.width/speed
    amd-smi static --bus --ras --json    bus.max_pcie_width/max_pcie_speed, ras.bad_page_threshold_exceeded
    amd-smi bad-pages --json             retired / pending / un_res: a list of pages, or "No bad pages found."

Values amd-smi cannot read are ``"N/A"``: the field is then unknown, never zero.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

from fleetctl.errors import ParseError
from fleetctl.telemetry.parsers.findings import Finding, clip, normalize_bus_id
from fleetctl.telemetry.parsers.rocm import _amd_index

METRIC_COMMAND = "amd-smi metric --ecc --pcie --json"
STATIC_COMMAND = "amd-smi static --bus --ras --json"
BAD_PAGES_COMMAND = "amd-smi bad-pages --json"
MAX_GPUS = 1024
MAX_PAGES = 1_000_000


@dataclass(frozen=True)
class AmdHealthReading:
    index: int
    bus_id: str | None = None
    ecc_correctable: int | None = None
    ecc_uncorrectable: int | None = None
    ecc_deferred: int | None = None
    pcie_width: int | None = None
    pcie_width_max: int | None = None
    pcie_speed_gts: float | None = None
    pcie_speed_max_gts: float | None = None
    bad_pages_retired: int | None = None
    bad_pages_pending: int | None = None
    bad_pages_unreservable: int | None = None
    bad_page_threshold_exceeded: bool | None = None


def _gpus(stdout: str, what: str) -> list[dict[str, Any]]:
    starts = [i for i in (stdout.find("{"), stdout.find("[")) if i != -1]
    if not starts:
        raise ParseError(f"amd-smi {what} printed no JSON", stdout[:2000], hint="add --json")
    try:
        document, _ = json.JSONDecoder().raw_decode(stdout[min(starts):])
    except json.JSONDecodeError as exc:
        raise ParseError(f"amd-smi {what} JSON is invalid: {exc.msg} at char {exc.pos}", stdout[:2000]) from None
    except RecursionError:
        raise ParseError(f"amd-smi {what} JSON is nested too deep", stdout[:2000]) from None
    gpus = document.get("gpu_data", []) if isinstance(document, dict) else document
    if not isinstance(gpus, list):
        raise ParseError(f"amd-smi {what} JSON has no GPU list", stdout[:2000])
    if len(gpus) > MAX_GPUS:
        raise ParseError(f"amd-smi {what} reports more than {MAX_GPUS} GPUs: not believable", stdout[:2000])
    return [g for g in gpus if isinstance(g, dict)]


def _count(value: Any) -> int | None:
    if isinstance(value, dict):
        value = value.get("value")
    if isinstance(value, bool):
        return None
    if isinstance(value, int) and 0 <= value < 2**53:
        return value
    if isinstance(value, str) and value.strip().isdigit() and len(value.strip()) < 16:
        return int(value.strip())
    return None


def _speed(value: Any) -> float | None:
    if isinstance(value, dict):
        value = value.get("value")
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 1000:
        return float(value)
    return None


def _section(gpu: dict[str, Any], name: str) -> dict[str, Any]:
    section = gpu.get(name)
    return section if isinstance(section, dict) else {}


def _pages(value: Any) -> int | None:
    """A list of pages counts; "No bad pages found." is zero; "N/A" (not root, not supported) unknown."""
    if isinstance(value, list):
        return min(len(value), MAX_PAGES)
    if isinstance(value, str) and "no bad pages" in value.lower():
        return 0
    return None


def parse_amd_health(metric: str | None = None, static: str | None = None, bad_pages: str | None = None,
                     ) -> list[AmdHealthReading]:
    """Readings per GPU from whichever of the three answers are given (matched by ``"gpu"`` index)."""
    readings: dict[int, AmdHealthReading] = {}

    def update(index: int, **changes: Any) -> None:
        current = readings.get(index) or AmdHealthReading(index)
        readings[index] = replace(current, **{k: v for k, v in changes.items() if v is not None})

    if metric:
        for position, gpu in enumerate(_gpus(metric, "metric")):
            ecc, pcie = _section(gpu, "ecc"), _section(gpu, "pcie")
            update(_amd_index(gpu.get("gpu"), position), ecc_correctable=_count(ecc.get("total_correctable_count")),
                   ecc_uncorrectable=_count(ecc.get("total_uncorrectable_count")),
                   ecc_deferred=_count(ecc.get("total_deferred_count")),
                   pcie_width=_count(pcie.get("width")), pcie_speed_gts=_speed(pcie.get("speed")))
    if static:
        for position, gpu in enumerate(_gpus(static, "static")):
            bus, ras = _section(gpu, "bus"), _section(gpu, "ras")
            exceeded = str(ras.get("bad_page_threshold_exceeded", "")).strip().lower()
            update(_amd_index(gpu.get("gpu"), position), bus_id=normalize_bus_id(str(bus.get("bdf", ""))),
                   pcie_width_max=_count(bus.get("max_pcie_width")), pcie_speed_max_gts=_speed(bus.get("max_pcie_speed")),
                   bad_page_threshold_exceeded={"true": True, "yes": True, "false": False, "no": False}.get(exceeded))
    if bad_pages:
        for position, gpu in enumerate(_gpus(bad_pages, "bad-pages")):
            update(_amd_index(gpu.get("gpu"), position), bad_pages_retired=_pages(gpu.get("retired")),
                   bad_pages_pending=_pages(gpu.get("pending")), bad_pages_unreservable=_pages(gpu.get("un_res")))
    return [readings[index] for index in sorted(readings)]


def findings_of_amd(readings: Iterable[AmdHealthReading]) -> list[Finding]:
    found: list[Finding] = []
    for r in readings:
        def add(kind: str, value: float | None = None, detail: str = "", r: AmdHealthReading = r) -> None:
            found.append(Finding(kind, gpu=r.index, value=value, bus_id=r.bus_id, detail=clip(detail)))

        if r.ecc_uncorrectable:
            add("ecc_uncorrected_volatile", float(r.ecc_uncorrectable))
        if r.ecc_deferred:
            add("ecc_deferred", float(r.ecc_deferred))
        if r.ecc_correctable:
            add("ecc_corrected_volatile", float(r.ecc_correctable))
        if r.bad_pages_pending:
            add("retired_pages_pending", float(r.bad_pages_pending))
        if r.bad_pages_retired:
            add("retired_pages_dbe", float(r.bad_pages_retired), detail="bad pages retired")
        if r.bad_pages_unreservable:
            add("remap_failure", float(r.bad_pages_unreservable), detail="bad pages that cannot be reserved")
        if r.bad_page_threshold_exceeded:
            add("bad_page_threshold_exceeded")
        if r.pcie_width and r.pcie_width_max and r.pcie_width < r.pcie_width_max:
            add("pcie_width_degraded", float(r.pcie_width), detail=f"x{r.pcie_width} of x{r.pcie_width_max}")
    return found
