"""``fleetctl.fabric`` against real sshd: Fabric connections and groups built from fleetctl's routes
(direct, one bastion, two bastions), judged by fleetctl's host-key policy, never Fabric's AutoAdd."""

from __future__ import annotations

import os
import re
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

fabric = pytest.importorskip("fabric")

from fleetctl.errors import ConfigError, HostKeyError  # noqa: E402
from fleetctl.fabric import connection, group  # noqa: E402
from fleetctl.fleet import Fleet  # noqa: E402
from fleetctl.inventory.config import load_config  # noqa: E402
from fleetctl.sandbox import Sandbox  # noqa: E402
from fleetctl.ssh.fabric_policy import FleetctlHostKeyPolicy  # noqa: E402
from tests.conftest import needs_netns  # noqa: E402

WRONG_PIN = "SHA256:" + "A" * 43


@pytest.fixture(autouse=True)
def no_stdin(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Invoke copies our stdin to the remote command; pytest's stdin refuses reads, so give it /dev/null as cron would."""
    with open(os.devnull) as devnull:
        monkeypatch.setattr(sys, "stdin", devnull)
        yield


@pytest.fixture
def fleet(fleet_sandbox: Sandbox, tmp_path: Path) -> Iterator[Fleet]:
    with Fleet(load_config(fleet_sandbox.inventory_path), state_dir=tmp_path / "state") as fleet:
        yield fleet


def _inventory_with(fleet_sandbox: Sandbox, tmp_path: Path, agent: str, fingerprint: str | None) -> Path:
    """A copy of the sandbox inventory where ``agent``'s own pin is replaced (None: removed)."""
    text = fleet_sandbox.inventory_path.read_text()
    start = text.index(f'name = "{agent}"')
    end = text.find("[[agents]]", start)
    end = len(text) if end < 0 else end
    block = re.sub(r'^host_key_fingerprint = ".*"\n', "" if fingerprint is None else f'host_key_fingerprint = "{fingerprint}"\n',
                   text[start:end], count=1, flags=re.M)  # the agent's line comes before its [agents.bastion] table
    path = tmp_path / "ssh-agents.toml"
    path.write_text(text[:start] + block + text[end:])
    return path


def test_a_direct_host_runs_a_command(fleet: Fleet) -> None:
    with connection(fleet, "direct-nv") as c:
        assert isinstance(c, fabric.Connection)
        assert c.original_host == "direct-nv"
        assert c.run("echo hi $FLEETCTL_SANDBOX_HOST", hide=True).stdout == "hi direct-nv\n"
        # fleetctl judged the key (the pin), Fabric's AutoAdd never saw it and remembered nothing.
        judge = c.client._policy
        assert isinstance(judge, FleetctlHostKeyPolicy) and judge.verdict == "matches the pinned fingerprint"
        assert len(c.client.get_host_keys()) == 0


@needs_netns
@pytest.mark.netns
@pytest.mark.parametrize("name, bastions", [("lan-nv", 1), ("deep-nv", 2)])
def test_through_bastions_as_nested_gateways(fleet: Fleet, name: str, bastions: int) -> None:
    c = connection(fleet, name)
    try:
        assert c.run("echo hi $FLEETCTL_SANDBOX_HOST", hide=True).stdout == f"hi {name}\n"
        chain, hop = [], c.gateway
        while isinstance(hop, fabric.Connection):
            chain.append(hop)
            hop = hop.gateway
        route = fleet.hosts.route(name)
        assert [(g.host, g.port) for g in reversed(chain)] == [(h.hostname, h.port) for h in route.bastions]
        assert len(chain) == bastions
        for gateway in chain:  # every bastion judged by fleetctl too
            assert isinstance(gateway.client._policy, FleetctlHostKeyPolicy)
            assert gateway.client._policy.is_bastion and gateway.client._policy.verdict
    finally:
        c.close()
        for gateway in chain:
            gateway.close()


def test_group_by_label_globs_returns_every_hosts_result(fleet: Fleet) -> None:
    chosen = group(fleet, ["direct-nv", "direct-amd", "broken-driver"], labels={"vendor": "nv*"})
    assert isinstance(chosen, fabric.ThreadingGroup)
    assert sorted(c.original_host for c in chosen) == ["broken-driver", "direct-nv"]
    result = chosen.run("echo $FLEETCTL_SANDBOX_HOST", hide=True)
    assert isinstance(result, fabric.GroupResult)
    assert {c.original_host: r.stdout.strip() for c, r in result.items()} == {"direct-nv": "direct-nv",
                                                                              "broken-driver": "broken-driver"}
    chosen.close()
    with pytest.raises(ConfigError, match="no agent matches the labels vendor=intel"):
        group(fleet, labels={"vendor": "intel"})


@needs_netns
@pytest.mark.netns
def test_group_of_all_nvidia_hosts_includes_the_bastion_hosts(fleet: Fleet) -> None:
    chosen = group(fleet, labels={"vendor": "nvidia"})
    names = {c.original_host for c in chosen}
    assert {"direct-nv", "lan-nv", "deep-nv"} <= names
    picked = fabric.ThreadingGroup.from_connections([c for c in chosen if c.original_host in ("direct-nv", "lan-nv", "deep-nv")])
    result = picked.run("echo $FLEETCTL_SANDBOX_HOST", hide=True)
    assert sorted(r.stdout.strip() for r in result.values()) == ["deep-nv", "direct-nv", "lan-nv"]
    chosen.close()


def test_a_wrong_pin_is_refused_naming_the_host(fleet_sandbox: Sandbox, tmp_path: Path) -> None:
    inventory = load_config(_inventory_with(fleet_sandbox, tmp_path, "direct-nv", WRONG_PIN))
    c = connection(inventory, "direct-nv")  # an Inventory works too
    with pytest.raises(HostKeyError) as refused:
        c.run("touch /tmp/should-not-run", hide=True)
    address = fleet_sandbox.agents()[0].hostname
    assert address in str(refused.value) and WRONG_PIN in str(refused.value)
    assert not c.is_connected
    # In a group the refusal is that host's result, the other host still runs.
    mixed = group(inventory, ["direct-nv", "direct-amd"])
    with pytest.raises(fabric.exceptions.GroupException) as failed:
        mixed.run("echo ok", hide=True)
    outcomes = {conn.original_host: r for conn, r in failed.value.result.items()}
    assert isinstance(outcomes["direct-nv"], HostKeyError)
    assert outcomes["direct-amd"].stdout == "ok\n"
    mixed.close()


def test_first_contact_is_recorded_in_fleetctls_known_hosts(fleet_sandbox: Sandbox, tmp_path: Path,
                                                            isolated_env: Path) -> None:
    state = tmp_path / "state"
    fleet = Fleet(load_config(_inventory_with(fleet_sandbox, tmp_path, "direct-nv", None)), state_dir=state)
    route = fleet.hosts.route("direct-nv")
    assert route.target.fingerprint is None
    with connection(fleet, "direct-nv") as c:
        assert c.run("true", hide=True).ok
        assert c.client._policy.verdict.startswith("first contact")
    recorded = (state / "known_hosts").read_text()
    assert f"[{route.target.hostname}]:{route.target.port} ssh-" in recorded
    assert not (isolated_env / ".ssh" / "known_hosts").exists()  # neither Fabric nor paramiko wrote one
    with connection(fleet, "direct-nv") as again:  # now known: judged against fleetctl's file
        assert again.run("true", hide=True).ok
        assert again.client._policy.verdict.startswith("known (")
    assert (state / "known_hosts").read_text() == recorded


def test_an_existing_fabric_task_runs_unchanged(fleet: Fleet) -> None:
    def task(c: Any) -> str:
        return str(c.run("hostname", hide=True).stdout)

    with connection(fleet, "direct-nv") as c:
        assert task(c).strip() == socket.gethostname()
    result = group(fleet, ["direct-nv", "direct-amd"]).run("hostname", hide=True)
    assert len(result) == 2 and not result.failed


def test_a_proxycommand_from_ssh_config_is_the_string_gateway(fleet_sandbox: Sandbox, isolated_env: Path,
                                                                tmp_path: Path) -> None:
    from tests.integration.test_ssh_config_live import RELAY

    host, port = fleet_sandbox.endpoints["direct-nv"]
    relay = tmp_path / "relay.py"
    relay.write_text(RELAY)
    (isolated_env / ".ssh" / "config").write_text(
        f"Host relayed\n  HostName {host}\n  Port {port}\n  User root\n  IdentityFile {fleet_sandbox.client_key}\n"
        f"  ProxyCommand {sys.executable} {relay} %h %p\n")
    inventory = tmp_path / "agents.toml"
    inventory.write_text('[[agents]]\nname = "relayed"\nssh_config_host = "relayed"\n')
    fleet = Fleet(load_config(inventory), state_dir=tmp_path / "state")
    with connection(fleet, "relayed") as c:
        assert isinstance(c.gateway, str) and f"{relay} {host} {port}" in c.gateway  # tokens expanded by fleetctl
        assert c.run("echo $FLEETCTL_SANDBOX_HOST", hide=True).stdout == "direct-nv\n"
        assert c.client._policy.verdict.startswith("first contact")
