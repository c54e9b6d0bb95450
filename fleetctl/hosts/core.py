"""``Hosts``: the host core below jobs. The agents of an inventory, one kept-open SSH connection per
agent, heartbeat rounds over a bounded pool (every host gets a snapshot, whatever fails), fan-out,
history and health. It knows nothing of jobs: ``fleetctl.jobs`` builds on it, and ``Fleet``
(``fleet.py``) is the facade over both."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from fleetctl._durations import utc
from fleetctl.errors import ConnectionLost, FleetError
from fleetctl.hosts import fanout
from fleetctl.inventory.config import Agent, Inventory, load_config
from fleetctl.inventory.routes import HopView, describe_route, resolver_for, route_for
from fleetctl.paths import state_dir as resolve_state_dir
from fleetctl.settings import ControllerSettings, default_of
from fleetctl.ssh import ConnectOptions, Connector, HostKeyPolicy
from fleetctl.ssh.known_hosts import KnownHosts
from fleetctl.ssh.resolve import SshConfigResolver
from fleetctl.ssh.seam import Connection, Route
from fleetctl.ssh.seam import Connector as TransportConnector
from fleetctl.store import Store, open_store
from fleetctl.store.leases import Fence
from fleetctl.telemetry.frames import to_dataframe
from fleetctl.telemetry.gpu_health import table_with
from fleetctl.telemetry.health import Health, HealthPolicy
from fleetctl.telemetry.health_beat import HostMemory, health_script, remembered
from fleetctl.telemetry.heartbeat import MAX_STDERR as HEARTBEAT_MAX_STDERR
from fleetctl.telemetry.heartbeat import MAX_STDOUT as HEARTBEAT_MAX_STDOUT
from fleetctl.telemetry.heartbeat import crashed_snapshot, failed_snapshot, heartbeat_command, snapshot_from_result
from fleetctl.telemetry.history import Transition, agent_statuses, history, prune, set_draining
from fleetctl.telemetry.history import record as record_history
from fleetctl.telemetry.quarantine import GpuEvent, StoredHost, load_memory
from fleetctl.telemetry.snapshot import TelemetrySnapshot

if TYPE_CHECKING:
    from typing import Self

    import pandas as pd

DEFAULT_MAX_PARALLEL_SSH: int = default_of(ControllerSettings, "max_parallel_ssh")
PRUNE_EVERY_S = 3600.0
T = TypeVar("T")


@dataclass
class HeartbeatRound:
    """Every agent's snapshot from one round."""

    snapshots: list[TelemetrySnapshot] = field(default_factory=list)
    duration_s: float = 0.0
    transitions: list[Transition] = field(default_factory=list)  # agents whose health changed

    def __iter__(self) -> Iterator[TelemetrySnapshot]:
        return iter(self.snapshots)

    def __len__(self) -> int:
        return len(self.snapshots)

    @property
    def ok(self) -> list[TelemetrySnapshot]:
        return [s for s in self.snapshots if s.ok]

    @property
    def failed(self) -> list[TelemetrySnapshot]:
        return [s for s in self.snapshots if not s.ok]

    def to_dataframe(self) -> pd.DataFrame:
        return to_dataframe(self.snapshots)

    def _repr_html_(self) -> str:
        return str(self.to_dataframe().to_html(index=False, na_rep=""))

    def __repr__(self) -> str:
        return f"<HeartbeatRound {len(self.ok)} ok, {len(self.failed)} failed, {self.duration_s:.2f}s>"


def _tap(snapshot: TelemetrySnapshot, on_done: Callable[[TelemetrySnapshot], None]) -> TelemetrySnapshot:
    on_done(snapshot)
    return snapshot


