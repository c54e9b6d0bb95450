"""``Fleet``: the notebook-facing object. Keeps one SSH connection per agent open between
heartbeats and fans out over a bounded pool; every host gets a snapshot, whatever fails."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from fleetctl.config import Agent, Inventory, load_config
from fleetctl.errors import ConnectionLost, FleetError
from fleetctl.frames import to_dataframe
from fleetctl.heartbeat import failed_snapshot, heartbeat_command, snapshot_from_result
from fleetctl.known_hosts import KnownHosts
from fleetctl.paths import state_dir as resolve_state_dir
from fleetctl.routes import route_for
from fleetctl.ssh import ConnectOptions, HostKeyPolicy, connect
from fleetctl.telemetry import TelemetrySnapshot
from fleetctl.transport import Connection, Connector, Route

if TYPE_CHECKING:
    import pandas as pd

DEFAULT_MAX_PARALLEL_SSH = 32


@dataclass
class HeartbeatRound:
    """Every agent's snapshot from one round."""

    snapshots: list[TelemetrySnapshot] = field(default_factory=list)
    duration_s: float = 0.0

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


class Fleet:
    """The agents of an inventory, and the connections to them."""

    def __init__(self, inventory: Inventory, *, state_dir: str | os.PathLike[str] | None = None,
                 max_parallel_ssh: int = DEFAULT_MAX_PARALLEL_SSH, connector: Connector | None = None,
                 accept_any_host_key: bool = False) -> None:
        self.inventory = inventory
        self.state_dir = Path(resolve_state_dir(state_dir))
        self.max_parallel_ssh = max(1, max_parallel_ssh)
        options = ConnectOptions(host_keys=HostKeyPolicy(KnownHosts.default(self.state_dir), accept_any_host_key))
        self._connect: Connector = connector or (lambda route: connect(route, options))
        self._connections: dict[str, Connection] = {}
        self._locks: dict[str, threading.Lock] = {a.name: threading.Lock() for a in inventory}
        self._routes: dict[str, Route] = {}

    @classmethod
    def from_config(cls, path: str | os.PathLike[str] | None = None, **kwargs: object) -> Fleet:
        return cls(load_config(path), **kwargs)  # type: ignore[arg-type]

    @property
    def agents(self) -> list[Agent]:
        return list(self.inventory)

    def _route(self, agent: Agent) -> Route:
        if agent.name not in self._routes:
            self._routes[agent.name] = route_for(agent)
        return self._routes[agent.name]

    def connection(self, agent: Agent) -> Connection:
        """The open connection to ``agent``, opened (again) if there is none or it died."""
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
        """One host, one exec. A connection that died since last time is reopened once."""
        lock = self._locks.setdefault(agent.name, threading.Lock())
        with lock:
            command = heartbeat_command(agent)
            for attempt in (1, 2):
                started = time.monotonic()
                try:
                    result = self.connection(agent).run(command, timeout=agent.command_timeout_s)
                    return snapshot_from_result(agent, result, (time.monotonic() - started) * 1000)
                except ConnectionLost as exc:
                    self.drop(agent.name)
                    if attempt == 2:
                        return failed_snapshot(agent, exc, started)
                except FleetError as exc:
                    self.drop(agent.name)
                    return failed_snapshot(agent, exc, started)
            raise AssertionError("unreachable")

    def heartbeat(self, agents: list[str] | None = None) -> HeartbeatRound:
        """One round over the fleet (or the named agents), hosts in parallel up to the cap."""
        chosen = self.inventory.select(agents)
        started = time.monotonic()
        if not chosen:
            return HeartbeatRound([], 0.0)
        with ThreadPoolExecutor(max_workers=min(self.max_parallel_ssh, len(chosen)),
                                thread_name_prefix="fleetctl-heartbeat") as pool:
            snapshots = list(pool.map(self.heartbeat_one, chosen))
        return HeartbeatRound(snapshots, time.monotonic() - started)

    def close(self) -> None:
        for name in list(self._connections):
            self.drop(name)

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
