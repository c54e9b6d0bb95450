"""One thread reads every logged-in connection (see :mod:`fleetctl.ssh.loop` for why and when).

The reader waits on every handed-over socket at once (epoll) and, when one is readable, lets its
transport take the bytes and dispatch each whole packet in them; each second it lets the
transports with keepalives on send one when due. It never waits on a single connection: the
transport gives a connection a thread of its own back rather than let the reader block.

A connection to a host behind a bastion runs over a channel of the bastion's connection, which has
no descriptor of its own. Its channel's buffer wakes the reader instead (:class:`ChannelWake`, set
as the buffer's event): when the bastion's packet carrying the bytes was read by this thread, the
host's transport is simply next in line; from another thread, a byte on the reader's wake pipe.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fleetctl.ssh.loop import Transport

# How often the reader looks at client keepalives (ServerAliveInterval) when nothing arrives, and
# how long it sleeps when no connection has them on (a keepalive set meanwhile waits that long).
_TICK_S = 1.0
_IDLE_S = 5.0
# A channel's buffer announces data just before it appends it: a transport woken a moment early
# is looked at again this soon, until its bytes are there.
_AGAIN_S = 0.001

log = logging.getLogger(__name__)


class ChannelWake:
    """Set as a channel buffer's event (paramiko's ``BufferedPipe.set_event``): each ``set()`` puts
    the transport reading that channel in the reader's line. ``transport`` None: wakes nobody."""

    __slots__ = ("reader", "transport")

    def __init__(self, reader: Reader | None, transport: Transport | None) -> None:
        self.reader = reader
        self.transport = transport

    def set(self) -> None:
        if self.reader is not None and self.transport is not None:
            self.reader.notify(self.transport)

    def clear(self) -> None:
        pass

    def is_set(self) -> bool:
        return False


NO_WAKE = ChannelWake(None, None)


class Reader:
    """The thread that reads every handed-over connection (one per process, started on first use)."""

    def __init__(self) -> None:
        self._selector = selectors.DefaultSelector()
        self._lock = threading.Lock()
        self._transports: dict[int, Transport] = {}
        self._channels: set[Transport] = set()  # transports over a bastion's channel
        self._ready: deque[Transport] = deque()
        self._again: set[Transport] = set()
        self._keepalives: set[Transport] = set()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._wake_pending = False
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._thread = threading.Thread(target=self._loop, name="fleetctl-ssh-reader", daemon=True)
        self._thread.start()

    @property
    def ident(self) -> int:
        return self._thread.ident or 0

    def adopt(self, transport: Transport) -> None:
        if transport.over_channel:
            with self._lock:
                self._channels.add(transport)
                if transport.keepalive_s:
                    self._keepalives.add(transport)
            # Outside the lock: set_event calls set() at once when bytes are already buffered.
            transport.sock.in_buffer.set_event(ChannelWake(self, transport))
            return
        with self._lock:
            transport.reader_fd = transport.sock.fileno()
            self._selector.register(transport.reader_fd, selectors.EVENT_READ, transport)
            self._transports[transport.reader_fd] = transport
            if transport.keepalive_s:
                self._keepalives.add(transport)

    def release(self, transport: Transport) -> None:
        if transport.over_channel:
            with self._lock:
                held = transport in self._channels
                self._channels.discard(transport)
                self._keepalives.discard(transport)
            if held:
                transport.sock.in_buffer.set_event(NO_WAKE)
            return
        with self._lock:
            if self._transports.get(transport.reader_fd) is transport:
                del self._transports[transport.reader_fd]
                self._keepalives.discard(transport)
                with contextlib.suppress(KeyError, ValueError, OSError):
                    self._selector.unregister(transport.reader_fd)

    def notify(self, transport: Transport) -> None:
        """``transport``'s channel has bytes (or closed): read it soon. Safe from any thread."""
        self._ready.append(transport)
        if threading.get_ident() != self._thread.ident and not self._wake_pending:
            self._wake_pending = True
            with contextlib.suppress(BlockingIOError):  # a full pipe wakes the reader anyway
                os.write(self._wake_w, b"w")

    def watch(self, transport: Transport) -> None:
        """Send ``transport``'s keepalives from now on (or stop, for an interval of 0)."""
        with self._lock:
            if transport.keepalive_s and self.holds(transport):
                self._keepalives.add(transport)
            else:
                self._keepalives.discard(transport)

    def holds(self, transport: Transport) -> bool:
        if transport.over_channel:
            return transport in self._channels
        return self._transports.get(transport.reader_fd) is transport

    def _loop(self) -> None:
        next_tick = time.monotonic() + _TICK_S
        while True:
            if self._ready:
                timeout = 0.0
            elif self._again:
                timeout = _AGAIN_S
            else:
                timeout = _TICK_S if self._keepalives else _IDLE_S
            try:
                ready = self._selector.select(timeout)
            except OSError:  # a descriptor closed under select: look again
                ready = []
            for key, _ in ready:
                transport: Transport | None = key.data
                if transport is None:  # the wake pipe: the transports are in self._ready
                    with contextlib.suppress(BlockingIOError):
                        os.read(self._wake_r, 4096)
                    self._wake_pending = False
                elif self._transports.get(key.fd) is transport:  # not released meanwhile
                    self._call(transport, transport.on_readable)
            self._read_channels()
            if time.monotonic() >= next_tick:
                next_tick = time.monotonic() + _TICK_S
                for transport in list(self._keepalives):
                    self._call(transport, transport.on_tick)

    def _read_channels(self) -> None:
        """Every channel transport woken since the last look (reading one may wake others: a
        bastion's packets feed its hosts' channels), then those woken a moment early."""
        again = self._again
        self._again = set()
        while self._ready:
            transport = self._ready.popleft()
            again.discard(transport)
            if transport in self._channels and self._call(transport, transport.on_readable):
                self._again.add(transport)
        for transport in again:
            if transport in self._channels and self._call(transport, transport.on_readable):
                self._again.add(transport)

    def _call(self, transport: Transport, callback: Callable[[], bool | None]) -> bool:
        # The transports catch their own errors; anything escaping still ends only that one
        # connection, never this thread (which every other connection depends on).
        try:
            return bool(callback())
        except BaseException as exc:  # noqa: BLE001
            log.debug("ending %r after an unexpected error in the reader: %r", transport, exc)
            self.release(transport)
            with contextlib.suppress(BaseException):
                transport._finish()
            return False


_shared: Reader | None = None
_shared_lock = threading.Lock()


def shared_reader() -> Reader:
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = Reader()
        return _shared


def _forget_in_child() -> None:
    # A forked child has no reader thread (only the forking thread survives a fork): its next
    # hand-over starts a reader of its own.
    global _shared, _shared_lock
    _shared, _shared_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_in_child)
