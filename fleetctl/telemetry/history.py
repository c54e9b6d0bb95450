"""Telemetry history and agent health in the store: record a round, read it back as a DataFrame."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Optional

from fleetctl._durations import seconds_of
from fleetctl.errors import ConfigError
from fleetctl.store import Store
from fleetctl.store.leases import Fence
from fleetctl.telemetry import quarantine
from fleetctl.telemetry.frames import COLUMNS, snapshot_tuples, typed_frame
from fleetctl.telemetry.gpu_health import Rule
from fleetctl.telemetry.health import Health, HealthPolicy, advance
from fleetctl.telemetry.quarantine import GpuEvent
from fleetctl.telemetry.snapshot import TelemetrySnapshot

if TYPE_CHECKING:
    import pandas as pd

_INSERT = (f"INSERT INTO telemetry (ts, {', '.join(COLUMNS)}, controller) "
           f"VALUES ({', '.join('?' * (len(COLUMNS) + 2))})")


@dataclass(frozen=True)
class Transition:
    agent: str
    before: str
    after: str


@dataclass(frozen=True)
class AgentStatus:
    """What the store knows of one agent: its health, drain flag and latest snapshot."""

    agent: str
    health: Health
    draining: bool
    snapshot: Optional[TelemetrySnapshot]


def record(store: Store, snapshots: Iterable[TelemetrySnapshot], policy: HealthPolicy,
           fence: Fence | None = None, *, table: Mapping[str, Rule] | None = None,
           kill_on_gpu_failure: bool = False, gpu_events: list[GpuEvent] | None = None,
           gpu_written: dict[str, tuple[object, ...]] | None = None) -> list[Transition]:
    """Append the snapshots to history and advance each agent's health, in one transaction. With a
    ``fence`` (a controller of a shared store), only beats of agents whose lease it still holds with
    the same token are written; the rest are dropped (another controller has taken those agents).
    GPU health is judged with its history and quarantines kept (:mod:`fleetctl.telemetry.quarantine`,
    with ``table``); what happened is appended to ``gpu_events`` when given; ``gpu_written`` is the caller's
    memory of hosts whose stored GPU health is all ok, so a calm beat writes none of it."""
    snapshots = list(snapshots)
    if not snapshots:
        return []
    transitions = []
    with store.transaction() as db:
        if fence is not None:
            held = fence.held_tokens(db, store)
            snapshots = [snap for snap in snapshots if held.get(snap.agent, -1) == fence.tokens.get(snap.agent)]
            if not snapshots:
                return []
        writer = fence.controller if fence is not None else None
        happened = quarantine.apply(db, snapshots, table, kill_on_failure=kill_on_gpu_failure, written=gpu_written)
        if gpu_events is not None:
            gpu_events.extend(happened)
        rows = [(snap.timestamp.timestamp(), *row, writer) for snap in snapshots for row in snapshot_tuples([snap])]
        db.executemany(_INSERT, rows)
        names = [s.agent for s in snapshots]
        known = {row[0]: Health(*row[1:]) for row in db.execute(
            f"SELECT agent, health, misses, last_ok, last_seen, since FROM agents WHERE agent IN ({','.join('?' * len(names))})",
            names)}
        updates: dict[str, tuple[object, ...]] = {}
        for snap in snapshots:
            before = known.get(snap.agent, Health())
            after = advance(before, snap.ok, snap.timestamp.timestamp(), policy)
            known[snap.agent] = after
            if after.state != before.state:
                transitions.append(Transition(snap.agent, before.state, after.state))
            updates[snap.agent] = (snap.agent, after.state, after.misses, after.last_ok, after.last_seen, after.since,
                                   snap.model_dump_json())
        db.executemany(
            "INSERT INTO agents (agent, health, misses, last_ok, last_seen, since, snapshot) VALUES (?,?,?,?,?,?,?) "
            "ON CONFLICT (agent) DO UPDATE SET health=excluded.health, misses=excluded.misses, "
            "last_ok=excluded.last_ok, last_seen=excluded.last_seen, since=excluded.since, snapshot=excluded.snapshot",
            list(updates.values()))  # one row per agent: the last of its beats in this batch
    return transitions


def prune(store: Store, retention_days: float, now: float | None = None) -> int:
    """Delete history older than the retention period; returns the rows removed."""
    cutoff = (now or time.time()) - retention_days * 86400
    # Not under the store-wide write lock: a long delete must not hold up every controller's renewals.
    with store.transaction(serialized=False) as db:
        return db.execute("DELETE FROM telemetry WHERE ts < ?", (cutoff,)).rowcount


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """``90s``, ``15m``, ``1h``, ``2d``, ``1w`` ago, or an ISO time (UTC unless it says otherwise)."""
    now = now or datetime.now(timezone.utc)
    ago = seconds_of(text, unit_required=True)
    if ago is not None:
        return now - timedelta(seconds=ago)
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ConfigError(f"--since {text!r} is neither a duration nor an ISO time",
                          hint="write e.g. 1h, 30m, 2d or 2026-11-01T00:00") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def history(store: Store, since: datetime | str | None = None, agents: list[str] | None = None,
            until: datetime | None = None) -> pd.DataFrame:
    """Rows in the CSV schema, oldest first."""
    import pandas as pd

    clauses: list[str] = []
    params: list[float | str] = []
    if since is not None:
        moment = parse_since(since) if isinstance(since, str) else since
        clauses.append("ts >= ?")
        params.append(moment.timestamp())
    if until is not None:
        clauses.append("ts < ?")
        params.append(until.timestamp())
    if agents:
        clauses.append(f"agent IN ({','.join('?' * len(agents))})")
        params.extend(agents)
    where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
    sql = f"SELECT {', '.join(COLUMNS)} FROM telemetry{where} ORDER BY ts, rowid"
    # Through Store.query, so a damaged file is a StoreError; from_records(coerce_float) is what
    # read_sql_query does with the same rows.
    rows = [tuple(row) for row in store.query(sql, params)]
    return typed_frame(pd.DataFrame.from_records(rows, columns=COLUMNS, coerce_float=True))


def agent_statuses(store: Store) -> dict[str, AgentStatus]:
    rows = store.query("SELECT agent, health, misses, last_ok, last_seen, since, draining, snapshot FROM agents")
    return {row["agent"]: AgentStatus(
        agent=row["agent"], health=Health(row["health"], row["misses"], row["last_ok"], row["last_seen"], row["since"]),
        draining=bool(row["draining"]),
        snapshot=TelemetrySnapshot.model_validate_json(row["snapshot"]) if row["snapshot"] else None)
        for row in rows}


def set_draining(store: Store, agent: str, draining: bool) -> None:
    with store.transaction() as db:
        db.execute("INSERT INTO agents (agent, draining) VALUES (?, ?) "
                   "ON CONFLICT (agent) DO UPDATE SET draining = excluded.draining", (agent, int(draining)))
