"""The SQLite backend, the default store: one file in the state dir, in WAL mode, so a ``serve``
process, a cron export and the CLI can use it at the same time. Every write is one short ``BEGIN
IMMEDIATE`` transaction (SQLite's one writer at a time), so a crash never leaves half an update and a
read-then-write block needs no row locks. One file in one state dir, whose controller lock admits one
controller: the store is not :attr:`~fleetctl.store.base.Store.shared`.

The schema version is SQLite's own ``PRAGMA user_version``. Errors are translated by SQLite's primary
result code (:func:`sqlite_error`), never by their text."""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from fleetctl.errors import StoreError
from fleetctl.store.base import Connection, Row, Store, database_error
from fleetctl.store.schema import Spelling

DATABASE_NAME = "fleetctl.db"
BUSY_TIMEOUT_S = 30.0

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


def _primary_code(exc: sqlite3.Error) -> int | None:
    code = getattr(exc, "sqlite_errorcode", None)  # an extended code, e.g. SQLITE_IOERR_SHORT_READ
    return code & 0xFF if isinstance(code, int) else None


def sqlite_error(path: Path, exc: sqlite3.Error) -> StoreError:
    """A ``sqlite3`` error as one line naming the file and the fix: by its primary result code where
    SQLite gives one, else by the class the sqlite3 module raised."""
    code = _primary_code(exc)
    found = _BY_CODE.get(code) if code is not None else None
    return database_error(str(path), found or next(entry for cls, entry in _BY_CLASS if isinstance(exc, cls)), exc)


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


class SQLiteStore(Store):
    """One connection per process, shared by its threads under a lock (SQLite serialises writers
    anyway; this keeps Python's connection object safe)."""

    clock_sql = "((julianday('now') - 2440587.5) * 86400.0)"
    shared = False
    # SQLite's implicit rowid is the insertion order; AUTOINCREMENT never reuses a deleted job's number.
    spelling = Spelling(real="REAL", serial_key="INTEGER PRIMARY KEY AUTOINCREMENT", rowid="")

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
    def in_state_dir(cls, state_dir: str | os.PathLike[str]) -> SQLiteStore:
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
        return str(self.path)

    @contextlib.contextmanager
    def _translated(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as exc:
            raise sqlite_error(self.path, exc) from exc

    # -- the schema version: SQLite's own header field --------------------------------------
    def _schema_version(self, db: Connection) -> int:
        return int(db.execute("PRAGMA user_version").fetchone()[0])

    def _set_schema_version(self, db: Connection, number: int) -> None:
        db.execute(f"PRAGMA user_version = {int(number)}")

    # -- the interface ---------------------------------------------------------------------
    @contextlib.contextmanager
    def transaction(self, *, serialized: bool = True) -> Iterator[Connection]:
        """``BEGIN IMMEDIATE``: take the write lock up front, so two processes never deadlock
        upgrading read locks; commit on success, roll back on any error. A ``sqlite3`` error
        raised inside the block leaves as a :class:`StoreError` too. ``serialized`` changes
        nothing here: SQLite serializes every writer anyway."""
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

    # Every transaction is the only writer until it ends (``BEGIN IMMEDIATE``): the rows it read
    # cannot change, and nobody else can be claiming them meanwhile. Nothing to add.
    def for_claim(self, select: str) -> str:
        return select

    def for_update(self, select: str) -> str:
        return select

    def for_share(self, select: str) -> str:
        return select

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        with self._lock, self._translated():
            cursor = self._db.execute(sql, params)
            cursor.row_factory = sqlite3.Row
            return list(cursor.fetchall())

    def close(self) -> None:
        with self._lock, contextlib.suppress(sqlite3.Error):
            self._db.close()

