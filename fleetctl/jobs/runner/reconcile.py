"""Settling ``dispatching`` jobs with their hosts: after a controller restart or a takeover, or a
launch whose answer never came. The remote directory is the truth (:func:`~fleetctl.jobs.remote.probe_command`):
none made, or made but not filled, and the job goes back to the queue; filled, and it is launched
(the launch step refuses a directory already started); started, and it is running."""

from __future__ import annotations

import logging

from fleetctl._text import one_line
from fleetctl.errors import TransportError
from fleetctl.inventory.config import Agent
from fleetctl.jobs.model import JobRecord
from fleetctl.jobs.remote import LAUNCH_ALREADY_STARTED, launch_command, parse_probe, probe_command
from fleetctl.jobs.runner.context import RunnerContext

log = logging.getLogger("fleetctl.jobs")


def reconcile(ctx: RunnerContext, agents: set[str] | None = None) -> None:
    """Every ``dispatching`` job of this controller's agents (of ``agents`` only, if given)."""
    for job in ctx.queue.list(("dispatching",)):
        if (agents is not None and job.agent not in agents) or not ctx.mine(job.agent):
            continue
        agent = ctx.agent(job.agent)
        if agent is None:
            ctx.queue.requeue(job.id, "requeue", detail="agent no longer in the inventory", reason=None)
            continue
        try:
            _reconcile_one(ctx, job, agent)
        except TransportError as exc:
            log.warning("job %s: cannot reconcile with %s yet: %s", job.id, agent.name, one_line(str(exc)))


def _reconcile_one(ctx: RunnerContext, job: JobRecord, agent: Agent) -> None:
    queue = ctx.queue
    conn = ctx.fleet.connection(agent)
    found = parse_probe(conn.run(probe_command(job.id, job.attempt, agent.name), timeout=agent.command_timeout_s).stdout)
    if found is None:
        queue.requeue(job.id, "requeue", reason=None, detail="controller restarted before the job directory existed")
        return
    state, remote_dir = found
    if not queue.set_remote_dir(job.id, remote_dir, job.attempt):
        return
    if state == "partial":
        ctx.remove(agent.name, remote_dir)
        queue.requeue(job.id, "requeue", reason=None, detail="controller restarted mid-upload")
        return
    if state == "ready":
        launched = conn.run(launch_command(remote_dir), timeout=agent.command_timeout_s)
        if not (launched.ok or launched.exit_code == LAUNCH_ALREADY_STARTED):
            return
    queue.mark_running(job.id, remote_dir, f"{remote_dir} (reconciled)", attempt=job.attempt)
