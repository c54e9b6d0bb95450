"""GPU quarantine in the store: each beat's health judged with its history, failed GPUs kept out.

Called by :func:`fleetctl.telemetry.history.record` inside the transaction that writes the beats.
Per GPU (``gpu_health``) it keeps the verdict, the quarantine, and the Xids of the last hour (a rule's
``repeat`` counts them across beats and across controllers, so a cron heartbeat from cold still sees a
storm, and a line two controllers both read counts once); per host (``gpu_hosts``) the kernel log cursor, the bus ids and the boot time last seen.
A beat that finds nothing on a host whose stored state is all ok (``written``, the caller's memory of
what it last wrote) writes nothing: the common beat costs no SQL here.

* A GPU judged ``failed`` is quarantined: the event ``quarantined`` names why; placement skips it.
* It stays quarantined, whatever later beats say, until ``fleetctl agents clear-gpu AGENT INDEX``
  (event ``cleared``) or the recovery rule: **the host rebooted** (its boot time, the beat's time less
  its uptime, moved on by more than :data:`REBOOT_SLACK_S`) **and the GPU's failing finding is gone**
  on the first beat after (event ``recovered``). A reset without reboot is not trusted on its own:
  clear it by hand.
* A running job on a GPU that becomes quarantined gets the job event ``gpu_failed``; with
  ``[controller] kill_on_gpu_failure = true`` it is also cancelled (the runner kills it).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from fleetctl.telemetry.gpu_health import Rule, judge
from fleetctl.telemetry.parsers.findings import Finding
from fleetctl.telemetry.snapshot import GpuHealth, TelemetrySnapshot

XID_MEMORY_S = 3600.0  # Xids older than this are not kept for the repeat window (the longest default is 10 min)
MAX_XIDS = 200         # per GPU: a storm is counted, not stored whole
REBOOT_SLACK_S = 120.0  # boot time = beat time - uptime jitters by the beat's latency and clock steps


@dataclass(frozen=True)
class GpuEvent:
    agent: str
    gpu: int | None
    event: str  # quarantined, recovered, cleared, gpu_failed
    detail: str


def _reason_text(reason: str, index: int) -> str:
    return reason.removeprefix(f"GPU {index}: ")


def apply(db: Any, snapshots: Iterable[TelemetrySnapshot], table: Mapping[str, Rule] | None, *,
          kill_on_failure: bool = False, now: float | None = None,
          written: dict[str, tuple[object, ...]] | None = None) -> list[GpuEvent]:
    """Judge each snapshot's GPU health with the stored history, keep quarantines, write it all back;
    the snapshots' ``gpu_health`` is updated in place (it is what the agents row stores). ``db`` is
    the open transaction of :func:`fleetctl.telemetry.history.record`."""
    events: list[GpuEvent] = []
    for snap in snapshots:
        report = snap.gpu_health
        if report is None or not snap.ok:
            continue
        at = snap.timestamp.timestamp() if now is None else now
        booted = at - snap.host.uptime_s if snap.host.uptime_s is not None else None
        signature = (report.journal_cursor, tuple(sorted(report.buses.items())), tuple(g.index for g in report.gpus))
        calm = not report.findings and all(g.state == "ok" for g in report.gpus)
        if calm and written is not None and written.get(snap.agent, (None,))[:1] == (signature,) and (
                booted is None or abs(booted - float(written[snap.agent][1])) < REBOOT_SLACK_S):  # type: ignore[arg-type]
            continue  # stored: all ok, nothing quarantined, no Xids in the window, same cursor: nothing to write
        stored = {row[0]: row for row in db.execute(
            "SELECT gpu, state, since, quarantined, quarantine_reason, xids FROM gpu_health WHERE agent = ?", (snap.agent,))}
        host = list(db.execute("SELECT booted FROM gpu_hosts WHERE agent = ?", (snap.agent,)))
        last_booted = host[0][0] if host else None
        rebooted = last_booted is not None and booted is not None and booted > last_booted + REBOOT_SLACK_S
        history = [Finding("xid", gpu=gpu, code=str(code), at=float(when))
                   for gpu, row in stored.items() for code, when in json.loads(row[5] or "[]") if when >= at - XID_MEMORY_S]
        # An Xid line already counted (same GPU, code and kernel timestamp) is not counted again: serve and a
        # cron heartbeat each read the journal from their own cursor, so both may bring the same line.
        counted = {(f.gpu, f.code, f.at) for f in history}
        findings = [Finding(**f.model_dump()) for f in report.findings
                    if not (f.kind == "xid" and f.at is not None and (f.gpu, f.code, f.at) in counted)]
        indices = sorted({g.index for g in report.gpus} | {i for i in stored if i >= 0})
        verdict = judge(findings, now=at, history=history, gpus=indices, table=table)
        gpus: list[GpuHealth] = []
        rows = []
        for index, judged in verdict.gpus.items():
            before = stored.get(index)
            quarantined, why = (before[3], before[4]) if before else (None, None)
            reasons = list(judged.reasons)
            if quarantined is not None and rebooted and judged.state != "failed":
                events.append(GpuEvent(snap.agent, index, "recovered",
                                       f"the host rebooted and the finding is gone (was: {why})"))
                quarantined = why = None
            if judged.state == "failed" and quarantined is None:
                quarantined, why = at, _reason_text(judged.reason, index)
                events.append(GpuEvent(snap.agent, index, "quarantined", why))
                events += _running_jobs(db, snap.agent, index, why, kill_on_failure, at)
            state = "failed" if quarantined is not None else judged.state
            if quarantined is not None and not any(_reason_text(r, index) == why for r in reasons):
                reasons.insert(0, f"GPU {index}: quarantined: {why}")
            since = before[2] if before and before[1] == state else at
            seen = report.of(index)
            bus = seen.bus_id if seen else None
            xids = [(f.code, f.at if f.at is not None else at) for f in (*history, *findings)
                    if f.kind == "xid" and f.gpu == index and f.code][-MAX_XIDS:]
            # dcgm-exporter's XID_ERRORS is the last Xid seen: kept across beats for the hour
            last_xid = int(max(xids, key=lambda x: x[1])[0]) if xids else None
            gpus.append(GpuHealth(index=index, state=state, reasons=reasons, bus_id=bus, quarantined=quarantined,
                                  quarantine_reason=why, values=seen.values if seen else [], last_xid=last_xid,
                                  missing=seen.missing if seen else False))
            rows.append((snap.agent, index, bus, state, reasons[0] if reasons else None, since, quarantined, why,
                         json.dumps(xids)))
        report.gpus = gpus
        report.host_reasons = list(verdict.host.reasons)
        db.executemany(
            "INSERT INTO gpu_health (agent, gpu, bus_id, state, reason, since, quarantined, quarantine_reason, xids) "
            "VALUES (?,?,?,?,?,?,?,?,?) ON CONFLICT (agent, gpu) DO UPDATE SET bus_id=COALESCE(excluded.bus_id, gpu_health.bus_id), "
            "state=excluded.state, reason=excluded.reason, since=excluded.since, quarantined=excluded.quarantined, "
            "quarantine_reason=excluded.quarantine_reason, xids=excluded.xids", rows)
        db.execute(
            "INSERT INTO gpu_hosts (agent, journal_cursor, buses, booted, updated, gpu_count) VALUES (?,?,?,?,?,?) "
            "ON CONFLICT (agent) DO UPDATE SET journal_cursor=COALESCE(excluded.journal_cursor, gpu_hosts.journal_cursor), "
            "buses=excluded.buses, booted=excluded.booted, updated=excluded.updated, "
            # No count this beat (a hung tool): the last one stands, unless the host rebooted since (it counts anew).
            "gpu_count=CASE WHEN excluded.gpu_count IS NOT NULL THEN excluded.gpu_count "
            "WHEN excluded.booted > gpu_hosts.booted + ? THEN NULL ELSE gpu_hosts.gpu_count END",
            (snap.agent, report.journal_cursor, json.dumps(report.buses), booted, at, report.gpu_count, REBOOT_SLACK_S))
        if written is not None:
            settled = all(r[3] == "ok" and r[6] is None and r[8] == "[]" for r in rows) and booted is not None
            if settled and calm:
                written[snap.agent] = (signature, booted)
            else:
                written.pop(snap.agent, None)
    if events:
        db.executemany("INSERT INTO gpu_events (agent, gpu, ts, event, detail) VALUES (?,?,?,?,?)",
                       [(e.agent, e.gpu, time.time(), e.event, e.detail) for e in events if e.event != "gpu_failed"])
    return events


def _running_jobs(db: Any, agent: str, index: int, why: str, kill: bool, at: float) -> list[GpuEvent]:
    """The job event ``gpu_failed`` for each running job holding the GPU (and its cancel, when asked)."""
    found = []
    for job_id, gpus in list(db.execute(
            "SELECT id, gpus FROM jobs WHERE agent = ? AND state IN ('dispatching', 'running')", (agent,))):
        if str(index) not in json.loads(gpus or "[]"):
            continue
        detail = f"GPU {index} on {agent} failed: {why}" + ("; cancelling (kill_on_gpu_failure)" if kill else "")
        db.execute("INSERT INTO job_events (job_id, ts, event, detail) VALUES (?,?,?,?)", (job_id, at, "gpu_failed", detail))
        if kill:
            db.execute("UPDATE jobs SET cancel_requested = 1, cancel_force = 1 WHERE id = ?", (job_id,))
        found.append(GpuEvent(agent, index, "gpu_failed", f"job {job_id}: {detail}"))
    return found


@dataclass(frozen=True)
class StoredHost:
    """What the store remembers of a host, for a controller that has not beaten it yet."""

    cursor: str | None = None
    buses: dict[str, int] = field(default_factory=dict)
    count: int | None = None      # the most GPUs seen since it booted
    booted: float | None = None


def load_memory(db: Any, agent: str) -> StoredHost:
    """A host's kernel log cursor, last bus ids, GPU count and boot time."""
    rows = list(db.execute("SELECT journal_cursor, buses, gpu_count, booted FROM gpu_hosts WHERE agent = ?", (agent,)))
    if not rows:
        return StoredHost()
    cursor, buses, count, booted = rows[0]
    return StoredHost(cursor, {str(k): int(v) for k, v in json.loads(buses or "{}").items()},
                      None if count is None else int(count), None if booted is None else float(booted))


