"""Three ``fleetctl serve`` processes on one real PostgreSQL and a sandbox fleet of real sshd: 300
jobs each append a line to a marker file; one controller is SIGKILLed half-way, another SIGSTOPped
for longer than its lease and then woken. Every job ends exactly once, every agent's heartbeats
resume within the lease, and the paused controller writes nothing under its old id after waking."""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleetctl.fleet import Fleet
from fleetctl.sandbox import HostSpec, Sandbox
from fleetctl.store import Store, open_store
from fleetctl.store.leases import assign, controller_rows
from fleetctl.store.postgres import IDLE_IN_TRANSACTION_MS
from tests.conftest import require_sshd, run_cli
from tests.waiting import wait_for

pytestmark = pytest.mark.postgres

LEASE_S = 3.0
INTERVAL_S = 0.5
JOBS = 300
# A takeover: the lease runs out, the others notice at their next renewal (lease / 3), the first
# beat comes within one interval; a controller stopped inside a transaction holds its locks until
# PostgreSQL ends its session (fleetctl.store.postgres.IDLE_IN_TRANSACTION_MS); plus slack for a 2-core CI machine
# running three controllers and six hosts (the new holder's first beat also makes the connection).
RESUME_WITHIN_S = LEASE_S + LEASE_S / 3 + INTERVAL_S + IDLE_IN_TRANSACTION_MS / 1000 + 2.5
AGENTS = [f"node{n}" for n in range(6)]


@pytest.fixture
def six_hosts(tmp_path: Path) -> Iterator[Sandbox]:
    require_sshd()
    sandbox = Sandbox(tmp_path / "sb", [HostSpec(agent, gpus=2) for agent in AGENTS])
    sandbox.up()
    yield sandbox
    sandbox.down()


def count(store: Store, sql: str, params: tuple[object, ...] = ()) -> int:
    return int(store.query(sql, params)[0][0])


