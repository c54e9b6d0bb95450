"""The seam between fleetctl and SSH: plain data and two small protocols.

Everything above this line (heartbeats, jobs, registration) talks to a :class:`Connection`;
only :mod:`fleetctl.ssh` knows it is paramiko underneath, and unit tests can hand in a fake.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from fleetctl.errors import CommandFailed
from fleetctl.settings import HostTimeouts, default_of
from fleetctl.ssh.addresses import format_address

# Every read from a host is bounded: a tool that prints forever must not take the controller's memory.
MAX_STDOUT = 16 * 1024 * 1024
MAX_STDERR = 1024 * 1024


@dataclass(frozen=True)
class Hop:
    """One SSH server on the way: a bastion or the target itself, as ssh_config resolved it."""

    hostname: str
    user: str
    port: int = 22
    key_path: str | None = None  # the inventory's key; tried first (like `ssh -i`)
    fingerprint: str | None = None  # pinned SHA256:...; None means verify against known_hosts
    identity_files: tuple[str, ...] = ()  # IdentityFile, in order; empty: key_path or the default keys
    certificate_files: tuple[str, ...] = ()
    identities_only: bool = False
    identity_agent: str | None = None  # socket path; None: $SSH_AUTH_SOCK; "none": no agent
    proxy_command: str | None = None  # only on the first hop: its transport instead of TCP
    alias: str | None = None  # the name the user gave (OpenSSH's %n)
    host_key_alias: str | None = None
    known_hosts_files: tuple[str, ...] = ()  # UserKnownHostsFile + GlobalKnownHostsFile
    strict_host_key_checking: str = "accept-new"
    hash_known_hosts: bool = False
    host_key_algorithms: tuple[str, ...] = ()  # set by the user; empty: known types first
    keepalive_s: int = 0
    bind_address: str | None = None
    address_family: str = "any"

    @property
    def address(self) -> str:
        return format_address(self.hostname, self.port, self.user)

    @property
    def identities(self) -> tuple[str, ...]:
        if self.identity_files:
            return self.identity_files
        return (self.key_path,) if self.key_path else DEFAULT_IDENTITY_FILES


DEFAULT_IDENTITY_FILES = ("~/.ssh/id_rsa", "~/.ssh/id_ecdsa", "~/.ssh/id_ecdsa_sk", "~/.ssh/id_ed25519",
                          "~/.ssh/id_ed25519_sk", "~/.ssh/id_xmss", "~/.ssh/id_dsa")


@dataclass(frozen=True)
class Route:
    """The hops to cross, nearest the controller first; the last one is the target."""

    hops: tuple[Hop, ...]
    connect_timeout: float = default_of(HostTimeouts, "connect_timeout_s")  # written once, in the settings

    @property
    def target(self) -> Hop:
        return self.hops[-1]

    @property
    def bastions(self) -> tuple[Hop, ...]:
        return self.hops[:-1]

    def describe(self) -> str:
        via = " via " + " -> ".join(h.address for h in self.bastions) if self.bastions else ""
        return f"{self.target.address}{via}"


@dataclass(frozen=True)
class HostKeySeen:
    """What a hop presented during this connection (recorded by ``register-ssh``, shown by ``doctor``)."""

    address: str
    key_type: str
    fingerprint: str
    peer_ip: str | None
    verdict: str = ""  # how the host key was judged
    identity: str = ""  # the key that logged in
    key_blob: bytes = field(default=b"", repr=False)


@dataclass
class CommandResult:
    command: str
    exit_code: int
    stdout: str
    stderr: str
    duration_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    def check(self) -> CommandResult:
        """Raise :class:`CommandFailed` unless the command exited 0 (raising is opt-in)."""
        if not self.ok:
            raise CommandFailed(self)
        return self


class Connection(Protocol):
    """What fleetctl needs of a connection to one host."""

    route: Route
    host_keys: list[HostKeySeen]

    @property
    def is_open(self) -> bool: ...

    def run(self, command: str, *, timeout: float | None = None, max_stdout: int | None = None,
            max_stderr: int | None = None) -> CommandResult:
        """Exit code and output; raises :class:`~fleetctl.errors.OutputTooLarge` past the limits
        (``None``: :data:`MAX_STDOUT` / :data:`MAX_STDERR`), a ``TransportError`` if nothing ran."""
        ...

    def run_kept(self, command: str, *, timeout: float | None = None, max_stdout: int | None = None,
                 max_stderr: int | None = None) -> CommandResult:
        """As :meth:`run`, in a shell kept open between calls (the heartbeat's cheap path: two or
        three SSH packets instead of a channel per command). The command must not read stdin."""
        ...

    def write_bytes(self, remote_path: str, data: bytes) -> None: ...

    def read_bytes(self, remote_path: str, *, max_bytes: int | None = None) -> bytes: ...

    def get(self, remote_path: str, local_path: Path) -> None: ...

    def close(self) -> None: ...


class Connector(Protocol):
    """Opens a connection along a route (``fleetctl.ssh.connect`` is the real one)."""

    def __call__(self, route: Route) -> Connection: ...

