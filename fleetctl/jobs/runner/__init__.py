"""The job runner: each tick it settles ``dispatching`` jobs with their hosts, acts on what the
heartbeat's scan shows (collects finished jobs, marks lost ones), sends cancels, resolves
dependencies, then places and dispatches queued jobs. Each of those is a part of its own:

    fleetctl/jobs/runner/decide.py      what to do about a job, from its record, its host's scan and health (pure)
    fleetctl/jobs/runner/observe.py     carrying those decisions out
    fleetctl/jobs/runner/collect.py     pulling a finished attempt's files and recording its end
    fleetctl/jobs/runner/cancels.py     delivering cancels
    fleetctl/jobs/runner/schedule.py    dependencies, --max-concurrent, placement and claims
    fleetctl/jobs/runner/dispatch.py    mkdir, upload, launch of one claimed job
    fleetctl/jobs/runner/reconcile.py   settling ``dispatching`` jobs with the host
    fleetctl/jobs/remote.py             every shell fragment run on a host

The remote directory is the truth: a restarted controller reconciles every ``dispatching`` job
with it, and the launch step refuses a directory that was already started, so no job starts twice
unless its retries ask for it. A job whose host goes offline is ``lost`` provisionally (or requeued
with its last attempt remembered): if that attempt reports back before a retry starts, its result is
the job's and no retry runs. Directories of no current attempt are orphans, removed after a safety age."""

from __future__ import annotations

from fleetctl.hosts.core import Hosts
from fleetctl.jobs.model import JobRecord
from fleetctl.jobs.runner import cancels, reconcile
from fleetctl.jobs.runner.collect import Collector
from fleetctl.jobs.runner.context import RunnerContext
from fleetctl.jobs.runner.dispatch import Dispatcher
from fleetctl.jobs.runner.observe import Observer
from fleetctl.jobs.runner.schedule import Scheduler, resolve_dependencies
from fleetctl.store.leases import FenceSource
from fleetctl.telemetry.history import agent_statuses


class JobRunner:
    def __init__(self, fleet: Hosts) -> None:
        self.ctx = RunnerContext(fleet)
        self.queue = self.ctx.queue
        self.collector = Collector(self.ctx)
        self.observer = Observer(self.ctx, self.collector)
        self.scheduler = Scheduler(self.ctx, Dispatcher(self.ctx))

    def use_fence(self, source: FenceSource | None) -> None:
        """A controller acts only on the agents it leases: their jobs, their hosts, and every queue
        transition fenced by the lease (None: all agents). ``source`` gives the current fence at each
        check, so a tick longer than a renewal period goes on with the renewed leases."""
        self.queue.fence_source = source

    def tick(self) -> None:
        """One pass over the queue (the :class:`~fleetctl.jobs.driver.Driver` calls it, holding the controller lock)."""
        statuses = agent_statuses(self.ctx.fleet.store)
        # A launch whose answer was lost leaves its job ``dispatching``; settle it with the host.
        self.reconcile({name for name, status in statuses.items() if status.health.state == "online"})
        self.observer.observe(statuses)
        cancels.send_cancels(self.ctx)
        resolve_dependencies(self.queue)
        self.scheduler.dispatch_queued(statuses)

    def reconcile(self, agents: set[str] | None = None) -> None:
        """Settle every ``dispatching`` job (of ``agents`` only, if given) with its host: after a
        controller restart or a takeover, or a launch whose answer never came."""
        reconcile.reconcile(self.ctx, agents)

    def signal(self, job: JobRecord, force: bool) -> bool:
        """Send a job's pending cancel now (``jobs cancel`` calls it; the tick does for the rest)."""
        return cancels.signal(self.ctx, job, force)
