"""``fleetctl serve``: the long-running controller. APScheduler runs each agent's heartbeat on its
own interval (coalescing missed runs, never two of one agent at once) and, when a job runner is
attached, a scheduler tick that places, dispatches and collects jobs.

A :class:`StoreError` in a heartbeat or a tick stops the controller: a damaged or read-only store
fails the same way on every later beat, so ``run_until`` re-raises it (one line, non-zero exit)
instead of logging the same traceback forever."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import datetime, timedelta, timezone

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler

from fleetctl.config import Agent
from fleetctl.errors import StoreError
from fleetctl.fleet import Fleet
from fleetctl.telemetry import TelemetrySnapshot
from fleetctl.text import one_line

log = logging.getLogger("fleetctl.serve")
RECORD_EVERY_S = 0.5


class Controller:
    def __init__(self, fleet: Fleet, *, tick: Callable[[], None] | None = None) -> None:
        self.fleet = fleet
        self.tick = tick
        self.beats = 0
        self.failure: StoreError | None = None
        self._stopping = threading.Event()
        self._failed = threading.Event()
        self._idle = threading.Condition()
        self._active = 0
        # Beats are written in batches, one transaction per RECORD_EVERY_S (not one per beat): at
        # 1000 hosts every 5 s that is 2 transactions a second instead of 200.
        self._pending: list[TelemetrySnapshot] = []
        self._pending_lock = threading.Lock()
        self._scheduler = BackgroundScheduler(
            executors={"default": ThreadPoolExecutor(fleet.max_parallel_ssh), "tick": ThreadPoolExecutor(1),
                       "record": ThreadPoolExecutor(1)},
            job_defaults={"coalesce": True, "max_instances": 1},
            timezone=timezone.utc,
        )
        # "skipped: maximum number of running instances reached" is the design working, not news.
        logging.getLogger("apscheduler.scheduler").setLevel(logging.ERROR)
        logging.getLogger("apscheduler.executors").setLevel(logging.ERROR)

    def interval_of(self, agent: Agent) -> float:
        return agent.heartbeat_interval_s or self.fleet.settings.heartbeat_interval_s

    def start(self) -> None:
        agents = list(self.fleet.inventory)
        now = datetime.now(timezone.utc)
        for position, agent in enumerate(agents):
            interval = self.interval_of(agent)
            # Spread first beats over one interval so a big fleet does not beat in lockstep.
            first = now + timedelta(seconds=interval * position / max(1, len(agents)))
            self._scheduler.add_job(self._beat, "interval", seconds=interval, args=[agent], id=f"heartbeat:{agent.name}",
                                    next_run_time=first, misfire_grace_time=max(1, int(interval)))
        self._scheduler.add_job(self._record, "interval", seconds=RECORD_EVERY_S, id="record", executor="record",
                                next_run_time=now, misfire_grace_time=1)
        if self.tick is not None:
            tick_s = self.fleet.settings.scheduler_tick_s
            self._scheduler.add_job(self._tick, "interval", seconds=tick_s, id="jobs", executor="tick",
                                    next_run_time=now, misfire_grace_time=max(1, int(tick_s)))
        self._scheduler.start()
        log.info("serving %d agents", len(agents))

    def _tracked(self, work: Callable[[], None]) -> None:
        with self._idle:
            if self._stopping.is_set():
                return
            self._active += 1
        try:
            work()
        finally:
            with self._idle:
                self._active -= 1
                self._idle.notify_all()

    def _fail(self, exc: StoreError) -> None:
        """The first store failure wins; ``run_until`` stops and raises it."""
        with self._idle:
            if self.failure is None:
                self.failure = exc
        self._failed.set()

    def _beat(self, agent: Agent) -> None:
        def beat() -> None:
            snapshot = self.fleet.heartbeat_one(agent)
            if self._stopping.is_set():
                return  # stop() closed the connection under it: not a real miss
            with self._pending_lock:
                self._pending.append(snapshot)
            self.beats += 1
        self._tracked(beat)

    def _record(self) -> None:
        self._tracked(self.flush)

    def flush(self) -> None:
        """Write the beats so far in one transaction and log each health change they made."""
        with self._pending_lock:
            batch, self._pending = self._pending, []
        if not batch:
            return
        try:
            changes = self.fleet.record(batch)
        except StoreError as exc:
            self._fail(exc)
            return
        errors = {snapshot.agent: snapshot for snapshot in batch}
        for change in changes:
            snapshot = errors[change.agent]
            # The error is the host's text: one line, control characters made visible, in the log.
            detail = f" ({snapshot.status}: {one_line(snapshot.error)})" if snapshot.error else ""
            log.warning("%s %s -> %s%s", change.agent, change.before, change.after, detail)

    def _tick(self) -> None:
        def tick() -> None:
            try:
                if self.tick is not None:
                    self.tick()
            except StoreError as exc:
                self._fail(exc)
            except Exception:  # one bad tick must not stop the controller; the next one retries
                log.exception("scheduler tick failed")
        self._tracked(tick)

    def stop(self, grace_s: float = 10.0) -> None:
        """Stop scheduling, abort in-flight SSH work, wait for the workers, close the store."""
        self._stopping.set()
        if self._scheduler.running:
            self._scheduler.shutdown(wait=False)
        self.fleet.close_connections()
        with self._idle:
            self._idle.wait_for(lambda: self._active == 0, timeout=grace_s)
        if self.failure is None:
            self.flush()  # the last beats are history too
        self.fleet.close()

    def run_until(self, stop: threading.Event) -> None:
        """Serve until ``stop`` is set; raises the :class:`StoreError` that stopped it, if one did."""
        self.start()
        try:
            while not stop.wait(0.5) and not self._failed.is_set():
                pass
        finally:
            self.stop()
        if self.failure is not None:
            raise self.failure
