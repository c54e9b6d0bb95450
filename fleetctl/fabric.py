"""Fabric on fleetctl's inventory: your existing Fabric tasks, run on the fleet.

    from fleetctl.fabric import connection, group
    connection(fleet, "gpu-1").run("nvidia-smi -L")
    group(fleet, labels={"gpu_type": "a100*"}).run("uptime")

Each ``fabric.Connection`` is built from the route fleetctl itself uses (``fleet.hosts.route(name)``,
ssh_config already resolved): bastions become nested ``gateway=`` connections, a first-hop
ProxyCommand becomes Fabric's string gateway, and the same key files are offered. Host keys are
judged by fleetctl (pins, known_hosts, StrictHostKeyChecking, TOFU into fleetctl's own file), never
by Fabric's AutoAddPolicy: a refused key raises :class:`~fleetctl.errors.HostKeyError`.
Each target connection's ``original_host`` is its agent name. Needs ``pip install 'fleetctl[fabric]'``.
"""

from __future__ import annotations

import math
import os
import shlex
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from fleetctl.errors import ConfigError, FleetError
from fleetctl.fleet import Fleet
from fleetctl.hosts.fanout import select
from fleetctl.inventory.config import Inventory
from fleetctl.ssh.config_file import expand_tokens
from fleetctl.ssh.fabric_policy import empty_ssh_config, guard, transport_factory
from fleetctl.ssh.hostkeys import HostKeyPolicy
from fleetctl.ssh.proxy import expand_proxy_command
from fleetctl.ssh.seam import Hop, Route

if TYPE_CHECKING:
    import fabric
    from invoke.config import Config as InvokeConfig

__all__ = ["connection", "group"]


def _fabric() -> Any:
    try:
        import fabric
    except ImportError as exc:
        raise FleetError("fleetctl.fabric needs Fabric", hint="pip install 'fleetctl[fabric]'") from exc
    return fabric


def _fleet(fleet_or_inventory: Fleet | Inventory) -> Fleet:
    if isinstance(fleet_or_inventory, Fleet):
        return fleet_or_inventory
    if isinstance(fleet_or_inventory, Inventory):
        return Fleet(fleet_or_inventory)
    raise ConfigError(f"fleetctl.fabric needs a Fleet or an Inventory, not {type(fleet_or_inventory).__name__}",
                      hint="pass fleetctl.Fleet.from_config() or fleetctl.load_config()")


def _config(config: InvokeConfig | None) -> fabric.Config:
    """Fabric's config (fabric.yaml, env vars, ``config`` if given) without ssh_config: fleetctl has
    resolved every hop already, and Fabric re-reading ~/.ssh/config could add a second ProxyJump."""
    fab = _fabric()
    if config is None:
        return fab.Config(overrides={"load_ssh_configs": False})
    cloned = config.clone(into=fab.Config) if not isinstance(config, fab.Config) else config.clone()
    cloned._set(base_ssh_config=empty_ssh_config())
    return cloned


def _key_files(hop: Hop) -> list[str]:
    """The hop's identity files that exist, inventory key first, in the order fleetctl offers them."""
    files = []
    for raw in dict.fromkeys(((hop.key_path,) if hop.key_path else ()) + hop.identities):
        if raw.lower() == "none":
            continue
        path = os.path.expanduser(expand_tokens(raw, hop.alias or hop.hostname, hop.hostname, user=hop.user, port=hop.port))
        if os.path.isfile(path):
            files.append(path)
    return files


def _proxy_gateway(hop: Hop) -> str:
    """The first hop's ProxyCommand, tokens expanded, run through the shell as OpenSSH (and fleetctl) runs it."""
    assert hop.proxy_command is not None
    command = expand_proxy_command(hop.proxy_command, hop)
    shell = os.environ.get("SHELL") or "/bin/sh"
    return f"{shlex.quote(shell)} -c {shlex.quote('exec ' + command)}"


def _build(route: Route, policy: HostKeyPolicy, config: fabric.Config, *, use_agent: bool) -> fabric.Connection:
    fab = _fabric()
    gateway: Any = False  # False, not None: Fabric must not look for a gateway of its own
    conn: Any = None
    last = len(route.hops) - 1
    for index, hop in enumerate(route.hops):
        if index == 0 and hop.proxy_command:
            gateway = _proxy_gateway(hop)
        connect_kwargs = {
            "key_filename": _key_files(hop),
            "look_for_keys": False,
            "allow_agent": use_agent and hop.identity_agent != "none",
            "banner_timeout": route.connect_timeout,
            "auth_timeout": route.connect_timeout,
            "transport_factory": transport_factory(hop, policy),
        }
        conn = fab.Connection(hop.hostname, user=hop.user, port=hop.port, config=config, gateway=gateway,
                              connect_timeout=max(1, math.ceil(route.connect_timeout)),  # Fabric keeps whole seconds
                              connect_kwargs=connect_kwargs)
        guard(conn.client, hop, policy, is_bastion=index < last)
        gateway = conn
    return conn


def _connection(fleet: Fleet, name: str, config: fabric.Config) -> fabric.Connection:
    conn = _build(fleet.hosts.route(name), fleet.hosts.connect_options.host_keys, config, use_agent=fleet.hosts.connect_options.use_agent)
    conn.original_host = fleet.inventory.get(name).name
    return conn


def connection(fleet_or_inventory: Fleet | Inventory, name: str, *, config: InvokeConfig | None = None) -> fabric.Connection:
    """A ``fabric.Connection`` to agent ``name`` (not yet open), through its bastions, with
    fleetctl's host-key policy. ``config``: a Fabric/Invoke config for ``run``/``sudo`` settings."""
    fleet = _fleet(fleet_or_inventory)
    return _connection(fleet, name, _config(config))


def group(fleet_or_inventory: Fleet | Inventory, names: str | Sequence[str] | None = None,
          labels: Mapping[str, str] | None = None, *, config: InvokeConfig | None = None) -> fabric.ThreadingGroup:
    """A ``fabric.ThreadingGroup`` of the named agents (default: all), narrowed to those whose labels
    match the globs (``{"gpu_type": "a100*"}``), as jobs and ``fleet.run`` select them."""
    fleet = _fleet(fleet_or_inventory)
    chosen = select(fleet.hosts, names, labels)
    if not chosen:
        if not labels:
            raise ConfigError(f"the inventory {fleet.inventory.path} has no agents", hint="add one with `fleetctl register-ssh`")
        wanted = ", ".join(f"{k}={v}" for k, v in labels.items())
        raise ConfigError(f"no agent matches the labels {wanted}", hint="see each agent's labels with `fleetctl agents list`")
    shared = _config(config)
    return _fabric().ThreadingGroup.from_connections([_connection(fleet, agent.name, shared) for agent in chosen])
