"""One thread reads every logged-in connection (see :mod:`fleetctl.ssh.loop` for why and when).

The reader waits on every handed-over socket at once (epoll) and, when one is readable, lets its
transport take the bytes and dispatch each whole packet in them; each second it lets the
transports with keepalives on send one when due. It never waits on a single connection: the
transport gives a connection a thread of its own back rather than let the reader block.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fleetctl.ssh.loop import Transport

# How often the reader looks at client keepalives (ServerAliveInterval) when nothing arrives, and
# how long it sleeps when no connection has them on (a keepalive set meanwhile waits that long).
_TICK_S = 1.0
_IDLE_S = 5.0

log = logging.getLogger(__name__)


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
            transport.reader_fd = transport.sock.fileno()
            self._selector.register(transport.reader_fd, selectors.EVENT_READ, transport)
            self._transports[transport.reader_fd] = transport
            if transport.keepalive_s:
                self._keepalives.add(transport)

    def release(self, transport: Transport) -> None:
        with self._lock:
            if self._transports.get(transport.reader_fd) is transport:
                del self._transports[transport.reader_fd]
                self._keepalives.discard(transport)
                with contextlib.suppress(KeyError, ValueError, OSError):
                    self._selector.unregister(transport.reader_fd)

    def watch(self, transport: Transport) -> None:
        """Send ``transport``'s keepalives from now on (or stop, for an interval of 0)."""
        with self._lock:
            if transport.keepalive_s and self._transports.get(transport.reader_fd) is transport:
                self._keepalives.add(transport)
            else:
                self._keepalives.discard(transport)

    def holds(self, transport: Transport) -> bool:
        return self._transports.get(transport.reader_fd) is transport

    def _loop(self) -> None:
        next_tick = time.monotonic() + _TICK_S
        while True:
            try:
                ready = self._selector.select(_TICK_S if self._keepalives else _IDLE_S)
            except OSError:  # a descriptor closed under select: look again
                ready = []
            for key, _ in ready:
                transport: Transport = key.data
                if self._transports.get(key.fd) is transport:  # not released meanwhile
                    self._call(transport, transport.on_readable)
            if time.monotonic() >= next_tick:
                next_tick = time.monotonic() + _TICK_S
                for transport in list(self._keepalives):
                    self._call(transport, transport.on_tick)

    def _call(self, transport: Transport, callback: Callable[[], None]) -> None:
        # The transports catch their own errors; anything escaping still ends only that one
        # connection, never this thread (which every other connection depends on).
        try:
            callback()
        except BaseException as exc:  # noqa: BLE001
            log.debug("ending %r after an unexpected error in the reader: %r", transport, exc)
            self.release(transport)
            with contextlib.suppress(BaseException):
                transport._finish()


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
