"""The suite's one polling loop: wait on a condition with a deadline, never a fixed sleep.

``poll`` is the loop; ``wait_until`` answers whether the condition came true in time, ``wait_for``
fails the test (naming what it waited for) when it did not."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def poll(what: str, probe: Callable[[], T | None], timeout: float = 10.0, interval: float = 0.05) -> T:
    """The first value ``probe()`` returns that is neither None nor False; AssertionError naming
    ``what`` past ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value is not None and value is not False:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"no {what} within {timeout:g}s")
        time.sleep(interval)


def wait_until(condition: Callable[[], object], timeout: float = 10.0, interval: float = 0.05) -> bool:
    """True as soon as ``condition()`` is truthy; False once ``timeout`` seconds pass without it."""
    try:
        poll("condition", lambda: bool(condition()), timeout, interval)
    except AssertionError:
        return False
    return True


def wait_for(what: str, condition: Callable[[], object], timeout: float = 10.0) -> None:
    """Return once ``condition()`` is truthy; fail the test, naming ``what``, past ``timeout``."""
    poll(what, lambda: bool(condition()), timeout)
