"""``Fleet``: the notebook-facing object, a thin facade over the host core (``hosts.py``: connections,
heartbeat rounds, fan-out, history, health) and the job queue (``jobs/``). Layers point down only:
jobs build on :class:`~fleetctl.hosts.Hosts` and never import this module."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fleetctl.hosts import DEFAULT_MAX_PARALLEL_SSH, HeartbeatRound, Hosts
from fleetctl.jobs.api import Job, jobs_frame, submit
from fleetctl.jobs.queue import JobQueue

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["DEFAULT_MAX_PARALLEL_SSH", "Fleet", "HeartbeatRound"]


class Fleet(Hosts):
    """The agents of an inventory, the connections to them, and the job queue that runs on them."""

    def submit(self, command: list[str] | str, **options: Any) -> Job:
        """Queue a job (``gpus=``, ``labels=``, ``payload=``, ``timeout_s=``, ``retries=``, ``outputs=``,
        ``after=``, ``env=``, ``workdir=``, ``agent=``, ``min_free_mem_mib=``, ``name=``, ``priority=``;
        ``code="DIR"``: run in a snapshot of DIR taken now, as the working directory)."""
        self.inventory.require()  # a job needs agents to run on
        return submit(self, command, **options)

    def job(self, job_id: str) -> Job:
        return Job(self, JobQueue(self.store).get(job_id).id)

    def jobs(self, state: str | list[str] | None = None) -> pd.DataFrame:
        """Every job (or those in ``state``), oldest first, one row each."""
        states = [state] if isinstance(state, str) else state
        return jobs_frame(JobQueue(self.store).list(states))  # type: ignore[arg-type]

    def store_events(self, job_id: str) -> list[tuple[float, str, str | None]]:
        """A job's history: (epoch seconds, event, detail), oldest first."""
        return JobQueue(self.store).events(job_id)
