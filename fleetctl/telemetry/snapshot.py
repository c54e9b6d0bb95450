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


HealthState = Literal["ok", "degraded", "failed", "unknown"]


class GpuHealth(BaseModel):
    """One GPU's health verdict (fleetctl.telemetry.gpu_health); ``quarantined`` (epoch s) while no job may
    be placed on it: kept from beat to beat by the store until cleared or recovered."""

    index: int
    state: HealthState = "ok"
    reasons: list[str] = Field(default_factory=list)  # one line each, worst first
    bus_id: Optional[str] = None
    quarantined: Optional[float] = None
    quarantine_reason: Optional[str] = None
    # The health fields as this beat read them, in the order of fleetctl.telemetry.health_beat.DCGM_FIELDS
    # (a list, not a dict: written with every beat, it stays small); None where the driver does not say.
    values: list[Optional[float]] = Field(default_factory=list)
    last_xid: Optional[int] = None  # the last Xid seen within the hour (dcgm-exporter's XID_ERRORS)
    missing: bool = False  # listed before, not answering now

    @property
    def reason(self) -> str:
        return self.reasons[0] if self.reasons else ""


class HealthFinding(BaseModel):
    """A finding as the snapshot carries it (fleetctl.telemetry.parsers.findings.Finding)."""

    kind: str
    gpu: Optional[int] = None
    code: Optional[str] = None
    value: Optional[float] = None
    at: Optional[float] = None
    bus_id: Optional[str] = None
    detail: str = ""


class GpuHealthReport(BaseModel):
    """The health part of one heartbeat: per-GPU verdicts and what the host told us to remember."""

    gpus: list[GpuHealth] = Field(default_factory=list)
    host_reasons: list[str] = Field(default_factory=list)  # host-level: unreadable health, an Xid on an unknown bus
    findings: list[HealthFinding] = Field(default_factory=list)
    # What the controller remembers of the host (fleetctl.telemetry.health_beat.HostMemory); not written with
    # the snapshot (the store keeps the bus ids in gpu_hosts).
    fields: list[str] = Field(default_factory=list, exclude=True)  # the --query-gpu fields the driver answered
    driver_version: Optional[str] = None
    buses: dict[str, int] = Field(default_factory=dict, exclude=True)  # bus id -> GPU index, for a vanished GPU
    journal_cursor: Optional[str] = None  # where the next kernel log read starts (None: keep the last one)
    journal_problem: Optional[str] = None  # one line: why the kernel log is not readable
    tool: Optional[str] = Field(default=None, exclude=True)  # the tool that answered: nvidia-smi or amd-smi
    # The GPU count to remember (the most seen since the host booted) and that boot time (epoch s): where the
    # tool gives no bus ids, a GPU that vanished is found by the count.
    gpu_count: Optional[int] = Field(default=None, exclude=True)
    booted: Optional[float] = Field(default=None, exclude=True)

    def of(self, index: int) -> Optional[GpuHealth]:
        return next((g for g in self.gpus if g.index == index), None)


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
    gpu_health: Optional[GpuHealthReport] = None  # None: not collected (not nvidia-smi, switched off, beat failed)

    def health_of(self, index: int) -> HealthState:
        """A GPU's health; ``unknown`` whenever this beat could not tell."""
        found = self.gpu_health.of(index) if self.gpu_health is not None and self.ok else None
        return found.state if found is not None else "unknown"

    @property
    def ok(self) -> bool:
        return self.status in GOOD_STATUSES

    def __repr__(self) -> str:
        # One line: a round of 100 hosts prints 100 short lines, not kilobytes of fields each.
        if self.error:
            return f"<TelemetrySnapshot {self.agent} {self.status}: {one_line(self.error, 60)}>"
        return f"<TelemetrySnapshot {self.agent} {self.status}, {len(self.gpus)} GPUs>"
