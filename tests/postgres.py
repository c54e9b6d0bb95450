"""Fixtures for a real PostgreSQL: one private cluster per session (fleetctl's own sandbox machinery:
initdb + pg_ctl in a temp dir, a free loopback port, an unprivileged user, stopped by PID), an empty
database per test, and ``make_store``: the store tests run once on SQLite and once on PostgreSQL.

The whole suite runs on either store: ``--store-backend=postgres`` (or ``$FLEETCTL_TEST_STORE_BACKEND``)
points ``$FLEETCTL_STORE`` at a new empty database of the session's cluster for every test (and for
every module's fixtures, such as a long-running ``serve``), so ``Fleet()``, the CLI in subprocesses and
``serve`` all use PostgreSQL. That pass skips ``sqlite_only`` tests (about the SQLite file itself) and
deselects ``no_store`` tests (they never open a store) and those that already ran on both backends in
the SQLite pass (``store_url``-parametrized, or marked ``postgres``). ``scripts/test`` runs both passes."""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fleetctl.sandbox.postgres import PostgresCluster, bindir
from fleetctl.store import Store, open_store

BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
BACKEND_OPTION = "--store-backend"
BACKEND_ENV = "FLEETCTL_TEST_STORE_BACKEND"
_numbers = itertools.count()


def add_backend_option(parser: pytest.Parser) -> None:
    default = os.environ.get(BACKEND_ENV) or "sqlite"
    parser.addoption(BACKEND_OPTION, choices=["sqlite", "postgres"], default=default,
                     help=f"the store every test's fleetctl uses (default: ${BACKEND_ENV}, else sqlite); with "
                          "postgres, $FLEETCTL_STORE is a new database of a private cluster for each test")


def backend(config: pytest.Config) -> str:
    value = str(config.getoption(BACKEND_OPTION))
    if value not in ("sqlite", "postgres"):  # argparse checks a typed value, not the default from the environment
        raise pytest.UsageError(f"${BACKEND_ENV}={value!r}: write sqlite or postgres")
    return value


def select_for_backend(config: pytest.Config, items: list[pytest.Item]) -> None:
    """On PostgreSQL: skip ``sqlite_only`` tests, with their reason; deselect ``no_store`` tests and
    those that already ran on both stores (their SQLite pass repeats them exactly)."""
    if backend(config) != "postgres":
        return
    kept: list[pytest.Item] = []
    dropped: list[pytest.Item] = []
    for item in items:
        both = "store_url" in getattr(item, "fixturenames", ()) or item.get_closest_marker("postgres") is not None
        if both or item.get_closest_marker("no_store") is not None:
            dropped.append(item)
            continue
        only = item.get_closest_marker("sqlite_only")
        if only is not None:
            reason = only.kwargs.get("reason") or (only.args[0] if only.args else "")
            item.add_marker(pytest.mark.skip(reason=f"sqlite_only: {reason}" if reason else "sqlite_only"))
        kept.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


def _uses_postgres(request: pytest.FixtureRequest) -> bool:
    return backend(request.config) == "postgres" and request.node.get_closest_marker("sqlite_only") is None


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


@contextlib.contextmanager
def _database(cluster: PostgresCluster) -> Iterator[str]:
    """A new, empty database (from template1: about 30 ms), dropped at the end with whatever is
    still connected to it (about 10 ms)."""
    import psycopg

    name = f"test_{os.getpid()}_{next(_numbers)}"
    with psycopg.connect(cluster.url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield cluster.url_for(name)
    finally:
        with psycopg.connect(cluster.url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def postgres_url(postgres_cluster: PostgresCluster) -> Iterator[str]:
    """The URL of a new, empty database of the session's cluster, dropped after the test."""
    with _database(postgres_cluster) as url:
        yield url


@pytest.fixture(scope="module", autouse=True)
def backend_store_for_module(request: pytest.FixtureRequest) -> Iterator[None]:
    """Module (and session) fixtures start before any test's ``isolated_env``: a ``serve`` they start
    takes its store from here. On SQLite: no inherited ``$FLEETCTL_STORE``; on PostgreSQL: a new
    database for the module, dropped after it."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        if not _uses_postgres(request):
            monkeypatch.delenv("FLEETCTL_STORE", raising=False)
            yield
            return
        cluster: PostgresCluster = request.getfixturevalue("postgres_cluster")
        with _database(cluster) as url:
            monkeypatch.setenv("FLEETCTL_STORE", url)
            yield


def backend_store_for_test(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """For ``isolated_env``: on PostgreSQL, ``$FLEETCTL_STORE`` is this test's own new database."""
    if _uses_postgres(request):
        monkeypatch.setenv("FLEETCTL_STORE", str(request.getfixturevalue("postgres_url")))


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
