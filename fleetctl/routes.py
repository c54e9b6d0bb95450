"""From an inventory agent to the hops SSH must cross, nearest the controller first."""

from __future__ import annotations

import getpass
from pathlib import Path

from fleetctl.addresses import parse_address
from fleetctl.config import Agent
from fleetctl.errors import ConfigError
from fleetctl.ssh import lookup_ssh_config
from fleetctl.transport import Hop, Route


def route_for(agent: Agent, *, ssh_config: Path | None = None) -> Route:
    """Bastions (``[agents.bastion]`` nesting, or ProxyJump via ``ssh_config_host``) then the host."""
    user = agent.ssh_user
    hostname = agent.hostname
    port = agent.ssh_port
    key = agent.ssh_key_path
    jumps: list[Hop] = []
    if agent.ssh_config_host:
        entry = lookup_ssh_config(agent.ssh_config_host, ssh_config)
        hostname = hostname or entry.hostname
        user = user or entry.user
        port = port if "ssh_port" in agent.model_fields_set else (entry.port or 22)
        key = key or entry.identity_file
        if entry.proxy_jump and agent.bastion is None:
            for part in entry.proxy_jump.split(","):
                try:
                    address = parse_address(part)
                except ConfigError as exc:
                    raise ConfigError(f"agent {agent.name!r}: ProxyJump {part!r} in ~/.ssh/config: {exc.message}") from None
                jumps.append(Hop(address.host, address.user or getpass.getuser(), address.port or 22, key))
    for bastion in agent.bastions():
        jumps.append(Hop(bastion.hostname, bastion.ssh_user or user or getpass.getuser(), bastion.ssh_port,
                         bastion.ssh_key_path or key, bastion.host_key_fingerprint))
    assert hostname is not None  # the inventory guarantees hostname or ssh_config_host
    target = Hop(hostname, user or getpass.getuser(), port, key, agent.host_key_fingerprint)
    return Route((*jumps, target), connect_timeout=agent.connect_timeout_s)
