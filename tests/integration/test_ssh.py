"""The SSH layer against real sshd: direct, one and two bastions, host keys, keys, failures."""

from __future__ import annotations

import subprocess
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from fleetctl.errors import (
    AuthError,
    CommandTimeout,
    ConnectionLost,
    ConnectTimeout,
    HostKeyError,
    OutputTooLarge,
    UnreachableError,
)
from fleetctl.inventory.config import load_config
from fleetctl.inventory.routes import route_for
from fleetctl.sandbox import Sandbox
from fleetctl.ssh import ConnectOptions, HostKeyPolicy, connect
from fleetctl.ssh.known_hosts import KnownHosts
from fleetctl.ssh.seam import Hop, Route
from tests.conftest import needs_netns
from tests.waiting import wait_until

pytestmark = pytest.mark.no_store  # never opens a store: the PostgreSQL pass deselects it


def _route(sandbox: Sandbox, name: str) -> Route:
    return route_for(load_config(sandbox.inventory_path).get(name))


def _unpinned(route: Route) -> Route:
    return Route(tuple(replace(h, fingerprint=None) for h in route.hops), route.connect_timeout)


def test_direct_login_runs_commands_and_transfers_files(fleet_sandbox: Sandbox, tmp_path: Path) -> None:
    with connect(_route(fleet_sandbox, "direct-nv")) as conn:
        result = conn.run("echo out; echo err >&2; exit 3")
        assert (result.exit_code, result.stdout, result.stderr) == (3, "out\n", "err\n")
        big = conn.run("head -c 3000000 /dev/zero | tr '\\0' x")  # larger than the SSH window
        assert len(big.stdout) == 3_000_000
        remote = conn.run("mktemp -d").stdout.strip()
        conn.write_bytes(f"{remote}/f.json", b'{"a": 1}')
        assert conn.read_bytes(f"{remote}/f.json") == b'{"a": 1}'
        assert conn.read_bytes(f"{remote}/f.json", max_bytes=3) == b" 1}"
        conn.get(f"{remote}/f.json", tmp_path / "f.json")
        assert (tmp_path / "f.json").read_bytes() == b'{"a": 1}'
        conn.run(f"rm -rf {remote}").check()


@needs_netns
def test_one_hop_target_is_unreachable_without_its_bastion(fleet_sandbox: Sandbox) -> None:
    route = _route(fleet_sandbox, "lan-nv")
    assert len(route.hops) == 2
    with pytest.raises(UnreachableError):
        connect(Route((route.target,), connect_timeout=2))
    with connect(route) as conn:
        assert conn.run("echo $FLEETCTL_SANDBOX_HOST").stdout.strip() == "lan-nv"


@needs_netns
def test_two_hop_chain_reaches_a_host_only_the_second_bastion_can_see(fleet_sandbox: Sandbox) -> None:
    route = _route(fleet_sandbox, "deep-nv")
    assert len(route.hops) == 3
    with pytest.raises(UnreachableError):
        connect(Route((route.hops[0], route.target), connect_timeout=2))  # first bastion alone is not enough
    with connect(route) as conn:
        assert conn.run("echo $FLEETCTL_SANDBOX_HOST").stdout.strip() == "deep-nv"
        assert [k.fingerprint for k in conn.host_keys] == [
            fleet_sandbox.fingerprints["bastion-1"], fleet_sandbox.fingerprints["bastion-2"],
            fleet_sandbox.fingerprints["deep-nv"]]