class Hosts:
    """The agents of an inventory, and the connections to them."""

    def __init__(self, inventory: Inventory, *, state_dir: str | os.PathLike[str] | None = None,
                 max_parallel_ssh: int | None = None, connector: Connector | None = None,
                 accept_any_host_key: bool = False, store: str | None = None) -> None:
        self.inventory = inventory
        # defaults < [controller] < $FLEETCTL_* < these arguments (fleetctl.settings), each value with its source.
        self.layered = inventory.layered(store=store, max_parallel_ssh=max_parallel_ssh or None)
        self.settings = self.layered.settings
        self.store_url = self.settings.store or None  # None is the SQLite file in the state dir
        self.state_dir = Path(resolve_state_dir(state_dir))
        self.max_parallel_ssh = self.settings.max_parallel_ssh
        self.health_policy = HealthPolicy(self.settings.offline_after_misses, self.settings.offline_grace_s)
        # The GPU health judgment with the [controller] gpu_health overrides; a bad one fails here, at load.
        self.health_table = table_with(self.settings.gpu_health)
        self.gpu_health_checks = self.settings.gpu_health_checks
        # Per host: the health fields its driver answers, its bus ids, its journal cursor (health_beat.HostMemory).
        self._gpu_memory: dict[str, HostMemory] = {}
        self._gpu_written: dict[str, tuple[object, ...]] = {}  # hosts whose stored GPU health is all ok (quarantine.apply)
        self.gpu_events: list[GpuEvent] = []  # what the last record() did to GPUs (quarantined, recovered, ...)
        self._store: Store | None = None
        self._pruned_at = -PRUNE_EVERY_S
        self.connect_options = ConnectOptions(host_keys=HostKeyPolicy(KnownHosts.default(self.state_dir),
                                                                      accept_any_host_key),
                                              hop_retry_after_s=self.settings.hop_retry_after_s,
                                              handshakes_per_sshd=self.settings.handshakes_per_sshd)
        # One Connector for the fleet: hosts behind the same bastion share one connection to it.
        self._connect: TransportConnector = connector or Connector(self.connect_options)
        self._connections: dict[str, Connection] = {}
        self._locks: dict[str, threading.Lock] = {a.name: threading.Lock() for a in inventory}
        self._routes: dict[str, Route] = {}
        # ssh_config is resolved once per agent (cached by the resolver), never per heartbeat.
        self.resolver = resolver_for(self.settings, state_dir=self.state_dir)
        self._plain_resolver = resolver_for(self.settings, enabled=False)
        self._executor: ThreadPoolExecutor | None = None
        self._closing = False
        self._connect_locks: dict[str, threading.Lock] = {}

    @classmethod
    def from_config(cls, path: str | os.PathLike[str] | None = None, **kwargs: object) -> Self:
        """The fleet of an inventory file. With no file there, history and jobs still read from
        the state dir; heartbeats, submits and anything else that needs agents say "no inventory"."""
        return cls(load_config(path, missing_ok=True), **kwargs)  # type: ignore[arg-type]

    @property
    def agents(self) -> list[Agent]:
        return list(self.inventory)

    def _resolver(self, agent: Agent) -> SshConfigResolver:
        return self._plain_resolver if agent.ssh_config is False else self.resolver

    def _route(self, agent: Agent) -> Route:
        if agent.name not in self._routes:
            self._routes[agent.name] = route_for(agent, self._resolver(agent))
        return self._routes[agent.name]

    def describe_route(self, name: str) -> list[HopView]:
        """Each hop to ``name`` with where every value came from (``agents show``)."""
        agent = self.inventory.get(name)
        return describe_route(agent, self._resolver(agent))

    def forget_route(self, name: str) -> None:
        """Resolve ``name`` again on next use (its inventory entry changed) and drop its connection."""
        self._routes.pop(name, None)
        self.drop(name)

    def route(self, name: str) -> Route:
        """How ``name`` is reached: every hop as ssh_config resolved it (raises ConfigError)."""
        return self._route(self.inventory.get(name))

    def connection(self, agent: Agent) -> Connection:
        """The open connection to ``agent``, opened (again) if there is none or it died. Safe
        from several threads (serve's heartbeat and job tick share connections)."""
        if self._closing:
            raise ConnectionLost(f"not connecting to {agent.name}: the fleet is closing")
        with self._connect_locks.setdefault(agent.name, threading.Lock()):
            current = self._connections.get(agent.name)
            if current is not None and current.is_open:
                return current
            if current is not None:
                current.close()
            fresh = self._connect(self._route(agent))
            self._connections[agent.name] = fresh
            return fresh

    def drop(self, name: str) -> None:
        conn = self._connections.pop(name, None)
        if conn is not None:
            conn.close()

    def heartbeat_one(self, agent: Agent) -> TelemetrySnapshot:
        """One host, one command in its kept-open shell, its output bounded. A connection that died since last time is
        reopened once. Never raises: whatever goes wrong is this host's failed snapshot."""
        lock = self._locks.setdefault(agent.name, threading.Lock())
        with lock:
            memory = self._memory_of(agent.name) if self.gpu_health_checks else None
            command = heartbeat_command(agent, health_script(memory) if memory is not None else "")
            for attempt in (1, 2):
                started = time.monotonic()
                result = None
                try:
                    result = self.connection(agent).run_kept(command, timeout=agent.command_timeout_s,
                                                             max_stdout=HEARTBEAT_MAX_STDOUT,
                                                             max_stderr=HEARTBEAT_MAX_STDERR)
                    snap = snapshot_from_result(agent, result, (time.monotonic() - started) * 1000,
                                                memory=memory, table=self.health_table)
                    if snap.gpu_health is not None:
                        self._gpu_memory[agent.name] = remembered(snap.gpu_health, memory)
                    return snap
                except ConnectionLost as exc:
                    self.drop(agent.name)
                    if attempt == 2:
                        return failed_snapshot(agent, exc, started)
                except FleetError as exc:
                    self.drop(agent.name)
                    return failed_snapshot(agent, exc, started)
                except Exception as exc:  # one host's surprise must not cost the round every other host
                    with contextlib.suppress(Exception):
                        self.drop(agent.name)
                    return crashed_snapshot(agent, exc, started, ran=result is not None)
            raise AssertionError("unreachable")

    def _memory_of(self, name: str) -> HostMemory:
        """What is remembered of a host's GPU health; from cold, its cursor and bus ids from the store."""
        memory = self._gpu_memory.get(name)
        if memory is None:
            try:
                with self.store.transaction() as db:
                    stored = load_memory(db, name)
            except FleetError:
                stored = StoredHost()
            memory = self._gpu_memory.setdefault(name, HostMemory(buses=stored.buses, cursor=stored.cursor,
                                                                  count=stored.count, booted=stored.booted))
        return memory

    def heartbeat(self, agents: list[str] | None = None, *, record: bool = True,
                  on_done: Callable[[TelemetrySnapshot], None] | None = None,
                  fence: Fence | None = None) -> HeartbeatRound:
        """One round over the fleet (or the named agents), hosts in parallel up to the cap.
        With ``record`` (the default) the snapshots go to history and advance each agent's health.
        ``on_done`` is called with each host's snapshot as it arrives, from the pool's threads (progress)."""
        chosen = self.inventory.select(agents)
        started = time.monotonic()
        if not chosen:
            return HeartbeatRound([], 0.0)
        pool = self._pool()
        beat = self.heartbeat_one if on_done is None else (lambda agent: _tap(self.heartbeat_one(agent), on_done))
        snapshots = list(pool.map(beat, chosen))
        round_ = HeartbeatRound(snapshots, time.monotonic() - started)
        if record:
            round_.transitions = self.record(snapshots, fence)
        return round_

    def heartbeat_each(self, agents: list[str] | None, period: float, stop: threading.Event,
                       on_done: Callable[[TelemetrySnapshot], None], *, record: bool = True) -> None:
        """Beat each agent every ``period`` seconds until ``stop`` is set, each on its own: no host
        waits for another (a black-holed host holds only its own next beat, never the others').
        ``on_done`` gets each snapshot as it arrives, from the pool's threads; with ``record`` it is
        written to history first."""
        chosen = self.inventory.select(agents)
        in_flight: dict[str, Future[None]] = {}
        due = dict.fromkeys((a.name for a in chosen), 0.0)

        def beat(agent: Agent) -> None:
            snapshot = self.heartbeat_one(agent)
            if record:
                self.record([snapshot])
            on_done(snapshot)

        pool = self._pool()
        while not stop.is_set():
            now = time.monotonic()
            for agent in chosen:
                running = in_flight.get(agent.name)
                if due[agent.name] <= now and (running is None or running.done()):
                    due[agent.name] = now + period
                    in_flight[agent.name] = pool.submit(beat, agent)
            stop.wait(max(0.05, min(due.values()) - time.monotonic()))

    def map_agents(self, fn: Callable[[Agent], T], agents: list[Agent]) -> list[T]:
        """``fn(agent)`` for each agent on the fleet's bounded pool (the one heartbeats use), in order."""
        return list(self._pool().map(fn, agents))

    def _pool(self) -> ThreadPoolExecutor:
        # Kept between rounds: starting 32 threads per round is measurable at a 5 s interval.
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=self.max_parallel_ssh, thread_name_prefix="fleetctl-ssh")
        return self._executor

    # -- fan-out ---------------------------------------------------------------------------
    def run(self, command: list[str] | str, agents: list[str] | str | None = None,
            labels: dict[str, str] | None = None, timeout: float = fanout.DEFAULT_TIMEOUT_S, *,
            max_stdout: int = fanout.MAX_STDOUT, max_stderr: int = fanout.MAX_STDERR) -> fanout.FanoutResult:
        """``command`` (argv, each word quoted; a string runs via ``sh -c``) on every chosen agent in
        parallel; ``labels`` are globs (``{"gpu_type": "a100*"}``). Every host's outcome, never raising for one."""
        return fanout.run(self, command, agents=agents, labels=labels, timeout=timeout,
                          max_stdout=max_stdout, max_stderr=max_stderr)

    # -- the store -------------------------------------------------------------------------
    @property
    def store(self) -> Store:
        if self._store is None:
            self._store = open_store(self.store_url, self.state_dir)
        return self._store

    def record(self, snapshots: list[TelemetrySnapshot], fence: Fence | None = None) -> list[Transition]:
        """Write snapshots to history and advance health; prunes old history now and then. With a
        ``fence``, only agents whose lease it holds are written (:func:`fleetctl.telemetry.history.record`)."""
        events: list[GpuEvent] = []
        transitions = record_history(self.store, snapshots, self.health_policy, fence, table=self.health_table,
                                     kill_on_gpu_failure=self.settings.kill_on_gpu_failure, gpu_events=events,
                                     gpu_written=self._gpu_written)
        self.gpu_events = events
        if time.monotonic() - self._pruned_at >= PRUNE_EVERY_S:
            self._pruned_at = time.monotonic()
            prune(self.store, self.settings.retention_days)
        return transitions

    def history(self, since: datetime | str | None = None, agent: str | list[str] | None = None) -> pd.DataFrame:
        """Recorded telemetry in the CSV schema: ``since`` is ``"1h"``, ``"2d"``, an ISO time or a datetime."""
        agents = [agent] if isinstance(agent, str) else agent
        return history(self.store, since, agents)

    def store_agents(self) -> list[str]:
        """Agents that have history, including ones since removed from the inventory."""
        return [row[0] for row in self.store.query("SELECT agent FROM agents")]

    def health(self) -> pd.DataFrame:
        """One row per agent: health (online/offline/unknown), misses in a row, last good heartbeat, draining."""
        import pandas as pd

        known = agent_statuses(self.store)
        rows = []
        for agent in self.inventory:
            status = known.get(agent.name)
            health = status.health if status else Health()
            rows.append({"agent": agent.name, "health": health.state, "misses": health.misses,
                         "last_ok": utc(health.last_ok), "last_seen": utc(health.last_seen),
                         "draining": bool(status and status.draining),
                         "status": status.snapshot.status if status and status.snapshot else None})
        return pd.DataFrame(rows, columns=["agent", "health", "misses", "last_ok", "last_seen", "draining", "status"])

    def drain(self, agent: str, draining: bool = True) -> None:
        """Running jobs finish; no new ones are placed on ``agent`` until ``drain(agent, False)``."""
        set_draining(self.store, self.inventory.get(agent).name, draining)

    def close_connections(self) -> None:
        """Close every SSH connection and refuse new ones: in-flight commands fail at once."""
        self._closing = True
        for name in list(self._connections):
            self.drop(name)

    def close(self) -> None:
        self.close_connections()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        if self._store is not None:
            self._store.close()
            self._store = None

    def __enter__(self) -> Self:
        return self

    def _repr_html_(self) -> str:
        """Jupyter: one row per agent with its route, labels and last known health."""
        try:
            frame = self.health()
        except FleetError:  # no readable store: the inventory alone
            import pandas as pd

            frame = pd.DataFrame({"agent": self.inventory.names()})
        import html

        routes, labels = {}, {}
        for a in self.inventory:
            try:
                routes[a.name] = self._route(a).describe()
            except FleetError as exc:  # e.g. an ssh_config alias that no longer resolves
                routes[a.name] = f"({exc.message})"
            labels[a.name] = ", ".join(f"{k}={v}" for k, v in a.labels.items())
        frame.insert(1, "address", frame["agent"].map(routes))
        frame.insert(2, "labels", frame["agent"].map(labels))
        frame = frame.drop(columns=["misses", "last_ok"], errors="ignore").astype(object)
        frame = frame.where(frame.notna(), "")
        caption = html.escape(f"Fleet of {len(self.inventory)} agents ({self.inventory.path})")
        return f"<p>{caption}</p>" + str(frame.to_html(index=False, na_rep=""))

    def __exit__(self, *exc: object) -> None:
        self.close()
