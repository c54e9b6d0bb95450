"""The fence around the fast path (fleetctl/ssh/fastpath.py): it runs only on the paramiko releases
whose internals were checked, this test checks them, and FLEETCTL_SSH_FAST=0 is stock paramiko."""

from __future__ import annotations

import hashlib
import importlib
import inspect
import socket

import paramiko
import pytest

from fleetctl.ssh import fastpath

pytestmark = pytest.mark.no_store


def _run_source_hash() -> str:
    return hashlib.sha256(inspect.getsource(paramiko.Transport.run).encode()).hexdigest()


def _owner(path: str, live: dict[str, object]) -> object:
    if path in live:
        return live[path]
    module, _, name = path.rpartition(".")
    try:
        return importlib.import_module(path)
    except ImportError:
        return getattr(importlib.import_module(module), name)


def test_the_fast_path_runs_only_on_tested_releases(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(fastpath.ENV_SWITCH, raising=False)
    tested = paramiko.__version__ in fastpath.TESTED_RUN_SOURCES
    assert fastpath.enabled() is tested
    expected = "fleetctl.ssh.loop" if tested else "paramiko.transport"
    assert fastpath.transport_class().__module__ == expected


@pytest.mark.parametrize("value", ["0", "no", "off", "false"])
def test_the_switch_gives_stock_paramiko(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv(fastpath.ENV_SWITCH, value)
    assert not fastpath.enabled() and fastpath.transport_class() is paramiko.Transport


def test_the_copied_function_and_every_private_name_are_as_tested() -> None:
    """Fails when the installed paramiko, one the fast path would run on, is not what was checked:
    its Transport.run (which loop.py re-implements in parts) or a private name it uses changed."""
    if paramiko.__version__ not in fastpath.TESTED_RUN_SOURCES:
        pytest.skip(f"paramiko {paramiko.__version__}: the fast path is off (stock paramiko); to enable it, check "
                    f"loop.py against this release and add its Transport.run hash {_run_source_hash()}")
    assert _run_source_hash() == fastpath.TESTED_RUN_SOURCES[paramiko.__version__], (
        "paramiko.Transport.run differs from the release loop.py was checked against")
    ours, theirs = socket.socketpair()
    try:
        transport = paramiko.Transport(ours)
        live: dict[str, object] = {
            "paramiko.transport.Transport": transport,
            "paramiko.packet.Packetizer": transport.packetizer,
            "paramiko.auth_handler.AuthHandler": paramiko.auth_handler.AuthHandler(transport),
            "paramiko.channel.Channel": paramiko.Channel(0),
            "paramiko.buffered_pipe.BufferedPipe": paramiko.buffered_pipe.BufferedPipe(),
        }
        missing = [f"{where}.{name}" for where, name in fastpath.PRIVATE_NAMES if not hasattr(_owner(where, live), name)]
        assert not missing, f"paramiko {paramiko.__version__} lacks {missing}"
    finally:
        ours.close()
        theirs.close()
