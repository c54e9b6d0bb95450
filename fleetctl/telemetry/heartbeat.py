"""One heartbeat = one SSH exec: the GPU query and the host's basics, parsed into a snapshot.

The remote side is stateless: a POSIX ``sh`` script prints the tool's output, a marker with
its exit code, then ``/proc/loadavg``, two ``/proc/meminfo`` lines and ``/proc/uptime``, and, when
GPU health is read, its part behind its own marker (:mod:`fleetctl.telemetry.health_beat`).

The GPU tool runs bounded on the host (:mod:`fleetctl.telemetry.bounded`): one that hangs exits 124
after its share of the command timeout, and the beat is still a good one (the host stays online) with
no GPU samples and, where health is read, the ``tool_hung`` finding: its GPUs read ``unknown``.
"""

from __future__ import annotations

import functools
import logging
import re
import shlex
import time
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

from fleetctl._text import one_line
from fleetctl.errors import FleetError
from fleetctl.inventory.config import Agent
from fleetctl.ssh.seam import CommandResult
from fleetctl.telemetry.bounded import BOUNDED, HUNG_EXIT, MIN_TOOL_S, bounded_function, tool_timeout_s
from fleetctl.telemetry.gpu_health import Rule
from fleetctl.telemetry.gpu_tools import DEFAULT_QUERIES
from fleetctl.telemetry.health_beat import HEALTH_MARK, HostMemory, read_health
from fleetctl.telemetry.jobdirs import SCAN_MARK, SCAN_SCRIPT, parse_scan_line
from fleetctl.telemetry.outcomes import status_of
from fleetctl.telemetry.parsers import NoGpusError, parse_gpu_output, tool_of
from fleetctl.telemetry.snapshot import GpuSample, HostBasics, Status, TelemetrySnapshot

MARK = "\x1efleetctl"  # ASCII record separator: never in tool output
# Bounded reads: past these the channel is closed and the host's status is parse_error ("larger
# than N bytes"), so a tool printing endlessly or a million GPU lines cannot grow the controller.
# A real 8-GPU answer with the host basics and a job scan is a few KiB.
MAX_STDOUT = 4 * 1024 * 1024
MAX_STDERR = 64 * 1024

log = logging.getLogger("fleetctl")
# JSON can spell a lone surrogate ("\\udcff"): a str that no UTF-8 encoder (the store, a CSV, the
# terminal) accepts. It becomes U+FFFD, as bytes that are not UTF-8 already do when decoded.
_SURROGATES = re.compile("[\ud800-\udfff]")


def _query_block(gpu_query_cmd: str | None) -> str:
    # $t names the tool for the health part's note when it hung (fleetctl.telemetry.health_beat).
    if gpu_query_cmd:
        named = shlex.quote(tool_of(gpu_query_cmd) or "gpu_query_cmd")
        return f"printf '{MARK}-cmd given\\n'; t={named}; {BOUNDED}sh -c {shlex.quote(gpu_query_cmd)}"
    branches = [f'if command -v {tool} >/dev/null 2>&1; then printf \'{MARK}-cmd {tool}\\n\'; t={tool}; {BOUNDED}{query}'
                for tool, query in DEFAULT_QUERIES.items()]
    return "; el".join(branches) + f"; else printf '{MARK}-cmd none\\n'; fi"


def heartbeat_command(agent: Agent, health: str = "") -> str:
    """The remote command for one heartbeat; it depends only on the agent's query and ``health``, the
    GPU health part (:func:`fleetctl.telemetry.health_beat.health_script`; empty: no health read)."""
    return _heartbeat_command(agent.gpu_query_cmd, health, tool_timeout_s(agent.command_timeout_s))


@functools.lru_cache(maxsize=1024)
def _heartbeat_command(gpu_query_cmd: str | None, health: str = "", tool_s: int = MIN_TOOL_S) -> str:
    # Built and quoted once per distinct query (and journal cursor), not on every beat.
    script = (
        f"{bounded_function(tool_s)}\n{_query_block(gpu_query_cmd)}\n"
        f"rc=$?; printf '\\n{MARK}-rc %s\\n' \"$rc\"; "
        "cat /proc/loadavg /proc/uptime 2>/dev/null; grep -E '^(MemTotal|MemAvailable):' /proc/meminfo 2>/dev/null; "
        + SCAN_SCRIPT + (f"\n{health}" if health else "")
    )
    return "sh -c " + shlex.quote(script)


def _basics(lines: list[str]) -> HostBasics:
    basics = HostBasics()
    for line in lines:
        parts = line.split()
        try:
            if len(parts) == 5 and "/" in parts[3]:
                basics.load_1m, basics.load_5m, basics.load_15m = (float(p) for p in parts[:3])
            elif len(parts) == 2 and not parts[0].endswith(":"):
                basics.uptime_s = float(parts[0])
            elif parts[:1] == ["MemTotal:"]:
                basics.mem_total_mib = int(parts[1]) / 1024
            elif parts[:1] == ["MemAvailable:"]:
                basics.mem_available_mib = int(parts[1]) / 1024
        except (ValueError, IndexError):
            continue
    return basics


