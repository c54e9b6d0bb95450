"""A real fleet's shape: dozens of hosts behind one bastion whose sshd keeps OpenSSH's defaults
(MaxStartups 10:30:100, MaxSessions 10), in network namespaces so the hosts are reachable only
through it, plus a few hosts two bastions deep. Every host shares one connection to each bastion."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleetctl import Fleet
from fleetctl.sandbox import HostSpec, Sandbox
from tests.conftest import needs_netns, require_sshd, run_cli
from tests.waiting import wait_until

LAN_HOSTS = 40
DEEP_HOSTS = 6

pytestmark = needs_netns


@pytest.fixture(scope="module")
def bastion_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    require_sshd()
    hosts = [HostSpec(f"lan-{n:02d}", gpus=1, zone="lan") for n in range(LAN_HOSTS)]
    hosts += [HostSpec(f"deep-{n}", gpus=1, zone="deep") for n in range(DEEP_HOSTS)]
    sandbox = Sandbox(tmp_path_factory.mktemp("bastion-fleet"), hosts, use_netns=True)
    sandbox.up()
    yield sandbox
    sandbox.down()


def logins(sandbox: Sandbox, bastion: str) -> int:
    """Logins the bastion's sshd accepted so far (its log, LogLevel INFO)."""
    text = (sandbox.directory / f"sshd_{bastion}.log").read_text(errors="replace")
    return len(re.findall(r"Accepted publickey for ", text))


def test_cron_heartbeats_see_every_host_and_log_in_to_each_bastion_once(bastion_fleet: Sandbox) -> None:
    """Three cron-style runs (a fresh process each, as cron starts them): every host ok every time,
    and each run logs in to each bastion once, not once per host."""
    config = str(bastion_fleet.inventory_path)
    for _ in range(3):
        before = {b: logins(bastion_fleet, b) for b in ("bastion-1", "bastion-2")}
        done = run_cli("heartbeat", "--config", config, "--json", timeout=120)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        statuses = {snap["agent"]: snap["status"] for snap in json.loads(done.stdout)}
        assert len(statuses) == LAN_HOSTS + DEEP_HOSTS and set(statuses.values()) == {"ok"}, statuses
        after = {b: logins(bastion_fleet, b) for b in ("bastion-1", "bastion-2")}
        # bastion-1 carries both chains (lan, and deep through bastion-2): one login for both.
        assert after["bastion-1"] - before["bastion-1"] == 1
        assert after["bastion-2"] - before["bastion-2"] == 1


def test_a_restarted_bastion_is_one_reconnect_for_every_host_behind_it(bastion_fleet: Sandbox) -> None:
    with Fleet.from_config(bastion_fleet.inventory_path) as fleet:
        fleet.hosts.connect_options.hop_retry_after_s = 0.2  # the test waits for the retry, not 5 s
        first = fleet.heartbeat(record=False)
        assert {s.status for s in first} == {"ok"}
        bastion_fleet.stop_host("bastion-1")
        try:
            down = fleet.heartbeat(record=False)
        finally:
            bastion_fleet.restart_host("bastion-1")  # a new sshd, a new log: its logins count from zero
        bastion = "{}@{}:{}".format(fleet.inventory.get("lan-00").bastion.ssh_user,  # type: ignore[union-attr]
                                    *bastion_fleet.endpoints["bastion-1"])
        others = [(s.agent, s.status, s.error) for s in down if s.status != "bastion_unreachable"]
        assert not others, others
        assert all(bastion in (s.error or "") for s in down), down.snapshots[0].error
        assert wait_until(lambda: {s.status for s in fleet.heartbeat(record=False)} == {"ok"}, timeout=60)
        assert logins(bastion_fleet, "bastion-1") == 1


def test_a_host_the_bastion_cannot_reach_is_that_hosts_status_only(bastion_fleet: Sandbox, tmp_path: Path) -> None:
    with Fleet.from_config(bastion_fleet.inventory_path) as fleet:
        bastion_fleet.stop_host("lan-03")
        try:
            beat = {s.agent: s for s in fleet.heartbeat(record=False)}
        finally:
            bastion_fleet.restart_host("lan-03")
        assert beat["lan-03"].status == "unreachable", beat["lan-03"]
        assert {s.status for name, s in beat.items() if name != "lan-03"} == {"ok"}


def test_hosts_behind_the_bastion_are_read_by_the_shared_reader(bastion_fleet: Sandbox) -> None:
    """After login a host behind the bastion costs no thread of its own: its transport, and the
    bastion's, are read by the one shared reader (fast path)."""
    import threading

    from fleetctl.ssh import fastpath

    if not fastpath.enabled():
        pytest.skip("stock paramiko (FLEETCTL_SSH_FAST=0 or an untested release): one thread per connection")
    with Fleet.from_config(bastion_fleet.inventory_path) as fleet:
        assert {s.status for s in fleet.heartbeat(record=False)} == {"ok"}

        def transports() -> list[object]:
            return [fleet.hosts.connection(agent)._transport for agent in fleet.agents]  # type: ignore[attr-defined]

        def all_handed_over() -> bool:
            fleet.heartbeat(record=False)  # packets drive the hand-over: each loop looks before it reads
            return all(t.handed_over for t in transports())  # type: ignore[attr-defined]

        assert wait_until(all_handed_over, timeout=60)
        for _ in range(3):  # beats keep working through the reader
            assert {s.status for s in fleet.heartbeat(record=False)} == {"ok"}
        own = [t for t in threading.enumerate() if t.name.startswith("Thread-") or "own reader" in t.name]
        assert len(own) <= 4, [t.name for t in own]
