"""Agent health: ``online`` after a good heartbeat, ``offline`` only after N misses in a row or no
good heartbeat for a grace period, so one lost packet is not a dead host. Pure; no I/O."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from fleetctl.settings import ControllerSettings, default_of

HealthState = Literal["unknown", "online", "offline"]


@dataclass(frozen=True)
class HealthPolicy:
    offline_after_misses: int = default_of(ControllerSettings, "offline_after_misses")
    offline_grace_s: float = default_of(ControllerSettings, "offline_grace_s")


@dataclass(frozen=True)
class Health:
    state: HealthState = "unknown"
    misses: int = 0
    last_ok: float | None = None  # epoch seconds of the last good heartbeat
    last_seen: float | None = None  # epoch seconds of the last heartbeat, good or not
    since: float | None = None  # when ``state`` last changed


def advance(previous: Health, good: bool, at: float, policy: HealthPolicy) -> Health:
    """The health after one more heartbeat at ``at`` (epoch seconds)."""
    if good:
        state: HealthState = "online"
        updated = replace(previous, misses=0, last_ok=at, last_seen=at)
    else:
        misses = previous.misses + 1
        silent_for = at - previous.last_ok if previous.last_ok is not None else None
        gone = misses >= policy.offline_after_misses or (silent_for is not None and silent_for >= policy.offline_grace_s)
        if gone:
            state = "offline"
        elif previous.state == "unknown":
            state = "unknown"  # never seen good: not yet known to be up, not yet proven down
        else:
            state = previous.state
        updated = replace(previous, misses=misses, last_seen=at)
    if state != previous.state:
        updated = replace(updated, state=state, since=at)
    return updated
