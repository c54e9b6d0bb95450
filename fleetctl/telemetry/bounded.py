"""A GPU tool bounded on the host: a hung ``nvidia-smi`` or ``amd-smi`` costs its own deadline, not the beat.

The heartbeat script defines one shell function, ``fleetctl_bounded``, and runs every GPU tool through
it: ``timeout`` where the host has it (coreutils' signals the tool's whole process group), else a
watchdog in plain ``sh`` that sends the process it started SIGTERM, then SIGKILL a second later (a custom
``gpu_query_cmd``'s own children may live on there until they end). ``timeout`` sends SIGTERM alone: its
``-k`` is not in every busybox, and a GPU tool hangs in the driver, where SIGKILL is no surer (see below).
Either way a tool out of time exits :data:`HUNG_EXIT`, the
script goes on without asking the hung tool again, says so behind :data:`HUNG_MARK`, and the host
answers within the beat: it stays online and its GPUs read ``unknown`` (the ``tool_hung`` finding),
never healthy. A tool stuck uninterruptibly in the driver (state D) ignores even SIGKILL: that beat
still waits for the command timeout, as before.
"""

from __future__ import annotations

import math

HUNG_EXIT = 124  # what timeout exits with when the command ran out of time (the watchdog's 143 and 137 read the same)
HUNG_MARK = "\x1efleetctl-hung"
BOUNDED = "fleetctl_bounded "  # the prefix that runs a tool under the deadline
TOOL_SHARE = 4  # a tool gets this share of the command timeout: the query and one hung health call fit in it
MIN_TOOL_S = 2


def tool_timeout_s(command_timeout_s: float) -> int:
    """Whole seconds a GPU tool may take in a beat whose command may take ``command_timeout_s``
    (whole: busybox's ``timeout`` and ``sleep`` take no fractions)."""
    return max(MIN_TOOL_S, math.ceil(command_timeout_s / TOOL_SHARE))


def bounded_function(seconds: int) -> str:
    """The ``fleetctl_bounded`` definition. The watchdog's output goes to /dev/null: holding the captured
    stdout open, it would make ``$(...)`` wait for it."""
    n = int(seconds)
    return ("fleetctl_bounded() { if command -v timeout >/dev/null 2>&1; then "
            f'timeout {n} "$@"; r=$?; '
            f'else "$@" & p=$!; (sleep {n}; kill $p; sleep 1; kill -9 $p) >/dev/null 2>&1 & w=$!; '
            f"wait $p 2>/dev/null; r=$?; kill $w 2>/dev/null; [ $r = 143 ] || [ $r = 137 ] && r={HUNG_EXIT}; fi; "
            "return $r; }")


def hung_note(what: str) -> str:
    """Shell that says, after a tool exited :data:`HUNG_EXIT` (``$?`` just read into ``$r``), that it hung."""
    return f"if [ \"$r\" = {HUNG_EXIT} ]; then printf '\\n{HUNG_MARK} {what}\\n'; fi"
