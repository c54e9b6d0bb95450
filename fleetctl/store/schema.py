"""The store's schema, written once for both backends: the list of its migrations, in order. A store
at version N (its backend keeps the number: :meth:`~fleetctl.store.base.Store.schema_version`) has
run the first N; opening it runs the rest, in one transaction, and never edits one that shipped.

The few column types the two dialects spell differently are named fields (``{real}``,
``{serial_key}``, ``{rowid}``) that each backend fills with its own :class:`Spelling`, side by side
in :mod:`fleetctl.store.sqlite` and :mod:`fleetctl.store.postgres`. Everything else is the SQL both
speak."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class Spelling:
    """How one backend writes the types that differ between the dialects."""

    real: str  # a double-precision float
    serial_key: str  # an integer primary key that grows with every insert and is never reused
    # After the last column of every table without a serial key: the insertion order that history and
    # job events sort by (``ORDER BY ts, rowid``). SQLite has it implicitly; PostgreSQL needs a column.
    rowid: str


# Column order of ``telemetry`` after ``ts`` is the CSV schema (frames.COLUMNS).
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE telemetry (
        ts {real} NOT NULL, timestamp TEXT NOT NULL, agent TEXT NOT NULL, hostname TEXT, status TEXT NOT NULL,
        error TEXT, latency_ms {real}, vendor TEXT, gpu_index INTEGER, gpu_uuid TEXT, gpu_name TEXT,
        memory_total_mib {real}, memory_used_mib {real}, memory_free_mib {real}, utilization_gpu_pct {real},
        temperature_c {real}, power_draw_w {real}, power_limit_w {real}, load_1m {real}, mem_available_mib {real}{rowid}
    );
    CREATE INDEX telemetry_ts ON telemetry (ts);
    CREATE INDEX telemetry_agent_ts ON telemetry (agent, ts);
    CREATE TABLE agents (
        agent TEXT PRIMARY KEY, health TEXT NOT NULL DEFAULT 'unknown', misses INTEGER NOT NULL DEFAULT 0,
        last_ok {real}, last_seen {real}, since {real}, draining INTEGER NOT NULL DEFAULT 0, snapshot TEXT{rowid}
    );
    CREATE TABLE jobs (
        seq {serial_key}, id TEXT NOT NULL UNIQUE, name TEXT, state TEXT NOT NULL,
        priority INTEGER NOT NULL DEFAULT 0, spec TEXT NOT NULL, agent TEXT, gpus TEXT, remote_dir TEXT,
        attempt INTEGER NOT NULL DEFAULT 0, submitted {real} NOT NULL, dispatched {real}, started {real},
        finished {real}, exit_code INTEGER, signal INTEGER, reason TEXT, result TEXT,
        cancel_requested INTEGER NOT NULL DEFAULT 0, cancel_force INTEGER NOT NULL DEFAULT 0, updated {real}
    );
    CREATE INDEX jobs_state ON jobs (state, priority, seq);
    CREATE TABLE job_events (
        job_id TEXT NOT NULL, ts {real} NOT NULL, event TEXT NOT NULL, detail TEXT{rowid}
    );
    CREATE INDEX job_events_job ON job_events (job_id, ts);
    """,
    # 2: several controllers on one store (fleetctl.store.leases). Each live controller has a row it renews;
    # each agent has at most one lease, and its token grows with every new holder. Rows written by a
    # controller name it, so a fenced one can be shown to have written nothing.
    """
    CREATE TABLE controllers (
        id TEXT PRIMARY KEY, host TEXT NOT NULL, pid INTEGER NOT NULL, started {real} NOT NULL,
        seen {real} NOT NULL, expires {real} NOT NULL, stopped {real}{rowid}
    );
    CREATE TABLE leases (
        agent TEXT PRIMARY KEY, controller TEXT, token INTEGER NOT NULL DEFAULT 0, expires {real} NOT NULL DEFAULT 0{rowid}
    );
    CREATE INDEX leases_controller ON leases (controller);
    ALTER TABLE telemetry ADD COLUMN controller TEXT;
    ALTER TABLE job_events ADD COLUMN controller TEXT;
    """,
    # sweeps: one parent row per ``submit --array/--sweep/--sweep-file``; its tasks are ordinary jobs that
    # name it (``parent``, ``task_index``), so placement, retries, cancel and ``lost`` stay per task.
    # ``cancelled``: when ``jobs cancel PARENT`` was recorded (no task is claimed after it).
    """
    CREATE TABLE sweeps (
        seq {serial_key}, id TEXT NOT NULL UNIQUE, name TEXT, kind TEXT NOT NULL, spec TEXT NOT NULL,
        count INTEGER NOT NULL, max_concurrent INTEGER, submitted {real} NOT NULL, cancelled {real}
    );
    ALTER TABLE jobs ADD COLUMN parent TEXT;
    ALTER TABLE jobs ADD COLUMN task_index INTEGER;
    CREATE INDEX jobs_parent ON jobs (parent, task_index);
    """,
    # gpu health (issue 22, fleetctl.telemetry.quarantine): each GPU's last verdict, its quarantine
    # (kept until cleared or recovered) and its recent Xids (the judgment's repeat window); per host,
    # the kernel log cursor and what was last seen (bus ids, boot time); and what happened, as events.
    """
    CREATE TABLE gpu_health (
        agent TEXT NOT NULL, gpu INTEGER NOT NULL, bus_id TEXT, state TEXT NOT NULL DEFAULT 'ok', reason TEXT,
        since {real}, quarantined {real}, quarantine_reason TEXT, xids TEXT, PRIMARY KEY (agent, gpu){rowid}
    );
    CREATE TABLE gpu_hosts (
        agent TEXT PRIMARY KEY, journal_cursor TEXT, buses TEXT, booted {real}, updated {real}{rowid}
    );
    CREATE TABLE gpu_events (
        agent TEXT NOT NULL, gpu INTEGER, ts {real} NOT NULL, event TEXT NOT NULL, detail TEXT{rowid}
    );
    CREATE INDEX gpu_events_agent ON gpu_events (agent, ts);
    """,
    # the GPU count last known per host, for a host whose tool gives no bus ids (a vanished GPU is then
    # found by the count: fleetctl.telemetry.health_beat).
    """
    ALTER TABLE gpu_hosts ADD COLUMN gpu_count INTEGER;
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)


def statements(migration: str, spelling: Spelling) -> list[str]:
    """One migration as the statements a backend runs, in its spelling."""
    fields = dataclasses.asdict(spelling)
    return [statement.format(**fields) for statement in migration.split(";") if statement.strip()]
