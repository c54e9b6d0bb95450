"""``register-ssh``: log in once (through bastions), pin host keys, detect the GPU tool, save.

Nothing is written unless every step succeeded, so a refused key or a changed host key leaves
the inventory exactly as it was.
"""

from __future__ import annotations

import getpass
import re
from dataclasses import dataclass, field
from pathlib import Path

from fleetctl.errors import ConfigError
from fleetctl.inventory.config import Agent, Bastion, edit_inventory, load_config
from fleetctl.inventory.routes import resolver_for, route_for
from fleetctl.paths import config_path, state_dir
from fleetctl.ssh import ConnectOptions, HostKeyPolicy, connect
from fleetctl.ssh.addresses import Address, parse_address
from fleetctl.ssh.known_hosts import KnownHosts
from fleetctl.telemetry.gpu_tools import DETECT_COMMAND, default_query, parse_detection


@dataclass
class Registration:
    agent: Agent
    replaced: bool
    tools: list[str] = field(default_factory=list)
    connected: bool = True


def default_name(address: Address) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", address.host).strip("-") or "host"
    return name if address.port in (None, 22) else f"{name}-{address.port}"


def _bastion_chain(bastions: list[str], key: str | None, existing: Agent | None) -> Bastion | None:
    """``--bastion`` flags are given nearest-controller first; the TOML nests the other way."""
    known = {(b.hostname, b.ssh_port): b for b in (existing.bastions() if existing else [])}
    chain: Bastion | None = None
    for text in bastions:
        address = parse_address(text)
        port = address.port or 22
        previous = known.get((address.host, port))
        chain = Bastion(hostname=address.host, ssh_port=port, ssh_user=address.user or getpass.getuser(),
                        ssh_key_path=key,
                        host_key_fingerprint=previous.host_key_fingerprint if previous else None,
                        bastion=chain)
    return chain


def register_ssh(
    host: str,
    key: str | None,
    *,
    name: str | None = None,
    bastions: list[str] | None = None,
    bastion_key: str | None = None,
    labels: dict[str, str] | None = None,
    gpu_query_cmd: str | None = None,
    connect_now: bool = True,
    config: str | Path | None = None,
    state: str | Path | None = None,
    accept_any_host_key: bool = False,
    connect_timeout_s: float | None = None,
) -> Registration:
    address = parse_address(host)
    agent_name = name or default_name(address)
    if key is not None and not Path(key).expanduser().exists():
        raise ConfigError(f"key file {key} not found", hint="pass the private key's path with --key")
    inventory = load_config(config_path(config), missing_ok=True)
    existing = next((a for a in inventory if a.name == agent_name), None)
    same_host = existing is not None and existing.hostname == address.host and \
        existing.ssh_port == (address.port or 22)
    fields: dict[str, object] = {
        "name": agent_name, "hostname": address.host, "ssh_user": address.user or getpass.getuser(),
        "ssh_port": address.port or 22,
    }
    if key:
        fields["ssh_key_path"] = key
    chain = _bastion_chain(bastions or [], bastion_key or key, existing)
    if chain is not None:
        fields["bastion"] = chain
    if labels:
        fields["labels"] = labels
    if gpu_query_cmd:
        fields["gpu_query_cmd"] = gpu_query_cmd
    if connect_timeout_s is not None:
        fields["connect_timeout_s"] = connect_timeout_s
    if same_host and existing is not None and existing.host_key_fingerprint:
        fields["host_key_fingerprint"] = existing.host_key_fingerprint
    agent = Agent(**fields)  # type: ignore[arg-type]
    tools: list[str] = []
    if connect_now:
        policy = HostKeyPolicy(known_hosts=KnownHosts.default(state_dir(state)), accept_any=accept_any_host_key)
        with connect(route_for(agent, resolver_for(inventory.controller)), ConnectOptions(host_keys=policy)) as connection:
            detection = connection.run(DETECT_COMMAND, timeout=agent.command_timeout_s)
            tools, own_address = parse_detection(detection.stdout)
            seen = connection.host_keys
        updates: dict[str, object] = {"host_key_fingerprint": seen[-1].fingerprint}
        resolved = own_address or seen[-1].peer_ip
        if resolved and resolved != address.host:
            updates["resolved_ip"] = resolved
        if not gpu_query_cmd and default_query(tools):
            updates["gpu_query_cmd"] = default_query(tools)
        hops = agent.bastions()
        for hop, key_seen in zip(hops, seen, strict=False):
            hop.host_key_fingerprint = key_seen.fingerprint
            if key_seen.peer_ip and key_seen.peer_ip != hop.hostname:
                hop.resolved_ip = key_seen.peer_ip
        agent = agent.model_copy(update=updates)
    with edit_inventory(inventory.path) as writable:
        replaced = writable.upsert(agent)
    return Registration(agent, replaced, tools, connect_now)
