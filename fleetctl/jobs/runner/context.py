"""What every part of the job runner shares: the hosts, the queue, the lease checks, and the one
host-side step they all take (removing an attempt's directory).

A controller acts only on the agents it leases (:meth:`RunnerContext.mine`); every queue transition is
fenced by the same leases (:class:`~fleetctl.jobs.queue.JobQueue`), and a step that changes a host
checks right before it that the lease it began under is still the one held (:meth:`still_mine`)."""

from __future__ import annotations

import logging

from fleetctl._text import one_line
from fleetctl.errors import FleetError, LeaseLost, TransportError
from fleetctl.hosts.core import Hosts
from fleetctl.inventory.config import Agent
from fleetctl.jobs.queue import JobQueue
from fleetctl.jobs.remote import remove_command

log = logging.getLogger("fleetctl.jobs")


class RunnerContext:
    def __init__(self, fleet: Hosts, queue: JobQueue | None = None) -> None:
        self.fleet = fleet
        self.queue = queue if queue is not None else JobQueue(fleet.store)

    def agent(self, name: str | None) -> Agent | None:
        """The inventory's agent of that name; None for no name or one no longer in the inventory."""
        try:
            return self.fleet.inventory.get(name) if name else None
        except FleetError:
            return None

    def mine(self, agent: str | None) -> bool:
        fence = self.queue.fence
        return fence is None or fence.holds(agent)

    def token(self, agent: str) -> int | None:
        fence = self.queue.fence
        return fence.tokens.get(agent) if fence is not None else None

    def still_mine(self, agent: str, token: int | None) -> None:
        """Checked right before each step that changes a host: a controller that lost the lease
        (paused past it, partitioned), even if it holds the agent again now (a new token), stops
        here; the lease's holder settles the job with the host."""
        if not self.mine(agent) or self.token(agent) != token:
            raise LeaseLost(f"this controller no longer holds the lease of {agent} it claimed the job under")

    def remove(self, agent_name: str, remote_dir: str) -> bool:
        """``rm -rf`` an attempt's directory (nothing but a job directory: :func:`remove_command`)."""
        agent = self.agent(agent_name)
        if agent is None or not self.mine(agent_name):
            return False  # only the lease holder changes a host
        try:
            return self.fleet.connection(agent).run(remove_command(remote_dir), timeout=agent.command_timeout_s).ok
        except (TransportError, ValueError) as exc:
            log.warning("could not remove %s on %s: %s", remote_dir, agent_name, one_line(str(exc)))
            return False
