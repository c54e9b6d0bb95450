"""Fixtures for a real PostgreSQL: one private cluster per session (fleetctl's own sandbox machinery:
initdb + pg_ctl in a temp dir, a free loopback port, an unprivileged user, stopped by PID), an empty
database per test, and ``make_store``: the store tests run once on SQLite and once on PostgreSQL."""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fleetctl.sandbox.postgres import PostgresCluster, bindir
from fleetctl.store import Store, open_store

BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
_numbers = itertools.count()


@pytest.fixture(scope="session")
def postgres_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresCluster]:
    if bindir() is None:
        message = "PostgreSQL's server is missing: run the tests with scripts/test, which installs it"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    cluster = PostgresCluster(tmp_path_factory.mktemp("postgres")).start()
    yield cluster
    cluster.stop()


@pytest.fixture
def postgres_url(postgres_cluster: PostgresCluster) -> Iterator[str]:
    """The URL of a new, empty database of the session's cluster, dropped after the test."""
    import psycopg

    name = f"test_{os.getpid()}_{next(_numbers)}"
    with psycopg.connect(postgres_cluster.url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    yield postgres_cluster.url_for(name)
    with psycopg.connect(postgres_cluster.url, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=BACKENDS)
def store_url(request: pytest.FixtureRequest) -> str | None:
    """None (the SQLite file in the state dir) or a fresh PostgreSQL database's URL."""
    if request.param == "sqlite":
        return None
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture
def make_store(store_url: str | None, tmp_path: Path) -> Iterator[Callable[[], Store]]:
    """Opens another :class:`Store` on the same data each call (as another process would); every
    one is closed after the test."""
    opened: list[Store] = []

    def make() -> Store:
        opened.append(open_store(store_url, tmp_path / "state"))
        return opened[-1]

    yield make
    for store in opened:
        store.close()
