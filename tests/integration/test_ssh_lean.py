"""The lean Events and Conditions go into the objects of fleetctl's own connections on the fast path
only (fleetctl/ssh/lean_swap.py): threading's on stock paramiko, and paramiko itself untouched."""

from __future__ import annotations

import threading

import paramiko
import pytest

from fleetctl.inventory.config import load_config
from fleetctl.inventory.routes import route_for
from fleetctl.sandbox import Sandbox
from fleetctl.ssh import connect, fastpath, lean_sync
from fleetctl.ssh.connection import SSHConnection
from tests.conftest import needs_netns

pytestmark = pytest.mark.no_store


def _sync_objects(transport: paramiko.Transport, channel: paramiko.Channel) -> dict[str, object]:
    return {
        "transport.clear_to_send": transport.clear_to_send,
        "transport.server_accept_cv": transport.server_accept_cv,
        "transport.completion_event": transport.completion_event,
        "auth_handler.auth_event": transport.auth_handler.auth_event,
        **_channel_objects("channel", channel),
    }


def _channel_objects(name: str, channel: paramiko.Channel) -> dict[str, object]:
    return {
        f"{name}.event": channel.event,
        f"{name}.status_event": channel.status_event,
        f"{name}.out_buffer_cv": channel.out_buffer_cv,
        f"{name}.in_buffer._cv": channel.in_buffer._cv,
        f"{name}.in_stderr_buffer._cv": channel.in_stderr_buffer._cv,
    }


def _kinds(objects: dict[str, object]) -> dict[str, str]:
    def kind(obj: object) -> str:
        if isinstance(obj, (lean_sync.Event, lean_sync.Condition)):
            return "lean"
        assert isinstance(obj, (threading.Event, threading.Condition)), obj
        return "threading"

    return {name: kind(obj) for name, obj in objects.items()}


def _expected_kind(fast: str, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv(fastpath.ENV_SWITCH, fast)
    return "lean" if fastpath.enabled() else "threading"  # an untested paramiko is stock either way


def _kept_shell_channel(conn: SSHConnection) -> paramiko.Channel:
    assert conn.run_kept("echo kept").stdout == "kept\n"
    assert conn._session is not None
    return conn._session.channel


def _assert_paramiko_untouched() -> None:
    modules = (paramiko.transport, paramiko.channel, paramiko.buffered_pipe, paramiko.auth_handler, paramiko.packet)
    assert all(module.threading is threading for module in modules)
    fresh = paramiko.Channel(0)  # a user's own paramiko objects keep threading's
    assert isinstance(fresh.event, threading.Event) and isinstance(fresh.in_buffer._cv, threading.Condition)


@pytest.mark.parametrize("fast", ["1", "0"])
def test_a_direct_connection_keeps_lean_sync_objects_on_the_fast_path_only(
        fleet_sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch, fast: str) -> None:
    expected = _expected_kind(fast, monkeypatch)
    with connect(route_for(load_config(fleet_sandbox.inventory_path).get("direct-nv"))) as conn:
        assert conn._transport is not None
        channel = _kept_shell_channel(conn)
        kinds = _kinds(_sync_objects(conn._transport, channel))
        assert kinds == dict.fromkeys(kinds, expected)
        # Everything still works on them: the kept shell, an exec with window adjusts, its exit status.
        assert conn.run_kept("echo again; echo oops >&2").stdout == "again\n"
        big = conn.run("head -c 3000000 /dev/zero | tr '\\0' x; exit 4")
        assert (len(big.stdout), big.exit_code) == (3_000_000, 4)
    _assert_paramiko_untouched()


@needs_netns
@pytest.mark.parametrize("fast", ["1", "0"])
def test_a_host_behind_a_bastion_keeps_lean_sync_objects_on_its_tunnel_too(
        fleet_sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch, fast: str) -> None:
    expected = _expected_kind(fast, monkeypatch)
    with connect(route_for(load_config(fleet_sandbox.inventory_path).get("lan-nv"))) as conn:
        assert conn._transport is not None and conn._via is not None and conn._via.transport is not None
        tunnel = conn._transport.sock
        assert isinstance(tunnel, paramiko.Channel)
        objects = {**_sync_objects(conn._transport, _kept_shell_channel(conn)), **_channel_objects("tunnel", tunnel)}
        bastion = conn._via.transport
        objects.update({"bastion.clear_to_send": bastion.clear_to_send, "bastion.server_accept_cv": bastion.server_accept_cv,
                        "bastion.completion_event": bastion.completion_event})
        kinds = _kinds(objects)
        assert kinds == dict.fromkeys(kinds, expected)
        assert conn.run_kept("echo $FLEETCTL_SANDBOX_HOST").stdout.strip() == "lan-nv"
        big = conn.run("head -c 3000000 /dev/zero | tr '\\0' x")  # through the tunnel's window
        assert len(big.stdout) == 3_000_000
    _assert_paramiko_untouched()
