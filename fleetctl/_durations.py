"""Durations and times as users write them (``90s``, ``15m``, ``2h``, ``1d``, ``1w``) and as the
store keeps them (epoch seconds). Pure."""

from __future__ import annotations

import re
from datetime import datetime, timezone

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w)?\s*$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def seconds_of(text: str, *, unit_required: bool = False) -> float | None:
    """``"15m"`` -> 900.0; a bare number is seconds unless ``unit_required``; None if not a duration."""
    match = _DURATION.match(text)
    if not match or (unit_required and match.group(2) is None):
        return None
    return float(match.group(1)) * _UNIT_S[match.group(2) or "s"]


def utc(epoch: object) -> datetime | None:
    """Epoch seconds (as stored) -> an aware UTC datetime; None for anything else."""
    return datetime.fromtimestamp(epoch, timezone.utc) if isinstance(epoch, (int, float)) else None
