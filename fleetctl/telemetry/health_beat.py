"""GPU health in the heartbeat's one exec: the shell it appends, and the reading of what came back.

The heartbeat script ends with, where ``nvidia-smi`` is on the PATH, two more parts behind markers:

* the health query. The fields a host's driver knows are learned once: on a host not seen before (or
  whose driver version changed) the shell itself picks them from ``nvidia-smi --help-query-gpu`` (new
  spelling, else the old one) and queries them in the same exec, and the answer's CSV header tells the
  controller which it got. It remembers them per host, in memory (:class:`HostMemory`); later beats ask
  for exactly those, with no help text sent. ``driver_version`` rides along, so a new driver relearns.
* the kernel log from the host's journal cursor (remembered in the store, so a cron heartbeat from
  cold goes on from it): only new lines come back, and a beat with nothing new costs no more than an
  empty answer in the exec that was running anyway.

:func:`read_health` is pure: the text after the markers and what is remembered -> a
:class:`~fleetctl.telemetry.snapshot.GpuHealthReport` judged with this beat's findings only (the store
adds the Xid history and keeps quarantines, :mod:`fleetctl.telemetry.quarantine`).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

from fleetctl.errors import ParseError
from fleetctl.telemetry.gpu_health import Rule, judge
from fleetctl.telemetry.parsers.findings import Finding, clip
from fleetctl.telemetry.parsers.nvidia_health import (
    HEALTH_FIELDS,
    IDENTITY_FIELDS,
    REMAPPED_ROWS_FIELDS,
    HealthReading,
    findings_of,
    merge_remapped_rows,
    missing_gpus,
    parse_health_cached,
)
from fleetctl.telemetry.parsers.xid import kernel_log_command, parse_kernel_log
from fleetctl.telemetry.snapshot import GpuHealth, GpuHealthReport, GpuSample, HealthFinding

HEALTH_MARK = "\x1efleetctl-health"
REMAP_MARK = "\x1efleetctl-remap"
JOURNAL_MARK = "\x1efleetctl-journal"
DRIVER_FIELD = "driver_version"
JOURNAL_LINES = 500  # kernel lines read per beat at most; an Xid storm past this is cut (and says so)


# dcgm-exporter's names (dcgm-exporter's default-counters.csv; units as its help says) for what a reading holds.
DCGM_FIELDS: tuple[tuple[str, str, str], ...] = (
    ("DCGM_FI_DEV_ECC_SBE_VOL_TOTAL", "ecc_corrected_volatile", "Total number of single-bit volatile ECC errors."),
    ("DCGM_FI_DEV_ECC_DBE_VOL_TOTAL", "ecc_uncorrected_volatile", "Total number of double-bit volatile ECC errors."),
    ("DCGM_FI_DEV_ECC_SBE_AGG_TOTAL", "ecc_corrected_aggregate", "Total number of single-bit persistent ECC errors."),
    ("DCGM_FI_DEV_ECC_DBE_AGG_TOTAL", "ecc_uncorrected_aggregate", "Total number of double-bit persistent ECC errors."),
    ("DCGM_FI_DEV_RETIRED_SBE", "retired_pages_sbe", "Total number of retired pages due to single-bit errors."),
    ("DCGM_FI_DEV_RETIRED_DBE", "retired_pages_dbe", "Total number of retired pages due to double-bit errors."),
    ("DCGM_FI_DEV_RETIRED_PENDING", "retired_pages_pending", "Total number of pages pending retirement."),
    ("DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS", "remapped_rows_correctable", "Number of remapped rows for correctable errors."),
    ("DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS", "remapped_rows_uncorrectable", "Number of remapped rows for uncorrectable errors."),
    ("DCGM_FI_DEV_ROW_REMAP_PENDING", "remapped_rows_pending", "Whether remapping of rows is pending (1) or not (0)."),
    ("DCGM_FI_DEV_ROW_REMAP_FAILURE", "remapped_rows_failure", "Whether remapping of rows has failed (1) or not (0)."),
    ("DCGM_FI_DEV_CLOCKS_EVENT_REASONS", "clock_events_active", "Current clock event reasons (bitmask of nvmlClocksEventReason)."),
    ("DCGM_FI_DEV_PCIE_LINK_GEN", "pcie_gen_current", "PCIe current link generation."),
    ("DCGM_FI_DEV_PCIE_MAX_LINK_GEN", "pcie_gen_max", "PCIe max link generation."),
    ("DCGM_FI_DEV_PCIE_LINK_WIDTH", "pcie_width_current", "PCIe current link width (lanes)."),
    ("DCGM_FI_DEV_PCIE_MAX_LINK_WIDTH", "pcie_width_max", "PCIe max link width (lanes)."),
)
XID_FIELD = ("DCGM_FI_DEV_XID_ERRORS", "Value of the last XID error encountered.")


def _values(reading: HealthReading) -> dict[str, float]:
    found = {}
    for name, attribute, _ in DCGM_FIELDS:
        value = getattr(reading, attribute)
        if value is not None:
            found[name] = float(value)
    return found


@dataclass(frozen=True)
class HostMemory:
    """What the controller remembers of one host between beats."""

    fields: tuple[str, ...] | None = None   # None: not learned yet (the shell picks them this beat)
    driver_version: str | None = None
    buses: Mapping[str, int] = field(default_factory=dict)  # bus id -> index, as last seen
    cursor: str | None = None               # the kernel log cursor


def _learning_query() -> str:
    """Shell that picks the health fields this driver knows from its help, then queries them."""
    pairs = " ".join(f"{new}/{old or new}" for new, old in (*HEALTH_FIELDS, (DRIVER_FIELD, None)))
    return ("h=$(nvidia-smi --help-query-gpu 2>/dev/null); q=" + ",".join(IDENTITY_FIELDS) + "; "
            f"for p in {pairs}; do n=${{p%/*}}; o=${{p#*/}}; "
            'case "$h" in *"\\"$n\\""*) q="$q,$n";; *"\\"$o\\""*) q="$q,$o";; esac; done; '
            'nvidia-smi --query-gpu="$q" --format=csv,nounits 2>&1')


def health_script(memory: HostMemory | None) -> str:
    """The part of the heartbeat script that reads GPU health; empty where nvidia-smi is absent."""
    memory = memory or HostMemory()
    query = _learning_query() if memory.fields is None else f"nvidia-smi --query-gpu={','.join(memory.fields)} --format=csv,nounits 2>&1"
    remap = ""
    if memory.fields is not None and not any(f.startswith("remapped_rows.") for f in memory.fields) and \
            "retired_pages.pending" not in memory.fields and len(memory.fields) > len(IDENTITY_FIELDS) + 1:
        # R460..R535 know row remapping only through --query-remapped-rows (A100/H100 have no retired pages).
        remap = (f"printf '\\n{REMAP_MARK}\\n'; nvidia-smi --query-remapped-rows={','.join(REMAPPED_ROWS_FIELDS)} "
                 "--format=csv,nounits 2>&1; ")
    journal = kernel_log_command(memory.cursor, JOURNAL_LINES)
    return (f"if command -v nvidia-smi >/dev/null 2>&1; then printf '\\n{HEALTH_MARK}\\n'; {query}; {remap}"
            f"printf '\\n{JOURNAL_MARK}\\n'; {journal}; fi")


def _sections(text: str) -> tuple[str, str | None, str]:
    health, _, journal = text.partition(f"\n{JOURNAL_MARK}\n")
    health, marker, remap = health.partition(f"\n{REMAP_MARK}\n")
    return health, remap if marker else None, journal


def read_health(text: str, memory: HostMemory | None, gpus: Sequence[GpuSample], table: Mapping[str, Rule] | None,
                now: float | None = None) -> GpuHealthReport:
    """The health part's output (after its marker) -> this beat's report. Never raises on any text."""
    memory = memory or HostMemory()
    now = time.time() if now is None else now
    health_text, remap_text, journal_text = _sections(text)
    findings: list[Finding] = []
    fields: list[str] = []
    driver = None
    buses: dict[str, int] = {}
    values: dict[int, dict[str, float]] = {}
    try:
        readings = list(parse_health_cached(health_text.strip("\n")))
        header = health_text.strip("\n").split("\n", 1)[0]
        fields = [cell.strip().partition(" [")[0] for cell in header.split(",")] if readings else []
        if remap_text is not None:
            readings = merge_remapped_rows(readings, list(parse_health_cached(remap_text.strip("\n"))))
        driver = next((r.raw.get(DRIVER_FIELD) for r in readings if r.raw.get(DRIVER_FIELD)), None)
        buses = {r.bus_id: r.index for r in readings if r.bus_id and r.index is not None}
        values = {r.index: _values(r) for r in readings if r.index is not None}
        utilization = {g.index: g.utilization_gpu_pct for g in gpus if g.index is not None and g.utilization_gpu_pct is not None}
        findings += findings_of(readings, utilization)
        findings += missing_gpus(dict(memory.buses), readings)
        if not readings:
            findings.append(Finding("health_unreadable", detail=clip(health_text.strip()[:200]) or "no answer"))
    except ParseError as exc:
        findings.append(Finding("health_unreadable", detail=clip(str(exc))))
    scan = parse_kernel_log(journal_text, buses or dict(memory.buses), max_lines=JOURNAL_LINES)
    findings += scan.findings
    if not scan.readable:
        findings.append(Finding("journal_unreadable", detail=scan.problem or ""))
    indices = sorted({g.index for g in gpus if g.index is not None} | set(buses.values()))
    verdict = judge(findings, now=now, gpus=indices, table=table)
    bus_of = {index: bus for bus, index in {**memory.buses, **buses}.items()}
    missing = {f.gpu for f in findings if f.kind == "gpu_missing"}
    for finding in findings:  # dcgm-exporter's XID_ERRORS: the last Xid seen, per GPU
        if finding.kind == "xid" and finding.gpu is not None and finding.code:
            values.setdefault(finding.gpu, {})[XID_FIELD[0]] = float(finding.code)
    return GpuHealthReport(
        gpus=[GpuHealth(index=i, state=v.state, reasons=list(v.reasons), bus_id=bus_of.get(i), values=values.get(i, {}),
                        missing=i in missing) for i, v in verdict.gpus.items()],
        host_reasons=list(verdict.host.reasons), findings=[HealthFinding(**asdict(f)) for f in findings],
        fields=fields, driver_version=driver, buses=buses or dict(memory.buses),
        journal_cursor=scan.cursor or memory.cursor, journal_problem=scan.problem)


def remembered(report: GpuHealthReport, before: HostMemory | None) -> HostMemory:
    """What to remember of a host after a beat: a new driver (or fields not learned) means relearning."""
    before = before or HostMemory()
    learned = tuple(report.fields) if len(report.fields) > len(IDENTITY_FIELDS) else None
    if before.driver_version and report.driver_version and report.driver_version != before.driver_version:
        learned = None  # a new driver may know new fields: the next beat asks its help again
    return HostMemory(learned, report.driver_version or before.driver_version, dict(report.buses),
                      report.journal_cursor or before.cursor)
