"""``fleetctl serve``: the long-running controller. APScheduler runs each leased agent's heartbeat
on its own interval (coalescing missed runs, never two of one agent at once), renews this
controller's leases every ``lease_s / 3`` (:mod:`fleetctl.store.leases`: on a shared store, several
controllers split the fleet and take over each other's agents) and, when a job driver is attached,
a scheduler tick that places, dispatches and collects jobs on the agents it leases.

A :class:`StoreError` that says the store itself is broken (damaged, read-only, refused) stops the
controller: it fails the same way on every later beat, so ``run_until`` re-raises it (one line,
non-zero exit). One that says the database server is unreachable or busy for now is logged and
the work retried; the leases lapse meanwhile, and another controller takes the agents over."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.jobstores.base import JobLookupError
from apscheduler.schedulers.background import BackgroundScheduler

from fleetctl._text import one_line
from fleetctl.errors import StoreError
from fleetctl.fleet import Fleet
from fleetctl.inventory.config import Agent
from fleetctl.jobs.driver import Driver
from fleetctl.store.leases import LeaseChange, Membership
from fleetctl.telemetry.snapshot import TelemetrySnapshot

log = logging.getLogger("fleetctl.serve")
RECORD_EVERY_S = 0.5


class Controller:
    def __init__(self, fleet: Fleet, *, driver: Driver | None = None) -> None:
        self.fleet = fleet
        self.driver = driver
        self.beats = 0
        self.failure: StoreError | None = None
        self._stopping = threading.Event()
        self._failed = threading.Event()
        self._idle = threading.Condition()
        self._active = 0
        # Beats are written in batches, one transaction per RECORD_EVERY_S (not one per beat): at
        # 1000 hosts every 5 s that is 2 transactions a second instead of 200.
        # Each beat with the lease it was taken under (controller id, token): written only if still held.
        self._pending: list[tuple[TelemetrySnapshot, str, int | None]] = []
        self._pending_lock = threading.Lock()
        # On a store that is not shared (the SQLite file) the state dir's lock already makes this the only controller.
        self.membership = Membership(fleet.hosts.store, fleet.inventory.names(), fleet.settings.lease_s,
                                     sole=not fleet.hosts.store.shared)
        self._taken: set[str] = set()  # agents leased since the last tick: it reconciles their jobs first
        self._store_away_since: float | None = None  # monotonic time of the first failure in a streak
        self._scheduler = BackgroundScheduler(
            executors={"default": ThreadPoolExecutor(fleet.hosts.max_parallel_ssh), "tick": ThreadPoolExecutor(1),
                       "record": ThreadPoolExecutor(1), "leases": ThreadPoolExecutor(1)},
            job_defaults={"coalesce": True, "max_instances": 1},
            timezone=timezone.utc,
        )
        # "skipped: maximum number of running instances reached" is the design working, not news.
        logging.getLogger("apscheduler.scheduler").setLevel(logging.ERROR)
        logging.getLogger("apscheduler.executors").setLevel(logging.ERROR)

    def interval_of(self, agent: Agent) -> float:
        return agent.heartbeat_interval_s or self.fleet.settings.heartbeat_interval_s

    @property
    def id(self) -> str:
        return self.membership.id

    def start(self) -> None:
        """Join the store's controllers, take this one's share of the agents, start beating them."""
        change = self.membership.renew()  # a store that refuses this fails serve at once, one line
        now = datetime.now(timezone.utc)
        self._apply(change)
        # No misfire grace: a renewal running late (a loaded machine) must still run, never be skipped.
        self._scheduler.add_job(self._renew, "interval", seconds=self.membership.renew_every_s, id="leases",
                                executor="leases", next_run_time=now + timedelta(seconds=self.membership.renew_every_s),
                                misfire_grace_time=None)
        self._scheduler.add_job(self._record, "interval", seconds=RECORD_EVERY_S, id="record", executor="record",
                                next_run_time=now, misfire_grace_time=1)
        if self.driver is not None:
            tick_s = self.fleet.settings.scheduler_tick_s
            self._scheduler.add_job(self._tick, "interval", seconds=tick_s, id="jobs", executor="tick",
                                    next_run_time=now, misfire_grace_time=max(1, int(tick_s)))
        self._scheduler.start()
        log.info("controller %s: serving %d of %d agents", self.id, len(change.acquired), len(self.fleet.inventory))

    def _apply(self, change: LeaseChange) -> None:
        """Beat the agents just leased (first beats spread over one interval, so a takeover does not
        beat in lockstep), stop beating those given up."""
        if change.retired:
            log.warning("controller %s was given up for dead (stopped or cut off for longer than lease_s = %gs); "
                        "rejoined as %s", change.retired, self.membership.lease_s, self.id)
        for name in change.released:
            with contextlib.suppress(JobLookupError):
                self._scheduler.remove_job(f"heartbeat:{name}")
            self.fleet.hosts.drop(name)
        taken = [agent for agent in self.fleet.inventory if agent.name in change.acquired]
        now = datetime.now(timezone.utc)
        for position, agent in enumerate(taken):
            interval = self.interval_of(agent)
            first = now + timedelta(seconds=interval * position / max(1, len(taken)))
            self._scheduler.add_job(self._beat, "interval", seconds=interval, args=[agent], id=f"heartbeat:{agent.name}",
                                    next_run_time=first, misfire_grace_time=max(1, int(interval)), replace_existing=True)
        with self._pending_lock:
            self._taken |= change.acquired
        if self._scheduler.running and (change.acquired or change.released):
            log.info("controller %s: took %d agents, gave up %d; serving %d", self.id, len(change.acquired),
                     len(change.released), len(self.membership.fence.tokens))

    def _renew(self) -> None:
        def renew() -> None:
            try:
                change = self.membership.renew()
            except StoreError as exc:
                self._store_trouble(exc, "renewing leases")
                return
            self._apply(change)
            self._store_back()
        self._tracked(renew)

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

    def _store_trouble(self, exc: StoreError, doing: str) -> None:
        if not exc.transient:
            self._fail(exc)
            return
        # The server is away for now: the leases lapse, the next try may work. One line when it goes
        # away and one when it is back, not one per failed write.
        with self._pending_lock:
            first, self._store_away_since = self._store_away_since is None, self._store_away_since or time.monotonic()
        if first:
            log.warning("controller %s: store unavailable while %s: %s; retrying", self.id, doing, one_line(str(exc)))

    def _store_back(self) -> None:
        with self._pending_lock:
            since, self._store_away_since = self._store_away_since, None
        if since is not None:
            log.warning("controller %s: store reachable again after %.0fs", self.id, time.monotonic() - since)

    def _fail(self, exc: StoreError) -> None:
        """The first store failure wins; ``run_until`` stops and raises it."""
        with self._idle:
            if self.failure is None:
                self.failure = exc
        self._failed.set()

    def _beat(self, agent: Agent) -> None:
        def beat() -> None:
            fence = self.membership.fence
            if not fence.holds(agent.name):
                return  # the lease lapsed (a pause, the store away): not ours to beat until renewed
            snapshot = self.fleet.hosts.heartbeat_one(agent)
            if self._stopping.is_set():
                return  # stop() closed the connection under it: not a real miss
            with self._pending_lock:
                self._pending.append((snapshot, fence.controller, fence.tokens.get(agent.name)))
            self.beats += 1
        self._tracked(beat)

    def _record(self) -> None:
        self._tracked(self.flush)

    def flush(self) -> None:
        """Write the beats so far in one transaction and log each health change they made."""
        with self._pending_lock:
            pending, self._pending = self._pending, []
        fence = self.membership.fence
        # Beats of agents no longer held under the lease they were taken under (this process slept,
        # gave them up, or took them back since) are stale: not history.
        batch = [snapshot for snapshot, controller, token in pending
                 if fence.holds(snapshot.agent) and controller == fence.controller and fence.tokens.get(snapshot.agent) == token]
        if not batch:
            return
        try:
            changes = self.fleet.hosts.record(batch, fence)
        except StoreError as exc:
            self._store_trouble(exc, "writing heartbeats")
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
                if self.driver is not None:
                    with self._pending_lock:
                        taken, self._taken = self._taken, set()
                    fences = lambda: self.membership.fence  # noqa: E731  (read at each check: renewals go on)
                    try:
                        self.driver.take_over(taken, fences)
                    except BaseException:
                        with self._pending_lock:
                            self._taken |= taken  # the next tick tries again
                        raise
                    self.driver.tick(fences)
            except StoreError as exc:
                self._store_trouble(exc, "driving jobs")
            except Exception:  # one bad tick must not stop the controller; the next one retries
                log.exception("scheduler tick failed")
        self._tracked(tick)

    def stop(self, grace_s: float = 10.0) -> None:
        """Stop scheduling, abort in-flight SSH work, wait for the workers, close the store."""
        self._stopping.set()
        if self._scheduler.running:
            self._scheduler.shutdown(wait=False)
        self.fleet.hosts.close_connections()
        with self._idle:
            self._idle.wait_for(lambda: self._active == 0, timeout=grace_s)
        if self.failure is None:
            self.flush()  # the last beats are history too
            with contextlib.suppress(StoreError):
                self.membership.leave()  # the others take these agents at their next renewal
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
