"""One thread reads every logged-in connection.

paramiko gives each connection a thread of its own that reads and dispatches the peer's packets.
Across a fleet that thread is most of a kept connection's memory: its stack keeps the pages the
handshake's crypto touched (about 34 KiB), plus Python's per-thread state, for as long as the
connection lives, while it reads one small packet a heartbeat. So :class:`Transport` runs
paramiko's loop in its own thread only until login (the handshake, and the authentication, whose
signing may wait on an agent or a hardware key), then hands its socket to the process's one
:class:`Reader` and the thread ends. The reader waits on every handed-over socket at once (epoll),
buffers what arrives, and passes each packet to paramiko only once the whole packet is in, so a
host that stalls mid-packet stalls nothing but itself. Callers are untouched: channels, events and
sends behave as with paramiko's own thread, since the same handlers run.

The whole-packet rule needs the packet length in clear: AES-GCM (fleetctl's first choice) and the
encrypt-then-MAC modes send it so. A connection on another cipher, over a bastion's channel, or
still logging in keeps paramiko's thread, as before.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import sys
import threading
import time

import paramiko
from paramiko import transport as _paramiko_transport
from paramiko.common import (
    MSG_DEBUG,
    MSG_DISCONNECT,
    MSG_IGNORE,
    MSG_KEXINIT,
    MSG_NAMES,
    MSG_UNIMPLEMENTED,
    cMSG_UNIMPLEMENTED,
)
from paramiko.message import Message
from paramiko.packet import NeedRekeyException
from paramiko.ssh_exception import MessageOrderError, SSHException

from fleetctl.ssh import lean_sync

_RECV = 1 << 16
# OpenSSH's own limit (PACKET_MAX_SIZE): a length above it is a broken or hostile peer.
MAX_PACKET = 256 * 1024
# How often the reader looks at client keepalives (ServerAliveInterval) when nothing arrives.
_TICK_S = 1.0
_IDLE_S = 5.0

lean_sync.install()
_STARTED = lean_sync.Event()
_STARTED.set()


class _End(Exception):
    """The peer disconnected, or a packet came for a channel that never was: end quietly."""


class Transport(paramiko.Transport):  # type: ignore[misc]
    # The transport thread wakes this often only to notice a local close. paramiko's 0.1 s costs
    # measurable idle CPU across hundreds of kept-open connections (1000 connections at 2 s were
    # still 4 % of a core); we close by shutting the socket down, which wakes it at once anyway.
    _active_check_timeout = 10.0
    # AES-GCM first: an AEAD cipher needs no separate MAC, and paramiko checks MACs with a
    # byte-by-byte Python loop, a third of a heartbeat's CPU. OpenSSH prefers GCM too. It also
    # sends the packet length in clear, which lets the reader take the connection over.
    _preferred_ciphers = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com",
                          *(c for c in paramiko.Transport._preferred_ciphers if "gcm" not in c))

    # Set by paramiko's __init__; declared for the type checker, as this class assigns them too.
    active: bool
    saved_exception: BaseException | None
    _expected_packet: tuple[int, ...]
    _started: threading.Event | lean_sync.Event  # threading.Thread's

    def __init__(self, sock: object) -> None:
        super().__init__(sock)
        # A bastion's channel has no descriptor to wait on: that connection keeps its own thread.
        self._hand_over_allowed = isinstance(sock, socket.socket)
        self._inbox = bytearray()
        self._reader: Reader | None = None
        self._reader_fd = -1
        self._keepalive_s = 0  # ServerAliveInterval: the reader sends these once it reads the connection
        self._reading_thread = 0  # ident of the thread that dispatches this connection's packets
        self._held: list[Message] = []

    @property
    def handed_over(self) -> bool:
        """True once the shared reader, not a thread of this connection's own, reads it."""
        return self._reader is not None

    # paramiko's Transport.run, in two parts: the handshake and the message loop run in this
    # thread; after login the loop ends here and the reader goes on with the same dispatch.
    def run(self) -> None:
        self.sys = sys  # as paramiko: tells interpreter shutdown apart from real errors below
        self._reading_thread = threading.get_ident()
        _paramiko_transport._active_threads.append(self)
        try:
            try:
                self.packetizer.write_all(f"{self.local_version}\r\n".encode())
                self._check_banner()
                self.packetizer.start_handshake(self.handshake_timeout)
                self._send_kex_init()
                self._expect_packet(MSG_KEXINIT)
                while self.active:
                    if self._hand_over():
                        return
                    if self.packetizer.need_rekey() and not self.in_kex:
                        self._send_kex_init()
                    try:
                        ptype, message = self.packetizer.read_message()
                    except NeedRekeyException:
                        continue
                    self._dispatch(ptype, message)
            except _End:
                pass
            except Exception as exc:  # noqa: BLE001 - as paramiko: kept for the waiting caller
                self.saved_exception = exc
            self._finish()
        except BaseException:
            if self.sys.modules is not None:  # not interpreter shutdown
                raise

    def _send_user_message(self, data: Message) -> None:
        # A handler answering the peer (a channel's close, a refused request) while keys are being
        # exchanged: paramiko waits for the exchange to end, but only this thread can end it, so it
        # stalls for clear_to_send_timeout and drops the connection (and with one reader, every
        # connection would stall). Hold the answer; it goes out, in order, once the exchange ends.
        if threading.get_ident() != self._reading_thread:
            super()._send_user_message(data)
            return
        with self.clear_to_send_lock:  # another thread starting an exchange clears it under this lock
            if self.clear_to_send.is_set():
                self._send_message(data)
                return
        self._held.append(data)  # only this thread ends an exchange, so it cannot end meanwhile

    def _dispatch(self, ptype: int, m: Message) -> None:
        self._dispatch_one(ptype, m)
        if self._held and self.clear_to_send.is_set():
            held, self._held = self._held, []
            for message in held:
                self._send_user_message(message)

    def _dispatch_one(self, ptype: int, m: Message) -> None:
        """One packet, exactly as paramiko's own loop handles it (5.x)."""
        if ptype == MSG_IGNORE:
            self._enforce_strict_kex(ptype)
            return
        if ptype == MSG_DISCONNECT:
            self._parse_disconnect(m)
            raise _End
        if ptype == MSG_DEBUG:
            self._enforce_strict_kex(ptype)
            self._parse_debug(m)
            return
        if len(self._expected_packet) > 0:
            if ptype not in self._expected_packet:
                error = MessageOrderError if self.agreed_on_strict_kex else SSHException
                raise error(f"Expecting packet from {self._expected_packet!r}, got {ptype:d}")
            self._expected_packet = ()
            if 30 <= ptype <= 41:  # key exchange, the messages differ by algorithm
                self.kex_engine.parse_next(ptype, m)
                return
        if ptype in self._handler_table:
            error_msg = self._ensure_authed(ptype, m)
            if error_msg:
                self._send_message(error_msg)
            else:
                self._handler_table[ptype](m)
        elif ptype in self._channel_handler_table:
            chanid = m.get_int()
            chan = self._channels.get(chanid)
            if chan is not None:
                self._channel_handler_table[ptype](chan, m)
            elif chanid not in self.channels_seen:
                raise _End  # as paramiko: a channel that never existed ends the connection
        elif self.auth_handler is not None and ptype in self.auth_handler._handler_table:
            self.auth_handler._handler_table[ptype](m)
            if len(self._expected_packet) > 0:
                return
        elif ptype != MSG_UNIMPLEMENTED:
            self._log(paramiko.common.DEBUG, f"unhandled message type {ptype} ({MSG_NAMES.get(ptype)!r})")
            reply = Message()
            reply.add_byte(cMSG_UNIMPLEMENTED)
            reply.add_int(m.seqno)
            self._send_message(reply)
        self.packetizer.complete_handshake()

    def _finish(self) -> None:
        """The end of paramiko's loop: wake every waiter, close the socket."""
        with contextlib.suppress(ValueError):
            _paramiko_transport._active_threads.remove(self)
        if self._reader is not None:
            self._reader.release(self)  # before the socket closes: its descriptor number may be reused
        for chan in list(self._channels.values()):
            chan._unlink()
        if self.active:
            self.active = False
            self.packetizer.close()
            if self.completion_event is not None:
                self.completion_event.set()
            if self.auth_handler is not None:
                self.auth_handler.abort()
            for event in self.channel_events.values():
                event.set()
            with self.lock:
                self.server_accept_cv.notify()
        self.sock.close()

    def close(self) -> None:
        if self._reader is None:
            super().close()  # paramiko's: stops this connection's own thread, which wakes the waiters
        else:
            self._finish()  # no thread of its own to do it

    # ---- the hand-over and the reader's side

    def _clear_length(self) -> bool:
        packetizer = self.packetizer
        return bool(getattr(packetizer, "_Packetizer__aead_in", False) or getattr(packetizer, "_Packetizer__etm_in", False))

    def _hand_over(self) -> bool:
        if not (self._hand_over_allowed and self.is_authenticated() and self._clear_length()):
            return False
        if self.in_kex or self._expected_packet or getattr(self.packetizer, "_Packetizer__remainder", b"x"):
            return False
        with contextlib.suppress(ValueError):
            _paramiko_transport._active_threads.remove(self)
        # Memory this connection keeps for nothing from here on: the handshake's timer (a cancelled
        # Thread with two Events), and this ending thread's own `started` Event, which only
        # is_alive() and join() read: a set lean Event answers them the same.
        if hasattr(self.packetizer, "_Packetizer__timer"):
            self.packetizer._Packetizer__timer = None
        if isinstance(getattr(self, "_started", None), threading.Event) and self._started.is_set():
            self._started = _STARTED
        self._reader = shared_reader()
        self._reading_thread = self._reader.ident
        self._reader.adopt(self)
        return True

    def _packet_size(self) -> int | None:
        """Bytes of the next whole packet in the inbox, None while fewer than 4 have come."""
        if len(self._inbox) < 4:
            return None
        if not self._clear_length():
            raise SSHException("the peer moved to a cipher that hides the packet length; reconnecting")
        length = int.from_bytes(self._inbox[:4], "big")
        if length > MAX_PACKET:
            raise SSHException(f"the peer sent a {length}-byte packet, over the {MAX_PACKET}-byte limit")
        return 4 + length + int(self.packetizer.get_mac_size_in())

    def _on_readable(self) -> None:
        """Called by the reader: take what arrived, dispatch every whole packet in it."""
        try:
            try:
                data = self.sock.recv(_RECV)
            except (TimeoutError, BlockingIOError, InterruptedError):
                return
            if not data:
                raise EOFError
            self._inbox += data
            while self.active:
                size = self._packet_size()
                if size is None or len(self._inbox) < size:
                    return
                if self.packetizer.need_rekey() and not self.in_kex:
                    self._send_kex_init()
                # The packetizer reads what it has buffered before its socket: give it one whole packet.
                self.packetizer._Packetizer__remainder = bytes(self._inbox[:size])
                del self._inbox[:size]
                ptype, message = self.packetizer.read_message()
                self._dispatch(ptype, message)
        except _End:
            self._finish()
        except Exception as exc:  # noqa: BLE001 - as paramiko's thread: kept for the waiting caller
            self.saved_exception = exc
            self._finish()

    def set_keepalive(self, interval: int) -> None:
        super().set_keepalive(interval)
        self._keepalive_s = interval
        if self._reader is not None:
            self._reader.watch(self)

    def _on_tick(self) -> None:
        with contextlib.suppress(Exception):  # a keepalive that cannot go out shows as the next read's failure
            self.packetizer._check_keepalive()


