"""The only module that knows paramiko: connect along a route, run, transfer, close.

Policy (what a timeout means for a host's health, retries, concurrency) lives above this module;
here every paramiko and socket failure is translated once into the fleetctl exception tree.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import paramiko

from fleetctl.errors import (
    AuthError,
    CommandTimeout,
    ConnectionLost,
    ConnectTimeout,
    HostKeyError,
    OutputTooLarge,
    TransportError,
    UnreachableError,
)
from fleetctl.ssh.known_hosts import KnownHosts, KnownKey, fingerprint, host_id
from fleetctl.transport import MAX_STDERR, MAX_STDOUT, CommandResult, Hop, HostKeySeen, Route

DEFAULT_IDENTITIES = ("id_ed25519", "id_ecdsa", "id_rsa")
_READ_CHUNK = 1 << 16


class _Transport(paramiko.Transport):  # type: ignore[misc]
    # The transport thread wakes this often only to notice a local close. paramiko's 0.1 s costs
    # measurable idle CPU across hundreds of kept-open connections (1000 connections at 2 s were
    # still 4 % of a core); we close by shutting the socket down, which wakes it at once anyway.
    _active_check_timeout = 10.0
    # AES-GCM first: an AEAD cipher needs no separate MAC, and paramiko checks MACs with a
    # byte-by-byte Python loop, a third of a heartbeat's CPU. OpenSSH prefers GCM too.
    _preferred_ciphers = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com",
                          *(c for c in paramiko.Transport._preferred_ciphers if "gcm" not in c))


@dataclass
class HostKeyPolicy:
    """How offered host keys are judged: pinned fingerprint, else known_hosts with TOFU."""

    known_hosts: KnownHosts | None = None
    accept_any: bool = False  # --insecure-accept-any-host-key; never the default


@dataclass
class ConnectOptions:
    host_keys: HostKeyPolicy = field(default_factory=HostKeyPolicy)
    use_agent: bool = True
    keepalive_s: int = 0


# Loaded private keys by (path, mtime): a reconnect must not re-read and re-parse the file.
_key_cache: dict[tuple[str, int], paramiko.PKey] = {}
_key_cache_lock = threading.Lock()


def _load_key(path: str, hop: Hop, is_bastion: bool) -> paramiko.PKey | None:
    """The key at ``path``, or None when it is passphrase-protected (the agent may hold it)."""
    expanded = os.path.expanduser(path)
    try:
        stamp = os.stat(expanded).st_mtime_ns
    except FileNotFoundError:
        raise AuthError(f"key file {path} not found (for {hop.address})", hop=hop.address,
                        is_bastion=is_bastion, hint="check ssh_key_path / --key") from None
    except OSError as exc:
        raise AuthError(f"cannot read key file {path}: {exc.strerror}", hop=hop.address,
                        is_bastion=is_bastion) from None
    with _key_cache_lock:
        cached = _key_cache.get((expanded, stamp))
    if cached is not None:
        return cached
    try:
        key = paramiko.PKey.from_path(expanded)
    except (paramiko.PasswordRequiredException, TypeError):
        return None
    except (paramiko.SSHException, ValueError, OSError) as exc:
        raise AuthError(f"cannot use key file {path}: {exc}", hop=hop.address, is_bastion=is_bastion,
                        hint="use an OpenSSH ed25519, ecdsa or rsa private key") from None
    with _key_cache_lock:
        _key_cache[(expanded, stamp)] = key
    return key


def _agent_keys(options: ConnectOptions) -> list[paramiko.PKey]:
    if not options.use_agent or not os.environ.get("SSH_AUTH_SOCK"):
        return []
    try:
        return list(paramiko.Agent().get_keys())
    except (paramiko.SSHException, OSError):
        return []


def _authenticate(transport: paramiko.Transport, hop: Hop, is_bastion: bool, options: ConnectOptions) -> None:
    candidates: list[paramiko.PKey] = []
    locked_key: str | None = None
    paths = [hop.key_path] if hop.key_path else [
        str(Path.home() / ".ssh" / name) for name in DEFAULT_IDENTITIES
        if (Path.home() / ".ssh" / name).exists()
    ]
    for path in paths:
        key = _load_key(path, hop, is_bastion)
        if key is None:
            locked_key = path
        else:
            candidates.append(key)
    candidates.extend(_agent_keys(options))
    if not candidates:
        if locked_key:
            raise AuthError(
                f"key {locked_key} is passphrase-protected and no ssh-agent offers it (for {hop.address})",
                hop=hop.address, is_bastion=is_bastion, hint=f"run `ssh-add {locked_key}` first",
            )
        raise AuthError(f"no SSH key to offer {hop.address}", hop=hop.address, is_bastion=is_bastion,
                        hint="pass --key or set ssh_key_path")
    for key in candidates:
        try:
            transport.auth_publickey(hop.user, key)
            return
        except paramiko.BadAuthenticationType:
            raise AuthError(f"{hop.address} does not accept public-key login", hop=hop.address,
                            is_bastion=is_bastion, hint="enable PubkeyAuthentication on the host") from None
        except paramiko.AuthenticationException:
            continue
        except (paramiko.SSHException, EOFError, OSError) as exc:
            raise UnreachableError(f"{hop.address} closed the connection during login: {exc or 'EOF'}",
                                   hop=hop.address, is_bastion=is_bastion) from None
    shown = hop.key_path or "the default keys and ssh-agent"
    raise AuthError(f"{hop.address} refused {shown}", hop=hop.address, is_bastion=is_bastion,
                    hint="add the public key to the host's authorized_keys or pass the right --key")


def _verify_host_key(transport: paramiko.Transport, hop: Hop, is_bastion: bool,
                     policy: HostKeyPolicy) -> HostKeySeen:
    key = transport.get_remote_server_key()
    blob = key.asbytes()
    offered = fingerprint(blob)
    seen = HostKeySeen(hop.address, key.get_name(), offered, None)
    if hop.fingerprint:
        if offered != hop.fingerprint:
            raise HostKeyError(
                f"host key of {hop.address} changed: expected {hop.fingerprint}, offered {offered}",
                hop=hop.address, expected=hop.fingerprint, offered=offered, is_bastion=is_bastion,
                hint="if the host was rebuilt on purpose, re-register it; otherwise suspect interception",
            )
        return seen
    if policy.accept_any or policy.known_hosts is None:
        return seen
    name = host_id(hop.hostname, hop.port)
    known = policy.known_hosts.lookup(name)
    if not known:
        policy.known_hosts.record(name, KnownKey(key.get_name(), blob))
    elif not any(k.blob == blob for k in known):
        expected = known[0].fingerprint
        raise HostKeyError(
            f"host key of {hop.address} changed: expected {expected}, offered {offered}",
            hop=hop.address, expected=expected, offered=offered, is_bastion=is_bastion,
            hint=f"if expected, remove {name} from {policy.known_hosts.path}; otherwise suspect interception",
        )
    return seen


def _tcp_socket(hop: Hop, timeout: float) -> socket.socket:
    try:
        sock = socket.create_connection((hop.hostname, hop.port), timeout=timeout)
    except socket.gaierror as exc:
        raise UnreachableError(f"cannot resolve {hop.hostname}: {exc.strerror}", hop=hop.address,
                               hint="check the hostname") from None
    except TimeoutError:
        raise ConnectTimeout(f"no answer from {hop.address} within {timeout:g}s", hop=hop.address,
                             hint="is the host up and the port open? raise connect_timeout_s for slow links") from None
    except ConnectionRefusedError:
        raise UnreachableError(f"connection refused by {hop.address}", hop=hop.address,
                               hint="is sshd running on that port?") from None
    except OSError as exc:
        raise UnreachableError(f"cannot reach {hop.address}: {exc.strerror or exc}", hop=hop.address) from None
    # Without TCP_NODELAY, Nagle plus delayed ACK stalls each back-to-back exec by ~40 ms.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _channel_through(outer: paramiko.Transport, via: Hop, hop: Hop, is_bastion: bool,
                     timeout: float) -> paramiko.Channel:
    try:
        return outer.open_channel("direct-tcpip", (hop.hostname, hop.port), ("127.0.0.1", 0), timeout=timeout)
    except paramiko.ChannelException as exc:
        reason = exc.text or "connect failed"
        hint = ("the bastion forbids forwarding: set AllowTcpForwarding yes there"
                if exc.code == 1 else "is the host up and reachable from the bastion?")
        raise UnreachableError(f"bastion {via.address} could not reach {hop.address}: {reason}",
                               hop=hop.address, is_bastion=is_bastion, hint=hint) from None
    except paramiko.SSHException as exc:
        if "Timeout" in str(exc):
            raise ConnectTimeout(f"bastion {via.address} got no answer from {hop.address} within {timeout:g}s",
                                 hop=hop.address, is_bastion=is_bastion) from None
        raise UnreachableError(f"bastion {via.address} dropped the tunnel to {hop.address}: {exc}",
                               hop=via.address, is_bastion=True) from None
    except (EOFError, OSError) as exc:
        raise UnreachableError(f"bastion {via.address} closed the connection: {exc or 'EOF'}",
                               hop=via.address, is_bastion=True) from None


class SSHConnection:
    """A live connection to one host, through zero or more bastions. Safe to reuse; not thread-safe
    for concurrent commands (the heartbeat pool gives each host one worker at a time)."""

    def __init__(self, route: Route, options: ConnectOptions | None = None) -> None:
        self.route = route
        self.options = options or ConnectOptions()
        self.host_keys: list[HostKeySeen] = []
        self._transports: list[paramiko.Transport] = []
        self._raw_socket: socket.socket | None = None
        self._sftp: paramiko.SFTPClient | None = None
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    def _open(self) -> None:
        timeout = self.route.connect_timeout
        last = len(self.route.hops) - 1
        for index, hop in enumerate(self.route.hops):
            is_bastion = index < last
            peer_ip: str | None = None
            if index == 0:
                self._raw_socket = sock = _tcp_socket(hop, timeout)
                peer_ip = sock.getpeername()[0]
                transport = _Transport(sock)
            else:
                channel = _channel_through(self._transports[-1], self.route.hops[index - 1], hop,
                                           is_bastion, timeout)
                transport = _Transport(channel)
            self._transports.append(transport)
            transport.banner_timeout = timeout
            transport.auth_timeout = timeout
            try:
                transport.start_client(timeout=timeout)
            except (paramiko.SSHException, EOFError, OSError) as exc:
                if "timeout" in str(exc).lower():
                    raise ConnectTimeout(f"SSH handshake with {hop.address} timed out after {timeout:g}s",
                                         hop=hop.address, is_bastion=is_bastion) from None
                raise UnreachableError(f"SSH handshake with {hop.address} failed: {exc or 'connection closed'}",
                                       hop=hop.address, is_bastion=is_bastion,
                                       hint="is it an SSH server on that port?") from None
            seen = _verify_host_key(transport, hop, is_bastion, self.options.host_keys)
            self.host_keys.append(HostKeySeen(seen.address, seen.key_type, seen.fingerprint, peer_ip))
            _authenticate(transport, hop, is_bastion, self.options)
            if self.options.keepalive_s:
                transport.set_keepalive(self.options.keepalive_s)

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
        except (paramiko.SSHException, EOFError, OSError):
            raise self._lost("starting a command") from None
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
        partial = CommandResult(command, -1, stdout[:stdout_cap].decode("utf-8", "replace"),
                                stderr[:stderr_cap].decode("utf-8", "replace"), time.monotonic() - started)
        return OutputTooLarge(f"{self.route.target.address} sent {which} larger than {cap} bytes; reading stopped",
                              partial, hint="the command's output is bounded; check the host's tool or narrow the query")

    def _sftp_client(self) -> paramiko.SFTPClient:
        if self._sftp is None:
            try:
                self._sftp = self._transports[-1].open_sftp_client()
            except (paramiko.SSHException, EOFError, OSError) as exc:
                raise TransportError(f"SFTP unavailable on {self.route.target.address}: {exc}",
                                     hop=self.route.target.address, hint="enable the sftp subsystem in sshd") from None
            if self._sftp is None:
                raise TransportError(f"SFTP unavailable on {self.route.target.address}", hop=self.route.target.address)
        return self._sftp

    def write_bytes(self, remote_path: str, data: bytes) -> None:
        try:
            with self._sftp_client().open(remote_path, "wb") as handle:
                handle.write(data)
        except OSError as exc:
            raise TransportError(f"cannot write {remote_path} on {self.route.target.address}: {exc}",
                                 hop=self.route.target.address) from None
        except (paramiko.SSHException, EOFError):
            raise self._lost(f"writing {remote_path}") from None

    def read_bytes(self, remote_path: str, *, max_bytes: int | None = None) -> bytes:
        """The file's content; with ``max_bytes``, only its last ``max_bytes`` bytes."""
        try:
            with self._sftp_client().open(remote_path, "rb") as handle:
                if max_bytes is not None:
                    size = handle.stat().st_size or 0
                    if size > max_bytes:
                        handle.seek(size - max_bytes)
                handle.prefetch()
                return bytes(handle.read())
        except OSError as exc:
            raise TransportError(f"cannot read {remote_path} on {self.route.target.address}: {exc}",
                                 hop=self.route.target.address) from None
        except (paramiko.SSHException, EOFError):
            raise self._lost(f"reading {remote_path}") from None

    def get(self, remote_path: str, local_path: Path) -> None:
        try:
            self._sftp_client().get(remote_path, str(local_path))
        except OSError as exc:
            raise TransportError(f"cannot fetch {remote_path} from {self.route.target.address}: {exc}",
                                 hop=self.route.target.address) from None
        except (paramiko.SSHException, EOFError):
            raise self._lost(f"fetching {remote_path}") from None

    def close(self) -> None:
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

    def __enter__(self) -> SSHConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _short(command: str, limit: int = 60) -> str:
    return command if len(command) <= limit else command[: limit - 3] + "..."


def connect(route: Route, options: ConnectOptions | None = None) -> SSHConnection:
    """Open a connection along ``route`` (bastions first). Raises a :class:`TransportError`."""
    return SSHConnection(route, options)


@dataclass(frozen=True)
class SshConfigEntry:
    hostname: str
    user: str | None
    port: int | None
    identity_file: str | None
    proxy_jump: str | None


def lookup_ssh_config(alias: str, path: Path | None = None) -> SshConfigEntry:
    """Resolve an alias through ``~/.ssh/config`` (HostName, User, Port, IdentityFile, ProxyJump)."""
    config_file = path or Path.home() / ".ssh" / "config"
    config = paramiko.SSHConfig.from_path(str(config_file)) if config_file.exists() else paramiko.SSHConfig()
    found = config.lookup(alias)
    identity = found.get("identityfile")
    port = found.get("port")
    proxy = found.get("proxyjump")
    return SshConfigEntry(
        hostname=found.get("hostname", alias),
        user=found.get("user"),
        port=int(port) if port else None,
        identity_file=identity[0] if identity else None,
        proxy_jump=None if proxy in (None, "none") else proxy,
    )
