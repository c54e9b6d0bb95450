"""``Fleet``: the notebook-facing object, a thin facade over the host core (``hosts.py``: connections,
heartbeat rounds, fan-out, history, health) and the job queue (``jobs/``). It offers what a notebook
user calls; the library's own layers (serve, the CLI, jobs, doctor) work on ``fleet.hosts``, the
:class:`~fleetctl.hosts.core.Hosts` underneath. Layers point down only: jobs build on ``Hosts`` and never
import this module."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any

from fleetctl.hosts import fanout
from fleetctl.hosts.core import DEFAULT_MAX_PARALLEL_SSH, HeartbeatRound, Hosts
from fleetctl.inventory.config import Agent, Inventory, load_config
from fleetctl.jobs.api import Job, jobs_frame, submit
from fleetctl.jobs.queue import JobQueue
from fleetctl.jobs.sweeps import Sweep, submit_sweep
from fleetctl.settings import ControllerSettings
from fleetctl.telemetry.snapshot import TelemetrySnapshot

if TYPE_CHECKING:
    from typing import Self

    import pandas as pd

__all__ = ["DEFAULT_MAX_PARALLEL_SSH", "Fleet", "HeartbeatRound"]


class Fleet:
    """The agents of an inventory, the connections to them, and the job queue that runs on them.

    Takes what :class:`~fleetctl.hosts.core.Hosts` takes: ``state_dir=``, ``max_parallel_ssh=``,
    ``store=``, ``accept_any_host_key=``, ``connector=`` (e.g. :mod:`fleetctl.testing`'s fake)."""

    def __init__(self, inventory: Inventory, **options: Any) -> None:
        self.hosts = Hosts(inventory, **options)

    @classmethod
    def from_config(cls, path: str | os.PathLike[str] | None = None, **options: Any) -> Self:
        """The fleet of an inventory file. With no file there, history and jobs still read from
        the state dir; heartbeats, submits and anything else that needs agents say "no inventory"."""
        return cls(load_config(path, missing_ok=True), **options)

    @property
    def inventory(self) -> Inventory:
        return self.hosts.inventory

    @property
    def agents(self) -> list[Agent]:
        return self.hosts.agents

    @property
    def settings(self) -> ControllerSettings:
        """The effective controller settings (``fleetctl config show`` says where each came from)."""
        return self.hosts.settings

    # -- telemetry -------------------------------------------------------------------------
    def heartbeat(self, agents: list[str] | None = None, *, record: bool = True,
                  on_done: Callable[[TelemetrySnapshot], None] | None = None) -> HeartbeatRound:
        """One round over the fleet (or the named agents), hosts in parallel up to the cap. With
        ``record`` (the default) the snapshots go to history and advance each agent's health.
        ``on_done`` is called with each host's snapshot as it arrives (from the pool's threads)."""
        return self.hosts.heartbeat(agents, record=record, on_done=on_done)

    def heartbeat_each(self, agents: list[str] | None, period: float, stop: threading.Event,
                       on_done: Callable[[TelemetrySnapshot], None], *, record: bool = True) -> None:
        """Beat each agent every ``period`` seconds until ``stop`` is set, no host waiting for another."""
        self.hosts.heartbeat_each(agents, period, stop, on_done, record=record)

    def history(self, since: datetime | str | None = None, agent: str | list[str] | None = None) -> pd.DataFrame:
        """Recorded telemetry in the CSV schema: ``since`` is ``"1h"``, ``"2d"``, an ISO time or a datetime."""
        return self.hosts.history(since, agent)

    def health(self) -> pd.DataFrame:
        """One row per agent: health (online/offline/unknown), misses in a row, last good heartbeat, draining."""
        return self.hosts.health()

    # -- commands --------------------------------------------------------------------------
    def run(self, command: list[str] | str, agents: list[str] | str | None = None,
            labels: dict[str, str] | None = None, timeout: float = fanout.DEFAULT_TIMEOUT_S, *,
            max_stdout: int = fanout.MAX_STDOUT, max_stderr: int = fanout.MAX_STDERR) -> fanout.FanoutResult:
        """``command`` (argv, each word quoted; a string runs via ``sh -c``) on every chosen agent in
        parallel; ``labels`` are globs (``{"gpu_type": "a100*"}``); ``max_stdout``/``max_stderr``
        bound what is kept per host. Every host's outcome, never raising for one."""
        return self.hosts.run(command, agents, labels, timeout, max_stdout=max_stdout, max_stderr=max_stderr)

    # -- jobs ------------------------------------------------------------------------------
    def submit(self, command: list[str] | str, **options: Any) -> Job:
        """Queue a job (``gpus=``, ``labels=``, ``payload=``, ``timeout_s=``, ``retries=``, ``outputs=``,
        ``after=``, ``env=``, ``workdir=``, ``agent=``, ``min_free_mem_mib=``, ``name=``, ``priority=``;
        ``code="DIR"``: run in a snapshot of DIR taken now, as the working directory)."""
        self.inventory.require()  # a job needs agents to run on
        return submit(self.hosts, command, **options)

    def submit_sweep(self, command: list[str] | str, *, params: list[dict[str, Any]] | None = None,
                     grid: dict[str, list[Any]] | None = None, array: int | None = None,
                     max_concurrent: int | None = None, **options: Any) -> Sweep:
        """Queue one task per parameter set, in one transaction: ``array=N`` (N tasks),
        ``grid={"lr": [0.1, 0.01], "batch": [32, 64]}`` (every combination) or ``params=[{...}, ...]``.
        Each task sees ``FLEETCTL_TASK_INDEX``, ``FLEETCTL_TASK_COUNT``, ``FLEETCTL_PARAM_<NAME>`` and
        ``task`` in job.json; ``max_concurrent`` caps how many run at once; the other options are
        :meth:`submit`'s, for every task. ``.results()`` of the handle is one row per task."""
        self.inventory.require()
        return submit_sweep(self.hosts, command, params=params, grid=grid, array=array, max_concurrent=max_concurrent, **options)

    def sweep(self, sweep_id: str) -> Sweep:
        """The handle of a sweep already queued."""
        return Sweep(self.hosts, JobQueue(self.hosts.store).get_sweep(sweep_id).id)

    def job(self, job_id: str) -> Job:
        """The handle of a job already queued (``wait()``, ``result``, ``cancel()``, ``events``)."""
        return Job(self.hosts, JobQueue(self.hosts.store).get(job_id).id)

    def jobs(self, state: str | list[str] | None = None) -> pd.DataFrame:
        """Every job (or those in ``state``), oldest first, one row each."""
        states = [state] if isinstance(state, str) else state
        return jobs_frame(JobQueue(self.hosts.store).list(states))  # type: ignore[arg-type]

    def drain(self, agent: str, draining: bool = True) -> None:
        """Running jobs finish; no new ones are placed on ``agent`` until ``drain(agent, False)``."""
        self.hosts.drain(agent, draining)

    # -- lifetime --------------------------------------------------------------------------
    def close(self) -> None:
        """Close every connection and the store."""
        self.hosts.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _repr_html_(self) -> str:
        return self.hosts._repr_html_()

    def __repr__(self) -> str:
        return f"<Fleet of {len(self.inventory)} agents ({self.inventory.path})>"
