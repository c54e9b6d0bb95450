"""Fixtures: an isolated user environment, and a sandbox fleet of real sshd processes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleetctl.sandbox import HostSpec, Sandbox
from fleetctl.sandbox.netns import available as netns_available
from tests.postgres import (  # noqa: F401  (fixtures)
    add_backend_option,
    backend,
    backend_store_for_module,
    backend_store_for_test,
    make_store,
    postgres_cluster,
    postgres_url,
    select_for_backend,
    store_url,
)


def pytest_addoption(parser: pytest.Parser) -> None:
    add_backend_option(parser)  # --store-backend=sqlite|postgres


def pytest_report_header(config: pytest.Config) -> str:
    if backend(config) == "postgres":
        return "store backend: postgres ($FLEETCTL_STORE: a new database of a private cluster per test)"
    return "store backend: sqlite (the file in each test's state dir)"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    select_for_backend(config, items)


@pytest.fixture(autouse=True)
def isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> Path:
    """Tests never read or write the real user's ~/.ssh, config or state. With ``--store-backend=postgres``
    their store is a new PostgreSQL database, through ``$FLEETCTL_STORE``."""
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / ".config"))
    monkeypatch.setenv("XDG_STATE_HOME", str(home / ".local" / "state"))
    # OpenSSH reads ~/.ssh/config from the passwd entry, not $HOME: point it at the isolated one.
    (home / ".ssh" / "config").touch()
    monkeypatch.setenv("FLEETCTL_SSH_CONFIG", str(home / ".ssh" / "config"))
    for var in ("FLEETCTL_CONFIG", "FLEETCTL_STATE_DIR", "SSH_AUTH_SOCK", "FLEETCTL_DEBUG"):
        monkeypatch.delenv(var, raising=False)
    # Set, then deleted: monkeypatch restores only what it recorded, and ``--store`` sets this one
    # in-process, so a test that passes it never leaks it into the next.
    monkeypatch.setenv("FLEETCTL_STORE", "")
    monkeypatch.delenv("FLEETCTL_STORE")
    backend_store_for_test(request, monkeypatch)
    return home


def require_sshd() -> None:
    if not shutil.which("sshd") and not os.path.exists("/usr/sbin/sshd"):
        pytest.fail("sshd is missing: run the tests with scripts/test, which installs openssh-server")


needs_netns = pytest.mark.skipif(not netns_available() and not os.environ.get("CI"),
                                 reason="needs root and iproute2 for network namespaces")

FLEET_HOSTS = [
    HostSpec("direct-nv"),
    HostSpec("direct-amd", vendor="amd"),
    HostSpec("lan-nv", zone="lan", gpus=4),
    HostSpec("deep-nv", zone="deep"),
    HostSpec("broken-driver", mode="driver_error"),
    HostSpec("no-tool", mode="no_tool"),
    HostSpec("refused", mode="refused"),
]


@pytest.fixture(scope="session")
def fleet_sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    """One shared fleet: direct, one-hop and two-hop hosts, AMD, a broken driver, no tool, refused,
    and (with namespaces) a black-holed host. Stopped by PID at the end of the session."""
    require_sshd()
    hosts = list(FLEET_HOSTS)
    if netns_available():
        hosts.append(HostSpec("blackholed", mode="blackhole"))
    sandbox = Sandbox(tmp_path_factory.mktemp("fleet"), hosts)
    sandbox.up()
    yield sandbox
    sandbox.down()


@pytest.fixture
def own_sandbox(tmp_path: Path) -> Iterator[Sandbox]:
    """A private one-host sandbox for tests that break things (kill sshd, change keys)."""
    require_sshd()
    sandbox = Sandbox(tmp_path / "own", [HostSpec("solo")])
    sandbox.up()
    yield sandbox
    sandbox.down()


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run the real ``fleetctl`` entry point in a subprocess with no stdin, as cron would."""
    return subprocess.run([sys.executable, "-m", "fleetctl", *args], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})}, timeout=timeout)
