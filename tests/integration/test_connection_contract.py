"""One contract, two connections: the real SSH connection (to a sandbox sshd) and the shipped fake
(``fleetctl.testing.ScriptedConnection``) raise exactly the same types for the same situations, so
code tested on the fake behaves the same on a real host."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fleetctl.errors import ConnectionLost, RemoteFileNotFound
from fleetctl.inventory.config import load_config
from fleetctl.inventory.routes import route_for
from fleetctl.sandbox import Sandbox
from fleetctl.ssh import connect
from fleetctl.ssh.seam import CommandResult, Connection
from fleetctl.testing import ScriptedConnection

pytestmark = pytest.mark.no_store


def _fake_answer(command: str) -> CommandResult:
    return CommandResult(command, 3 if "exit 3" in command else 0, "out\n", "")


@pytest.fixture(params=["sshd", "fake"])
def conn(request: pytest.FixtureRequest, fleet_sandbox: Sandbox) -> Iterator[Connection]:
    route = route_for(load_config(fleet_sandbox.inventory_path).get("direct-nv"))
    made: Connection = connect(route) if request.param == "sshd" else ScriptedConnection(route, default=_fake_answer)
    yield made
    made.close()


def _scratch(conn: Connection) -> str:
    if isinstance(conn, ScriptedConnection):
        return "/scratch"
    return conn.run("mktemp -d").stdout.strip()


def test_run_returns_the_exit_code_without_raising(conn: Connection) -> None:
    result = conn.run("echo out; exit 3")
    assert isinstance(result, CommandResult) and (result.exit_code, result.stdout) == (3, "out\n")


def test_files_round_trip_and_a_tail_reads_the_end(conn: Connection, tmp_path: Path) -> None:
    where = _scratch(conn)
    conn.write_bytes(f"{where}/f.json", b'{"a": 1}')
    assert conn.read_bytes(f"{where}/f.json") == b'{"a": 1}'
    assert conn.read_bytes(f"{where}/f.json", max_bytes=3) == b" 1}"
    conn.get(f"{where}/f.json", tmp_path / "f.json")
    assert (tmp_path / "f.json").read_bytes() == b'{"a": 1}'


@pytest.mark.parametrize("read", [
    lambda conn, path, tmp: conn.read_bytes(path),
    lambda conn, path, tmp: conn.read_bytes(path, max_bytes=10),
    lambda conn, path, tmp: conn.get(path, tmp / "x"),
], ids=["read_bytes", "read_tail", "get"])
def test_a_missing_file_is_remote_file_not_found(conn: Connection, tmp_path: Path,
                                                 read: Callable[[Connection, str, Path], object]) -> None:
    with pytest.raises(RemoteFileNotFound):
        read(conn, f"{_scratch(conn)}/never-written", tmp_path)


def test_a_closed_connection_is_connection_lost_not_a_library_error(conn: Connection) -> None:
    conn.close()
    assert not conn.is_open
    for attempt in (lambda: conn.run("true"), lambda: conn.run_kept("true")):
        with pytest.raises(ConnectionLost):
            attempt()
