"""paramiko's Transport with its read loop in fleetctl's hands, so the loop can move between threads.

paramiko gives each connection a thread of its own that reads and dispatches the peer's packets.
Across a fleet that thread is most of a kept connection's memory: its stack keeps the pages the
handshake's crypto touched (about 34 KiB), plus Python's per-thread state, for as long as the
connection lives, while it reads one small packet a heartbeat. :class:`Transport` runs paramiko's
loop in its own thread only until login (the handshake, and the authentication, whose signing may
wait on an agent or a hardware key), then hands its socket to the process's one reader
(:mod:`fleetctl.ssh.reader`) and the thread ends. Callers are untouched: channels, events and sends
behave as with paramiko's own thread, since the same handlers run.

The reader must never wait for one host, or every host waits:

- it passes a packet to paramiko only once the whole packet is in, which needs the length in
  clear: AES-GCM (fleetctl's first choice) and the encrypt-then-MAC modes send it so. A connection
  on another cipher, or still logging in, keeps its own thread;
- before it lets paramiko handle a packet (whose handler may answer), it checks that an answer
  could go out at once: nobody else is mid-send and the socket (or, over a bastion, the channel's
  window and the bastion's own connection) has room. Otherwise the connection gets a thread of its
  own back, for good, and the reader goes on with the others.

A connection over a bastion's channel joins the reader only while the bastion's own connection is
read by it too (:class:`fleetctl.ssh.reader.ChannelWake` says when the channel has bytes).

This is the fast path; :mod:`fleetctl.ssh.fastpath` decides when it runs (tested paramiko
releases only; ``FLEETCTL_SSH_FAST=0`` for stock paramiko).
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import sys
import threading
import time

import paramiko
from paramiko import transport as _paramiko_transport
from paramiko.common import (
    DEBUG,
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

from fleetctl.ssh import lean_swap, lean_sync
from fleetctl.ssh.reader import Reader, shared_reader

_RECV = 1 << 16
# OpenSSH's own limit (PACKET_MAX_SIZE): a length above it is a broken or hostile peer.
MAX_PACKET = 256 * 1024
# How long the reader waits for another thread's send on a connection before it gives that
# connection a thread of its own (see _answer_could_block).
_SENDER_GRACE_S = 0.1
# Over a bastion's channel, an answer goes out at once while the channel's window holds a whole
# packet (paramiko's largest, plus framing).
_CHANNEL_ROOM = 32768 + 1024
# Times a connection may be taken back from the reader and rejoin it before it keeps its own thread.
_MAX_HAND_BACKS = 3
_REJOIN_AFTER_S = 10.0

_STARTED = lean_sync.Event()
log = logging.getLogger("fleetctl.ssh")
_STARTED.set()


class _End(Exception):
    """The peer disconnected, or a packet came for a channel that never was: end quietly."""


class Transport(paramiko.Transport):  # type: ignore[misc]
    # A connection's own thread wakes this often only to notice a local close. paramiko's 0.1 s
    # costs measurable idle CPU across hundreds of connections; close() shuts the socket down,
    # which wakes the thread at once anyway.
    _active_check_timeout = 10.0
    # Set by paramiko's __init__; declared for the type checker, as this class assigns them too.
    active: bool
    saved_exception: BaseException | None
    _expected_packet: tuple[int, ...]
    _started: threading.Event | lean_sync.Event  # threading.Thread's

    def __init__(self, sock: object) -> None:
        super().__init__(sock)
        lean_swap.lean_transport(self)
        self.over_channel = isinstance(sock, paramiko.Channel)  # a host behind a bastion
        self._hand_over_allowed = isinstance(sock, socket.socket) or self.over_channel
        self._hand_over_lock = threading.Lock()  # close() against the hand-over
        self._closing = False
        self._inbox = bytearray()
        self._reader: Reader | None = None
        self.reader_fd = -1
        self.keepalive_s = 0  # ServerAliveInterval: the reader sends these once it reads the connection
        self._reading_thread = 0  # ident of the thread that dispatches this connection's packets
        self._held: list[Message] = []
        self._hand_backs = 0
        self._handed_back_at = 0.0

    @property
    def handed_over(self) -> bool:
        """True while the shared reader, not a thread of this connection's own, reads it."""
        return self._reader is not None

    # ---- paramiko's Transport.run, in parts

    def run(self) -> None:
        self.sys = sys  # as paramiko: tells interpreter shutdown apart from real errors below
        _paramiko_transport._active_threads.append(self)
        self._read_here(handshake=True)

    def _read_here(self, handshake: bool = False) -> None:
        """paramiko's loop in the calling thread, until the connection ends or the reader takes it."""
        self._reading_thread = threading.get_ident()
        try:
            try:
                if handshake:
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
                if self.active:
                    self.saved_exception = exc
            try:
                self._finish()
            except Exception as exc:  # noqa: BLE001 - the connection is over either way; a thread never prints
                log.debug("closing %r after its loop ended: %r", self, exc)
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
        if not self.active:
            return  # as paramiko: nothing goes out on a dead connection
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
            self._log(DEBUG, f"unhandled message type {ptype} ({MSG_NAMES.get(ptype)!r})")
            reply = Message()
            reply.add_byte(cMSG_UNIMPLEMENTED)
            reply.add_int(m.seqno)
            self._send_message(reply)
        self.packetizer.complete_handshake()

    def _finish(self) -> None:
        """The end of paramiko's loop: wake every waiter, close the socket. Idempotent."""
        with contextlib.suppress(ValueError):
            _paramiko_transport._active_threads.remove(self)
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.release(self)  # before the socket closes: its descriptor number may be reused
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
        with contextlib.suppress(Exception):  # a bastion's channel over a dead bastion: closed is closed
            self.sock.close()

    def close(self) -> None:
        with self._hand_over_lock:
            self._closing = True  # no hand-over from here on
            handed_over = self._reader is not None
        if handed_over:
            self._finish()  # no thread of its own to do it
            return
        if isinstance(self.sock, socket.socket):
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)  # wakes its thread now, not at the next timeout
        super().close()

    # ---- the hand-over, and the reader's side

    def _clear_length(self) -> bool:
        packetizer = self.packetizer
        return bool(getattr(packetizer, "_Packetizer__aead_in", False) or getattr(packetizer, "_Packetizer__etm_in", False))

    def _via(self) -> Transport | None:
        """The bastion's connection this one runs over, if it is on the fast path too."""
        via = self.sock.get_transport() if self.over_channel else None
        return via if isinstance(via, Transport) else None

    def _hand_over(self) -> bool:
        if not (self._hand_over_allowed and self.is_authenticated() and self._clear_length()):
            return False
        if self._hand_backs and time.monotonic() - self._handed_back_at < _REJOIN_AFTER_S:
            return False
        if self.over_channel:
            via = self._via()
            if via is None or not via.handed_over:
                return False
        if self.in_kex or self._expected_packet or getattr(self.packetizer, "_Packetizer__remainder", b"x"):
            return False
        with self._hand_over_lock:
            if self._closing or not self.active or self.packetizer.closed:
                return False
            with contextlib.suppress(ValueError):
                _paramiko_transport._active_threads.remove(self)
            # Memory this connection keeps for nothing from here on: the handshake's timer (a
            # cancelled Thread with two Events), and this ending thread's `started` Event, which
            # only is_alive() and join() read: a set lean Event answers them the same.
            if hasattr(self.packetizer, "_Packetizer__timer"):
                self.packetizer._Packetizer__timer = None
            if isinstance(getattr(self, "_started", None), threading.Event) and self._started.is_set():
                self._started = _STARTED
            self._reader = shared_reader()
            self._reading_thread = self._reader.ident
            self._reader.adopt(self)
        return True

    def _read_on_own_thread(self) -> None:
        """Take this connection back from the reader: a thread of its own reads on from what the
        reader had buffered (paramiko's packetizer reads its buffer before the socket). It rejoins
        the reader when it can (a moment's contention on a busy bastion), up to a few times; after
        that it keeps its thread for good (a host that stopped reading)."""
        self._hand_backs += 1
        self._handed_back_at = time.monotonic()
        if self._hand_backs >= _MAX_HAND_BACKS:
            self._hand_over_allowed = False
        with self._hand_over_lock:
            reader, self._reader = self._reader, None
            if reader is None:
                return
            reader.release(self)
        self.packetizer._Packetizer__remainder = bytes(self._inbox)
        self._inbox.clear()
        threading.Thread(target=self._read_here, name=f"{self.name} (own reader)", daemon=True).start()

    def _answer_could_block(self) -> bool:
        """Would a send from here wait: another thread stuck mid-send, or a socket with no room?"""
        write_lock = getattr(self.packetizer, "_Packetizer__write_lock", None)
        # Another thread's send (a window adjust, the next request) takes microseconds: a short
        # wait tells that apart from a sender stuck on a host that stopped reading.
        if write_lock is None or not write_lock.acquire(True, _SENDER_GRACE_S):
            return True
        write_lock.release()
        if self.over_channel:
            via = self._via()
            if via is None or not via.handed_over or via._answer_could_block():
                return True
            return bool(self.sock.closed or self.sock.out_window_size < _CHANNEL_ROOM)
        room = select.poll()  # not select(): a fleet's descriptors run past its 1024 limit
        room.register(self.reader_fd, select.POLLOUT)
        return not room.poll(0)

    def _packet_size(self) -> int | None:
        """Bytes of the next whole packet in the inbox, None while fewer than 4 have come."""
        if len(self._inbox) < 4:
            return None
        if not self._clear_length():
            raise SSHException("the peer moved to a cipher that hides the packet length; reconnecting")
        length = int.from_bytes(self._inbox[:4], "big")
        block = int(getattr(self.packetizer, "_Packetizer__block_size_in", 16))
        # As OpenSSH: within its limit, and whole blocks (AEAD and encrypt-then-MAC leave the
        # length out of them). paramiko would read past a short length into the next packet.
        if length > MAX_PACKET or length < 5 or length % block:
            raise SSHException(f"the peer sent a malformed packet length ({length} bytes; at most {MAX_PACKET}, "
                               f"whole {block}-byte blocks)")
        return 4 + length + int(self.packetizer.get_mac_size_in())

    def _take(self) -> bytes | None:
        """What arrived: b"" at the end, None when woken before the bytes landed (look again)."""
        if self.over_channel:
            channel = self.sock
            if channel.recv_ready():  # only this thread empties the buffer: recv returns at once
                return bytes(channel.recv(_RECV))
            return b"" if channel.closed or channel.eof_received else None
        try:
            # os.read: paramiko's socket has a timeout, so it is non-blocking underneath, while
            # socket.recv would wait up to that timeout after a spurious wake-up.
            return os.read(self.reader_fd, _RECV)
        except (BlockingIOError, InterruptedError):
            return None

    def on_readable(self) -> bool:
        """Called by the reader: take what arrived, dispatch every whole packet in it. True: look
        again in a moment (a channel woke the reader just before its bytes landed)."""
        try:
            data = self._take()
            if data is None:
                return self.over_channel
            if not data:
                raise EOFError
            self._inbox += data
            while self.active and self._reader is not None:
                size = self._packet_size()
                if size is None or len(self._inbox) < size:
                    return False
                if self._answer_could_block():
                    self._read_on_own_thread()
                    return False
                if self.packetizer.need_rekey() and not self.in_kex:
                    self._send_kex_init()
                # The packetizer reads what it has buffered before its socket: give it one whole packet.
                self.packetizer._Packetizer__remainder = bytes(self._inbox[:size])
                del self._inbox[:size]
                ptype, message = self.packetizer.read_message()
                if self.packetizer._Packetizer__remainder:
                    raise SSHException("packet framing went out of step with the peer")
                self._dispatch(ptype, message)
        except _End:
            self._finish()
        except Exception as exc:  # noqa: BLE001 - as paramiko's thread: kept for the waiting caller
            if self.active:
                self.saved_exception = exc
            self._finish()
        return False

    def set_keepalive(self, interval: int) -> None:
        super().set_keepalive(interval)
        self.keepalive_s = interval
        reader = self._reader
        if reader is not None:
            reader.watch(self)

    def on_tick(self) -> None:
        """Called by the reader each second while keepalives are on: send one when it is due."""
        if self._answer_could_block():
            return  # busy sending already: the peer hears from us anyway
        with contextlib.suppress(Exception):  # one that cannot go out shows as the next read's failure
            self.packetizer._check_keepalive()
