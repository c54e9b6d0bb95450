"""From an inventory agent to the hops SSH must cross, nearest the controller first.

The inventory's fields act like ``ssh`` command-line options and win (``-l`` ssh_user, ``-p``
ssh_port when set, ``-i`` ssh_key_path, ``-o HostName=`` hostname when an ``ssh_config_host``
alias is used, ``-J`` for ``[agents.bastion]``); everything else comes from ssh_config, resolved as
OpenSSH resolves it (:mod:`fleetctl.ssh.resolve`), ProxyJump hops included.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from fleetctl.inventory.config import Agent, Bastion
from fleetctl.settings import ControllerSettings, default_of, layered
from fleetctl.ssh.resolve import Resolved, SshConfigResolver, SshOptions
from fleetctl.ssh.resolve_cache import ANSWERS_DIR
from fleetctl.ssh.seam import Hop, Route

DEFAULT_CONNECT_TIMEOUT_S: float = default_of(Agent, "connect_timeout_s")


def resolver_for(settings: ControllerSettings, *, enabled: bool | None = None,
                 state_dir: Path | None = None) -> SshConfigResolver:
    """ssh_config file: ``[controller] ssh_config_file`` < ``$FLEETCTL_SSH_CONFIG`` (the layers of
    :mod:`fleetctl.settings`); unset means what plain ``ssh`` reads (~/.ssh/config and /etc/ssh/ssh_config).
    With ``state_dir``, ``ssh -G``'s answers are kept there between processes (:mod:`fleetctl.ssh.resolve_cache`)."""
    config_file = layered({"ssh_config_file": settings.ssh_config_file}).settings.ssh_config_file
    return SshConfigResolver(config_file, enabled=settings.ssh_config if enabled is None else enabled,
                             answers_dir=state_dir / ANSWERS_DIR if state_dir is not None else None)


def _port(model: Agent | Bastion) -> int | None:
    return model.ssh_port if "ssh_port" in model.model_fields_set else None


def _hop(resolved: Resolved, pin: str | None = None) -> Hop:
    return Hop(hostname=resolved.hostname, user=resolved.user, port=resolved.port, fingerprint=pin,
               identity_files=resolved.identity_files, certificate_files=resolved.certificate_files,
               identities_only=resolved.identities_only, identity_agent=resolved.identity_agent,
               proxy_command=resolved.proxy_command, alias=resolved.alias, host_key_alias=resolved.host_key_alias,
               known_hosts_files=(*resolved.user_known_hosts, *resolved.global_known_hosts),
               strict_host_key_checking=resolved.strict_host_key_checking, hash_known_hosts=resolved.hash_known_hosts,
               host_key_algorithms=resolved.host_key_algorithms, keepalive_s=resolved.server_alive_interval,
               bind_address=resolved.bind_address, address_family=resolved.address_family)


def resolved_chain(agent: Agent, resolver: SshConfigResolver) -> list[tuple[Resolved, str | None]]:
    """Every hop as resolved, with its inventory pin (config-only jump hosts have none)."""
    alias = agent.ssh_config_host or agent.hostname
    assert alias is not None  # the inventory guarantees hostname or ssh_config_host
    bastions = agent.bastions()
    jump = ",".join(b.address for b in bastions) if bastions else None
    options = SshOptions(user=agent.ssh_user, port=_port(agent),
                         identity_files=(agent.ssh_key_path,) if agent.ssh_key_path else (),
                         hostname=agent.hostname if agent.ssh_config_host and agent.hostname else None, jump=jump)
    if not bastions:
        chain = resolver.chain(alias, options)
        return [(hop, None) for hop in chain[:-1]] + [(chain[-1], agent.host_key_fingerprint)]
    hops: list[tuple[Resolved, str | None]] = []
    for index, bastion in enumerate(bastions):
        key = bastion.ssh_key_path or agent.ssh_key_path
        bastion_options = SshOptions(user=bastion.ssh_user or agent.ssh_user, port=_port(bastion),
                                     identity_files=(key,) if key else (),
                                     jump=",".join(b.address for b in bastions[:index]) or None)
        if index == 0:  # the nearest bastion may itself sit behind a ProxyJump or ProxyCommand
            *before, nearest = resolver.chain(bastion.hostname, bastion_options)
            hops.extend((hop, None) for hop in before)
            hops.append((nearest, bastion.host_key_fingerprint))
        else:
            hops.append((resolver.resolve(bastion.hostname, bastion_options), bastion.host_key_fingerprint))
    hops.append((resolver.resolve(alias, options), agent.host_key_fingerprint))
    return hops


def route_for(agent: Agent, resolver: SshConfigResolver | None = None) -> Route:
    resolver = resolver or resolver_for(ControllerSettings())
    chain = resolved_chain(agent, resolver)
    hops = tuple(_hop(resolved, pin) for resolved, pin in chain)
    target = chain[-1][0]
    explicit = "connect_timeout_s" in agent.model_fields_set
    timeout = agent.connect_timeout_s if explicit or target.connect_timeout is None else target.connect_timeout
    return Route(hops, connect_timeout=timeout or DEFAULT_CONNECT_TIMEOUT_S)


@dataclass(frozen=True)
class HopView:
    """One hop as ``agents show`` prints it; ``sources`` says where each value came from
    (``inventory``, ``FILE:LINE`` of ssh_config, or ``default``)."""

    role: str
    host: str
    port: int
    user: str
    identities: tuple[str, ...]
    certificates: tuple[str, ...]
    identities_only: bool
    proxy_command: str | None
    host_key: str
    resolver: str
    sources: dict[str, str]

    def source(self, field: str) -> str:
        return self.sources.get(field, "default")

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def describe_route(agent: Agent, resolver: SshConfigResolver) -> list[HopView]:
    chain = resolved_chain(agent, resolver)
    return [HopView(role="target" if index == len(chain) - 1 else "bastion", host=resolved.hostname, port=resolved.port,
                    user=resolved.user, identities=tuple(p for p in resolved.identity_files if p.lower() != "none"),
                    certificates=tuple(p for p in resolved.certificate_files if p.lower() != "none"),
                    identities_only=resolved.identities_only, proxy_command=resolved.proxy_command,
                    host_key=pin or f"known_hosts (StrictHostKeyChecking {resolved.strict_host_key_checking})",
                    resolver=resolved.resolver, sources=dict(resolved.sources))
            for index, (resolved, pin) in enumerate(chain)]
