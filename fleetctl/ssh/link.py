"""One logged-in SSH transport to one hop: over TCP, over a ProxyCommand, or over a ``direct-tcpip``
channel of the link before it (a bastion's). A host's connection is a chain of links; the links to
bastions are shared between hosts by :mod:`fleetctl.ssh.hops`.
"""

from __future__ import annotations

import contextlib
import socket
import time
from dataclasses import dataclass, field

import paramiko

from fleetctl.errors import ConnectTimeout, TransportError, UnreachableError
from fleetctl.settings import ControllerSettings, default_of
from fleetctl.ssh import fastpath, lean_swap
from fleetctl.ssh.auth import authenticate
from fleetctl.ssh.errors import PARAMIKO_LOG_CHANNEL, quiet_paramiko, translated
from fleetctl.ssh.hostkeys import HostKeyPolicy, preferred_algorithms, verify
from fleetctl.ssh.known_hosts import fingerprint
from fleetctl.ssh.proxy import ProxyProcess
from fleetctl.ssh.seam import Hop, HostKeySeen

# AEAD first: it needs no separate MAC (paramiko checks MACs with a byte-by-byte Python loop, a third
# of a heartbeat's CPU), OpenSSH prefers it too, and it sends packet lengths in clear, which the
# shared reader needs. Only those this paramiko offers (3.4 has no GCM).
_FIRST_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")
# SSH_OPEN_ADMINISTRATIVELY_PROHIBITED: the bastion's AllowTcpForwarding (or PermitOpen) says no.
_OPEN_PROHIBITED = 1
# When a bastion's connection drops, its reader first closes every channel on it (waking each host
# behind it, whose login or tunnel then fails) and only then marks the transport inactive. A host
# that failed through a bastion still marked alive waits up to this long for that mark before the
# failure is called the host's own, so a dead bastion is every host's ``bastion_unreachable``.
_BASTION_SETTLE_S = 1.0
quiet_paramiko()


@dataclass
class ConnectOptions:
    host_keys: HostKeyPolicy = field(default_factory=HostKeyPolicy)
    use_agent: bool = True
    keepalive_s: int = 0
    # A shared bastion that failed is not tried again for this long: the hosts behind it that ask
    # meanwhile (the rest of the round) get the same error at once, so a dead bastion costs one
    # connect timeout per round, not one per host. Defaults: [controller] (fleetctl.settings).
    hop_retry_after_s: float = default_of(ControllerSettings, "hop_retry_after_s")
    # Logins in progress at once to one sshd (its address and port, along the same hops).
    handshakes_per_sshd: int = default_of(ControllerSettings, "handshakes_per_sshd")


def preferred_ciphers(offered: tuple[str, ...]) -> tuple[str, ...]:
    first = [c for c in _FIRST_CIPHERS if c in offered]
    return (*first, *(c for c in offered if c not in first))


def _tcp_socket(hop: Hop, timeout: float, is_bastion: bool) -> socket.socket:
    family = {"inet": socket.AF_INET, "inet6": socket.AF_INET6}.get(hop.address_family, 0)
    with translated("connect", f"cannot reach {hop.address}", hop=hop.address, is_bastion=is_bastion,
                    hostname=hop.hostname, timeout=timeout):
        if family:
            info = socket.getaddrinfo(hop.hostname, hop.port, family, socket.SOCK_STREAM)
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            if hop.bind_address:
                sock.bind((hop.bind_address, 0))
            sock.connect(info[0][4])
        else:
            source = (hop.bind_address, 0) if hop.bind_address else None
            sock = socket.create_connection((hop.hostname, hop.port), timeout=timeout, source_address=source)
    # Without TCP_NODELAY, Nagle plus delayed ACK stalls each back-to-back exec by ~40 ms.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


