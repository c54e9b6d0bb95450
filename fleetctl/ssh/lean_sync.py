"""Events and Conditions at a fraction of the memory, for objects fleetctl creates and keeps per
connection (a kept shell's wake-up, a handed-over transport's ``started`` flag, and, swapped in by
:mod:`fleetctl.ssh.lean_swap`, those of its own transports and channels).

``threading.Condition`` carries an instance dict, five bound methods copied into it and a deque
allocated up front even when nobody waits. These classes run CPython's own algorithm
(``Lib/threading.py``) with ``__slots__`` and a waiter list made on the first wait. They are never
installed into another library's modules: paramiko's own objects keep ``threading``'s.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from time import monotonic
from typing import Any

_allocate_lock = threading.Lock


class Condition:
    """``threading.Condition``: same methods, same semantics (CPython 3.11's algorithm)."""

    __slots__ = ("_lock", "_waiters")

    def __init__(self, lock: Any = None) -> None:
        self._lock: Any = threading.RLock() if lock is None else lock
        self._waiters: list[Any] | None = None

    def __enter__(self) -> bool:
        return bool(self._lock.__enter__())

    def __exit__(self, *args: Any) -> None:
        self._lock.__exit__(*args)

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        return bool(self._lock.acquire(blocking, timeout))

    def release(self) -> None:
        self._lock.release()

    def __repr__(self) -> str:
        return f"<Condition({self._lock}, {len(self._waiters or ())})>"

    def _release_save(self) -> Any:
        release_save = getattr(self._lock, "_release_save", None)  # RLock: give up every level
        if release_save is not None:
            return release_save()
        self._lock.release()
        return None

    def _acquire_restore(self, state: Any) -> None:
        acquire_restore = getattr(self._lock, "_acquire_restore", None)
        if acquire_restore is not None:
            acquire_restore(state)
        else:
            self._lock.acquire()

    def _is_owned(self) -> bool:
        is_owned = getattr(self._lock, "_is_owned", None)
        if is_owned is not None:
            return bool(is_owned())
        if self._lock.acquire(False):  # as CPython: a plain lock we can take was not held
            self._lock.release()
            return False
        return True

    def wait(self, timeout: float | None = None) -> bool:
        if not self._is_owned():
            raise RuntimeError("cannot wait on un-acquired lock")
        waiter = _allocate_lock()
        waiter.acquire()
        if self._waiters is None:
            self._waiters = []
        self._waiters.append(waiter)
        saved_state = self._release_save()
        gotit = False
        try:
            if timeout is None:
                waiter.acquire()
                gotit = True
            elif timeout > 0:
                gotit = waiter.acquire(True, timeout)
            else:
                gotit = waiter.acquire(False)
            return gotit
        finally:
            self._acquire_restore(saved_state)
            if not gotit:
                with contextlib.suppress(ValueError):  # notify took it meanwhile
                    self._waiters.remove(waiter)

    def wait_for(self, predicate: Callable[[], Any], timeout: float | None = None) -> Any:
        endtime = None
        waittime = timeout
        result = predicate()
        while not result:
            if waittime is not None:
                if endtime is None:
                    endtime = monotonic() + waittime
                else:
                    waittime = endtime - monotonic()
                    if waittime <= 0:
                        break
            self.wait(waittime)
            result = predicate()
        return result

    def notify(self, n: int = 1) -> None:
        if not self._is_owned():
            raise RuntimeError("cannot notify on un-acquired lock")
        waiters = self._waiters
        while waiters and n > 0:
            waiter = waiters[0]
            try:
                waiter.release()
            except RuntimeError:  # gave up (timed out) between our look and its removal
                pass
            else:
                n -= 1
            with contextlib.suppress(ValueError):
                waiters.remove(waiter)

    def notify_all(self) -> None:
        self.notify(len(self._waiters or ()))

    def _at_fork_reinit(self) -> None:  # threading calls it in a forked child (CPython's, the same)
        self._lock._at_fork_reinit()
        self._waiters = None


class Event:
    """``threading.Event``: same methods, same semantics (CPython 3.11's algorithm)."""

    __slots__ = ("_cond", "_flag")

    def __init__(self) -> None:
        self._cond = Condition(_allocate_lock())
        self._flag = False

    def __repr__(self) -> str:
        return f"<Event: {'set' if self._flag else 'unset'}>"

    def is_set(self) -> bool:
        return self._flag

    isSet = is_set  # noqa: N815 - threading.Event's old name; paramiko may call either

    def set(self) -> None:
        with self._cond:
            self._flag = True
            self._cond.notify_all()

    def clear(self) -> None:
        with self._cond:
            self._flag = False

    def wait(self, timeout: float | None = None) -> bool:
        with self._cond:
            signaled = self._flag
            if not signaled:
                signaled = self._cond.wait(timeout)
            return signaled

    def _at_fork_reinit(self) -> None:  # threading calls it on a Thread's Event in a forked child
        self._cond._at_fork_reinit()
