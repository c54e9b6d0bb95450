"""fleetctl's host-key judgement for the paramiko ``SSHClient`` inside a ``fabric.Connection``.

Fabric sets ``AutoAddPolicy`` (any key silently trusted). :func:`guard` replaces it with
:class:`FleetctlHostKeyPolicy` and empties the client's own key store, so paramiko has nothing to
compare against and always asks the policy: the pin, the known_hosts files, StrictHostKeyChecking
and fleetctl's TOFU file decide (:func:`fleetctl.ssh.hostkeys.verify`), nothing else.
:func:`transport_factory` offers the host-key types already known for the hop first, as
fleetctl's own connections do, so a host serving several key types is not reported as changed.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable
from typing import Any

import paramiko

from fleetctl.errors import HostKeyError
from fleetctl.ssh.hostkeys import HostKeyPolicy, preferred_algorithms, verify
from fleetctl.ssh.seam import Hop


class FleetctlHostKeyPolicy(paramiko.MissingHostKeyPolicy):  # type: ignore[misc]
    """Accept a hop's key only as :func:`fleetctl.ssh.hostkeys.verify` does; ``verdict`` says how."""

    def __init__(self, hop: Hop, policy: HostKeyPolicy, *, is_bastion: bool) -> None:
        self.hop = hop
        self.policy = policy
        self.is_bastion = is_bastion
        self.verdict = ""

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        try:
            self.verdict = verify(self.hop, key.get_name(), key.asbytes(), self.policy, is_bastion=self.is_bastion)
        except HostKeyError:
            # SSHClient.connect leaves its transport running when the policy refuses: stop it here.
            with contextlib.suppress(Exception):
                client.close()
            raise


def guard(client: paramiko.SSHClient, hop: Hop, policy: HostKeyPolicy, *, is_bastion: bool) -> FleetctlHostKeyPolicy:
    """Make fleetctl the only judge of ``client``'s host keys (call before it connects)."""
    client.get_host_keys().clear()
    client._system_host_keys.clear()  # never loaded by fabric; emptied in case someone did
    judge = FleetctlHostKeyPolicy(hop, policy, is_bastion=is_bastion)
    client.set_missing_host_key_policy(judge)
    return judge


def transport_factory(hop: Hop, policy: HostKeyPolicy) -> Callable[..., paramiko.Transport]:
    """A ``transport_factory`` for ``SSHClient.connect``: host-key types known for ``hop`` offered first."""

    def make(sock: socket.socket | paramiko.Channel, **kwargs: Any) -> paramiko.Transport:
        transport = paramiko.Transport(sock, **kwargs)
        options = transport.get_security_options()
        options.key_types = preferred_algorithms(hop, policy, tuple(options.key_types))
        return transport

    return make


def empty_ssh_config() -> paramiko.SSHConfig:
    """An ssh_config with no entries: fleetctl has already resolved every hop, Fabric must not again."""
    return paramiko.SSHConfig()
