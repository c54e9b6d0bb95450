"""Job directories on a host, as the host core sees them: their names and the scan every heartbeat
appends (pure functions, no I/O). The heartbeat reports each directory's state; what to do about it
is the job runner's business (``fleetctl.jobs``), which builds the directories with these names.

A job attempt's directory is ``${TMPDIR:-/tmp}/fleetctl-job-<id>-a<attempt>-<agent>.XXXXXXXX``."""

from __future__ import annotations

import re
from dataclasses import dataclass

SCAN_MARK = "\x1efleetctl-job"
# The agent's name is part of it: hosts that share a /tmp (agents on one machine) must not act
# on each other's jobs.
DIR_PATTERN = re.compile(r"/fleetctl-job-(j[0-9a-f]+)-a(\d+)-([A-Za-z0-9._-]+)\.[A-Za-z0-9]{8}/?$")
DIR_STATES = ("new", "starting", "running", "done", "vanished")

# Appended to every heartbeat: one line per job directory with its state, no extra round trip.
SCAN_SCRIPT = (
    'for d in "${TMPDIR:-/tmp}"/fleetctl-job-*; do [ -d "$d" ] || continue; '
    'if [ -f "$d/result.json" ]; then s=done; '
    'elif [ -f "$d/wrapper" ]; then if kill -0 "$(cat "$d/wrapper")" 2>/dev/null; then s=running; else s=vanished; fi; '
    'elif [ -d "$d/started" ]; then s=starting; else s=new; fi; '
    f"printf '{SCAN_MARK} %s %s\\n' \"$s\" \"$d\"; done"
)


def dir_prefix(job_id: str, attempt: int, agent: str) -> str:
    """The fixed part of an attempt's directory name; ``mktemp -d`` adds the random suffix."""
    prefix = f"fleetctl-job-{job_id}-a{attempt}-{agent}"
    assert re.fullmatch(r"[A-Za-z0-9._-]+", prefix)  # nothing in it needs quoting
    return prefix


@dataclass(frozen=True)
class RemoteJobDir:
    path: str
    state: str  # new, starting, running, done, vanished
    job_id: str
    attempt: int
    agent: str


def parse_scan_line(line: str) -> RemoteJobDir | None:
    parts = line.removeprefix(SCAN_MARK).strip().split(" ", 1)
    if len(parts) != 2:
        return None
    state, path = parts
    match = DIR_PATTERN.search(path)
    if not match or state not in DIR_STATES:
        return None
    return RemoteJobDir(path, state, match.group(1), int(match.group(2)), match.group(3))