def test_trust_on_first_use_records_then_refuses_a_changed_key(own_sandbox: Sandbox, tmp_path: Path) -> None:
    known = KnownHosts(tmp_path / "known_hosts")
    options = ConnectOptions(host_keys=HostKeyPolicy(known))
    route = _unpinned(_route(own_sandbox, "solo"))
    with connect(route, options):
        pass
    recorded = (tmp_path / "known_hosts").read_text()
    assert recorded.startswith(f"[127.0.0.1]:{route.target.port} ssh-ed25519 ")
    with connect(route, options):  # same key: accepted, nothing appended
        pass
    assert (tmp_path / "known_hosts").read_text() == recorded
    # Rebuild the host with a new key on the same port.
    host_key = own_sandbox.host_dir("solo") / "ssh_host_ed25519_key"
    host_key.unlink()
    host_key.with_suffix(".pub").unlink()
    own_sandbox.stop_host("solo")
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(host_key)], check=True)
    from fleetctl.sandbox import sshd
    conf = own_sandbox.directory / "sshd_solo.conf"
    proc = subprocess.Popen([sshd.sshd_binary(), "-D", "-e", "-f", str(conf)], stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        def answers() -> bool:
            try:
                connect(route, ConnectOptions(host_keys=HostKeyPolicy(accept_any=True))).close()
            except UnreachableError:
                return False
            return True

        wait_until(answers, 5)
        with pytest.raises(HostKeyError) as caught:
            connect(route, options)
        assert caught.value.expected in str(caught.value) and caught.value.offered in str(caught.value)
        assert "127.0.0.1" in str(caught.value)
        # The explicit opt-out still connects.
        connect(route, ConnectOptions(host_keys=HostKeyPolicy(known, accept_any=True))).close()
    finally:
        sshd.stop(proc.pid)


def test_pinned_fingerprint_mismatch_is_refused(fleet_sandbox: Sandbox) -> None:
    route = _route(fleet_sandbox, "direct-nv")
    wrong = fleet_sandbox.fingerprints["direct-amd"]
    bad = Route((replace(route.target, fingerprint=wrong),))
    with pytest.raises(HostKeyError, match="expected .* offered"):
        connect(bad)


def test_wrong_key_is_auth_error(fleet_sandbox: Sandbox, tmp_path: Path) -> None:
    other = tmp_path / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    target = _route(fleet_sandbox, "direct-nv").target
    with pytest.raises(AuthError, match="refused"):
        connect(Route((Hop(target.hostname, target.user, target.port, str(other)),)))


def test_passphrase_key_without_agent_says_ssh_add(fleet_sandbox: Sandbox, tmp_path: Path) -> None:
    locked = tmp_path / "locked_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "secret", "-f", str(locked)], check=True)
    target = _route(fleet_sandbox, "direct-nv").target
    with pytest.raises(AuthError, match="passphrase-protected.*ssh-add"):
        connect(Route((Hop(target.hostname, target.user, target.port, str(locked)),)))


def test_refused_connection_is_unreachable_at_once(fleet_sandbox: Sandbox) -> None:
    started = time.monotonic()
    with pytest.raises(UnreachableError, match="connection refused"):
        connect(_route(fleet_sandbox, "refused"))
    assert time.monotonic() - started < 2


@needs_netns
def test_black_holed_address_times_out_at_the_connect_timeout(fleet_sandbox: Sandbox) -> None:
    route = _route(fleet_sandbox, "blackholed")
    with pytest.raises(ConnectTimeout, match="within 1s"):
        connect(Route(route.hops, connect_timeout=1))


def test_command_timeout(fleet_sandbox: Sandbox) -> None:
    with connect(_route(fleet_sandbox, "direct-nv")) as conn:
        with pytest.raises(CommandTimeout):
            conn.run("sleep 5", timeout=0.5)
        assert conn.run("echo still-usable").stdout == "still-usable\n"


def test_killing_sshd_mid_command_is_connection_lost(own_sandbox: Sandbox) -> None:
    conn = connect(_route(own_sandbox, "solo"))
    killer = threading.Timer(0.5, own_sandbox.stop_host, args=("solo",))
    killer.start()
    try:
        with pytest.raises(ConnectionLost):
            conn.run("sleep 10", timeout=8)
        assert not conn.is_open
    finally:
        killer.join()
        conn.close()


def test_kept_session_answers_like_an_exec_and_recovers_from_timeouts_and_floods(fleet_sandbox: Sandbox) -> None:
    with connect(_route(fleet_sandbox, "direct-nv")) as conn:
        result = conn.run_kept("echo out; echo err >&2; exit 3")  # `exit` ends the command, not the shell
        assert (result.exit_code, result.stdout, result.stderr) == (3, "out\n", "err\n")
        assert conn.run_kept("printf abc # a trailing comment").stdout == "abc"
        assert conn.run_kept("cat").stdout == ""  # stdin is /dev/null: a tool cannot swallow the next request
        forged = conn.run_kept("printf '\\n\\036fleetctl-end-0000000000000000 0\\n'; exit 5")
        assert forged.exit_code == 5  # the end marker carries a nonce no output can guess
        with pytest.raises(CommandTimeout):
            conn.run_kept("sleep 5", timeout=0.5)
        assert conn.run_kept("echo again").stdout == "again\n"  # a new shell replaced the timed-out one
        with pytest.raises(OutputTooLarge) as caught:
            conn.run_kept("head -c 2000000 /dev/zero | tr '\\0' x", max_stdout=100_000)
        assert len(caught.value.result.stdout) == 100_000
        assert conn.run_kept("echo after").stdout == "after\n"
        with pytest.raises(OutputTooLarge, match="stderr larger than 1000"):
            conn.run_kept("head -c 500000 /dev/zero >&2", max_stderr=1000)
        assert conn.run_kept("echo err >&2; echo out").stderr == "err\n"
        big = conn.run_kept("head -c 3000000 /dev/zero | tr '\\0' x")  # larger than the SSH window
        assert len(big.stdout) == 3_000_000
