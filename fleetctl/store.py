"""The embedded store: one SQLite file in the state dir for telemetry history, agent health and the
job queue. WAL mode, so a ``serve`` process, a cron export and the CLI can use it at the same time;
every write is one short ``BEGIN IMMEDIATE`` transaction, so a crash never leaves half an update."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from fleetctl.errors import StoreError

DATABASE_NAME = "fleetctl.db"

# Column order of ``telemetry`` after ``ts`` is the CSV schema (frames.COLUMNS).
_SCHEMA = [
    """
    CREATE TABLE telemetry (
        ts REAL NOT NULL, timestamp TEXT NOT NULL, agent TEXT NOT NULL, hostname TEXT, status TEXT NOT NULL,
        error TEXT, latency_ms REAL, vendor TEXT, gpu_index INTEGER, gpu_uuid TEXT, gpu_name TEXT,
        memory_total_mib REAL, memory_used_mib REAL, memory_free_mib REAL, utilization_gpu_pct REAL,
        temperature_c REAL, power_draw_w REAL, power_limit_w REAL, load_1m REAL, mem_available_mib REAL
    );
    CREATE INDEX telemetry_ts ON telemetry (ts);
    CREATE INDEX telemetry_agent_ts ON telemetry (agent, ts);
    CREATE TABLE agents (
        agent TEXT PRIMARY KEY, health TEXT NOT NULL DEFAULT 'unknown', misses INTEGER NOT NULL DEFAULT 0,
        last_ok REAL, last_seen REAL, since REAL, draining INTEGER NOT NULL DEFAULT 0, snapshot TEXT
    );
    CREATE TABLE jobs (
        seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, name TEXT, state TEXT NOT NULL,
        priority INTEGER NOT NULL DEFAULT 0, spec TEXT NOT NULL, agent TEXT, gpus TEXT, remote_dir TEXT,
        attempt INTEGER NOT NULL DEFAULT 0, submitted REAL NOT NULL, dispatched REAL, started REAL,
        finished REAL, exit_code INTEGER, signal INTEGER, reason TEXT, result TEXT,
        cancel_requested INTEGER NOT NULL DEFAULT 0, cancel_force INTEGER NOT NULL DEFAULT 0, updated REAL
    );
    CREATE INDEX jobs_state ON jobs (state, priority, seq);
    CREATE TABLE job_events (
        job_id TEXT NOT NULL, ts REAL NOT NULL, event TEXT NOT NULL, detail TEXT
    );
    CREATE INDEX job_events_job ON job_events (job_id, ts);
    """,
]


class Store:
    """One connection per process, shared by its threads under a lock (SQLite serialises writers
    anyway; this keeps Python's connection object safe)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock = threading.RLock()
        try:
            self._db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA busy_timeout = 30000")
            self._db.execute("PRAGMA journal_mode = WAL")
            # NORMAL in WAL mode: a power loss may drop the last commits, never corrupt the file.
            self._db.execute("PRAGMA synchronous = NORMAL")
            self._migrate()
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"cannot open the store {self.path}: {exc}",
                             hint="check the state dir's permissions, or move the damaged file away") from None
        with contextlib.suppress(OSError):
            os.chmod(self.path, 0o600)

    @classmethod
    def in_state_dir(cls, state_dir: str | os.PathLike[str]) -> Store:
        return cls(Path(state_dir) / DATABASE_NAME)

    def _migrate(self) -> None:
        with self.transaction() as db:
            version = int(db.execute("PRAGMA user_version").fetchone()[0])
            if version > len(_SCHEMA):
                raise StoreError(f"{self.path} was written by a newer fleetctl (schema {version})",
                                 hint="upgrade fleetctl")
            for number, script in enumerate(_SCHEMA[version:], start=version + 1):
                for statement in filter(str.strip, script.split(";")):
                    db.execute(statement)
                db.execute(f"PRAGMA user_version = {number}")

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE``: take the write lock up front, so two processes never deadlock
        upgrading read locks; commit on success, roll back on any error."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            cursor = self._db.execute(sql, params)
            cursor.row_factory = sqlite3.Row
            return list(cursor.fetchall())

    @property
    def connection(self) -> sqlite3.Connection:
        """For pandas' ``read_sql``; hold ``lock`` while using it from threads."""
        return self._db

    @property
    def lock(self) -> threading.RLock:
        return self._lock

    def close(self) -> None:
        with self._lock:
            self._db.close()
