"""The store: telemetry history, agent health and the job queue. By default one SQLite file in the
state dir, in WAL mode, so a ``serve`` process, a cron export and the CLI can use it at the same time;
every write is one short ``BEGIN IMMEDIATE`` transaction, so a crash never leaves half an update.
With a ``postgresql://`` URL (``--store``, ``FLEETCTL_STORE``, ``[controller] store``) the same schema
and the same SQL run on PostgreSQL (:mod:`fleetctl.store_pg`); :func:`open_store` picks.

:class:`Store` is both the interface its callers type against (``transaction()``, ``query()``,
``close()``, rows read by index or column name, ``?`` placeholders) and the SQLite backend.

Every database error, at open or later, leaves as a one-line :class:`StoreError` naming the store
and the fix (:func:`store_error`, the one translation table for both backends)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

from fleetctl.errors import ConfigError, StoreError
from fleetctl.paths import STORE_ENV

DATABASE_NAME = "fleetctl.db"
BUSY_TIMEOUT_S = 30.0

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
    # 2: several controllers on one store (fleetctl.leases). Each live controller has a row it renews;
    # each agent has at most one lease, and its token grows with every new holder. Rows written by a
    # controller name it, so a fenced one can be shown to have written nothing.
    """
    CREATE TABLE controllers (
        id TEXT PRIMARY KEY, host TEXT NOT NULL, pid INTEGER NOT NULL, started REAL NOT NULL,
        seen REAL NOT NULL, expires REAL NOT NULL, stopped REAL
    );
    CREATE TABLE leases (
        agent TEXT PRIMARY KEY, controller TEXT, token INTEGER NOT NULL DEFAULT 0, expires REAL NOT NULL DEFAULT 0
    );
    CREATE INDEX leases_controller ON leases (controller);
    ALTER TABLE telemetry ADD COLUMN controller TEXT;
    ALTER TABLE job_events ADD COLUMN controller TEXT;
    """,
]



class Row(Protocol):
    """A result row: by position (``row[0]``, ``tuple(row)``) or by column name (``row["agent"]``)."""

    def __getitem__(self, key: int | str, /) -> Any: ...
    def __iter__(self) -> Iterator[Any]: ...


class Cursor(Protocol):
    @property
    def rowcount(self) -> int: ...
    def fetchone(self) -> Any: ...
    def fetchall(self) -> list[Any]: ...
    def __iter__(self) -> Iterator[Any]: ...


class Connection(Protocol):
    """What a ``transaction()`` block gets: ``sqlite3.Connection``'s ``execute``/``executemany``,
    with ``?`` placeholders on either backend."""

    def execute(self, sql: str, parameters: Any = ..., /) -> Cursor: ...
    def executemany(self, sql: str, parameters: Iterable[Any], /) -> Cursor: ...


# SQLite's primary result codes (stable across versions; the sqlite3 module names them only from
# Python 3.11, as it adds ``sqlite_errorcode`` to its errors: on 3.10 the class table below decides).
SQLITE_PERM, SQLITE_BUSY, SQLITE_LOCKED, SQLITE_READONLY, SQLITE_IOERR, SQLITE_CORRUPT = 3, 5, 6, 8, 10, 11
SQLITE_FULL, SQLITE_CANTOPEN, SQLITE_PROTOCOL, SQLITE_AUTH, SQLITE_NOTADB = 13, 14, 15, 23, 26
_MOVE_AWAY = "move it away; fleetctl starts a new one"
_WRITABLE = "make the state dir writable, or pick another with --state-dir / FLEETCTL_STATE_DIR"
# Primary SQLite result code -> (what is wrong, the fix). Read from ``sqlite_errorcode``, never the text.
_BY_CODE: dict[int, tuple[str, str]] = {
    SQLITE_CORRUPT: ("is damaged", _MOVE_AWAY),
    SQLITE_NOTADB: ("is not a fleetctl store", _MOVE_AWAY),
    SQLITE_READONLY: ("is read-only", _WRITABLE),
    SQLITE_CANTOPEN: ("cannot be opened", _WRITABLE),
    SQLITE_PERM: ("is not accessible", _WRITABLE),
    SQLITE_AUTH: ("is not accessible", _WRITABLE),
    SQLITE_FULL: ("cannot grow: the disk is full", "free space on the state dir's disk"),
    SQLITE_IOERR: ("could not be read or written (I/O error)", "check the disk; if it persists, " + _MOVE_AWAY),
    SQLITE_BUSY: ("stayed locked by another process", "retry; stop a stuck fleetctl process if it persists"),
    SQLITE_LOCKED: ("stayed locked by another process", "retry; stop a stuck fleetctl process if it persists"),
    SQLITE_PROTOCOL: ("stayed locked by another process", "retry; stop a stuck fleetctl process if it persists"),
}
# For errors without a result code (raised by the sqlite3 module itself): most specific class first.
_BY_CLASS: tuple[tuple[type[sqlite3.Error], tuple[str, str]], ...] = (
    (sqlite3.ProgrammingError, ("was used wrongly (a fleetctl bug)", "report it with the command that failed")),
    (sqlite3.InterfaceError, ("was used wrongly (a fleetctl bug)", "report it with the command that failed")),
    (sqlite3.IntegrityError, ("refused a write (constraint failed)", "report it; if it persists, " + _MOVE_AWAY)),
    (sqlite3.DataError, ("refused a value", "report it with the command that failed")),
    (sqlite3.DatabaseError, ("failed", "check the disk and the state dir; if it persists, " + _MOVE_AWAY)),
    (sqlite3.Error, ("failed", "report it with the command that failed")),
)


_PG_URL = f"check the store URL (--store / {STORE_ENV} / [controller] store)"
_PG_UNREACHABLE = ("cannot be reached", "check that PostgreSQL runs there, and " + _PG_URL.removeprefix("check "))
_PG_BUSY = ("stayed busy (lock or serialization conflict)", "retry; stop a stuck fleetctl process if it persists")
_PG_BUG = ("was used wrongly (a fleetctl bug)", "report it with the command that failed")
# PostgreSQL SQLSTATE (an exact code, else its two-character class) -> (what is wrong, the fix).
_BY_SQLSTATE: dict[str, tuple[str, str]] = {
    "08": _PG_UNREACHABLE,                                              # connection exception
    "57P01": _PG_UNREACHABLE, "57P02": _PG_UNREACHABLE, "57P03": _PG_UNREACHABLE,  # shut down / starting up
    "25P03": _PG_UNREACHABLE,  # idle-in-transaction timeout: this process slept inside a transaction
    "28": ("refused the login", "check the user and password in the store URL, and pg_hba.conf"),
    "3D": ("has no such database", "create it (createdb), or " + _PG_URL),
    "42501": ("refused access (insufficient privilege)", "grant the store's user rights on its database"),
    "53100": ("cannot grow: the disk is full", "free space on the database server's disk"),
    "53300": ("has too many connections", "raise max_connections, or run fewer fleetctl processes"),
    "53": ("ran out of resources", "check the database server"),
    "40": _PG_BUSY, "55P03": _PG_BUSY, "57014": _PG_BUSY,               # rollback, lock not available, canceled
    "XX": ("is damaged (internal error)", "check the database server's log"),
    "23": ("refused a write (constraint failed)", "report it with the command that failed"),
    "22": ("refused a value", "report it with the command that failed"),
    "42": _PG_BUG, "0A": _PG_BUG,
}
# PostgreSQL errors without a SQLSTATE, by their PEP 249 class: most specific first, the last catches all.
_PG_BY_CLASS: tuple[tuple[str, tuple[str, str]], ...] = (
    ("OperationalError", _PG_UNREACHABLE),
    ("InterfaceError", _PG_BUG),
    ("ProgrammingError", _PG_BUG),
    ("Error", ("failed", "report it with the command that failed")),
)


def _primary_code(exc: sqlite3.Error) -> int | None:
    code = getattr(exc, "sqlite_errorcode", None)  # an extended code, e.g. SQLITE_IOERR_SHORT_READ
    return code & 0xFF if isinstance(code, int) else None


def _sqlite_entry(exc: sqlite3.Error) -> tuple[str, str]:
    code = _primary_code(exc)
    found = _BY_CODE.get(code) if code is not None else None
    return found or next(entry for cls, entry in _BY_CLASS if isinstance(exc, cls))


def _postgres_entry(exc: Exception) -> tuple[str, str]:
    # psycopg is an optional extra, so this side reads the SQLSTATE psycopg puts on server errors,
    # and for errors without one (raised by the client library) the PEP 249 class it derives from.
    sqlstate = getattr(exc, "sqlstate", None)
    if isinstance(sqlstate, str):
        found = _BY_SQLSTATE.get(sqlstate) or _BY_SQLSTATE.get(sqlstate[:2])
        if found:
            return found
    names = [cls.__name__ for cls in type(exc).__mro__]
    return next((entry for name, entry in _PG_BY_CLASS if name in names), _PG_BY_CLASS[-1][1])


def store_error(where: Path | str, exc: Exception) -> StoreError:
    """The one translation of a database error (``sqlite3`` or ``psycopg``), naming the store (a
    file, or a URL without its password): ``raise store_error(store.label, exc) from exc``."""
    entry = _sqlite_entry(exc) if isinstance(exc, sqlite3.Error) else _postgres_entry(exc)
    what, fix = entry
    detail = " ".join(str(exc).split()) or type(exc).__name__
    return StoreError(f"the store {where} {what}: {detail}", hint=fix,
                      transient=entry in (_PG_UNREACHABLE, _PG_BUSY))


def _os_error(path: Path, exc: OSError) -> StoreError:
    reason = exc.strerror or str(exc)
    return StoreError(f"cannot use the state dir {path}: {reason}", hint=_WRITABLE)


@contextlib.contextmanager
def _setup_lock(db_path: Path) -> Iterator[None]:
    """An flock on ``fleetctl.db.lock`` while a process sets WAL mode and migrates: ``PRAGMA
    journal_mode = WAL`` fails with SQLITE_BUSY at once (the busy timeout does not apply to it)
    when another process opens the same fresh file, so first opens take turns."""
    lock_path = db_path.with_name(db_path.name + ".lock")
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise _os_error(db_path.parent, exc) from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # held for milliseconds, or a migration's one transaction
        yield
    finally:
        os.close(fd)  # closing releases the lock


class Store:
    """The SQLite backend, and the interface of every backend. One connection per process, shared by
    its threads under a lock (SQLite serialises writers anyway; this keeps Python's connection object
    safe). A backend overrides ``__init__``, ``transaction``, ``query``, ``close``, ``label`` and the
    three migration hooks; the schema and the migration loop are shared."""

    dialect = "sqlite"
    # The database's own clock, in Unix seconds, as SQL: leases expire by one clock for every controller.
    clock_sql = "((julianday('now') - 2440587.5) * 86400.0)"

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock = threading.RLock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise _os_error(self.path.parent, exc) from exc
        with _setup_lock(self.path), self._translated():
            self._db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None,
                                       check_same_thread=False)
            try:
                self._db.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
                self._set_wal()
                # NORMAL in WAL mode: a power loss may drop the last commits, never corrupt the file.
                self._db.execute("PRAGMA synchronous = NORMAL")
                self._migrate()
            except BaseException:
                self._db.close()
                raise
        with contextlib.suppress(OSError):
            os.chmod(self.path, 0o600)

    @classmethod
    def in_state_dir(cls, state_dir: str | os.PathLike[str]) -> Store:
        return cls(Path(state_dir) / DATABASE_NAME)

    def _set_wal(self) -> None:
        # Openers take turns under the setup lock; a connection that was already open elsewhere
        # (a checkpoint, a recovery) can still answer BUSY for a moment, so retry until the deadline.
        deadline = time.monotonic() + BUSY_TIMEOUT_S
        while True:
            try:
                self._db.execute("PRAGMA journal_mode = WAL").fetchall()
                return
            except sqlite3.OperationalError as exc:
                if _primary_code(exc) != SQLITE_BUSY or time.monotonic() >= deadline:
                    raise
                time.sleep(0.05)

    @property
    def label(self) -> str:
        """How errors name this store: its file (or, on PostgreSQL, its URL without the password)."""
        return str(self.path)

    @contextlib.contextmanager
    def _translated(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as exc:
            raise store_error(self.path, exc) from exc

    # -- migrations: one loop over _SCHEMA; each backend reads and writes its version its own way --
    def _migrate(self) -> None:
        with self.transaction() as db:
            version = self._schema_version(db)
            if version > len(_SCHEMA):
                raise StoreError(f"{self.label} was written by a newer fleetctl (schema {version})",
                                 hint="upgrade fleetctl")
            for number, script in enumerate(_SCHEMA[version:], start=version + 1):
                for statement in filter(str.strip, script.split(";")):
                    db.execute(self._ddl(statement))
                self._set_schema_version(db, number)

    def _schema_version(self, db: Connection) -> int:
        return int(db.execute("PRAGMA user_version").fetchone()[0])

    def _set_schema_version(self, db: Connection, number: int) -> None:
        db.execute(f"PRAGMA user_version = {int(number)}")

    def _ddl(self, statement: str) -> str:
        """``_SCHEMA`` is written in SQLite's dialect; another backend rewrites its few differences."""
        return statement

    @contextlib.contextmanager
    def transaction(self, *, serialized: bool = True) -> Iterator[Connection]:
        """``BEGIN IMMEDIATE``: take the write lock up front, so two processes never deadlock
        upgrading read locks; commit on success, roll back on any error. A ``sqlite3`` error
        raised inside the block leaves as a :class:`StoreError` too. ``serialized=False`` says the
        block is safe alongside other writers (row locks and compare-and-set): SQLite serializes
        every writer anyway; PostgreSQL then skips its store-wide write lock."""
        with self._lock, self._translated():
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                # A damaged file can fail the rollback as well: the first error is the one to report.
                with contextlib.suppress(sqlite3.Error):
                    if self._db.in_transaction:
                        self._db.execute("ROLLBACK")
                raise

    def now(self) -> float:
        """The database's clock (Unix seconds): what lease expiry is measured by."""
        return float(self.query(f"SELECT {self.clock_sql}")[0][0])

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        with self._lock, self._translated():
            cursor = self._db.execute(sql, params)
            cursor.row_factory = sqlite3.Row
            return list(cursor.fetchall())

    def close(self) -> None:
        with self._lock, contextlib.suppress(sqlite3.Error):
            self._db.close()


def is_postgres_url(url: str) -> bool:
    return url.startswith(("postgresql://", "postgres://"))


def open_store(url: str | None, state_dir: str | os.PathLike[str]) -> Store:
    """The store a setting names: a ``postgresql://`` URL, or (none) the SQLite file in ``state_dir``."""
    if not url:
        return Store.in_state_dir(state_dir)
    if not is_postgres_url(url):
        raise ConfigError(f"the store {url!r} is not a postgresql:// URL",
                          hint=f"write postgresql://USER@HOST:PORT/DB, or unset --store / {STORE_ENV} for the SQLite file")
    # Imported here: psycopg is the optional ``postgres`` extra, and SQLite users never need it.
    try:
        from fleetctl.store_pg import PostgresStore
    except ImportError as exc:
        raise ConfigError(f"the store {url!r} needs psycopg, which is not installed",
                          hint="pip install 'fleetctl[postgres]'") from exc
    return PostgresStore(url)
