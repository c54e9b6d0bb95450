"""Which agent and GPUs a queued job gets. Pure: the inputs are the agents' latest snapshots, their
health and drain flags, and the GPUs fleetctl jobs already hold."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from fleetctl.inventory.config import Agent
from fleetctl.inventory.labels import labels_match as _labels_match
from fleetctl.jobs.model import JobSpec
from fleetctl.telemetry.snapshot import GpuSample, TelemetrySnapshot

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
    return _labels_match(spec.labels, agent.labels)


def _eligible(spec: JobSpec, agent: Agent) -> bool:
    return (spec.agent is None or spec.agent == agent.name) and labels_match(spec, agent)


def is_foreign_busy(gpu: GpuSample) -> bool:
    return ((gpu.memory_used_mib or 0) > FOREIGN_MEMORY_MIB or
            (gpu.utilization_gpu_pct or 0) > FOREIGN_UTILIZATION_PCT)


def quarantined(snapshot: TelemetrySnapshot) -> dict[int, str]:
    """GPU index -> why it is quarantined (fleetctl.telemetry.quarantine): no job is placed on it."""
    if snapshot.gpu_health is None:
        return {}
    return {g.index: g.quarantine_reason or g.reason for g in snapshot.gpu_health.gpus
            if g.quarantined is not None or g.state == "failed"}


def _gpu_count(snapshot: TelemetrySnapshot) -> int:
    """GPUs the host has, counting one that vanished (quarantined, it may come back after a reset)."""
    return max(len(snapshot.gpus), len(snapshot.gpu_health.gpus) if snapshot.gpu_health else 0)


def free_gpus(spec: JobSpec, candidate: Candidate) -> list[GpuSample]:
    snapshot = candidate.snapshot
    if snapshot is None or not snapshot.ok:
        return []
    out = quarantined(snapshot)
    free = []
    for index, gpu in enumerate(snapshot.gpus):
        number = gpu.index if gpu.index is not None else index
        if number in candidate.held_gpus or number in out:
            continue
        if not spec.allow_busy_gpus and is_foreign_busy(gpu):
            continue
        if spec.min_free_mem_mib is not None and (gpu.memory_free_mib or 0) < spec.min_free_mem_mib:
            continue
        free.append(gpu)
    return free


def rejection(spec: JobSpec, candidate: Candidate) -> str | None:
    """Why this matching agent cannot take the job now (one short clause), or None if it can."""
    name, snapshot = candidate.agent.name, candidate.snapshot
    free = free_gpus(spec, candidate)
    # An agent that would have room but is off or drained says so first: that is what to fix.
    has_room = f"{name} has {len(free)} free but " if spec.gpus and len(free) >= spec.gpus else f"{name} "
    if not candidate.online:
        return has_room + "is not online"
    if candidate.draining:
        return has_room + "is draining"
    if snapshot is None:
        return f"{name} has not reported its GPUs yet"
    if not snapshot.ok:
        return f"{name}'s last heartbeat failed ({snapshot.status})"
    if len(free) >= spec.gpus:
        return None
    out = quarantined(snapshot)
    # e.g. "gpu-3 GPU 2 quarantined: Xid 79 (fallen off the bus) at 09:14": what to look at, or clear-gpu.
    named = "".join(f"; {name} GPU {i} quarantined: {why}" for i, why in sorted(out.items()))
    return f"{name} has {len(free)} free of {_gpu_count(snapshot)}" + _why_not_free(spec, candidate, snapshot) + named


def _why_not_free(spec: JobSpec, candidate: Candidate, snapshot: TelemetrySnapshot) -> str:
    held = busy = short = 0
    out = quarantined(snapshot)
    for index, gpu in enumerate(snapshot.gpus):
        if (gpu.index if gpu.index is not None else index) in out:
            continue
        if (gpu.index if gpu.index is not None else index) in candidate.held_gpus:
            held += 1
        elif not spec.allow_busy_gpus and is_foreign_busy(gpu):
            busy += 1
        elif spec.min_free_mem_mib is not None and (gpu.memory_free_mib or 0) < spec.min_free_mem_mib:
            short += 1
    parts = [f"{held} held by fleetctl jobs" if held else "", f"{busy} in use by other processes" if busy else "",
             f"{short} with less than {spec.min_free_mem_mib:g} MiB free" if short else ""]
    named = ", ".join(p for p in parts if p)
    return f" ({named})" if named else ""


def waiting_reason(spec: JobSpec, candidates: Sequence[Candidate], limit: int = 4) -> str:
    """Why the job waits, naming what holds back each matching agent, e.g. ``waiting for 4 free
    GPUs on agents matching gpu_type=a100*: gpu-3 has 4 free but is draining``."""
    matching = ", ".join(f"{k}={v}" for k, v in spec.labels.items())
    if spec.gpus:
        wanted = f"{spec.gpus} free GPU{'s' if spec.gpus != 1 else ''}"
        where = f" on {spec.agent}" if spec.agent else f" on agents matching {matching}" if matching else ""
    else:
        wanted = f"agent {spec.agent}" if spec.agent else f"an agent matching {matching}" if matching else "an agent"
        where = ""
    found = [r for r in (rejection(spec, c) for c in candidates if _eligible(spec, c.agent)) if r]
    found.sort(key=lambda r: " but is " not in r)  # agents that only need undraining or to come back first
    if not found:
        return f"waiting for {wanted}{where}"
    more = f"; and {len(found) - limit} more" if len(found) > limit else ""
    return f"waiting for {wanted}{where}: {'; '.join(found[:limit])}{more}"


def place(spec: JobSpec, candidates: Sequence[Candidate]) -> Placement | None:
    """The least-loaded online, undrained, matching agent with enough free GPUs; None to wait
    (``waiting_reason`` says why)."""
    best: tuple[tuple[float, ...], Placement] | None = None
    for candidate in candidates:
        if not _eligible(spec, candidate.agent) or rejection(spec, candidate) is not None:
            continue
        assert candidate.snapshot is not None  # rejection() refuses an agent without one
        free = free_gpus(spec, candidate)
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
    most = max(_gpu_count(c.snapshot) for c in known if c.snapshot)
    if spec.gpus > most:
        return f"needs {spec.gpus} GPUs; the most any matching agent has is {most}"
    if spec.min_free_mem_mib is not None:
        largest = max((g.memory_total_mib or 0 for c in known if c.snapshot for g in c.snapshot.gpus), default=0)
        if spec.min_free_mem_mib > largest:
            return f"needs {spec.min_free_mem_mib:g} MiB free per GPU; the largest matching GPU has {largest:g} MiB"
    return None


def concurrency_cap(spec: JobSpec, running_tasks: Mapping[str, int]) -> str | None:
    """Why a task of a sweep with ``--max-concurrent`` waits (its sweep already has that many tasks
    dispatching or running), or None. ``running_tasks``: active tasks per sweep id."""
    task = spec.task
    if task is None or task.max_concurrent is None:
        return None
    active = running_tasks.get(task.parent, 0)
    if active < task.max_concurrent:
        return None
    return f"waiting: sweep {task.parent} already runs {active} tasks (--max-concurrent {task.max_concurrent})"
