"""The lean Event and Condition behave as threading's (fleetctl/ssh/lean_sync.py)."""

from __future__ import annotations

import sys
import threading
import time

import pytest

from fleetctl.ssh.lean_sync import Condition, Event


def _start(target: object, count: int) -> list[threading.Thread]:
    threads = [threading.Thread(target=target, daemon=True) for _ in range(count)]  # type: ignore[arg-type]
    for thread in threads:
        thread.start()
    return threads


def test_event_set_wakes_every_waiter_and_clear_resets() -> None:
    event = Event()
    woken: list[bool] = []
    threads = _start(lambda: woken.append(event.wait(10)), 5)
    deadline = time.monotonic() + 5
    while len(event._cond._waiters or ()) < 5 and time.monotonic() < deadline:
        time.sleep(0.005)
    event.set()
    for thread in threads:
        thread.join(5)
    assert woken == [True] * 5 and event.is_set() and event.isSet()
    event.clear()
    assert not event.is_set()
    started = time.monotonic()
    assert event.wait(0.05) is False
    assert time.monotonic() - started >= 0.04
    assert event.wait(0) is False


def test_condition_notify_wakes_one_then_all_and_wait_for_times_out() -> None:
    condition = Condition(threading.Lock())
    woken: list[int] = []

    def waiter() -> None:
        with condition:
            if condition.wait(10):
                woken.append(1)

    threads = _start(waiter, 3)
    deadline = time.monotonic() + 5
    while len(condition._waiters or ()) < 3 and time.monotonic() < deadline:
        time.sleep(0.005)
    with condition:
        condition.notify()
    deadline = time.monotonic() + 5
    while not woken and time.monotonic() < deadline:
        time.sleep(0.005)
    assert woken == [1]
    with condition:
        condition.notify_all()
    for thread in threads:
        thread.join(5)
    assert woken == [1, 1, 1] and not condition._waiters
    with condition:
        assert condition.wait_for(lambda: False, timeout=0.02) is False
        assert condition.wait_for(lambda: 7) == 7


def test_condition_refuses_an_unheld_lock_and_works_with_an_rlock() -> None:
    with pytest.raises(RuntimeError):
        Condition(threading.Lock()).wait(0)
    with pytest.raises(RuntimeError):
        Condition(threading.Lock()).notify()
    reentrant = Condition()  # an RLock, held twice: wait gives up both levels, then takes both back
    with reentrant, reentrant:
        assert reentrant.wait(0.01) is False
        assert reentrant._is_owned()
    assert not reentrant._is_owned()


def test_import_fleetctl_leaves_paramikos_modules_untouched() -> None:
    """Nothing fleetctl does changes paramiko for other code in the process (issue 19)."""
    import subprocess

    probe = ("import threading, logging, paramiko.transport, paramiko.channel, paramiko.buffered_pipe, paramiko.auth_handler\n"
             "before = {n: logging.getLogger(n).handlers[:] for n in ('paramiko', 'paramiko.transport')}\n"
             "import fleetctl, fleetctl.ssh, fleetctl.ssh.loop, fleetctl.ssh.connection\n"
             "mods = (paramiko.transport, paramiko.channel, paramiko.buffered_pipe, paramiko.auth_handler)\n"
             "assert all(m.threading is threading for m in mods), [m.threading for m in mods]\n"
             "assert all(logging.getLogger(n).handlers == h for n, h in before.items())\n"
             "assert logging.getLogger('paramiko').propagate\n"
             "import paramiko.config\n"
             "assert getattr(paramiko.config, 'invoke', None) is None or type(paramiko.config.invoke).__name__ == 'module'\n")
    subprocess.run([sys.executable, "-c", probe], check=True)


def test_a_lean_event_is_far_smaller_than_threadings() -> None:
    def size(event: object) -> int:
        seen, stack, total = set(), [event], 0
        while stack:
            obj = stack.pop()
            if id(obj) in seen or isinstance(obj, type):
                continue
            seen.add(id(obj))
            total += sys.getsizeof(obj)
            stack.extend(getattr(obj, "__dict__", {}).values())
            stack.extend(getattr(obj, slot) for slot in getattr(type(obj), "__slots__", ()) if hasattr(obj, slot))
        return total

    assert size(Event()) * 4 < size(threading.Event())