class Reader:
    """The thread that reads every handed-over connection (one per process, started on first use)."""

    def __init__(self) -> None:
        self._selector = selectors.DefaultSelector()
        self._lock = threading.Lock()
        self._transports: dict[int, Transport] = {}
        self._keepalives: set[Transport] = set()
        self._thread = threading.Thread(target=self._loop, name="fleetctl-ssh-reader", daemon=True)
        self._thread.start()

    @property
    def ident(self) -> int:
        return self._thread.ident or 0

    def adopt(self, transport: Transport) -> None:
        with self._lock:
            transport._reader_fd = transport.sock.fileno()
            self._selector.register(transport._reader_fd, selectors.EVENT_READ, transport)
            self._transports[transport._reader_fd] = transport
            if transport._keepalive_s:
                self._keepalives.add(transport)

    def watch(self, transport: Transport) -> None:
        """Send ``transport``'s keepalives from now on (or stop, for an interval of 0)."""
        with self._lock:
            if transport._keepalive_s and transport._reader_fd in self._transports:
                self._keepalives.add(transport)
            else:
                self._keepalives.discard(transport)

    def release(self, transport: Transport) -> None:
        with self._lock:
            if self._transports.get(transport._reader_fd) is transport:
                del self._transports[transport._reader_fd]
                self._keepalives.discard(transport)
                with contextlib.suppress(KeyError, ValueError, OSError):
                    self._selector.unregister(transport._reader_fd)

    def _loop(self) -> None:
        next_tick = time.monotonic() + _TICK_S
        while True:
            try:
                # Idle with no keepalives to send: wake rarely (a keepalive set meanwhile waits a little).
                ready = self._selector.select(_TICK_S if self._keepalives else _IDLE_S)
            except OSError:  # a descriptor closed under select: look again
                ready = []
            for key, _ in ready:
                transport: Transport = key.data
                if self._transports.get(key.fd) is transport:  # not released meanwhile
                    transport._on_readable()
            if time.monotonic() >= next_tick:
                next_tick = time.monotonic() + _TICK_S
                for transport in list(self._keepalives):
                    transport._on_tick()


_shared: Reader | None = None
_shared_lock = threading.Lock()


def shared_reader() -> Reader:
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = Reader()
        return _shared
