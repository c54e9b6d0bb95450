"""The PostgreSQL backend: the same schema, migrations and SQL as the SQLite file, for a store that
several processes or machines share (``postgresql://`` URLs): controllers split the agents by leases
in it, so the store is :attr:`~fleetctl.store.base.Store.shared`.

psycopg 3 directly, not SQLAlchemy: fleetctl's SQL is already hand-written, small and portable
(``ON CONFLICT``, ``IN``, ``LIMIT``), so a second query language and a connection-pool layer would add
more than the handful of differences this module spells its own way, each beside SQLite's in
:mod:`fleetctl.store.sqlite`:

- placeholders: fleetctl's SQL is written once with ``?`` (PEP 249's qmark style, SQLite's own);
  psycopg takes ``%s``, so every statement goes through :func:`placeholders` (``?`` -> ``%s``, a
  literal ``%`` -> ``%%``) on its way out. A plain replacement is enough because no fleetctl
  statement has a ``?`` inside a string literal;
- the schema's types: :attr:`PostgresStore.spelling` (``DOUBLE PRECISION``, an identity column for
  ``jobs.seq``, and SQLite's implicit ``rowid``, the insertion order history and job events sort by,
  made an explicit identity column);
- ``BEGIN IMMEDIATE`` -> ``BEGIN`` + ``pg_advisory_xact_lock``: writers take turns, as on SQLite, so a
  read-then-write transaction (health advance, compare-and-set) means the same on both; a
  ``serialized=False`` transaction locks its own rows instead (``FOR UPDATE SKIP LOCKED``, ``FOR SHARE``);
- ``PRAGMA user_version`` -> a one-row ``schema_version`` table, read and migrated under that same lock,
  so controllers that start together on an empty database migrate it once.

Errors are translated by their SQLSTATE (:func:`postgres_error`), else by their PEP 249 class.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict

from fleetctl.errors import StoreError
from fleetctl.paths import STORE_ENV
from fleetctl.store.base import Connection, Cursor, Row, Store, database_error
from fleetctl.store.schema import Spelling

CONNECT_TIMEOUT_S = 10
# One advisory-lock key for fleetctl's writes ("fleetctl" in ASCII), taken per transaction and freed
# at its end, so a crashed process never holds it. Another application on the same database would
# only contend if it picked the very same key.
WRITE_LOCK_KEY = 0x666C656574637463
TCP_USER_TIMEOUT_MS = 10000  # unacknowledged data this long: the connection is dead
IDLE_IN_TRANSACTION_MS = 2000  # no fleetctl transaction waits on its client this long

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
# Errors without a SQLSTATE (raised by psycopg itself), by their PEP 249 class: most specific first.
_BY_CLASS: tuple[tuple[type[psycopg.Error], tuple[str, str]], ...] = (
    (psycopg.OperationalError, _PG_UNREACHABLE),
    (psycopg.InterfaceError, _PG_BUG),
    (psycopg.ProgrammingError, _PG_BUG),
    (psycopg.Error, ("failed", "report it with the command that failed")),
)


def postgres_error(label: str, exc: psycopg.Error) -> StoreError:
    """A ``psycopg`` error as one line naming the store (its URL without the password) and the fix:
    by the SQLSTATE of a server error, else by the class psycopg raised. Unreachable and busy are
    transient: a controller retries them instead of stopping."""
    sqlstate = exc.sqlstate
    found = (_BY_SQLSTATE.get(sqlstate) or _BY_SQLSTATE.get(sqlstate[:2])) if sqlstate else None
    problem = found or next(entry for cls, entry in _BY_CLASS if isinstance(exc, cls))
    return database_error(label, problem, exc, transient=problem in (_PG_UNREACHABLE, _PG_BUSY))


def placeholders(sql: str) -> str:
    """fleetctl's ``?`` placeholders as psycopg's ``%s`` (and a literal ``%`` as ``%%``, which psycopg
    would otherwise read as a placeholder). fleetctl's SQL has no ``?`` inside string literals."""
    return sql.replace("%", "%%").replace("?", "%s")


