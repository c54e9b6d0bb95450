"""Which agent and GPUs a queued job gets. Pure: the inputs are the agents' latest snapshots, their
health and drain flags, and the GPUs fleetctl jobs already hold."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass

from fleetctl.config import Agent
from fleetctl.jobs.model import JobSpec
from fleetctl.telemetry import GpuSample, TelemetrySnapshot

# A GPU no fleetctl job holds counts as used by someone else above these.
FOREIGN_MEMORY_MIB = 1024.0
FOREIGN_UTILIZATION_PCT = 10.0


@dataclass(frozen=True)
class Candidate:
    """One agent as placement sees it."""

    agent: Agent
    online: bool
    draining: bool
    snapshot: TelemetrySnapshot | None
    held_gpus: frozenset[int]  # GPU indices held by dispatching/running fleetctl jobs
    running_jobs: int


@dataclass(frozen=True)
class Placement:
    agent: str
    gpus: list[GpuSample]


def labels_match(spec: JobSpec, agent: Agent) -> bool:
    return all(key in agent.labels and fnmatch.fnmatchcase(agent.labels[key], pattern)
               for key, pattern in spec.labels.items())


def _eligible(spec: JobSpec, agent: Agent) -> bool:
    return (spec.agent is None or spec.agent == agent.name) and labels_match(spec, agent)


def is_foreign_busy(gpu: GpuSample) -> bool:
    return ((gpu.memory_used_mib or 0) > FOREIGN_MEMORY_MIB or
            (gpu.utilization_gpu_pct or 0) > FOREIGN_UTILIZATION_PCT)


def free_gpus(spec: JobSpec, candidate: Candidate) -> list[GpuSample]:
    snapshot = candidate.snapshot
    if snapshot is None or not snapshot.ok:
        return []
    free = []
    for index, gpu in enumerate(snapshot.gpus):
        number = gpu.index if gpu.index is not None else index
        if number in candidate.held_gpus:
            continue
        if not spec.allow_busy_gpus and is_foreign_busy(gpu):
            continue
        if spec.min_free_mem_mib is not None and (gpu.memory_free_mib or 0) < spec.min_free_mem_mib:
            continue
        free.append(gpu)
    return free


def place(spec: JobSpec, candidates: Sequence[Candidate]) -> Placement | None:
    """The least-loaded online, undrained, matching agent with enough free GPUs; None to wait."""
    best: tuple[tuple[float, ...], Placement] | None = None
    for candidate in candidates:
        if not candidate.online or candidate.draining or not _eligible(spec, candidate.agent):
            continue
        if candidate.snapshot is None or not candidate.snapshot.ok:
            continue
        free = free_gpus(spec, candidate)
        if len(free) < spec.gpus:
            continue
        load = candidate.snapshot.host.load_1m or 0.0
        key = (candidate.running_jobs, load, -len(free))
        if best is None or key < best[0]:
            best = (key, Placement(candidate.agent.name, free[: spec.gpus]))
    return best[1] if best else None


def never_satisfiable(spec: JobSpec, candidates: Sequence[Candidate]) -> str | None:
    """Why no agent could ever run this job, or None if one might (once GPUs free up)."""
    matching = [c for c in candidates if _eligible(spec, c.agent)]
    if spec.agent is not None and not any(c.agent.name == spec.agent for c in candidates):
        return f"agent {spec.agent!r} is not in the inventory"
    if not matching:
        wanted = ", ".join(f"{k}={v}" for k, v in spec.labels.items())
        return f"no agent has labels matching {wanted}"
    known = [c for c in matching if c.snapshot is not None and c.snapshot.ok]
    if len(known) < len(matching):
        return None  # some matching agent has not reported GPUs yet: it might have enough
    most = max(len(c.snapshot.gpus) for c in known if c.snapshot)
    if spec.gpus > most:
        return f"needs {spec.gpus} GPUs; the most any matching agent has is {most}"
    if spec.min_free_mem_mib is not None:
        largest = max((g.memory_total_mib or 0 for c in known if c.snapshot for g in c.snapshot.gpus), default=0)
        if spec.min_free_mem_mib > largest:
            return f"needs {spec.min_free_mem_mib:g} MiB free per GPU; the largest matching GPU has {largest:g} MiB"
    return None
