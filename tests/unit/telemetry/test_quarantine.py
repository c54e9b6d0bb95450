"""The store's side of GPU health (fleetctl.telemetry.quarantine): a failed GPU stays quarantined beat
after beat, Xids count across beats, clear-gpu and the reboot rule return it, a running job hears of it.
Runs on SQLite and (with --store-backend=postgres) PostgreSQL."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import pytest

from fleetctl.store import Store, open_store
from fleetctl.telemetry import quarantine
from fleetctl.telemetry.health import HealthPolicy
from fleetctl.telemetry.history import agent_statuses, record
from fleetctl.telemetry.parsers.findings import Finding
from fleetctl.telemetry.snapshot import GpuHealth, GpuHealthReport, GpuSample, HealthFinding, HostBasics, TelemetrySnapshot

T0 = 1_800_000_000.0


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    opened = open_store(os.environ.get("FLEETCTL_STORE") or None, tmp_path)
    yield opened
    opened.close()


def beat(at: float, *findings: Finding, uptime: float = 1000.0, cursor: str | None = None) -> TelemetrySnapshot:
    report = GpuHealthReport(gpus=[GpuHealth(index=i) for i in range(2)], findings=[HealthFinding(**asdict(f)) for f in findings],
                             buses={"0000:01:00": 0, "0000:02:00": 1}, journal_cursor=cursor)
    return TelemetrySnapshot(agent="a", timestamp=datetime.fromtimestamp(at, timezone.utc), status="ok",
                             gpus=[GpuSample(index=i, vendor="nvidia") for i in range(2)], host=HostBasics(uptime_s=uptime),
                             gpu_health=report)


def states(store: Store, at: float, *findings: Finding, uptime: float = 1000.0,
           written: dict[str, tuple[object, ...]] | None = None) -> dict[int, str]:
    snap = beat(at, *findings, uptime=uptime)
    record(store, [snap], HealthPolicy(), gpu_written=written)
    stored = agent_statuses(store)["a"].snapshot
    assert stored is not None and stored.gpu_health is not None
    assert [g.state for g in stored.gpu_health.gpus] == [g.state for g in snap.gpu_health.gpus]  # type: ignore[union-attr]
    return {g.index: g.state for g in stored.gpu_health.gpus}


def events(store: Store) -> list[tuple[int, str]]:
    return [(row[0], row[1]) for row in store.query("SELECT gpu, event FROM gpu_events ORDER BY ts, rowid")]


def test_a_failed_gpu_stays_quarantined_until_cleared(store: Store) -> None:
    assert states(store, T0) == {0: "ok", 1: "ok"}
    assert states(store, T0 + 5, Finding("xid", gpu=1, code="79", at=T0 + 4)) == {0: "ok", 1: "failed"}
    assert states(store, T0 + 10) == {0: "ok", 1: "failed"}  # the journal has nothing new: still out
    with store.transaction() as db:
        assert quarantine.clear(db, "a", 1) == "Xid 79 (fallen off the bus) at 08:00"
        assert quarantine.clear(db, "a", 1) is None
    stored = agent_statuses(store)["a"].snapshot
    assert stored is not None and stored.health_of(1) == "ok"  # placement sees it at once
    assert states(store, T0 + 15) == {0: "ok", 1: "ok"}
    assert events(store) == [(1, "quarantined"), (1, "cleared")]


def test_xids_count_across_beats_and_one_xid_13_is_nothing(store: Store) -> None:
    assert states(store, T0, Finding("xid", gpu=0, code="13", at=T0)) == {0: "ok", 1: "ok"}
    for n in range(1, 4):
        assert states(store, T0 + n * 10, Finding("xid", gpu=0, code="13", at=T0 + n * 10))[0] == "ok"
    assert states(store, T0 + 50, Finding("xid", gpu=0, code="13", at=T0 + 50))[0] == "degraded"  # 5 in 10 min
    assert states(store, T0 + 2000)[0] == "ok"  # the storm is over: out of the window
    assert events(store) == []


def test_an_xid_line_two_controllers_both_read_counts_once(store: Store) -> None:
    """serve and a cron heartbeat read the journal from their own cursors: the same four lines brought
    by both are four Xids, not eight, so the storm rule (5 in 10 min) does not fire."""
    lines = [Finding("xid", gpu=0, code="13", at=T0 + n) for n in range(4)]
    assert states(store, T0 + 5, *lines)[0] == "ok"
    assert states(store, T0 + 6, *lines)[0] == "ok"  # the other controller, the same lines
    xids = store.query("SELECT xids FROM gpu_health WHERE agent = 'a' AND gpu = 0")[0][0]
    assert len(json.loads(xids)) == 4
    assert states(store, T0 + 7, Finding("xid", gpu=0, code="13", at=T0 + 7))[0] == "degraded"  # a fifth, new line


def test_a_reboot_with_the_finding_gone_recovers_a_gpu(store: Store) -> None:
    dbe = Finding("ecc_uncorrected_volatile", gpu=1, value=2)
    assert states(store, T0, dbe, uptime=5000) == {0: "ok", 1: "failed"}
    assert states(store, T0 + 10, uptime=5010)[1] == "failed"  # gone without a reboot: not trusted
    assert states(store, T0 + 600, dbe, uptime=60)[1] == "failed"  # rebooted, still failing
    assert states(store, T0 + 1200, uptime=30)[1] == "ok"  # rebooted again, and gone
    assert events(store) == [(1, "quarantined"), (1, "recovered")]


def test_a_running_job_on_a_failing_gpu_gets_an_event(store: Store) -> None:
    with store.transaction() as db:
        db.execute("INSERT INTO jobs (id, state, spec, agent, gpus, submitted) VALUES (?,?,?,?,?,?)",
                   ("j1", "running", "{}", "a", json.dumps(["1"]), T0))
        db.execute("INSERT INTO jobs (id, state, spec, agent, gpus, submitted) VALUES (?,?,?,?,?,?)",
                   ("j0", "running", "{}", "a", json.dumps(["0"]), T0))
    states(store, T0 + 5, Finding("xid", gpu=1, code="48", at=T0 + 4))
    rows = [tuple(r) for r in store.query("SELECT job_id, event FROM job_events")]
    assert rows == [("j1", "gpu_failed")]
    assert [tuple(r) for r in store.query("SELECT cancel_requested FROM jobs WHERE id = 'j1'")] == [(0,)]  # not killed


def test_a_calm_beat_writes_nothing(store: Store) -> None:
    written: dict[str, tuple[object, ...]] = {}
    states(store, T0, written=written)
    assert "a" in written
    with store.transaction() as db:
        db.execute("DELETE FROM gpu_health")
    states(store, T0 + 5, written=written)  # calm, and stored calm: no SQL of its own
    assert list(store.query("SELECT gpu FROM gpu_health")) == []
    states(store, T0 + 10, Finding("remap_failure", gpu=0), written=written)
    assert "a" not in written and sorted(r[0] for r in store.query("SELECT gpu FROM gpu_health")) == [0, 1]


def test_kill_on_gpu_failure_cancels_the_job(store: Store) -> None:
    with store.transaction() as db:
        db.execute("INSERT INTO jobs (id, state, spec, agent, gpus, submitted) VALUES (?,?,?,?,?,?)",
                   ("j1", "running", "{}", "a", json.dumps(["1"]), T0))
    record(store, [beat(T0, Finding("remap_failure", gpu=1))], HealthPolicy(), kill_on_gpu_failure=True)
    assert [tuple(r) for r in store.query("SELECT cancel_requested FROM jobs WHERE id = 'j1'")] == [(1,)]
    detail = [r[0] for r in store.query("SELECT detail FROM job_events WHERE job_id = 'j1'")]
    assert detail == ["GPU 1 on a failed: row remap failed: no spare rows; cancelling (kill_on_gpu_failure)"]


def test_the_gpu_count_and_boot_time_are_kept_for_a_cold_controller(store: Store) -> None:
    snap = beat(T0, uptime=1000.0)
    assert snap.gpu_health is not None
    snap.gpu_health.gpu_count = 4
    record(store, [snap], HealthPolicy())
    later = beat(T0 + 5, uptime=1005.0)  # a report that did not count keeps the stored count
    record(store, [later], HealthPolicy())
    with store.transaction() as db:
        stored = quarantine.load_memory(db, "a")
        assert stored.count == 4 and stored.booted == T0 - 1000.0 and stored.buses == {"0000:01:00": 0, "0000:02:00": 1}
        assert quarantine.load_memory(db, "nobody") == quarantine.StoredHost()


def test_a_reboot_with_no_count_forgets_the_old_count(store: Store) -> None:
    """A hung tool on the first beat after a reboot: the count from before the reboot is not kept (a cold
    controller would otherwise take GPUs as missing that the new boot never had)."""
    snap = beat(T0, uptime=1000.0)
    assert snap.gpu_health is not None
    snap.gpu_health.gpu_count = 4
    record(store, [snap], HealthPolicy())
    record(store, [beat(T0 + 600, uptime=30.0)], HealthPolicy())  # rebooted, nothing counted
    with store.transaction() as db:
        stored = quarantine.load_memory(db, "a")
        assert stored.count is None and stored.booted == T0 + 570