def display_url(url: str) -> str:
    """The URL as errors show it: never the password."""
    try:
        parts = conninfo_to_dict(url)
    except psycopg.Error:
        return url.split("@")[-1] if "@" in url else url
    user = f"{parts['user']}@" if parts.get("user") else ""
    port = f":{parts['port']}" if parts.get("port") else ""
    return f"postgresql://{user}{parts.get('host', '')}{port}/{parts.get('dbname', '')}"


class PgRow:
    """A row read by position or by column name, as ``sqlite3.Row`` is."""

    __slots__ = ("_index", "_values")

    def __init__(self, values: Sequence[Any], index: dict[str, int]) -> None:
        self._values = tuple(values)
        self._index = index

    def __getitem__(self, key: int | str, /) -> Any:
        return self._values[self._index[key] if isinstance(key, str) else key]

    def __iter__(self) -> Iterator[Any]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def keys(self) -> list[str]:
        return list(self._index)

    def __repr__(self) -> str:
        return f"PgRow({self._values!r})"


def _row_factory(cursor: psycopg.Cursor[Any]) -> Any:
    index = {column.name: i for i, column in enumerate(cursor.description or ())}
    return lambda values: PgRow(values, index)


def _storable(value: Any) -> Any:
    # PostgreSQL's text cannot hold NUL, which SQLite stores; a host may send it (hostile tool output).
    # The replacement character keeps "something was here" visible, as text.visible() does on screen.
    return value.replace("\x00", "\ufffd") if isinstance(value, str) and "\x00" in value else value


def _row(parameters: Iterable[Any]) -> tuple[Any, ...]:
    return tuple(_storable(value) for value in parameters)


MAX_PARAMETERS = 60000  # per statement; PostgreSQL's protocol allows 65535


def values_group(sql: str) -> tuple[int, int] | None:
    """Where the ``(...)`` after ``VALUES`` starts and ends in an ``INSERT`` (parentheses inside
    it, as in ``EXTRACT(EPOCH FROM ...)``, balanced); None for any other statement."""
    head = sql.upper().find("VALUES")
    if not sql.lstrip().upper().startswith("INSERT") or head < 0:
        return None
    start = sql.find("(", head)
    depth = 0
    for end in range(start, len(sql)):
        depth += {"(": 1, ")": -1}.get(sql[end], 0)
        if depth == 0:
            return start, end + 1
    return None


class _Counted:
    """What ``executemany`` returns: how many rows its statements changed."""

    def __init__(self, rowcount: int) -> None:
        self.rowcount = rowcount

    def fetchone(self) -> Any:
        return None

    def fetchall(self) -> list[Any]:
        return []

    def __iter__(self) -> Iterator[Any]:
        return iter(())


