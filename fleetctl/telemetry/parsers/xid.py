"""Kernel log lines -> Xid findings, read without root.

:func:`kernel_log_command` reads the kernel log from a cursor the caller remembers per host
(``journalctl -k`` implies this boot; ``--show-cursor`` ends the output with the next cursor), or
``dmesg`` where the journal is not readable, filtered on the host to the few lines that matter.
:func:`parse_kernel_log` reads what came back, in any of these line formats::

    2026-02-14T05:03:41+0000 gpu-7 kernel: NVRM: Xid (PCI:0000:3b:00): 79, pid=1234, GPU has fallen off the bus.
    2026-02-14T05:03:41,123456+00:00 NVRM: Xid (PCI:0000:3b:00): 48, pid=..., An uncorrectable double bit error
    [ 1843.308145] NVRM: Xid (PCI:0000:3b:00): 13, Graphics Exception: ...     (dmesg; needs boot_time for a time)
    Feb 14 05:03:41 gpu-7 kernel: NVRM: Xid (PCI:0000:3b:00): 31, pid=...       (journalctl's default: no year, no time)

and the newer drivers' multi-line "NVRM: The NVIDIA GPU 0000:b3:00.0 ... has fallen off the bus",
which carries no Xid number and counts as Xid 79. Each Xid is mapped to its GPU through the bus id
nvidia-smi reports (``00000000:3B:00.0`` and ``PCI:0000:3b:00`` are the same GPU).
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime

from fleetctl.telemetry.parsers.findings import Finding, clip, normalize_bus_id

MAX_LINES = 2000        # lines read per beat; an Xid storm past this is cut (and says so)
MAX_LINE = 4096         # characters of one line looked at
_ISO = r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:[.,]\d{1,9})?(?:Z|[+-]\d{2}:?\d{2})?"
_JOURNAL_ISO = re.compile(rf"^(?P<at>{_ISO})\s+\S+\s+kernel:\s?(?P<message>.*)$")
_DMESG_ISO = re.compile(rf"^(?P<at>{_ISO})\s+(?P<message>.*)$")
_DMESG_RAW = re.compile(r"^\[\s*(?P<uptime>\d{1,10}(?:\.\d{1,9})?)\]\s?(?P<message>.*)$")
_JOURNAL_SHORT = re.compile(r"^[A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d \S+ kernel:\s?(?P<message>.*)$")
_XID = re.compile(r"NVRM: Xid \((?:PCI:)?(?P<bus>[0-9a-fA-F]{1,8}:[0-9a-fA-F]{1,2}:[0-9a-fA-F]{1,2}(?:\.[0-7])?)\):"
                  r"\s*(?P<code>\d{1,5})\b,?\s*(?P<rest>.*)$")
_FALLEN_GPU = re.compile(r"NVRM: The NVIDIA GPU (?P<bus>[0-9a-fA-F]{1,8}:[0-9a-fA-F]{1,2}:[0-9a-fA-F]{1,2}(?:\.[0-7])?)")
_FALLEN = re.compile(r"fallen off the bus", re.I)
_CURSOR = re.compile(r"^-- cursor: (?P<cursor>\S{1,512})\s*$")
# What journalctl and dmesg say when this user may not read the kernel log.
_UNREADABLE = (
    re.compile(r"No journal files were (?:opened|found)[^\n]*"),
    re.compile(r"You are currently not seeing messages from[^\n]*"),
    re.compile(r"dmesg: read kernel buffer failed[^\n]*"),
    re.compile(r"journalctl: (?:command )?not found|dmesg: (?:command )?not found"),
)
GRANTING_GROUPS = ("adm", "systemd-journal")
FALLEN_OFF_BUS_XID = "79"


@dataclass(frozen=True)
class KernelLogScan:
    findings: list[Finding] = field(default_factory=list)
    cursor: str | None = None       # where the next read starts; None: keep the one you had
    readable: bool = True
    problem: str | None = None      # one line: why the log was not readable
    lines: int = 0                  # lines looked at
    truncated: bool = False         # more than max_lines came: the oldest were not looked at


def kernel_log_command(cursor: str | None = None, max_lines: int = MAX_LINES) -> str:
    """One shell line: new kernel log lines since ``cursor`` that concern NVIDIA GPUs, and the next
    cursor. ``journalctl -k`` where readable, else ``dmesg``; either one's refusal is kept, so
    :func:`parse_kernel_log` can say which group would grant it. Always exits 0."""
    after = f" --after-cursor={shlex.quote(cursor)}" if cursor else ""
    keep = "NVRM|^-- cursor:|No journal files|not seeing messages|read kernel buffer failed|not found"
    return (f"{{ journalctl -k -o short-iso --no-pager --show-cursor -n {int(max_lines)}{after} 2>&1"
            f" || dmesg --time-format iso 2>&1 | tail -n {int(max_lines)}; }} | grep -E {shlex.quote(keep)}; true")


def parse_kernel_log(text: str, bus_to_index: Mapping[str, int] | None = None, *, boot_time: float | None = None,
                     max_lines: int = MAX_LINES) -> KernelLogScan:
    """Xid findings (kind ``xid``, code the number) from kernel log text; ``bus_to_index`` maps
    nvidia-smi's bus ids (any spelling) to GPU indices; ``boot_time`` (epoch s) dates dmesg's
    uptime stamps. Never raises on any text."""
    buses = {normalize_bus_id(bus): index for bus, index in (bus_to_index or {}).items()}
    lines = text.splitlines()
    truncated = len(lines) > max_lines + 1
    if truncated:
        lines = lines[-(max_lines + 1):]  # the newest, and the cursor line at the end
    findings: list[Finding] = []
    cursor = None
    problem = None
    fallen: dict[str, tuple[int, float | None]] = {}  # bus -> (line number of "The NVIDIA GPU", time)
    xid79_buses: set[str] = set()
    for number_, line in enumerate(lines):
        line = line[:MAX_LINE]
        found_cursor = _CURSOR.match(line)
        if found_cursor:
            cursor = found_cursor.group("cursor")
            continue
        if problem is None:
            for pattern in _UNREADABLE:
                refusal = pattern.search(line)
                if refusal:
                    problem = clip(refusal.group(0))
        at, message = _split(line, boot_time)
        xid = _XID.search(message)
        if xid:
            bus = normalize_bus_id(xid.group("bus"))
            code = str(int(xid.group("code")))
            if code == FALLEN_OFF_BUS_XID and bus:
                xid79_buses.add(bus)
            findings.append(Finding("xid", gpu=buses.get(bus), code=code, at=at, bus_id=bus,
                                    detail=clip(xid.group("rest"))))
            continue
        gpu_line = _FALLEN_GPU.search(message)
        if gpu_line:
            bus = normalize_bus_id(gpu_line.group("bus"))
            if bus:
                fallen[bus] = (number_, at)
        if _FALLEN.search(message):
            for bus, (seen_at, when) in list(fallen.items()):
                if number_ - seen_at <= 3:
                    del fallen[bus]
                    if bus not in xid79_buses:
                        xid79_buses.add(bus)
                        findings.append(Finding("xid", gpu=buses.get(bus), code=FALLEN_OFF_BUS_XID, at=when, bus_id=bus,
                                                detail="GPU has fallen off the bus (no Xid line)"))
    # A refusal with no kernel line at all means the log was not read; a kernel line means it was.
    readable = problem is None or bool(findings)
    if not readable:
        problem = f"{problem}: add the user to group {' or '.join(GRANTING_GROUPS)} to let fleetctl read Xids"
    return KernelLogScan(findings, cursor, readable, None if readable else problem, len(lines), truncated)


def _split(line: str, boot_time: float | None) -> tuple[float | None, str]:
    """(epoch seconds or None, the kernel message) of one log line, whatever its format."""
    for pattern in (_JOURNAL_ISO, _DMESG_ISO):
        match = pattern.match(line)
        if match:
            return _epoch(match.group("at")), match.group("message")
    match = _DMESG_RAW.match(line)
    if match:
        at = boot_time + float(match.group("uptime")) if boot_time is not None else None
        return at, match.group("message")
    match = _JOURNAL_SHORT.match(line)
    if match:
        return None, match.group("message")
    return None, line


def _epoch(text: str) -> float | None:
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment.timestamp() if moment.tzinfo is not None else None  # no offset: no honest time