def clear(db: Any, agent: str, index: int, by: str = "clear-gpu") -> str | None:
    """Return a quarantined GPU to service; the reason it was quarantined, or None if it was not."""
    rows = list(db.execute("SELECT quarantined, quarantine_reason FROM gpu_health WHERE agent = ? AND gpu = ?", (agent, index)))
    if not rows or rows[0][0] is None:
        return None
    why = rows[0][1] or ""
    db.execute("UPDATE gpu_health SET quarantined = NULL, quarantine_reason = NULL, state = 'ok', reason = NULL, xids = NULL "
               "WHERE agent = ? AND gpu = ?", (agent, index))
    db.execute("INSERT INTO gpu_events (agent, gpu, ts, event, detail) VALUES (?,?,?,?,?)",
               (agent, index, time.time(), "cleared", f"by {by} (was: {why})"))
    # The latest snapshot (what placement reads) says so at once, not only after the next beat.
    for (text,) in list(db.execute("SELECT snapshot FROM agents WHERE agent = ?", (agent,))):
        if not text:
            continue
        snap = TelemetrySnapshot.model_validate_json(text)
        found = snap.gpu_health.of(index) if snap.gpu_health else None
        if found is not None:
            found.quarantined = found.quarantine_reason = None
            found.state, found.reasons = "ok", []
            db.execute("UPDATE agents SET snapshot = ? WHERE agent = ?", (snap.model_dump_json(), agent))
    return why
