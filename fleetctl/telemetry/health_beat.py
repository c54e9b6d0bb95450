"""GPU health in the heartbeat's one exec: the shell it appends, and the reading of what came back.

The heartbeat script ends with, where ``nvidia-smi`` is on the PATH, two more parts behind markers:

* the health query. The fields a host's driver knows are learned once: on a host not seen before (or
  whose driver version changed) the shell itself picks them from ``nvidia-smi --help-query-gpu`` (new
  spelling, else the old one) and queries them in the same exec, and the answer's CSV header tells the
  controller which it got. It remembers them per host, in memory (:class:`HostMemory`); later beats ask
  for exactly those, with no help text sent. ``driver_version`` rides along, so a new driver relearns.
* on an AMD host (``amd-smi`` on the PATH, no ``nvidia-smi``), amd-smi's ECC, PCIe and bad pages instead
  (:mod:`fleetctl.telemetry.health_amd`), judged by the same table.
* the kernel log from the host's journal cursor (remembered in the store, so a cron heartbeat from
  cold goes on from it): only new lines come back, and a beat with nothing new costs no more than an
  empty answer in the exec that was running anyway.

:func:`read_health` is pure: the text after the markers and what is remembered -> a
:class:`~fleetctl.telemetry.snapshot.GpuHealthReport` judged with this beat's findings only (the store
adds the Xid history and keeps quarantines, :mod:`fleetctl.telemetry.quarantine`).
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace

from fleetctl.errors import ParseError
from fleetctl.telemetry.bounded import BOUNDED, HUNG_EXIT, HUNG_MARK, hung_note
from fleetctl.telemetry.gpu_health import Rule, judge
from fleetctl.telemetry.health_amd import TOOL as AMD_TOOL
from fleetctl.telemetry.health_amd import amd_health_query, is_amd_answer, read_amd
from fleetctl.telemetry.parsers.findings import Finding, clip
from fleetctl.telemetry.parsers.nvidia_health import (
    BUSY_PCT,
    HEALTH_FIELDS,
    IDENTITY_FIELDS,
    REMAPPED_ROWS_FIELDS,
    HealthReading,
    findings_of,
    merge_remapped_rows,
    missing_gpus,
    needs_remapped_rows_query,
    parse_health_cached,
)
from fleetctl.telemetry.parsers.xid import kernel_log_command, parse_kernel_log
from fleetctl.telemetry.quarantine import REBOOT_SLACK_S
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


def _values(reading: HealthReading) -> tuple[float | None, ...]:
    return tuple(None if (value := getattr(reading, attribute)) is None else float(value) for _, attribute, _ in DCGM_FIELDS)


@dataclass(frozen=True)
class HostMemory:
    """What the controller remembers of one host between beats."""

    fields: tuple[str, ...] | None = None   # None: not learned yet (the shell picks them this beat)
    driver_version: str | None = None
    buses: Mapping[str, int] = field(default_factory=dict)  # bus id -> index, as last seen
    cursor: str | None = None               # the kernel log cursor
    tool: str | None = None                 # the tool that answered health: nvidia-smi, amd-smi (None: not known yet)
    count: int | None = None                # the most GPUs seen since the host booted (for a host without bus ids)
    booted: float | None = None             # when the host booted, as last seen (epoch s)


def _learning_query() -> str:
    """Shell that picks the health fields this driver knows from its help, then queries them."""
    pairs = " ".join(f"{new}/{old or new}" for new, old in (*HEALTH_FIELDS, (DRIVER_FIELD, None)))
    return (f"h=$({BOUNDED}nvidia-smi --help-query-gpu 2>/dev/null); q=" + ",".join(IDENTITY_FIELDS) + "; "
            f"for p in {pairs}; do n=${{p%/*}}; o=${{p#*/}}; "
            'case "$h" in *"\\"$n\\""*) q="$q,$n";; *"\\"$o\\""*) q="$q,$o";; esac; done; '
            f'{BOUNDED}nvidia-smi --query-gpu="$q" --format=csv,nounits 2>&1')


def health_script(memory: HostMemory | None) -> str:
    """The part of the heartbeat script that reads GPU health; it prints nothing where neither nvidia-smi
    nor amd-smi is on the PATH. Every tool runs bounded (:mod:`fleetctl.telemetry.bounded`): after the
    GPU query hung (``$rc``, the heartbeat script's) no tool is asked, only the kernel log is read."""
    memory = memory or HostMemory()
    return _health_script(memory.fields, memory.cursor, memory.tool)


@functools.lru_cache(maxsize=1024)
def _health_script(fields: tuple[str, ...] | None, cursor: str | None, tool: str | None = None) -> str:
    query = _learning_query() if fields is None else f"{BOUNDED}nvidia-smi --query-gpu={','.join(fields)} --format=csv,nounits 2>&1"
    remap = ""
    if fields is not None and len(fields) > len(IDENTITY_FIELDS) + 1 and needs_remapped_rows_query(fields):
        # R460..R535 know row remapping only through --query-remapped-rows; a driver older still refuses
        # it, and that refusal costs only the remap fields (see _parse_readings).
        remap = (f"if [ \"$r\" != {HUNG_EXIT} ]; then printf '\\n{REMAP_MARK}\\n'; {BOUNDED}nvidia-smi "
                 f"--query-remapped-rows={','.join(REMAPPED_ROWS_FIELDS)} --format=csv,nounits 2>&1; r=$?; fi; ")
    nvidia = f"{query}; r=$?; {remap}{hung_note('nvidia-smi')}"
    journal = kernel_log_command(cursor, JOURNAL_LINES)
    # A host known to answer one tool is asked that one only; a host not known yet, whichever it has.
    if tool == AMD_TOOL:
        branches = [(AMD_TOOL, amd_health_query())]
    elif fields is not None:
        branches = [("nvidia-smi", nvidia)]
    else:
        branches = [("nvidia-smi", nvidia), (AMD_TOOL, amd_health_query())]
    hung = f'[ "$rc" = {HUNG_EXIT} ]'
    present = " || ".join([hung, *(f"command -v {name} >/dev/null 2>&1" for name, _ in branches)])
    asked = f"if {hung}; then printf '{HUNG_MARK} %s\\n' \"$t\"; " + "".join(
        f"elif command -v {name} >/dev/null 2>&1; then {part}; " for name, part in branches) + "fi"
    # Gathered, then printed in one write: each separate write would be an SSH packet of its own, and
    # packets, not bytes, are what a beat costs the controller.
    return (f"if {present}; then h=$({asked}; "
            f"printf '\\n{JOURNAL_MARK}\\n'; {journal}); printf '\\n{HEALTH_MARK}\\n%s\\n' \"$h\"; fi")


def _sections(text: str) -> tuple[str, str | None, str]:
    health, _, journal = text.partition(f"\n{JOURNAL_MARK}\n")
    health, marker, remap = health.partition(f"\n{REMAP_MARK}\n")
    return health, remap if marker else None, journal


def _counted(memory: HostMemory, gpus: Sequence[GpuSample], booted: float | None) -> tuple[int | None, float | None, Finding | None]:
    """The GPU count to remember, the boot time, and ``gpu_missing`` for the host when fewer GPUs answer
    than it had since it booted and no bus id says which one is gone. A reboot starts the count again."""
    known = memory.count
    rebooted = booted is not None and memory.booted is not None and booted > memory.booted + REBOOT_SLACK_S
    if rebooted:
        known = None
    keep_booted = booted if memory.booted is None or rebooted else memory.booted
    if not gpus:  # nothing answered (a hung tool): nothing to count
        return known, keep_booted, None
    count = len(gpus)
    short = None
    if known is not None and count < known and not memory.buses:
        short = Finding("gpu_missing", value=float(known - count), detail=f"{count} of {known} GPUs answer")
    return max(count, known or 0), keep_booted, short


def read_health(text: str, memory: HostMemory | None, gpus: Sequence[GpuSample], table: Mapping[str, Rule] | None,
                now: float | None = None, booted: float | None = None) -> GpuHealthReport:
    """The health part's output (after its marker) -> this beat's report. Never raises on any text.
    ``booted``: when the host booted (epoch s), for the GPU count (see :func:`_counted`)."""
    memory = memory or HostMemory()
    busy = tuple(g.index for g in gpus if g.index is not None and (g.utilization_gpu_pct or 0) >= BUSY_PCT)
    indices = tuple(g.index for g in gpus if g.index is not None)
    buses_key = tuple(memory.buses.items())
    count, booted, short = _counted(memory, gpus, booted)
    # The common beat: a healthy host, nothing new in its journal. The same text gives the same report,
    # so it is built once (a copy is handed out: the store's quarantine pass replaces its lists).
    calm = _calm_report(text, buses_key, busy, indices, memory.cursor) if short is None else None
    if calm is not None:
        return calm.model_copy(update={"gpu_count": count, "booted": booted})
    health_text, remap_text, journal_text = _sections(text)
    parsed = _parse_readings(health_text, remap_text, buses_key, busy)
    now = time.time() if now is None else now
    findings = list(parsed.findings) + ([short] if short is not None else [])
    scan = parse_kernel_log(journal_text, dict(parsed.buses) or dict(memory.buses), max_lines=JOURNAL_LINES)
    findings += scan.findings
    if not scan.readable:
        findings.append(Finding("journal_unreadable", detail=scan.problem or ""))
    all_indices = sorted(set(indices) | {i for _, i in parsed.buses})
    if any(f.kind == "tool_hung" for f in findings):  # the GPUs it had are unknown, never healthy, never gone
        all_indices = sorted(set(all_indices) | set(memory.buses.values()))
    verdict = judge(findings, now=now, gpus=all_indices, table=table)
    bus_of = {index: bus for bus, index in (*memory.buses.items(), *parsed.buses)}
    missing = {f.gpu for f in findings if f.kind == "gpu_missing"}
    values = dict(parsed.values)
    last_xid: dict[int, int] = {}
    for finding in findings:  # dcgm-exporter's XID_ERRORS: the last Xid seen, per GPU
        if finding.kind == "xid" and finding.gpu is not None and finding.code:
            last_xid[finding.gpu] = int(finding.code)
    return GpuHealthReport(
        gpus=[GpuHealth(index=i, state=v.state, reasons=list(v.reasons), bus_id=bus_of.get(i), values=list(values.get(i, ())),
                        last_xid=last_xid.get(i), missing=i in missing) for i, v in verdict.gpus.items()],
        host_reasons=list(verdict.host.reasons), findings=[HealthFinding(**asdict(f)) for f in findings],
        fields=list(parsed.fields), driver_version=parsed.driver, buses=dict(parsed.buses) or dict(memory.buses),
        journal_cursor=scan.cursor or memory.cursor, journal_problem=scan.problem, tool=parsed.tool or memory.tool,
        gpu_count=count, booted=booted)


@dataclass(frozen=True)
class _Parsed:
    findings: tuple[Finding, ...]
    fields: tuple[str, ...]
    driver: str | None
    buses: tuple[tuple[str, int], ...]
    values: tuple[tuple[int, tuple[float | None, ...]], ...]
    tool: str | None = None


@functools.lru_cache(maxsize=512)
def _parse_readings(health_text: str, remap_text: str | None, known_buses: tuple[tuple[str, int], ...],
                    busy: tuple[int, ...]) -> _Parsed:
    """The health query's answer -> findings and values; remembered, as a healthy host repeats itself.
    A tool that hung (its line behind HUNG_MARK) is ``tool_hung``: what it printed before is read, but a
    GPU it did not list is not missing, and its silence is no ``health_unreadable``."""
    hung = [line for line in f"{health_text}\n{remap_text or ''}".split("\n") if line.startswith(HUNG_MARK)]
    if not hung:
        return _parse_answers(health_text, remap_text, known_buses, busy)
    def answered(text: str) -> str:
        return "\n".join(line for line in text.split("\n") if not line.startswith(HUNG_MARK))
    health_text, remap_text = answered(health_text), None if remap_text is None else answered(remap_text)
    parsed = _parse_answers(health_text, remap_text, (), busy) if health_text.strip() else _Parsed((), (), None, (), ())
    tool = hung[0].removeprefix(HUNG_MARK).strip() or "the GPU tool"
    kept = tuple(f for f in parsed.findings if f.kind not in ("health_unreadable", "gpu_missing"))
    return replace(parsed, findings=(*kept, Finding("tool_hung", detail=clip(tool))))


def _parse_answers(health_text: str, remap_text: str | None, known_buses: tuple[tuple[str, int], ...],
                   busy: tuple[int, ...]) -> _Parsed:
    if is_amd_answer(health_text):
        amd = read_amd(health_text, known_buses)
        values = tuple((index, tuple(found.get(attribute) for _, attribute, _ in DCGM_FIELDS)) for index, found in amd.values)
        return _Parsed(amd.findings, (), None, amd.buses, values, AMD_TOOL)
    findings: list[Finding] = []
    try:
        readings = list(parse_health_cached(health_text.strip("\n")))
        header = health_text.strip("\n").split("\n", 1)[0]
        fields = tuple(cell.strip().partition(" [")[0] for cell in header.split(",")) if readings else ()
        if remap_text is not None:
            # A driver before R460 has no --query-remapped-rows: the other fields still count.
            with contextlib.suppress(ParseError):
                readings = merge_remapped_rows(readings, list(parse_health_cached(remap_text.strip("\n"))))
        findings += findings_of(readings, dict.fromkeys(busy, 100.0))
        if readings:  # a tool that lists nothing failed: its GPUs are unknown, not all missing
            findings += missing_gpus(dict(known_buses), readings)
        else:
            findings.append(Finding("health_unreadable", detail=clip(health_text.strip()[:200]) or "no answer"))
    except ParseError as exc:
        return _Parsed((Finding("health_unreadable", detail=clip(str(exc))),), (), None, (), ())
    driver = next((r.raw.get(DRIVER_FIELD) for r in readings if r.raw.get(DRIVER_FIELD)), None)
    buses = tuple((r.bus_id, r.index) for r in readings if r.bus_id and r.index is not None)
    values = tuple((r.index, _values(r)) for r in readings if r.index is not None)
    return _Parsed(tuple(findings), fields, driver, buses, values, "nvidia-smi")


@functools.lru_cache(maxsize=1024)
def _calm_report(text: str, buses_key: tuple[tuple[str, int], ...], busy: tuple[int, ...], indices: tuple[int, ...],
                 cursor: str | None) -> GpuHealthReport | None:
    """The report of a beat with no finding and nothing new in the journal; None for any other beat."""
    health_text, remap_text, journal_text = _sections(text)
    parsed = _parse_readings(health_text, remap_text, buses_key, busy)
    if journal_text.strip() or parsed.findings:
        return None
    bus_of = {index: bus for bus, index in parsed.buses}
    values = dict(parsed.values)
    return GpuHealthReport(
        gpus=[GpuHealth(index=i, bus_id=bus_of.get(i), values=list(values.get(i, ()))) for i in sorted(set(indices) | set(bus_of))],
        fields=list(parsed.fields), driver_version=parsed.driver, buses=dict(parsed.buses), journal_cursor=cursor,
        tool=parsed.tool)


def remembered(report: GpuHealthReport, before: HostMemory | None) -> HostMemory:
    """What to remember of a host after a beat: a new driver (or fields not learned) means relearning."""
    before = before or HostMemory()
    if (before.fields is not None and report.fields == list(before.fields) and report.buses == before.buses
            and report.journal_cursor == before.cursor and report.driver_version == before.driver_version
            and report.tool == before.tool and report.gpu_count == before.count and report.booted == before.booted):
        return before  # the common beat: nothing new to remember
    learned = tuple(report.fields) if len(report.fields) > len(IDENTITY_FIELDS) else None
    if before.driver_version and report.driver_version and report.driver_version != before.driver_version:
        learned = None  # a new driver may know new fields: the next beat asks its help again
    return HostMemory(learned, report.driver_version or before.driver_version, dict(report.buses),
                      report.journal_cursor or before.cursor, report.tool or before.tool, report.gpu_count, report.booted)
