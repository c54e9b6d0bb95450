"""Health state machine, the SQLite history, CSV appends, and Fleet over an in-process fake transport."""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pandas as pd
import pytest

from fleetctl.errors import ConfigError, ConnectionLost, UnreachableError
from fleetctl.fleet import Fleet
from fleetctl.inventory.config import Agent, Inventory
from fleetctl.ssh.seam import CommandResult, Route
from fleetctl.store import Store, open_store
from fleetctl.telemetry.frames import COLUMNS, append_csv, to_dataframe
from fleetctl.telemetry.health import Health, HealthPolicy, advance
from fleetctl.telemetry.heartbeat import MARK
from fleetctl.telemetry.history import history, parse_since, prune, record
from fleetctl.telemetry.snapshot import GpuSample, TelemetrySnapshot
from fleetctl.testing import Answer, ScriptedConnection

POLICY = HealthPolicy(offline_after_misses=3, offline_grace_s=600)
NOW = datetime(2026, 11, 21, 12, 0, tzinfo=timezone.utc)


def snap(agent: str, status: str = "ok", at: datetime = NOW, gpus: int = 2) -> TelemetrySnapshot:
    samples = [GpuSample(index=i, vendor="nvidia", memory_total_mib=1000, memory_used_mib=10 * i) for i in range(gpus)]
    return TelemetrySnapshot(agent=agent, timestamp=at, status=status,  # type: ignore[arg-type]
                             gpus=samples if status == "ok" else [], error=None if status == "ok" else "boom")


def test_a_blip_is_not_a_death() -> None:
    health = advance(Health(), True, 0, POLICY)
    assert health.state == "online"
    for beat in (5, 10):
        health = advance(health, False, beat, POLICY)
        assert health.state == "online"
    assert advance(health, True, 15, POLICY) == Health("online", 0, 15, 15, 0)
    health = advance(advance(health, False, 20, POLICY), False, 25, POLICY)
    assert advance(health, False, 30, POLICY).state == "offline"


def test_grace_period_marks_offline_before_n_misses() -> None:
    health = advance(Health(), True, 0, POLICY)
    health = advance(health, False, 700, POLICY)  # one miss, but nothing good for 700 s > 600 s
    assert (health.state, health.misses, health.since) == ("offline", 1, 700)


def test_never_seen_good_stays_unknown_until_n_misses() -> None:
    health = Health()
    for beat in range(2):
        health = advance(health, False, beat, POLICY)
        assert health.state == "unknown"
    assert advance(health, False, 3, POLICY).state == "offline"


def test_record_history_and_transitions(make_store: Callable[[], Store]) -> None:
    """On SQLite and on PostgreSQL (the ``make_store`` fixture's two params)."""
    store = make_store()
    assert [t.after for t in record(store, [snap("a"), snap("b", "timeout")], POLICY)] == ["online"]
    record(store, [snap("a", at=NOW + timedelta(seconds=5))], POLICY)
    frame = history(store)
    assert list(frame.columns) == COLUMNS
    assert len(frame) == 2 + 1 + 2 and frame["gpu_index"].dtype == "Int64"
    assert frame.equals(history(make_store()))  # a second process sees the same rows
    only_a = history(store, since=NOW + timedelta(seconds=1), agents=["a"])
    assert len(only_a) == 2 and set(only_a["agent"]) == {"a"}
    assert history(store, agents=["b"]).iloc[0]["status"] == "timeout"
    assert prune(store, retention_days=1, now=(NOW + timedelta(days=1, seconds=2)).timestamp()) == 3
    assert len(history(store)) == 2


def test_round_and_history_frames_have_the_same_dtypes(make_store: Callable[[], Store]) -> None:
    store = make_store()
    snaps = [snap("a"), snap("b", "unreachable")]
    record(store, snaps, POLICY)
    assert history(store).dtypes.equals(to_dataframe(snaps).dtypes)


def test_parse_since() -> None:
    assert parse_since("1h", NOW) == NOW - timedelta(hours=1)
    assert parse_since("90s", NOW) == NOW - timedelta(seconds=90)
    assert parse_since("2026-11-01T00:00", NOW) == datetime(2026, 11, 1, tzinfo=timezone.utc)
    with pytest.raises(ConfigError, match="neither a duration nor an ISO time"):
        parse_since("yesterday")


def _append_many(path: str, worker: int) -> None:
    frame = to_dataframe([snap(f"w{worker}", at=NOW + timedelta(seconds=i), gpus=8) for i in range(50)])
    for _ in range(4):
        append_csv(path, frame)