class Link:
    """A transport to ``hop``, logged in (or, with ``probe``, only past the handshake). ``via`` is
    the bastion's link it runs over; the link does not own it (the pool does)."""

    def __init__(self, hop: Hop, *, via: Link | None, options: ConnectOptions, timeout: float,
                 is_bastion: bool, probe: bool = False) -> None:
        self.hop = hop
        self.via = via
        self.is_bastion = is_bastion
        self.users = 0  # connections riding on it (counted by the pool for shared links)
        self.seen: HostKeySeen | None = None
        self._raw_socket: socket.socket | None = None
        self._proxy: ProxyProcess | None = None
        self.transport: paramiko.Transport | None = None
        self._deadline = time.monotonic() + timeout
        try:
            self._open(options, timeout, probe)
        except TransportError as exc:
            self.close()
            if via is not None and not exc.is_bastion and self._bastion_died(via, exc):
                # The bastion died under this login: its failure, reported once for all its hosts.
                raise UnreachableError(f"bastion {via.hop.address} went away while reaching {hop.address}",
                                       hop=via.hop.address, is_bastion=True,
                                       hint="is the bastion up? its hosts reconnect through it on the next try") from exc
            raise
        except BaseException:
            self.close()
            raise

    @property
    def is_active(self) -> bool:
        via_active = self.via is None or self.via.is_active
        return self.transport is not None and bool(self.transport.is_active()) and via_active

    def _bastion_died(self, via: Link, exc: TransportError) -> bool:
        """Whether this login failed because the bastion it ran through died. Only a lost connection
        (the channel closed, EOF) can be the bastion's death still being noticed: then its reader gets
        up to ``_BASTION_SETTLE_S`` (never past this login's deadline) to mark it. An answer (a refused
        channel, a host key, a login refusal) or a timeout came through a bastion that was alive: no wait."""
        if not via.is_active:
            return True
        if type(exc) is not UnreachableError or isinstance(exc.__cause__, paramiko.ChannelException):
            return False
        # Polled: on the fast path a transport has no thread of its own to join.
        settle_until = min(time.monotonic() + _BASTION_SETTLE_S, self._deadline)
        while via.is_active:
            if time.monotonic() >= settle_until:
                return False
            time.sleep(0.01)
        return True

    def _open(self, options: ConnectOptions, timeout: float, probe: bool) -> None:
        hop, is_bastion = self.hop, self.is_bastion
        deadline = time.monotonic() + timeout
        peer_ip: str | None = None
        sock: socket.socket | paramiko.Channel
        if self.via is not None:
            sock = self.via.tunnel(hop, is_bastion, deadline, timeout)
        elif hop.proxy_command:
            self._proxy = ProxyProcess(hop, timeout)
            sock = self._proxy.socket
        else:
            sock = self._raw_socket = _tcp_socket(hop, timeout, is_bastion)
            peer_ip = sock.getpeername()[0]
        transport = self.transport = fastpath.transport_class()(sock)
        transport.set_log_channel(PARAMIKO_LOG_CHANNEL)
        transport.banner_timeout = timeout
        transport.auth_timeout = timeout
        security = transport.get_security_options()
        security.ciphers = preferred_ciphers(tuple(security.ciphers))
        security.key_types = preferred_algorithms(hop, options.host_keys, tuple(security.key_types))
        self._handshake(deadline, timeout)
        key = transport.get_remote_server_key()
        if probe:
            self.seen = HostKeySeen(hop.address, key.get_name(), fingerprint(key.asbytes()), peer_ip, key_blob=key.asbytes())
            return
        verdict = verify(hop, key.get_name(), key.asbytes(), options.host_keys, is_bastion=is_bastion)
        with translated("connect", f"{hop.address} closed the connection during login", hop=hop.address,
                        is_bastion=is_bastion, deadline=deadline):
            identity = authenticate(transport, hop, is_bastion, use_agent=options.use_agent)
        lean_swap.lean_after_login(transport)
        self.seen = HostKeySeen(hop.address, key.get_name(), fingerprint(key.asbytes()), peer_ip, verdict, identity)
        keepalive = hop.keepalive_s or options.keepalive_s
        if keepalive:
            transport.set_keepalive(keepalive)

    def _handshake(self, deadline: float, timeout: float) -> None:
        assert self.transport is not None
        hop = self.hop
        try:
            with translated("connect", f"SSH handshake with {hop.address} failed", hop=hop.address,
                            is_bastion=self.is_bastion, deadline=deadline, timeout=timeout,
                            hint="is it an SSH server on that port?"):
                self.transport.start_client(timeout=max(0.1, deadline - time.monotonic()))
        except TransportError as exc:
            if self._proxy is not None:
                raise UnreachableError(f"SSH handshake with {hop.address} failed: {self._proxy.failure()}",
                                       hop=hop.address, is_bastion=self.is_bastion,
                                       hint="run the ProxyCommand by hand to see why") from exc
            raise

    def tunnel(self, hop: Hop, is_bastion: bool, deadline: float, timeout: float) -> paramiko.Channel:
        """A ``direct-tcpip`` channel from this link's host to ``hop``."""
        if self.transport is None or not self.is_active:
            raise UnreachableError(f"bastion {self.hop.address} went away before reaching {hop.address}",
                                   hop=self.hop.address, is_bastion=True, hint="retry; check the bastion")
        try:
            with translated("tunnel", f"bastion {self.hop.address} could not reach {hop.address}", hop=hop.address,
                            is_bastion=is_bastion, deadline=deadline, timeout=timeout,
                            hint="is the host up and reachable from the bastion?"):
                channel = self.transport.open_channel("direct-tcpip", (hop.hostname, hop.port), ("127.0.0.1", 0),
                                                      timeout=max(0.1, deadline - time.monotonic()))
            lean_swap.lean_channel(channel)  # before the host's transport reads it
            return channel
        except (UnreachableError, ConnectTimeout) as exc:
            # Whether the bastion died under the open is judged once, by the Link being opened.
            cause = exc.__cause__
            if isinstance(cause, paramiko.ChannelException) and cause.code == _OPEN_PROHIBITED:
                raise UnreachableError(f"bastion {self.hop.address} refuses to forward to {hop.address}",
                                       hop=self.hop.address, is_bastion=True,
                                       hint="set AllowTcpForwarding yes on the bastion") from cause
            raise

    def close(self) -> None:
        if self.transport is not None:
            with contextlib.suppress(Exception):  # over a dead bastion paramiko may raise; closed is closed
                self.transport.close()
        if self._raw_socket is not None:
            with contextlib.suppress(OSError):
                self._raw_socket.shutdown(socket.SHUT_RDWR)
            self._raw_socket.close()
            self._raw_socket = None
        if self._proxy is not None:
            self._proxy.close()
            self._proxy = None
