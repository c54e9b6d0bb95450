"""``fleetctl agents trust``: the one way a host key is ever replaced.

Rebuilt or re-rented hosts change keys legitimately. This shows the old and the offered
fingerprint and, once the caller confirms, updates the inventory pin (when the agent is pinned) or
fleetctl's own known_hosts (never the user's files). A key marked ``@revoked`` is never trusted.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fleetctl.errors import HostKeyError
from fleetctl.hosts.core import Hosts
from fleetctl.inventory.config import edit_inventory
from fleetctl.ssh import probe_host_key
from fleetctl.ssh.hostkeys import hop_files, lookup_name
from fleetctl.ssh.known_hosts import KnownKey
from fleetctl.ssh.seam import HostKeySeen


@dataclass(frozen=True)
class TrustOffer:
    agent: str
    address: str
    offered: HostKeySeen
    old: list[str]  # "SHA256:... (where)" for each key known before
    pinned: bool
    already_trusted: bool


@dataclass(frozen=True)
class TrustResult:
    offer: TrustOffer
    changed: bool
    where: str  # what was updated


def offer(fleet: Hosts, name: str) -> TrustOffer:
    """Connect (bastions verified as usual), read the key the host offers now; judge nothing yet."""
    agent = fleet.inventory.get(name)
    route = fleet.route(name)
    seen = probe_host_key(route, fleet.connect_options)
    target = route.target
    known = fleet.connect_options.host_keys.known_hosts
    key = KnownKey(seen.key_type, seen.key_blob)
    if known is not None:
        judgement = known.judge(lookup_name(target), key, hop_files(target))
        if judgement.verdict == "revoked":
            raise HostKeyError(f"{name}: the offered key {seen.fingerprint} is marked @revoked in {judgement.where}",
                               hop=target.address, expected="not revoked", offered=seen.fingerprint,
                               hint="a revoked key is never trusted; re-key the host")
    if agent.host_key_fingerprint:
        old = [f"{agent.host_key_fingerprint} (host_key_fingerprint in {fleet.inventory.path})"]
        return TrustOffer(name, target.address, seen, old, True, agent.host_key_fingerprint == seen.fingerprint)
    lines = known.lines_for(lookup_name(target), hop_files(target)) if known else []
    old = [f"{line.key.key_type} {line.key.fingerprint} ({line.where})" for line in lines if line.marker is None]
    trusted = any(line.key.blob == seen.key_blob for line in lines if line.marker is None)
    return TrustOffer(name, target.address, seen, old, False, trusted)


def trust(fleet: Hosts, name: str, confirm: Callable[[TrustOffer], bool]) -> TrustResult:
    """Show the offer to ``confirm``; on yes, record the offered key for ``name``."""
    proposal = offer(fleet, name)
    if proposal.already_trusted:
        return TrustResult(proposal, False, "already trusted")
    if not confirm(proposal):
        return TrustResult(proposal, False, "not confirmed")
    if proposal.pinned:
        with edit_inventory(fleet.inventory.path) as inventory:
            inventory.upsert(inventory.get(name).model_copy(update={"host_key_fingerprint": proposal.offered.fingerprint}))
        fleet.inventory.get(name).host_key_fingerprint = proposal.offered.fingerprint
        fleet.forget_route(name)
        return TrustResult(proposal, True, f"host_key_fingerprint in {fleet.inventory.path}")
    known = fleet.connect_options.host_keys.known_hosts
    assert known is not None
    target = fleet.route(name).target
    known.replace(lookup_name(target), KnownKey(proposal.offered.key_type, proposal.offered.key_blob),
                  hashed=target.hash_known_hosts)
    return TrustResult(proposal, True, str(known.path))
