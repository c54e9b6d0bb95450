"""The store: telemetry history, agent health, the job queue and the controllers' leases. By default
one SQLite file in the state dir (:mod:`fleetctl.store.sqlite`); with a ``postgresql://`` URL
(``--store``, ``FLEETCTL_STORE``, ``[controller] store``) a PostgreSQL database that several
controllers share (:mod:`fleetctl.store.postgres`, which needs the optional ``postgres`` extra, so
it is imported only where a URL names it). :func:`open_store` picks.

Callers type against :class:`Store` (:mod:`fleetctl.store.base`: the interface, and what differs
between the backends); the schema and its migrations are :mod:`fleetctl.store.schema`."""

from __future__ import annotations

import os

from fleetctl.errors import ConfigError
from fleetctl.paths import STORE_ENV
from fleetctl.store.base import Connection, Cursor, Row, Store
from fleetctl.store.sqlite import DATABASE_NAME, SQLiteStore

__all__ = ["DATABASE_NAME", "Connection", "Cursor", "Row", "SQLiteStore", "Store", "is_postgres_url", "open_store"]


def is_postgres_url(url: str) -> bool:
    return url.startswith(("postgresql://", "postgres://"))


def open_store(url: str | None, state_dir: str | os.PathLike[str]) -> Store:
    """The store a setting names: a ``postgresql://`` URL, or (none) the SQLite file in ``state_dir``."""
    if not url:
        return SQLiteStore.in_state_dir(state_dir)
    if not is_postgres_url(url):
        raise ConfigError(f"the store {url!r} is not a postgresql:// URL",
                          hint=f"write postgresql://USER@HOST:PORT/DB, or unset --store / {STORE_ENV} for the SQLite file")
    # Imported here: psycopg is the optional ``postgres`` extra, and SQLite users never need it.
    try:
        from fleetctl.store.postgres import PostgresStore
    except ImportError as exc:
        raise ConfigError(f"the store {url!r} needs psycopg, which is not installed",
                          hint="pip install 'fleetctl[postgres]'") from exc
    return PostgresStore(url)