def test_concurrent_csv_appends_never_interleave(tmp_path: Path) -> None:
    target = tmp_path / "gpus.csv"
    target.touch()  # an empty file still gets the header
    workers = [multiprocessing.Process(target=_append_many, args=(str(target), n)) for n in range(4)]
    for process in workers:
        process.start()
    for process in workers:
        process.join(60)
    text = target.read_text()
    assert text.count("timestamp,agent") == 1
    frame = pd.read_csv(target)
    assert len(frame) == 4 * 4 * 50 * 8 and list(frame.columns) == COLUMNS


def test_unwritable_csv_is_a_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot write .*: Is a directory"):
        append_csv(tmp_path, to_dataframe([snap("a")]))


HEARTBEAT_OUTPUT = CommandResult("", 0, f"{MARK}-cmd given\n0, GPU-1, Fake GPU, 100, 10, 90, 5, 40, 50, 100\n{MARK}-rc 0\n"
                                        "0.5 0.4 0.3 1/100 42\n", "")


def test_fleet_reopens_a_dead_connection_and_never_stops_at_a_bad_host(tmp_path: Path) -> None:
    query = ("nvidia-smi --query-gpu=index,uuid,name,memory.total,memory.used,memory.free,utilization.gpu,"
             "temperature.gpu,power.draw,power.limit --format=csv,noheader,nounits")
    agents = [Agent(name=n, hostname=f"{n}.example", gpu_query_cmd=query) for n in ("good", "flaky", "dead")]
    opened: list[str] = []
    # One list of answers per connection opened: flaky's first connection drops, its second works.
    scripts: dict[str, list[list[Answer]]] = {"good.example": [], "flaky.example": [[ConnectionLost("dropped")]]}

    def connector(route: Route) -> ScriptedConnection:
        host = route.hops[-1].hostname
        opened.append(host)
        if host == "dead.example":
            raise UnreachableError("connection refused by dead.example:22")
        answers = scripts[host].pop(0) if scripts[host] else []
        return ScriptedConnection(route, answers, default=HEARTBEAT_OUTPUT)

    with Fleet(Inventory(tmp_path / "a.toml", agents, {}), state_dir=tmp_path, connector=connector) as fleet:
        first = fleet.heartbeat()
        second = fleet.heartbeat()
        statuses = {s.agent: s.status for s in first}
        assert statuses == {"good": "ok", "flaky": "ok", "dead": "unreachable"}
        assert first.snapshots[0].gpus[0].temperature_c == 40 and first.snapshots[0].host.load_1m == 0.5
        # flaky's connection died mid-run and was reopened once; good kept its connection.
        assert opened.count("good.example") == 1 and opened.count("flaky.example") == 2
        assert len(second.ok) == 2
        assert set(fleet.health()["health"]) == {"online", "unknown"}
        assert len(fleet.history(agent="good")) == 2


def test_serve_writes_beats_in_batches_and_loses_none_when_it_stops(tmp_path: Path) -> None:
    import threading

    from fleetctl.serve.controller import Controller

    query = "nvidia-smi --query-gpu=index,uuid,name,memory.total,memory.used,memory.free,utilization.gpu," \
            "temperature.gpu,power.draw,power.limit --format=csv,noheader,nounits"
    agents = [Agent(name=f"a{i}", hostname=f"h{i}.example", gpu_query_cmd=query, heartbeat_interval_s=0.05)
              for i in range(5)]
    fleet = Fleet(Inventory(tmp_path / "a.toml", agents, {}), state_dir=tmp_path,
                  connector=lambda route: ScriptedConnection(route, default=HEARTBEAT_OUTPUT))
    writes: list[int] = []
    record = fleet.hosts.record
    fleet.hosts.record = lambda batch, fence=None: (writes.append(len(batch)), record(batch, fence))[1]  # type: ignore[method-assign]
    controller = Controller(fleet)
    stop = threading.Event()
    timer = threading.Timer(1.5, stop.set)
    timer.start()
    controller.run_until(stop)
    store = open_store(fleet.hosts.store_url, tmp_path)
    try:
        rows = store.query("SELECT count(*) FROM telemetry")[0][0]
    finally:
        store.close()
    assert controller.beats > 20 and rows == controller.beats == sum(writes)  # the last batch was flushed at stop
    assert len(writes) < controller.beats / 3  # several beats per transaction, not one each