class _PgConnection:
    """What a transaction block gets: ``execute``/``executemany`` with SQLite's ``?`` placeholders."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self._conn = conn

    def execute(self, sql: str, parameters: Any = (), /) -> Cursor:
        return self._conn.execute(placeholders(sql), _row(parameters))

    def executemany(self, sql: str, parameters: Iterable[Any], /) -> Cursor:
        """An ``INSERT ... VALUES (...)`` for many rows as one statement per 60,000 parameters, not
        psycopg's pipeline: between whole statements a stopped process leaves its session idle in
        its transaction, which the server ends (mid-pipeline it would wait, holding its locks, and
        commit whatever the process sends when it wakes). Rows whose ``ON CONFLICT`` key repeats
        must be merged by the caller, as one statement cannot update a row twice."""
        rows = [_row(p) for p in parameters]
        group = values_group(sql)
        if group is None:
            return _Counted(sum(self._conn.execute(placeholders(sql), row).rowcount for row in rows))
        start, end = group
        per = max(1, MAX_PARAMETERS // max(1, sql.count("?", start, end)))
        changed = 0
        for first in range(0, len(rows), per):
            chunk = rows[first:first + per]
            statement = sql[:start] + ", ".join([sql[start:end]] * len(chunk)) + sql[end:]
            changed += self._conn.execute(placeholders(statement), [v for row in chunk for v in row]).rowcount
        return _Counted(changed)


class PostgresStore(Store):
    """One connection per process, shared by its threads under a lock, in autocommit mode outside
    ``transaction()`` (a query sees every committed write at once). A connection the server dropped
    (restart, failover) is replaced at the next use; the failed call itself still raises."""

    clock_sql = "EXTRACT(EPOCH FROM clock_timestamp())::float8"
    shared = True
    # Last in each table, so positional INSERTs line up with SQLite's columns (a missing one takes its default).
    spelling = Spelling(real="DOUBLE PRECISION", serial_key="BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY",
                        rowid=", rowid BIGINT GENERATED ALWAYS AS IDENTITY")

    def __init__(self, url: str) -> None:
        self.url = url
        self._label = display_url(url)
        self._lock = threading.RLock()
        self._closed = False
        self._conn: psycopg.Connection[Any] | None = None
        with self._translated():
            self._migrate()

    @property
    def label(self) -> str:
        return self._label

    def _connection(self) -> psycopg.Connection[Any]:
        if self._closed:
            raise psycopg.InterfaceError("the store was closed")
        if self._conn is None or self._conn.closed:
            # A process stopped (SIGSTOP, a debugger, a VM pause) inside a transaction must not hold
            # its locks for as long as it sleeps: the server ends such a session, the transaction
            # rolls back, and the process reconnects when it wakes.
            self._conn = psycopg.connect(self.url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S,
                                         application_name="fleetctl", row_factory=_row_factory,
                                         options=f"-c idle_in_transaction_session_timeout={IDLE_IN_TRANSACTION_MS}",
                                         # A silent partition must fail in seconds, not the kernel's 15 minutes.
                                         keepalives=1, keepalives_idle=5, keepalives_interval=2, keepalives_count=3,
                                         tcp_user_timeout=TCP_USER_TIMEOUT_MS)
        return self._conn

    @contextlib.contextmanager
    def _translated(self) -> Iterator[None]:
        try:
            yield
        except psycopg.Error as exc:
            if self._conn is not None and self._conn.broken:
                self._conn.close()  # reconnect next time
            raise postgres_error(self._label, exc) from exc

    # -- the schema version: a one-row table --------------------------------------------------
    def _schema_version(self, db: Connection) -> int:
        db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        row = db.execute("SELECT version FROM schema_version").fetchone()
        if row is None:
            db.execute("INSERT INTO schema_version (version) VALUES (0)")
            return 0
        return int(row[0])

    def _set_schema_version(self, db: Connection, number: int) -> None:
        db.execute("UPDATE schema_version SET version = ?", (number,))

    # -- the interface ---------------------------------------------------------------------
    @contextlib.contextmanager
    def transaction(self, *, serialized: bool = True) -> Iterator[Connection]:
        """``BEGIN`` and the write lock, so writers take turns as on SQLite; commit on success,
        roll back on any error. A ``psycopg`` error raised inside leaves as a :class:`StoreError`.
        ``serialized=False``: no store-wide lock, for blocks that lock their own rows (a job claim
        with ``FOR UPDATE SKIP LOCKED``, a fenced write with ``FOR SHARE`` on its leases)."""
        with self._lock, self._translated():
            conn = self._connection()
            with conn.transaction():
                if serialized:
                    conn.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK_KEY,))
                yield _PgConnection(conn)

    # Row locks, for transactions that skip the store-wide lock (``serialized=False``).
    def for_claim(self, select: str) -> str:
        return f"{select} FOR UPDATE SKIP LOCKED"

    def for_update(self, select: str) -> str:
        return f"{select} FOR UPDATE"

    def for_share(self, select: str) -> str:
        return f"{select} FOR SHARE"

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        with self._lock, self._translated():
            return list(self._connection().execute(placeholders(sql), _row(params)).fetchall())

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._conn is not None:
                with contextlib.suppress(psycopg.Error):
                    self._conn.close()
