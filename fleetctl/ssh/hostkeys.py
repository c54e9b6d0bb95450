"""Judging the host key a hop offers: a pinned fingerprint, else the known_hosts files as OpenSSH
reads them, else trust on first use (recorded in fleetctl's own file) unless StrictHostKeyChecking
says ``yes``. A changed or revoked key is always refused; nothing here ever replaces a key
(``fleetctl agents trust`` does, on purpose)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from fleetctl.errors import HostKeyError
from fleetctl.ssh.known_hosts import Judgement, KnownHosts, KnownKey, fingerprint, host_id
from fleetctl.ssh.seam import Hop

# Host-key algorithms paramiko negotiates for each known_hosts key type.
ALGORITHMS_OF_TYPE = {
    "ssh-ed25519": ("ssh-ed25519",),
    "ecdsa-sha2-nistp256": ("ecdsa-sha2-nistp256",),
    "ecdsa-sha2-nistp384": ("ecdsa-sha2-nistp384",),
    "ecdsa-sha2-nistp521": ("ecdsa-sha2-nistp521",),
    "ssh-rsa": ("rsa-sha2-512", "rsa-sha2-256"),
}
TRUST_HINT = "if the host was rebuilt or re-keyed on purpose, run `fleetctl agents trust AGENT`; otherwise suspect interception"


@dataclass
class HostKeyPolicy:
    """Where keys are looked up and recorded. ``accept_any`` is --insecure-accept-any-host-key."""

    known_hosts: KnownHosts | None = None
    accept_any: bool = False


def lookup_name(hop: Hop) -> str:
    """The name OpenSSH looks a host up by: HostKeyAlias, else HostName, bracketed with a port."""
    return host_id(hop.host_key_alias or hop.hostname, hop.port)


def hop_files(hop: Hop) -> tuple[Path, ...]:
    return tuple(Path(os.path.expanduser(p)) for p in hop.known_hosts_files)


def preferred_algorithms(hop: Hop, policy: HostKeyPolicy, supported: tuple[str, ...]) -> tuple[str, ...]:
    """OpenSSH's order_hostkeyalgs: key types already known for the host first, so a host that
    serves several types is never reported as changed. A HostKeyAlgorithms the user set wins."""
    if hop.host_key_algorithms:
        chosen = tuple(a for a in hop.host_key_algorithms if a in supported)
        return chosen or supported
    if policy.known_hosts is None or policy.accept_any:
        return supported
    known = policy.known_hosts.known_types(lookup_name(hop), hop_files(hop))
    first = [a for key_type in known for a in ALGORITHMS_OF_TYPE.get(key_type, ()) if a in supported]
    return tuple(dict.fromkeys([*first, *supported]))


def verify(hop: Hop, key_type: str, blob: bytes, policy: HostKeyPolicy, *, is_bastion: bool) -> str:
    """Accept or raise HostKeyError; returns how the key was judged (for ``doctor``)."""
    offered = fingerprint(blob)
    offered_key = KnownKey(key_type, blob)
    name = lookup_name(hop)
    judgement = policy.known_hosts.judge(name, offered_key, hop_files(hop)) if policy.known_hosts else Judgement("unknown")

    def refuse(message: str, expected: str, hint: str = TRUST_HINT) -> HostKeyError:
        return HostKeyError(message, hop=hop.address, expected=expected, offered=offered, is_bastion=is_bastion, hint=hint)

    if judgement.verdict == "revoked":
        raise refuse(f"host key of {hop.address} ({key_type} {offered}) is marked @revoked in {judgement.where}; refusing",
                     expected="not revoked", hint="the key was revoked on purpose: the host must be re-keyed")
    if hop.fingerprint:
        if offered != hop.fingerprint:
            raise refuse(f"host key of {hop.address} changed: expected {hop.fingerprint} (host_key_fingerprint in the "
                         f"inventory), offered {key_type} {offered}", expected=hop.fingerprint)
        return "matches the pinned fingerprint"
    if policy.accept_any or policy.known_hosts is None:
        return "not checked (--insecure-accept-any-host-key)"
    if judgement.verdict == "ok":
        return f"known ({judgement.lines[0].where})"
    if judgement.verdict == "changed":
        old = judgement.lines[0]
        raise refuse(f"host key of {hop.address} changed: expected {old.key.key_type} {old.key.fingerprint} "
                     f"({old.where}), offered {offered}", expected=old.key.fingerprint)
    if judgement.verdict == "other_type":
        old = judgement.lines[0]
        raise refuse(f"host key of {hop.address}: the host offered {key_type} {offered} but {old.where} knows only "
                     f"{old.key.key_type} for it", expected=old.key.fingerprint)
    if hop.strict_host_key_checking.lower() in ("yes", "true"):
        raise refuse(f"host key of {hop.address} ({key_type} {offered}) is not in any known_hosts file and "
                     "StrictHostKeyChecking is yes", expected="a known key",
                     hint=f"add it (e.g. `ssh-keyscan -p {hop.port} {hop.hostname} >> ~/.ssh/known_hosts` after checking "
                          "the fingerprint), or run `fleetctl agents trust AGENT`")
    try:
        policy.known_hosts.record(name, offered_key, hashed=hop.hash_known_hosts)
    except OSError as exc:
        raise refuse(f"cannot record the host key of {hop.address} in {policy.known_hosts.path}: {exc.strerror}",
                     expected="a recorded key", hint="make the state dir writable, or pin host_key_fingerprint") from exc
    return f"first contact: recorded in {policy.known_hosts.path}"
