"""Delivering cancels: a job marked for cancel (``jobs cancel``, its sweep's cancel, a failed GPU)
gets SIGTERM, then SIGKILL after ``kill_grace_s`` (or SIGKILL at once with ``force``), from whoever
takes the mark first (:meth:`~fleetctl.jobs.queue.JobQueue.take_cancel`). A cancel that cannot be
delivered now (host unreachable, the job's process group not written yet) is marked again, and the
next tick tries again."""

from __future__ import annotations

import logging

from fleetctl._text import one_line
from fleetctl.errors import TransportError
from fleetctl.jobs.model import ACTIVE_STATES, JobRecord
from fleetctl.jobs.remote import cancel_command
from fleetctl.jobs.runner.context import RunnerContext

log = logging.getLogger("fleetctl.jobs")


def send_cancels(ctx: RunnerContext) -> None:
    """Every running job of this controller's agents still marked for cancel."""
    for job in ctx.queue.list(ACTIVE_STATES):
        if job.cancel_requested and job.remote_dir and job.state == "running" and ctx.mine(job.agent):
            signal(ctx, job, force=False)


def signal(ctx: RunnerContext, job: JobRecord, force: bool) -> bool:
    """Take the job's cancel mark and signal its process group; True once the signal was sent."""
    agent = ctx.agent(job.agent)
    if agent is None or job.remote_dir is None or not ctx.queue.take_cancel(job.id):
        return False
    try:
        command = cancel_command(job.remote_dir, force, ctx.fleet.settings.kill_grace_s)
        result = ctx.fleet.connection(agent).run(command, timeout=agent.command_timeout_s)
    except TransportError as exc:
        log.warning("job %s: cancel not delivered yet: %s", job.id, one_line(str(exc)))
        ctx.queue.request_cancel(job.id, force=force, event=False)  # the next tick tries again
        return False
    if not result.ok:
        ctx.queue.request_cancel(job.id, force=force, event=False)
        return False
    ctx.queue.note(job.id, "cancel_sent", "SIGKILL" if force else "SIGTERM")
    return True
