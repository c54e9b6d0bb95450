"""Which queued jobs go where, each tick: dependencies resolved, tasks of cancelled sweeps ended,
``--max-concurrent`` and placement weighed, then each placed job claimed (a transition that refuses
a job someone else moved, or a sweep already at its cap) and handed to the :class:`Dispatcher`.

The queue is read once per tick, not once per queued job: a thousand queued tasks cost a thousand
placements against the same lists, kept current with what this tick claims."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from fleetctl.jobs.model import ACTIVE_STATES, JobRecord, SweepRecord
from fleetctl.jobs.placement import Candidate, concurrency_cap, never_satisfiable, place, waiting_reason
from fleetctl.jobs.queue import JobQueue
from fleetctl.jobs.runner.context import RunnerContext
from fleetctl.jobs.runner.dispatch import Dispatcher
from fleetctl.telemetry.history import AgentStatus


def dependencies(queue: JobQueue) -> Callable[[str], JobRecord | SweepRecord]:
    """What ``--after`` names, each read once per pass (a thousand tasks after one sweep read it once)."""
    seen: dict[str, JobRecord | SweepRecord] = {}

    def read(dep_id: str) -> JobRecord | SweepRecord:
        if dep_id not in seen:
            seen[dep_id] = queue.dependency(dep_id)
        return seen[dep_id]
    return read


def resolve_dependencies(queue: JobQueue) -> None:
    """A queued job whose dependency ended other than ``succeeded`` never runs."""
    read = dependencies(queue)
    for job in queue.list(("queued",)):
        for parent_id in job.spec.after:
            parent = read(parent_id)
            if parent.done and parent.state != "succeeded":
                queue.finish(job.id, "reject", reason=f"dependency {parent.id} ended {parent.state}; not run")
                break


@dataclass
class _Load:
    """Per agent, the GPUs fleetctl jobs hold and how many jobs are active there: counted once per
    tick and kept current claim by claim (placing each of a thousand queued tasks costs the same)."""

    gpus: dict[str, set[int]]
    jobs: Counter[str]

    @classmethod
    def of(cls, active: list[JobRecord]) -> _Load:
        load = cls({}, Counter())
        for job in active:
            load.add(job)
        return load

    def add(self, job: JobRecord) -> None:
        if job.agent is not None:
            self.jobs[job.agent] += 1
            self.gpus.setdefault(job.agent, set()).update(int(g) for g in job.gpus)


class Scheduler:
    def __init__(self, ctx: RunnerContext, dispatcher: Dispatcher) -> None:
        self.ctx = ctx
        self.queue = ctx.queue
        self.dispatcher = dispatcher

    def _candidates(self, statuses: dict[str, AgentStatus], load: _Load) -> list[Candidate]:
        candidates = []
        for agent in self.ctx.fleet.inventory:
            status = statuses.get(agent.name)
            candidates.append(Candidate(agent, bool(status and status.health.state == "online"),
                                        bool(status and status.draining), status.snapshot if status else None,
                                        frozenset(load.gpus.get(agent.name, ())), load.jobs[agent.name]))
        return candidates

    def dispatch_queued(self, statuses: dict[str, AgentStatus]) -> list[str]:
        """Place and dispatch what can run; give every job left queued its current reason."""
        queue = self.queue
        dispatched = []
        # Read once per tick (not once per queued job: 300 queued jobs made that 90,000 rows a tick),
        # and kept current with what this tick claims.
        active = queue.list(ACTIVE_STATES)
        load = _Load.of(active)
        # Placed only on agents held when the tick began: one taken over mid-tick has jobs ``active``
        # and ``statuses`` do not show yet.
        held = {agent.name for agent in self.ctx.fleet.inventory if self.ctx.mine(agent.name)}
        queued = queue.list(("queued",))
        read = dependencies(queue)
        # Tasks of a cancelled sweep (a lost one requeued after the cancel, say) are never claimed again.
        stopped = queue.cancelled_sweeps(sorted({j.spec.task.parent for j in queued if j.spec.task}))
        # Per sweep, for --max-concurrent: a task over the cap is not even placed. The claim checks the
        # cap again in its own transaction (another controller may have claimed meanwhile).
        running_tasks = Counter(j.spec.task.parent for j in active if j.spec.task)
        for job in queued:
            task = job.spec.task
            if task is not None and task.parent in stopped:
                queue.finish(job.id, "cancel", reason="cancelled with its sweep before it started")
                continue
            waiting = [p for p in (read(p) for p in job.spec.after) if p.state != "succeeded"]
            if waiting:
                parent = waiting[0]
                how = "lost for now; its host may come back" if parent.lost_provisionally else parent.state
                queue.set_reason(job.id, f"waiting for dependency {parent.id} ({how})")
                continue
            capped = concurrency_cap(job.spec, running_tasks)
            if capped:
                queue.set_reason(job.id, capped)
                continue
            candidates = self._candidates(statuses, load)
            impossible = never_satisfiable(job.spec, candidates)
            if impossible:
                queue.finish(job.id, "reject", reason=f"cannot be placed: {impossible}")
                continue
            # Placed only on agents this controller leases; the reason why not still weighs them all.
            placement = place(job.spec, [c for c in candidates if c.agent.name in held and self.ctx.mine(c.agent.name)])
            if placement is None:
                queue.set_reason(job.id, waiting_reason(job.spec, candidates))
                continue
            gpu_ids = [str(g.index) for g in placement.gpus]
            if not queue.claim(job.id, placement.agent, gpu_ids, job.attempt + 1):
                if task is not None and task.max_concurrent is not None:
                    # Refused in the claim's own transaction: most likely another controller's claims filled the cap.
                    queue.set_reason(job.id, f"waiting: sweep {task.parent} is at --max-concurrent {task.max_concurrent} "
                                             "(claimed by another controller)")
                continue
            # Snapshots do not change within a tick; the GPUs this claim took are held from now on.
            claimed = queue.get(job.id)
            load.add(claimed)
            if task is not None:
                running_tasks[task.parent] += 1
            if self.dispatcher.dispatch(claimed, placement.gpus):
                dispatched.append(job.id)
        return dispatched
