"""Small pure helpers shared by the tool parsers."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

# What nvidia-smi and rocm-smi print when they cannot give a value (compared lower-cased).
MISSING = {
    "", "n/a", "[n/a]", "[not supported]", "not supported", "[unknown error]", "unknown error",
    "[insufficient permissions]", "[gpu requires reset]", "[requested functionality has been deprecated]",
    "err!", "[err!]", "unknown", "none",
}
_NUMBER = re.compile(r"^\s*([-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)\s*([A-Za-z%/]*)\s*$")
# Bounds on what one host's output can put into a sample, whatever it sent. The largest real
# values: ~230 extra fields (nvidia-smi, every field) and 1.3 KB (an amd-smi list as JSON).
MAX_EXTRA_FIELDS = 512
MAX_EXTRA_TEXT = 4096
MAX_KEY_TEXT = 256
MAX_INDEX = 2**31 - 1  # a device index; larger is no index, and would overflow a store's integer
_TO_MIB = {"b": 1 / 1048576, "kib": 1 / 1024, "kb": 1 / 1024, "mib": 1.0, "mb": 1.0, "gib": 1024.0, "gb": 1024.0,
           "tib": 1048576.0, "tb": 1048576.0}


def is_missing(text: str | None) -> bool:
    if text is None:
        return True
    lowered = text.strip().lower()
    # rocm-smi says "N/A (Secondary die)" and similar; anything starting N/A is no value.
    return lowered in MISSING or lowered.startswith("n/a") or lowered.startswith("[n/a")


def number(text: str | None) -> tuple[float, str] | None:
    """``"81559 MiB"`` -> ``(81559.0, "MiB")``; ``None`` when missing or not a number."""
    if text is None:
        return None
    try:  # the common case (nounits): a bare number, without a regex per value on the heartbeat's path
        value = float(text)
    except ValueError:
        pass
    else:  # float() also takes "nan", "inf" and "1_000", which no GPU tool means as a number
        return (value, "") if math.isfinite(value) and "_" not in text else None
    if is_missing(text):
        return None
    match = _NUMBER.match(text)
    if not match:
        return None
    return float(match.group(1)), match.group(2)


def to_mib(value: float, unit: str) -> float | None:
    factor = _TO_MIB.get(unit.lower())
    return None if factor is None else value * factor


def derive_memory(total: float | None, used: float | None, free: float | None) -> tuple[float | None, ...]:
    """Fill used or free from the other two, only where the tool did not report it."""
    if used is None and total is not None and free is not None:
        used = total - free
    if free is None and total is not None and used is not None:
        free = total - used
    return total, used, free


def bounded_extra(items: Iterable[tuple[str, str]]) -> dict[str, str]:
    """The first :data:`MAX_EXTRA_FIELDS` fields, keys and values cut to their bounds."""
    extra: dict[str, str] = {}
    for key, value in items:
        if len(extra) >= MAX_EXTRA_FIELDS:
            break
        extra[key[:MAX_KEY_TEXT]] = value[:MAX_EXTRA_TEXT]
    return extra


def index_of(value: float | None) -> int | None:
    """A device index: a whole number from 0 to :data:`MAX_INDEX`, else None (the tool did not say)."""
    if value is None or not value.is_integer() or not 0 <= value <= MAX_INDEX:
        return None
    return int(value)
