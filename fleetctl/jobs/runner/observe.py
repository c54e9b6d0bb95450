"""Acting on what each agent's latest heartbeat scan says about job directories: each job, and each
scanned directory, gets the action :mod:`fleetctl.jobs.runner.decide` picks for it, carried out here through
the queue's transitions, the collector and the host.

Three passes, in this order: the active jobs; the provisionally lost ones (a job lost by the first
pass is seen here with a loss just recorded); every scanned directory of another attempt."""

from __future__ import annotations

import logging
import time

from fleetctl.errors import JobError
from fleetctl.jobs.model import ACTIVE_STATES, JobRecord
from fleetctl.jobs.runner.collect import Collector
from fleetctl.jobs.runner.context import RunnerContext
from fleetctl.jobs.runner.decide import Action, after_loss, decide, decide_directory, orphan_due, scan_valid
from fleetctl.telemetry.history import AgentStatus
from fleetctl.telemetry.jobdirs import RemoteJobDir, parse_scan_line

log = logging.getLogger("fleetctl.jobs")


class Observer:
    def __init__(self, ctx: RunnerContext, collector: Collector) -> None:
        self.ctx = ctx
        self.queue = ctx.queue
        self.collector = collector

    def observe(self, statuses: dict[str, AgentStatus]) -> None:
        settings = self.ctx.fleet.settings
        for job in self.queue.list(ACTIVE_STATES):
            if self.ctx.mine(job.agent):
                self._apply(job, decide(job, statuses.get(job.agent or ""), settings, time.time()))
        for job in self.queue.list(("lost",)):
            if job.lost_provisionally and self.ctx.mine(job.agent):
                since = self.queue.lost_at(job.id) or None
                self._apply(job, decide(job, statuses.get(job.agent or ""), settings, time.time(), since))
        for name, status in statuses.items():
            if not scan_valid(status.snapshot) or not self.ctx.mine(name):
                continue
            for path, state in status.snapshot.job_dirs.items():  # type: ignore[union-attr]
                found = parse_scan_line(f"{state} {path}")
                if found is None or found.agent != name:
                    continue
                try:
                    job = self.queue.get(found.job_id)
                except JobError:
                    continue  # not ours (another controller's state dir); a StoreError still stops the tick
                self._apply(job, decide_directory(job, found), found)

    def _apply(self, job: JobRecord, action: Action, found: RemoteJobDir | None = None) -> None:
        """Carry ``action`` out for ``job``: its own attempt, or the scanned directory ``found``."""
        kind = action.kind
        if kind == "collect":
            if found is not None:
                self.collector.collect(job.id, found.agent, found.path, found.attempt)
            elif job.remote_dir is not None:
                self.collector.collect(job.id, job.agent or "", job.remote_dir, job.attempt)
        elif kind == "lose":
            self._lose(job, action.why)
        elif kind == "resume":
            if self.queue.resume(job.id, job.attempt, action.why):
                log.warning("job %s: resumed instead of retried: %s", job.id, action.why)
        elif kind == "finalize_lost":
            self.queue.finalize_lost(job.id, action.why)
        elif kind == "remove" and found is not None:
            self.ctx.remove(found.agent, found.path)  # a collection interrupted before its removal
        elif kind == "remove_orphan" and found is not None:
            self._remove_orphan(job, found, action.why)
        elif kind == "age_orphan" and found is not None:
            self._age_orphan(job, found, action.why)

    def _lose(self, job: JobRecord, why: str) -> None:
        losses = sum(1 for _, event, _ in self.queue.events(job.id) if event == "lost")
        detail = f"attempt {job.attempt} on {job.agent} ({job.remote_dir}): {why}"
        if after_loss(job, losses) == "retry":
            # The attempt is remembered: if its host comes back with a result before a retry starts,
            # that result is the job's and the retry never runs.
            if self.queue.requeue(job.id, "retry", detail=detail, reason=f"requeued: {why}", keep_location=True):
                log.warning("job %s: %s; requeued (retry %d of %d)", job.id, why, losses + 1, job.spec.retries)
        elif self.queue.lose(job.id, detail=f"{detail}; provisional for up to "
                             f"{self.ctx.fleet.settings.lost_grace_s:g}s while its result may still come back", reason=why):
            log.warning("job %s lost: %s", job.id, why)

    def _age_orphan(self, job: JobRecord, found: RemoteJobDir, why: str) -> None:
        """A ``new`` or ``starting`` directory of no current attempt (a dispatch cut short by a crash or
        a SIGTERM): nothing will launch it, but wait ``orphan_age_s`` in case a launch is in flight."""
        first_seen = self.queue.first_event(job.id, "orphan_found", found.path)
        settings = self.ctx.fleet.settings
        if first_seen is None:
            self.queue.note(job.id, "orphan_found", f"{found.path} on {found.agent} ({found.state}, attempt "
                            f"{found.attempt}): belongs to no current attempt; removed after {settings.orphan_age_s:g}s",
                            agent=found.agent)
            first_seen = time.time()
        if orphan_due(first_seen, time.time(), settings):
            self._remove_orphan(job, found, why)

    def _remove_orphan(self, job: JobRecord, found: RemoteJobDir, why: str) -> None:
        if self.ctx.remove(found.agent, found.path):
            self.queue.note(job.id, "orphan_removed", f"{found.path} on {found.agent} (attempt {found.attempt}): {why}",
                            agent=found.agent)
            log.info("job %s: removed orphan %s on %s (%s)", job.id, found.path, found.agent, why)
