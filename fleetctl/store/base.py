"""The store's interface: what history, the leases, the job queue and the CLI use, whichever database
is behind it. Two backends implement it, each in its own module: :class:`~fleetctl.store.sqlite.SQLiteStore`
(the default: one file in the state dir) and :class:`~fleetctl.store.postgres.PostgresStore` (a
``postgresql://`` URL, which controllers on several machines share).

SQL that is the same on both is written once, by its caller, in what both dialects speak: ``?``
placeholders (PEP 249's qmark style, SQLite's own; the PostgreSQL backend translates them, see
:func:`fleetctl.store.postgres.placeholders`), ``INSERT ... ON CONFLICT ... DO UPDATE`` upserts, ``IN``,
``LIMIT``, ``substr``. What differs is a member of the backend, both spellings side by side in the
two modules:

- the database's own clock, as SQL (:attr:`Store.clock_sql`);
- row locks: a claim that skips rows another transaction is claiming (:meth:`Store.for_claim`), a
  read that keeps a row from changing until commit (:meth:`Store.for_share`);
- how a transaction takes the store-wide write lock (``BEGIN IMMEDIATE``, an advisory lock);
- the schema's column types (:attr:`Store.spelling`, filling :mod:`fleetctl.store.schema`) and where
  the schema version is kept;
- whether several controllers may share the store, coordinating by leases (:attr:`Store.shared`).

Every database error, at open or later, leaves as a one-line :class:`StoreError` naming the store and
the fix: each backend translates its own library's errors (SQLite result codes, PostgreSQL SQLSTATEs)
through :func:`database_error`."""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, ClassVar, Protocol

from fleetctl.errors import StoreError
from fleetctl.store.schema import MIGRATIONS, SCHEMA_VERSION, Spelling, statements


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


def database_error(where: str, problem: tuple[str, str], exc: Exception, *, transient: bool = False) -> StoreError:
    """A backend's database error as one line: the store (a file, or a URL without its password),
    ``problem`` (what is wrong, the fix: from the backend's own table) and the library's message.
    ``transient``: the database may work again soon (a controller retries instead of stopping)."""
    what, fix = problem
    detail = " ".join(str(exc).split()) or type(exc).__name__
    return StoreError(f"the store {where} {what}: {detail}", hint=fix, transient=transient)


class Store(abc.ABC):
    """The interface of every backend. One connection per process, shared by its threads under a
    lock; writes only inside :meth:`transaction`. The schema and its migration loop are shared; a
    backend says how it spells the schema's types and where it keeps the version number."""

    #: The database's own clock, in Unix seconds, as SQL: leases expire by one clock for every controller.
    clock_sql: ClassVar[str]
    #: True where controllers on several machines may use the store at once, splitting the agents by
    #: leases in it (:mod:`fleetctl.store.leases`); False where the store is a file in one state dir, whose
    #: controller lock already makes one process the only controller.
    shared: ClassVar[bool]
    #: The column types of :mod:`fleetctl.store.schema` in this backend's dialect.
    spelling: ClassVar[Spelling]

    @property
    @abc.abstractmethod
    def label(self) -> str:
        """How errors name this store: its file, or its URL without the password."""

    @abc.abstractmethod
    def transaction(self, *, serialized: bool = True) -> contextlib.AbstractContextManager[Connection]:
        """A write transaction: commit on success, roll back on any error; a database error raised
        inside leaves as a :class:`StoreError`. ``serialized`` (the default) takes the store-wide
        write lock first, so writers take turns and a read-then-write block means the same on every
        backend. ``serialized=False`` says the block is safe alongside other writers (it locks its
        own rows, with :meth:`for_claim` and :meth:`for_share`, or is a compare-and-set); a backend
        that serializes every writer anyway may take the lock regardless."""

    @abc.abstractmethod
    def query(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        """Read, outside any transaction: every committed write is visible."""

    @abc.abstractmethod
    def close(self) -> None:
        """Close the connection; using the store afterwards raises :class:`StoreError`."""

    @abc.abstractmethod
    def for_claim(self, select: str) -> str:
        """``select`` (of rows the transaction will change) such that, until the transaction ends,
        no other can change them, and another transaction claiming the same rows sees none of them
        at once instead of waiting (a job two controllers try to claim: one gets it, the other
        moves on)."""

    @abc.abstractmethod
    def for_update(self, select: str) -> str:
        """``select`` such that no other transaction can change, or lock for update, the rows it read
        until this one ends; another that asks waits its turn (claims of one capped sweep's tasks
        take turns on the sweep's row, so each counts what the others committed)."""

    @abc.abstractmethod
    def for_share(self, select: str) -> str:
        """``select`` such that the rows it read cannot change until the transaction ends (a lease
        a write is fenced by: a takeover waits for the write to commit)."""

    def now(self) -> float:
        """The database's clock (Unix seconds): what lease expiry is measured by."""
        return float(self.query(f"SELECT {self.clock_sql}")[0][0])

    def schema_version(self) -> int:
        """How many of :data:`~fleetctl.store.schema.MIGRATIONS` this store has run."""
        with self.transaction() as db:
            return self._schema_version(db)

    # -- migrations: one loop over the schema; each backend keeps its version number its own way --
    def _migrate(self) -> None:
        """Run the migrations this store lacks, in one serialized transaction, so processes that open
        a new store together migrate it once."""
        with self.transaction() as db:
            version = self._schema_version(db)
            if version > SCHEMA_VERSION:
                raise StoreError(f"{self.label} was written by a newer fleetctl (schema {version})",
                                 hint="upgrade fleetctl")
            for number, migration in enumerate(MIGRATIONS[version:], start=version + 1):
                for statement in statements(migration, self.spelling):
                    db.execute(statement)
                self._set_schema_version(db, number)

    @abc.abstractmethod
    def _schema_version(self, db: Connection) -> int: ...

    @abc.abstractmethod
    def _set_schema_version(self, db: Connection, number: int) -> None: ...
