"""Start several forked processes at once (a barrier releases them together) and collect each
one's outcome: None for success, else the error text it put on the queue."""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from typing import Any

Target = Callable[[Any, Barrier, "Queue[str | None]"], None]


def run_together(target: Target, argument: Any, count: int, timeout: float = 60) -> list[str | None]:
    forked = multiprocessing.get_context("fork")
    barrier, outcomes = forked.Barrier(count), forked.Queue()
    processes = [forked.Process(target=target, args=(argument, barrier, outcomes)) for _ in range(count)]
    for process in processes:
        process.start()
    try:
        return [outcomes.get(timeout=timeout) for _ in processes]
    finally:
        for process in processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
                process.join()