def snapshot_from_result(agent: Agent, result: CommandResult, latency_ms: float,
                         timestamp: datetime | None = None, *, memory: HostMemory | None = None,
                         table: Mapping[str, Rule] | None = None) -> TelemetrySnapshot:
    """Pure: the text one heartbeat exec returned -> a snapshot with exactly one status. ``memory``
    is what is remembered of the host's GPU health (fields, bus ids, cursor); ``table`` the judgment's."""
    stamp = timestamp or datetime.now(timezone.utc)
    stdout, health_marker, health_text = result.stdout.partition(f"\n{HEALTH_MARK}\n")

    def snapshot(status: Status, **fields: Any) -> TelemetrySnapshot:
        if isinstance(fields.get("error"), str):
            fields["error"] = _valid_unicode(fields["error"])
        return TelemetrySnapshot(agent=agent.name, hostname=agent.hostname or "", timestamp=stamp,
                                 latency_ms=latency_ms, status=status, job_dirs={d.path: d.state for d in job_dirs},
                                 **fields)
    head, marker, tail = stdout.partition(f"\n{MARK}-rc ")
    rc_text, _, rest = tail.partition("\n")
    lines = rest.split("\n")  # not splitlines(): it also splits at the \x1e of our markers
    basics = _basics([line for line in lines if not line.startswith(SCAN_MARK)]) if marker else HostBasics()
    job_dirs = [found for line in lines if line.startswith(SCAN_MARK) and (found := parse_scan_line(line))]
    first, _, tool_output = head.partition("\n")
    if not marker or not first.startswith(f"{MARK}-cmd "):
        return snapshot("parse_error", host=basics,
                        error=f"heartbeat output from {agent.name} is garbled (exit {result.exit_code})")
    which = first.removeprefix(f"{MARK}-cmd ")
    if which == "none":
        return snapshot("tool_missing", host=basics,
                        error="no nvidia-smi, rocm-smi or amd-smi on the host's PATH")
    command = agent.gpu_query_cmd or DEFAULT_QUERIES[which]
    try:
        exit_code = int(rc_text.strip())
    except ValueError:
        exit_code = result.exit_code
    booted = stamp.timestamp() - basics.uptime_s if basics.uptime_s is not None else None
    if exit_code == HUNG_EXIT:  # the tool hung and was stopped on the host: reachable, GPUs unknown
        health = read_health(health_text, memory, [], table, stamp.timestamp(), booted) if health_marker else None
        return snapshot("ok", host=basics, gpu_health=health,
                        error=f"{tool_of(command) or 'the GPU query'} did not answer within "
                              f"{tool_timeout_s(agent.command_timeout_s)} s: its GPUs are unknown")
    try:
        gpus = parse_gpu_output(command, tool_output, exit_code=exit_code, stderr=result.stderr)
    except NoGpusError:
        return snapshot("no_gpus", host=basics)
    except FleetError as exc:
        return snapshot(status_of(exc), host=basics, error=one_line(str(exc)))
    gpus = [_valid_sample(gpu) for gpu in gpus]
    health = read_health(health_text, memory, gpus, table, stamp.timestamp(), booted) if health_marker and gpus else None
    return snapshot("ok" if gpus else "no_gpus", gpus=gpus, host=basics, gpu_health=health)


def _valid_unicode(text: str) -> str:
    return _SURROGATES.sub("\ufffd", text)


def _valid_sample(gpu: GpuSample) -> GpuSample:
    texts = [gpu.uuid or "", gpu.name or "", *gpu.extra, *gpu.extra.values()]
    if not any(_SURROGATES.search(text) for text in texts):
        return gpu
    return gpu.model_copy(update={
        "uuid": gpu.uuid and _valid_unicode(gpu.uuid), "name": gpu.name and _valid_unicode(gpu.name),
        "extra": {_valid_unicode(k): _valid_unicode(v) for k, v in gpu.extra.items()}})


def failed_snapshot(agent: Agent, exc: FleetError, started: float) -> TelemetrySnapshot:
    return TelemetrySnapshot(agent=agent.name, hostname=agent.hostname or "", timestamp=datetime.now(timezone.utc),
                             status=status_of(exc), error=one_line(str(exc)),
                             latency_ms=(time.monotonic() - started) * 1000)


def crashed_snapshot(agent: Agent, exc: Exception, started: float, *, ran: bool) -> TelemetrySnapshot:
    """An exception nobody expected while beating one host (a parser bug, a library's internals)
    is that host's failed snapshot, never the round's: ``parse_error`` if the command ran and its
    output broke something, ``unreachable`` if it never ran. The traceback goes to DEBUG."""
    log.debug("heartbeat of %s failed unexpectedly", agent.name, exc_info=exc)
    doing = "reading the heartbeat of" if ran else "reaching"
    return TelemetrySnapshot(agent=agent.name, hostname=agent.hostname or "", timestamp=datetime.now(timezone.utc),
                             status="parse_error" if ran else "unreachable",
                             error=one_line(f"unexpected {type(exc).__name__} while {doing} {agent.name}: {exc}"),
                             latency_ms=(time.monotonic() - started) * 1000)