def test_three_controllers_share_the_fleet_through_a_kill_and_a_pause(
        six_hosts: Sandbox, postgres_url: str, tmp_path: Path) -> None:
    config = tmp_path / "agents.toml"
    config.write_text(f'[controller]\nstore = "{postgres_url}"\nheartbeat_interval_s = {INTERVAL_S}\n'
                      f"lease_s = {LEASE_S}\nscheduler_tick_s = 0.2\nkill_grace_s = 1\n\n"
                      + six_hosts.inventory_path.read_text())
    marker = tmp_path / "marker.txt"
    serves: list[subprocess.Popen[str]] = []
    logs = [tmp_path / f"serve-{n}.log" for n in range(3)]
    store = open_store(postgres_url, tmp_path / "reader")
    try:
        for n in range(3):
            with open(logs[n], "w") as log:
                serves.append(subprocess.Popen(
                    [sys.executable, "-m", "fleetctl", "serve", "--config", str(config),
                     "--state-dir", str(tmp_path / f"state-{n}")],
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log, text=True))
        live = lambda: {c.pid: c for c in controller_rows(store) if c.live}  # noqa: E731

        def balanced() -> bool:  # three live, each holding exactly its share: two agents
            rows = list(live().values())
            owners = assign(AGENTS, [c.id for c in rows])
            return len(rows) == 3 and all(sorted(c.agents) == sorted(a for a in AGENTS if owners[a] == c.id)
                                          and len(c.agents) == 2 for c in rows)
        wait_for("three live controllers, each holding its share of the agents", balanced, 30)

        with Fleet.from_config(config, state_dir=tmp_path / "submitter") as fleet:
            script = f'echo "$FLEETCTL_JOB_ID" >> {marker}; sleep 1'
            ids = [fleet.submit(script, name=f"m{n}").id for n in range(JOBS)]
        ended = lambda: count(store, "SELECT COUNT(*) FROM jobs WHERE finished IS NOT NULL")  # noqa: E731

        wait_for("a third of the jobs", lambda: ended() >= JOBS // 3, 120)
        killed, paused = serves[0], serves[1]
        killed.send_signal(signal.SIGKILL)
        killed.wait(timeout=10)
        killed_at = time.time()

        wait_for("half of the jobs", lambda: ended() >= JOBS // 2, 120)
        old_id = live()[paused.pid].id
        paused.send_signal(signal.SIGSTOP)
        wait_for("the paused controller given up for dead", lambda: paused.pid not in live(), 3 * LEASE_S + 5)
        time.sleep(LEASE_S)  # asleep well past its lease (a fixed pause is the scenario, not a wait)
        # Stopped, it cannot write: what carries its old id now is all there will ever be.
        written = (count(store, "SELECT COUNT(*) FROM telemetry WHERE controller = ?", (old_id,)),
                   count(store, "SELECT COUNT(*) FROM job_events WHERE controller = ?", (old_id,)))
        paused.send_signal(signal.SIGCONT)
        woke_at = time.time()

        wait_for("every job to end", lambda: ended() == JOBS, 180)
        wait_for("the woken controller to rejoin under a new id",
                 lambda: paused.pid in live() and live()[paused.pid].id != old_id, 30)
        # Rejoined, it takes its share back (the others hand it over at their next renewal): wait
        # until every agent has beaten since the wake; nothing new under the old id all the while.
        wait_for("every agent beating after the wake", lambda: count(
            store, "SELECT COUNT(DISTINCT agent) FROM telemetry WHERE ts > ?", (woke_at,)) == len(AGENTS),
                 2 * RESUME_WITHIN_S)
        assert written == (count(store, "SELECT COUNT(*) FROM telemetry WHERE controller = ?", (old_id,)),
                           count(store, "SELECT COUNT(*) FROM job_events WHERE controller = ?", (old_id,)))

        # Every job ran exactly once and ended once.
        lines = collections.Counter(marker.read_text().split())
        assert set(lines) == set(ids) and set(lines.values()) == {1}, {k: v for k, v in lines.items() if v != 1}
        states = collections.Counter(row[0] for row in store.query("SELECT state FROM jobs"))
        assert states == {"succeeded": JOBS}, states
        finals = store.query("SELECT job_id, COUNT(*) FROM job_events WHERE event = 'succeeded' GROUP BY job_id")
        assert len(finals) == JOBS and {row[1] for row in finals} == {1}

        # Every agent's heartbeats went on: no gap past a takeover's time, after the kill or the pause.
        for agent in AGENTS:
            beats = [row[0] for row in store.query(
                "SELECT ts FROM telemetry WHERE agent = ? AND ts > ? ORDER BY ts", (agent, killed_at - 5))]
            gaps = [later - earlier for earlier, later in zip(beats, beats[1:], strict=False)]
            assert beats and beats[-1] > woke_at and max(gaps) <= RESUME_WITHIN_S, (agent, max(gaps))

        shown = run_cli("controllers", "--json", "--config", str(config), "--state-dir", str(tmp_path / "cli"))
        assert shown.returncode == 0, shown.stderr
        listed = json.loads(shown.stdout)
        by_state = collections.Counter(c["state"] for c in listed["controllers"])
        assert by_state["live"] == 2 and by_state["lost"] == 2 and not listed["unheld_agents"], listed
        assert sorted(a for c in listed["controllers"] for a in c["agents"]) == AGENTS
    finally:
        for serve in serves:
            if serve.poll() is None:
                serve.send_signal(signal.SIGCONT)
                serve.terminate()
        for serve in serves:
            serve.wait(timeout=30)
        store.close()
    for serve, log in zip(serves[1:], logs[1:], strict=True):
        text = log.read_text()
        noteworthy = [line for line in text.splitlines() if "online" not in line and " INFO " not in line]
        assert serve.returncode == 0 and "Traceback" not in text, (serve.returncode, noteworthy[-40:])
    assert "rejoined as" in logs[1].read_text()


def test_a_controller_that_stops_hands_its_agents_over_at_once(
        six_hosts: Sandbox, postgres_url: str, tmp_path: Path) -> None:
    """A clean stop frees its leases (no wait for expiry); `controllers` shows who holds what."""
    config = tmp_path / "agents.toml"
    config.write_text(f'[controller]\nstore = "{postgres_url}"\nheartbeat_interval_s = {INTERVAL_S}\nlease_s = 30\n\n'
                      + six_hosts.inventory_path.read_text())
    env = {**os.environ}
    serves = [subprocess.Popen([sys.executable, "-m", "fleetctl", "serve", "--no-jobs", "--config", str(config),
                                "--state-dir", str(tmp_path / f"s{n}")], stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
              for n in range(2)]
    store = open_store(postgres_url, tmp_path / "reader")
    try:
        held = lambda: {c.pid: len(c.agents) for c in controller_rows(store) if c.live}  # noqa: E731
        wait_for("two controllers sharing six agents", lambda: sorted(held().values()) != [] and
                 len(held()) == 2 and sum(held().values()) == 6 and min(held().values()) > 0, 30)
        table = run_cli("controllers", "--config", str(config), "--state-dir", str(tmp_path / "cli"))
        assert table.returncode == 0 and "live" in table.stdout, table.stderr
        started = time.monotonic()
        serves[0].terminate()
        assert serves[0].wait(timeout=30) == 0
        # lease_s is 30: only the freed leases explain a takeover within one renewal (10 s).
        wait_for("the other controller holding all six", lambda: held() == {serves[1].pid: 6}, 15)
        assert time.monotonic() - started < 15
    finally:
        for serve in serves:
            if serve.poll() is None:
                serve.terminate()
            serve.communicate(timeout=30)
        store.close()


def test_serve_rides_out_a_database_restart(own_sandbox: Sandbox, tmp_path: Path) -> None:
    """The store's server goes away for longer than the lease and comes back: serve logs one line per
    failed write, keeps running, rejoins, and its agent's heartbeats resume."""
    from fleetctl.sandbox.postgres import PostgresCluster, bindir

    if bindir() is None:
        pytest.skip("PostgreSQL's server is missing: run the tests with scripts/test, which installs it")
    cluster = PostgresCluster(tmp_path / "pg").start()
    data = Path(cluster.state.root) / "data"  # type: ignore[union-attr]
    pg_ctl = str(bindir() / "pg_ctl")  # type: ignore[operator]
    config = tmp_path / "agents.toml"
    config.write_text(f'[controller]\nstore = "{cluster.url}"\nheartbeat_interval_s = {INTERVAL_S}\nlease_s = {LEASE_S}\n\n'
                      + own_sandbox.inventory_path.read_text())
    log = tmp_path / "serve.log"
    with open(log, "w") as stderr:
        serve = subprocess.Popen([sys.executable, "-m", "fleetctl", "serve", "--no-jobs", "--config", str(config),
                                  "--state-dir", str(tmp_path / "state")], stdin=subprocess.DEVNULL,
                                 stdout=subprocess.DEVNULL, stderr=stderr, text=True)
    try:
        def beats_since(moment: float) -> int:
            store = open_store(cluster.url, tmp_path / "reader")
            try:
                return count(store, "SELECT COUNT(*) FROM telemetry WHERE ts > ?", (moment,))
            finally:
                store.close()
        wait_for("the first beats", lambda: beats_since(0) > 0, 30)
        cluster._run(pg_ctl, "stop", "-D", str(data), "-m", "fast", "-w")
        down_at = time.monotonic()
        wait_for("a failed write", lambda: "store unavailable" in log.read_text(), 30)
        while time.monotonic() - down_at < 2 * LEASE_S:  # away for longer than the lease: it is a scenario
            assert serve.poll() is None, log.read_text()[-2000:]
            time.sleep(0.2)
        cluster._run(pg_ctl, "start", "-D", str(data), "-l", str(data.parent / "postgres.log"), "-w")
        back_at = time.time()
        wait_for("heartbeats again after the restart", lambda: beats_since(back_at) > 0, 30)
    finally:
        serve.terminate()
        serve.wait(timeout=30)
        cluster.stop()
    text = log.read_text()
    assert serve.returncode == 0 and "Traceback" not in text, text[-3000:]
