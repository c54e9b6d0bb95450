"""Typed telemetry: one GPU's sample, one host's snapshot."""

from __future__ import annotations

from datetime import datetime
from typing import Literal, Optional

from pydantic import BaseModel, Field, field_validator

from fleetctl._text import one_line

Vendor = Literal["nvidia", "amd"]
# ok / no_gpus, or the host's error status from the one table in fleetctl.telemetry.outcomes.
Status = Literal["ok", "no_gpus", "host_key_mismatch", "auth_failed", "bastion_unreachable", "timeout", "connection_lost",
                 "unreachable", "config_error", "tool_missing", "driver_error", "parse_error", "error"]
GOOD_STATUSES = ("ok", "no_gpus")


MAX_TEXT = 256  # a GPU name or UUID from a host is data of bounded size, whatever the host sent


def _bounded(value: object) -> object:
    return value[:MAX_TEXT] if isinstance(value, str) else value


class GpuSample(BaseModel):
    """One GPU as the tool reported it; ``None`` wherever the tool could not say."""

    index: Optional[int] = None
    uuid: Optional[str] = None
    name: Optional[str] = None
    vendor: Vendor
    memory_total_mib: Optional[float] = None
    memory_used_mib: Optional[float] = None
    memory_free_mib: Optional[float] = None
    utilization_gpu_pct: Optional[float] = None
    temperature_c: Optional[float] = None
    power_draw_w: Optional[float] = None
    power_limit_w: Optional[float] = None
    extra: dict[str, str] = Field(default_factory=dict)

    _bound_text = field_validator("uuid", "name", mode="before")(_bounded)


class HostBasics(BaseModel):
    """Collected in the same exec as the GPU query, at no extra round trip."""

    load_1m: Optional[float] = None
    load_5m: Optional[float] = None
    load_15m: Optional[float] = None
    mem_total_mib: Optional[float] = None
    mem_available_mib: Optional[float] = None
    uptime_s: Optional[float] = None


class TelemetrySnapshot(BaseModel):
    agent: str
    hostname: str = ""
    timestamp: datetime
    status: Status
    error: Optional[str] = None
    latency_ms: Optional[float] = None
    gpus: list[GpuSample] = Field(default_factory=list)
    host: HostBasics = Field(default_factory=HostBasics)
    job_dirs: dict[str, str] = Field(default_factory=dict)  # remote job directory -> new/starting/running/done/vanished

    @property
    def ok(self) -> bool:
        return self.status in GOOD_STATUSES

    def __repr__(self) -> str:
        # One line: a round of 100 hosts prints 100 short lines, not kilobytes of fields each.
        if self.error:
            return f"<TelemetrySnapshot {self.agent} {self.status}: {one_line(self.error, 60)}>"
        return f"<TelemetrySnapshot {self.agent} {self.status}, {len(self.gpus)} GPUs>"
