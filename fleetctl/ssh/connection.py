"""A live SSH connection along a route: the target's own link (:mod:`fleetctl.ssh.link`), over the
bastions' links shared with other hosts (:mod:`fleetctl.ssh.hops`); then run / read / write / close. Every vendor error is translated by
:mod:`fleetctl.ssh.errors`; host keys are judged by :mod:`fleetctl.ssh.hostkeys`, keys offered by
:mod:`fleetctl.ssh.auth`. Policy (what a timeout means for health, retries) lives above.
"""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path

import paramiko

from fleetctl.errors import CommandTimeout, ConnectionLost, OutputTooLarge, TransportError
from fleetctl.ssh.errors import translated
from fleetctl.ssh.hops import HopPool
from fleetctl.ssh.link import ConnectOptions, Link
from fleetctl.ssh.seam import MAX_STDERR, MAX_STDOUT, CommandResult, HostKeySeen, Route
from fleetctl.ssh.session import SessionUnavailable, ShellSession

_READ_CHUNK = 1 << 16


class SSHConnection:
    """A live connection to one host, through zero or more bastions. Safe to reuse; not thread-safe
    for concurrent commands (the heartbeat pool gives each host one worker at a time).

    The links to the bastions come from ``hops`` (shared with every other host behind them, see
    :mod:`fleetctl.ssh.hops`); the link to the target is this connection's own."""

    def __init__(self, route: Route, options: ConnectOptions | None = None, *, probe: bool = False,
                 hops: HopPool | None = None) -> None:
        self.route = route
        self.options = options or ConnectOptions()
        self._hops = hops if hops is not None else HopPool(self.options)
        self.host_keys: list[HostKeySeen] = []
        self._via: Link | None = None
        self._target: Link | None = None
        self._sftp: paramiko.SFTPClient | None = None
        self._session: ShellSession | None = None
        self._session_lock = threading.Lock()
        self._kept_unavailable = False
        try:
            self._open(probe)
        except BaseException:
            self.close()
            raise

    def _open(self, probe: bool) -> None:
        timeout = self.route.connect_timeout
        bastions = self.route.bastions
        if bastions:
            self._via = self._hops.acquire(bastions, timeout)
            chain: list[Link] = []
            link: Link | None = self._via
            while link is not None:
                chain.append(link)
                link = link.via
            self.host_keys.extend(link.seen for link in reversed(chain) if link.seen is not None)
        self._target = self._hops.open_link(self.route.target, via=self._via, via_chain=bastions, timeout=timeout,
                                            is_bastion=False, probe=probe)
        if self._target.seen is not None:
            self.host_keys.append(self._target.seen)

    @property
    def _transport(self) -> paramiko.Transport | None:
        return self._target.transport if self._target is not None else None

    @property
    def is_open(self) -> bool:
        return self._target is not None and self._target.is_active

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
        target = self._transport
        if target is None or not self.is_open:
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
            with contextlib.suppress(Exception):  # over a dead link: closed is closed
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
                assert self._transport is not None  # is_open
                self._session = ShellSession(self._transport, self.route.target.address, self.route.connect_timeout)
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
                assert self._transport is not None  # is_open
                self._sftp = self._transport.open_sftp_client()
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
        # Closing is best effort: over a dead bastion, paramiko's close messages raise EOFError;
        # closed is closed, and close() never raises.
        if self._session is not None:
            with contextlib.suppress(Exception):
                self._session.close()
            self._session = None
        if self._sftp is not None:
            # Closing over a dead channel can raise anything paramiko has; closed is closed.
            with contextlib.suppress(Exception):
                self._sftp.close()
            self._sftp = None
        if self._target is not None:
            self._target.close()
            self._target = None
        if self._via is not None:
            via, self._via = self._via, None
            self._hops.release(via)

    def __enter__(self) -> SSHConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _short(command: str, limit: int = 60) -> str:
    return command if len(command) <= limit else command[: limit - 3] + "..."


def connect(route: Route, options: ConnectOptions | None = None, *, hops: HopPool | None = None) -> SSHConnection:
    """Open a connection along ``route`` (bastions first), sharing the bastion links of ``hops``
    when given. Raises a :class:`TransportError`."""
    return SSHConnection(route, options, hops=hops)


class Connector:
    """Opens connections that share their bastions (the :class:`~fleetctl.ssh.seam.Connector` of a fleet)."""

    def __init__(self, options: ConnectOptions | None = None) -> None:
        self.options = options or ConnectOptions()
        self.hops = HopPool(self.options)

    def __call__(self, route: Route) -> SSHConnection:
        return SSHConnection(route, self.options, hops=self.hops)


def probe_host_key(route: Route, options: ConnectOptions | None = None) -> HostKeySeen:
    """The key the route's target offers now, neither judged nor logged in to (the bastions are
    judged and logged in to as usual): what ``fleetctl agents trust`` shows before it trusts."""
    with SSHConnection(route, options, probe=True) as connection:
        return connection.host_keys[-1]
