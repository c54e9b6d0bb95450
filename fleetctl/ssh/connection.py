"""A live SSH connection along a route: bastions crossed with direct-tcpip channels, the first hop
over TCP or a ProxyCommand; then run / read / write / close. Every vendor error is translated by
:mod:`fleetctl.ssh.errors`; host keys are judged by :mod:`fleetctl.ssh.hostkeys`, keys offered by
:mod:`fleetctl.ssh.auth`. Policy (what a timeout means for health, retries) lives above.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import paramiko

from fleetctl.errors import CommandTimeout, ConnectionLost, OutputTooLarge, TransportError, UnreachableError
from fleetctl.ssh.auth import authenticate
from fleetctl.ssh.errors import quiet_paramiko, translated
from fleetctl.ssh.hostkeys import HostKeyPolicy, preferred_algorithms, verify
from fleetctl.ssh.known_hosts import fingerprint
from fleetctl.ssh.loop import Transport
from fleetctl.ssh.proxy import ProxyProcess
from fleetctl.ssh.session import SessionUnavailable, ShellSession
from fleetctl.transport import MAX_STDERR, MAX_STDOUT, CommandResult, Hop, HostKeySeen, Route

_READ_CHUNK = 1 << 16
quiet_paramiko()


@dataclass
class ConnectOptions:
    host_keys: HostKeyPolicy = field(default_factory=HostKeyPolicy)
    use_agent: bool = True
    keepalive_s: int = 0


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


class SSHConnection:
    """A live connection to one host, through zero or more bastions. Safe to reuse; not thread-safe
    for concurrent commands (the heartbeat pool gives each host one worker at a time)."""

    def __init__(self, route: Route, options: ConnectOptions | None = None, *, probe: bool = False) -> None:
        self.route = route
        self._probe = probe  # stop after the target's handshake: its key is read, not judged
        self.options = options or ConnectOptions()
        self.host_keys: list[HostKeySeen] = []
        self._transports: list[paramiko.Transport] = []
        self._raw_socket: socket.socket | None = None
        self._proxy: ProxyProcess | None = None
        self._sftp: paramiko.SFTPClient | None = None
        self._session: ShellSession | None = None
        self._session_lock = threading.Lock()
        self._kept_unavailable = False
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    def _first_socket(self, hop: Hop, timeout: float, is_bastion: bool) -> tuple[socket.socket, str | None]:
        if hop.proxy_command:
            self._proxy = ProxyProcess(hop, timeout)
            return self._proxy.socket, None
        sock = _tcp_socket(hop, timeout, is_bastion)
        self._raw_socket = sock
        return sock, sock.getpeername()[0]

    def _open(self) -> None:
        timeout = self.route.connect_timeout
        last = len(self.route.hops) - 1
        for index, hop in enumerate(self.route.hops):
            is_bastion = index < last
            deadline = time.monotonic() + timeout
            peer_ip: str | None = None
            if index == 0:
                sock, peer_ip = self._first_socket(hop, timeout, is_bastion)
                transport = Transport(sock)
            else:
                via = self.route.hops[index - 1]
                channel = self._tunnel(via, hop, is_bastion, deadline, timeout)
                transport = Transport(channel)
            self._transports.append(transport)
            transport.banner_timeout = timeout
            transport.auth_timeout = timeout
            options = transport.get_security_options()
            options.key_types = preferred_algorithms(hop, self.options.host_keys, tuple(options.key_types))
            self._handshake(transport, hop, is_bastion, deadline)
            key = transport.get_remote_server_key()
            if self._probe and not is_bastion:
                self.host_keys.append(HostKeySeen(hop.address, key.get_name(), fingerprint(key.asbytes()), peer_ip,
                                                  key_blob=key.asbytes()))
                return
            verdict = verify(hop, key.get_name(), key.asbytes(), self.options.host_keys, is_bastion=is_bastion)
            with translated("connect", f"{hop.address} closed the connection during login", hop=hop.address,
                            is_bastion=is_bastion, deadline=deadline):
                identity = authenticate(transport, hop, is_bastion, use_agent=self.options.use_agent)
            self.host_keys.append(HostKeySeen(hop.address, key.get_name(), fingerprint(key.asbytes()), peer_ip,
                                              verdict, identity))
            keepalive = hop.keepalive_s or self.options.keepalive_s
            if keepalive:
                transport.set_keepalive(keepalive)

    def _tunnel(self, via: Hop, hop: Hop, is_bastion: bool, deadline: float, timeout: float) -> paramiko.Channel:
        try:
            with translated("tunnel", f"bastion {via.address} could not reach {hop.address}", hop=hop.address,
                            is_bastion=is_bastion, deadline=deadline, timeout=timeout,
                            hint="is the host up and reachable from the bastion?"):
                return self._transports[-1].open_channel("direct-tcpip", (hop.hostname, hop.port), ("127.0.0.1", 0),
                                                         timeout=timeout)
        except UnreachableError as exc:
            cause = exc.__cause__
            # SSH_OPEN_ADMINISTRATIVELY_PROHIBITED: sshd's AllowTcpForwarding (or PermitOpen) says no.
            if isinstance(cause, paramiko.ChannelException) and cause.code == 1:
                raise UnreachableError(f"bastion {via.address} refuses to forward to {hop.address}", hop=via.address,
                                       is_bastion=True, hint="set AllowTcpForwarding yes on the bastion") from cause
            raise

    def _handshake(self, transport: paramiko.Transport, hop: Hop, is_bastion: bool, deadline: float) -> None:
        try:
            with translated("connect", f"SSH handshake with {hop.address} failed", hop=hop.address,
                            is_bastion=is_bastion, deadline=deadline, timeout=self.route.connect_timeout,
                            hint="is it an SSH server on that port?"):
                transport.start_client(timeout=max(0.1, deadline - time.monotonic()))
        except TransportError as exc:
            if self._proxy is not None and len(self._transports) == 1:
                raise UnreachableError(f"SSH handshake with {hop.address} failed: {self._proxy.failure()}",
                                       hop=hop.address, is_bastion=is_bastion,
                                       hint="run the ProxyCommand by hand to see why") from exc
            raise

    @property
    def is_open(self) -> bool:
        return bool(self._transports) and all(t.is_active() for t in self._transports)

    def _lost(self, doing: str) -> ConnectionLost:
        return ConnectionLost(f"connection to {self.route.target.address} lost while {doing}",
                              hop=self.route.target.address, hint="the host or network went away; retry")

    def run(self, command: str, *, timeout: float | None = None, max_stdout: int | None = None,
            max_stderr: int | None = None) -> CommandResult:
        """Run ``command`` through the login shell; exit code and output, never raises on non-zero.
        Past ``max_stdout``/``max_stderr`` bytes the channel is closed and OutputTooLarge raised."""
        stdout_cap = MAX_STDOUT if max_stdout is None else max_stdout
        stderr_cap = MAX_STDERR if max_stderr is None else max_stderr
        started = time.monotonic()
        deadline = started + (timeout if timeout is not None else 3600.0)
        target = self._transports[-1] if self._transports else None
        if target is None or not target.is_active():
            raise self._lost("starting a command")
        try:
            channel = target.open_session(timeout=max(deadline - time.monotonic(), 0.1))
            channel.exec_command(command)
        except (paramiko.SSHException, EOFError, OSError) as exc:
            raise self._lost("starting a command") from exc
        stdout, stderr = bytearray(), bytearray()
        try:
            # Both buffers set one event on data and on close. Cheaper than channel.fileno(),
            # which makes an OS pipe per channel and writes to it on every packet.
            readable = threading.Event()
            channel.in_buffer.set_event(readable)
            channel.in_stderr_buffer.set_event(readable)
            while True:
                while channel.recv_ready():
                    stdout += channel.recv(_READ_CHUNK)
                while channel.recv_stderr_ready():
                    stderr += channel.recv_stderr(_READ_CHUNK)
                if len(stdout) > stdout_cap or len(stderr) > stderr_cap:
                    raise self._too_large(command, stdout, stderr, stdout_cap, stderr_cap, started)
                if channel.eof_received and not channel.recv_ready() and not channel.recv_stderr_ready():
                    break
                if channel.closed or not target.is_active():
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise CommandTimeout(
                        f"`{_short(command)}` on {self.route.target.address} did not finish within {timeout:g}s",
                        hop=self.route.target.address, hint="raise command_timeout_s or check the host")
                # Reads clear the event when a buffer empties: look again before sleeping on it.
                if not (channel.recv_ready() or channel.recv_stderr_ready() or channel.eof_received):
                    readable.wait(remaining)
            remaining = max(deadline - time.monotonic(), 0)
            if not channel.status_event.wait(remaining):
                if not target.is_active() or channel.closed:
                    raise self._lost(f"running `{_short(command)}`")
                raise CommandTimeout(f"`{_short(command)}` on {self.route.target.address} did not exit within {timeout:g}s",
                                     hop=self.route.target.address)
            exit_code = channel.recv_exit_status()
        finally:
            channel.close()
        if exit_code == -1:  # channel closed without an exit status: the connection died
            raise self._lost(f"running `{_short(command)}`")
        return CommandResult(command, exit_code, stdout.decode("utf-8", "replace"),
                             stderr.decode("utf-8", "replace"), time.monotonic() - started)

    def _too_large(self, command: str, stdout: bytearray, stderr: bytearray, stdout_cap: int, stderr_cap: int,
                   started: float) -> OutputTooLarge:
        which, cap = ("stdout", stdout_cap) if len(stdout) > stdout_cap else ("stderr", stderr_cap)
        del stdout[stdout_cap:], stderr[stderr_cap:]  # never hold a decoded copy of a flood
        partial = CommandResult(command, -1, stdout.decode("utf-8", "replace"), stderr.decode("utf-8", "replace"),
                                time.monotonic() - started)
        return OutputTooLarge(f"{self.route.target.address} sent {which} larger than {cap} bytes; reading stopped",
                              partial, hint="the command's output is bounded; check the host's tool or narrow the query")

    def run_kept(self, command: str, *, timeout: float | None = None, max_stdout: int | None = None,
                 max_stderr: int | None = None) -> CommandResult:
        """``run`` in the kept-open shell (see :mod:`fleetctl.ssh.session`); a shell that died or was
        closed by a timeout is replaced by a new one here."""
        if not self.is_open:
            raise self._lost("starting a command")
        if self._kept_unavailable:
            return self.run(command, timeout=timeout, max_stdout=max_stdout, max_stderr=max_stderr)
        with self._session_lock:
            if self._session is not None and not self._session.usable:
                self._session.close()
                self._session = None
            if self._session is None:
                self._session = ShellSession(self._transports[-1], self.route.target.address, self.route.connect_timeout)
            session = self._session
        try:
            return session.run(command, timeout=3600.0 if timeout is None else timeout,
                               max_stdout=MAX_STDOUT if max_stdout is None else max_stdout,
                               max_stderr=MAX_STDERR if max_stderr is None else max_stderr)
        except SessionUnavailable:
            self._kept_unavailable = True  # e.g. no writable /tmp: one exec per command still works
            return self.run(command, timeout=timeout, max_stdout=max_stdout, max_stderr=max_stderr)

    def _sftp_client(self) -> paramiko.SFTPClient:
        if self._sftp is None:
            target = self.route.target.address
            if not self.is_open:  # closed under us (serve stopping): an error of ours, not an IndexError
                raise self._lost("opening SFTP")
            with translated("command", f"SFTP unavailable on {target}", hop=target,
                            hint="enable the sftp subsystem in sshd"):
                self._sftp = self._transports[-1].open_sftp_client()
            if self._sftp is None:
                raise TransportError(f"SFTP unavailable on {target}", hop=target, hint="enable the sftp subsystem in sshd")
        return self._sftp

    def write_bytes(self, remote_path: str, data: bytes) -> None:
        target = self.route.target.address
        with translated("file", f"cannot write {remote_path} on {target}", hop=target), self._sftp_client().open(remote_path, "wb") as handle:
            handle.write(data)

    def read_bytes(self, remote_path: str, *, max_bytes: int | None = None) -> bytes:
        """The file's content; with ``max_bytes``, only its last ``max_bytes`` bytes."""
        target = self.route.target.address
        with translated("file", f"cannot read {remote_path} on {target}", hop=target), self._sftp_client().open(remote_path, "rb") as handle:
            if max_bytes is not None:
                size = handle.stat().st_size or 0
                if size > max_bytes:
                    handle.seek(size - max_bytes)
            handle.prefetch()
            return bytes(handle.read())

    def get(self, remote_path: str, local_path: Path) -> None:
        target = self.route.target.address
        with translated("file", f"cannot fetch {remote_path} from {target}", hop=target):
            self._sftp_client().get(remote_path, str(local_path))

    def close(self) -> None:
        if self._session is not None:
            self._session.close()
            self._session = None
        if self._sftp is not None:
            # Closing over a dead channel can raise anything paramiko has; closed is closed.
            with contextlib.suppress(Exception):
                self._sftp.close()
            self._sftp = None
        for transport in reversed(self._transports):
            transport.close()
        self._transports.clear()
        if self._raw_socket is not None:
            with contextlib.suppress(OSError):
                self._raw_socket.shutdown(socket.SHUT_RDWR)
            self._raw_socket.close()
            self._raw_socket = None
        if self._proxy is not None:
            self._proxy.close()
            self._proxy = None

    def __enter__(self) -> SSHConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _short(command: str, limit: int = 60) -> str:
    return command if len(command) <= limit else command[: limit - 3] + "..."


def connect(route: Route, options: ConnectOptions | None = None) -> SSHConnection:
    """Open a connection along ``route`` (bastions first). Raises a :class:`TransportError`."""
    return SSHConnection(route, options)


def probe_host_key(route: Route, options: ConnectOptions | None = None) -> HostKeySeen:
    """The key the route's target offers now, neither judged nor logged in to (the bastions are
    judged and logged in to as usual): what ``fleetctl agents trust`` shows before it trusts."""
    with SSHConnection(route, options, probe=True) as connection:
        return connection.host_keys[-1]
