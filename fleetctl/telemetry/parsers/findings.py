"""What the health parsers report: one :class:`Finding` per thing that is wrong (or worth knowing)
about one GPU, or about the host when ``gpu`` is None. Pure data; :mod:`fleetctl.telemetry.gpu_health`
judges them."""

from __future__ import annotations

import re
from dataclasses import dataclass

# Every kind a parser emits; fleetctl.telemetry.gpu_health.DEFAULT_TABLE has one entry for each.
KINDS = (
    "xid",                          # an NVRM Xid line in the kernel log (code = the Xid number)
    "ecc_uncorrected_volatile",     # uncorrectable (double-bit) ECC errors since the driver loaded
    "ecc_uncorrected_aggregate",    # uncorrectable ECC errors over the GPU's life
    "ecc_corrected_volatile",       # corrected (single-bit) ECC errors since the driver loaded
    "ecc_deferred",                 # AMD: deferred (poisoned, not yet consumed) ECC errors
    "retired_pages_pending",        # a page waits to be retired: needs a GPU reset
    "retired_pages_dbe",            # pages retired for double-bit errors
    "retired_pages_sbe",            # pages retired for repeated single-bit errors
    "retired_pages_limit",          # retired pages at NVIDIA's replacement limit (60+)
    "bad_page_threshold_exceeded",  # AMD: more bad pages than the board allows
    "remap_pending",                # a row remap waits for a GPU reset
    "remap_failure",                # a row could not be remapped: no spare rows left
    "remap_uncorrectable",          # rows remapped for uncorrectable errors (the count)
    "clock_hw_slowdown",            # clocks cut by half or more: thermal or power brake
    "clock_hw_thermal_slowdown",
    "clock_hw_power_brake",
    "clock_sw_thermal_slowdown",
    "pcie_width_degraded",          # link trained narrower than its max (x4 of x16)
    "pcie_gen_degraded",            # link slower than its max while the GPU is busy
    "recovery_action",              # gpu_recovery_action other than None (code = the action)
    "gpu_requires_reset",           # a field reads "[GPU requires reset]"
    "value_error",                  # a field reads "ERR!" or "Unknown Error"
    "gpu_missing",                  # a GPU seen before is not listed any more
    "tool_hung",                    # the GPU tool did not answer in time
    "health_unreadable",            # the health query failed: nothing is known
    "journal_unreadable",           # neither journalctl -k nor dmesg is readable: Xids unseen
)


@dataclass(frozen=True)
class Finding:
    kind: str
    gpu: int | None = None          # the GPU's index; None for the host, or an Xid on an unknown bus
    code: str | None = None         # the Xid number, the recovery action...
    value: float | None = None      # a count, a width
    at: float | None = None         # epoch seconds the event happened (kernel log), if known
    bus_id: str | None = None       # normalized "0000:3b:00" (domain:bus:device)
    detail: str = ""                # short text from the host, cut to MAX_DETAIL

    @property
    def key(self) -> str:
        """The judgment table's key: ``kind`` or ``kind:code`` (``xid:79``, ``recovery_action:reset``)."""
        return f"{self.kind}:{self.code}" if self.code else self.kind


MAX_DETAIL = 160
_BUS = re.compile(r"^(?:(?P<domain>[0-9a-fA-F]{1,8}):)?(?P<bus>[0-9a-fA-F]{1,2}):(?P<device>[0-9a-fA-F]{1,2})(?:\.[0-7])?$")


def normalize_bus_id(text: str | None) -> str | None:
    """``00000000:3B:00.0`` (nvidia-smi), ``0000:3b:00`` (an Xid line), ``3b:00.0`` -> ``0000:3b:00``.
    The function number is dropped: the kernel's Xid lines leave it out."""
    if not text:
        return None
    match = _BUS.match(text.strip())
    if not match:
        return None
    domain = int(match.group("domain") or "0", 16)
    if domain > 0xFFFF:
        return None
    return f"{domain:04x}:{int(match.group('bus'), 16):02x}:{int(match.group('device'), 16):02x}"


def clip(text: str) -> str:
    """Host text fit for one line: control characters dropped, cut to :data:`MAX_DETAIL`."""
    if len(text) <= MAX_DETAIL and text.isprintable() and "  " not in text and text == text.strip():
        return text  # the common case, without a pass per character
    cleaned = "".join(ch if ch.isprintable() else " " for ch in text[: MAX_DETAIL * 4])
    return " ".join(cleaned.split())[:MAX_DETAIL]
