"""The durable job queue, in the same SQLite store as history. Every state change is a
compare-and-set (``expect=``), so a ``serve`` process and a CLI cancel can never both win."""

from __future__ import annotations

import builtins
import json
import secrets
import sqlite3
import time
from collections.abc import Sequence
from typing import Any

from fleetctl.durations import utc
from fleetctl.errors import JobError
from fleetctl.jobs.model import JobRecord, JobResult, JobSpec, JobState
from fleetctl.store import Store

_COLUMNS = ("id", "name", "state", "priority", "spec", "agent", "gpus", "remote_dir", "attempt", "submitted",
            "dispatched", "started", "finished", "exit_code", "signal", "reason", "result", "cancel_requested")


def new_job_id() -> str:
    return "j" + secrets.token_hex(5)


def _record(row: sqlite3.Row) -> JobRecord:
    return JobRecord(
        id=row["id"], name=row["name"], state=row["state"], spec=JobSpec.model_validate_json(row["spec"]),
        agent=row["agent"], gpus=json.loads(row["gpus"] or "[]"), remote_dir=row["remote_dir"], attempt=row["attempt"],
        submitted=utc(row["submitted"]), dispatched=utc(row["dispatched"]), started=utc(row["started"]),  # type: ignore[arg-type]
        finished=utc(row["finished"]), exit_code=row["exit_code"], signal=row["signal"], reason=row["reason"],
        result=JobResult.model_validate_json(row["result"]) if row["result"] else None,
        cancel_requested=bool(row["cancel_requested"]))


class JobQueue:
    def __init__(self, store: Store) -> None:
        self.store = store

    def submit(self, spec: JobSpec) -> JobRecord:
        """Durable when this returns: the row is committed (WAL) before the id is handed out."""
        for parent in spec.after:
            self.get(parent)
        job_id = new_job_id()
        with self.store.transaction() as db:
            db.execute("INSERT INTO jobs (id, name, state, priority, spec, submitted, updated) VALUES (?,?,?,?,?,?,?)",
                       (job_id, spec.name, "queued", spec.priority, spec.model_dump_json(), time.time(), time.time()))
            db.execute("INSERT INTO job_events (job_id, ts, event, detail) VALUES (?,?,?,?)",
                       (job_id, time.time(), "submitted", None))
        return self.get(job_id)

    def get(self, job_id: str) -> JobRecord:
        """By id, or by a unique prefix of one (as git does)."""
        rows = self.store.query(f"SELECT {', '.join(_COLUMNS)} FROM jobs WHERE id = ?", (job_id,))
        if not rows and len(job_id) >= 3:
            rows = self.store.query(f"SELECT {', '.join(_COLUMNS)} FROM jobs WHERE id LIKE ? LIMIT 2",
                                    (job_id.replace("%", "").replace("_", "") + "%",))
        if len(rows) != 1:
            problem = "is ambiguous" if rows else "does not exist"
            raise JobError(f"job {job_id!r} {problem}", hint="see `fleetctl jobs list`")
        return _record(rows[0])

    def list(self, states: Sequence[JobState] | None = None) -> builtins.list[JobRecord]:
        where = f" WHERE state IN ({','.join('?' * len(states))})" if states else ""
        rows = self.store.query(f"SELECT {', '.join(_COLUMNS)} FROM jobs{where} ORDER BY priority DESC, seq",
                                tuple(states or ()))
        return [_record(r) for r in rows]

    def update(self, job_id: str, *, expect: Sequence[JobState] | None = None, event: str | None = None,
               detail: str | None = None, **fields: Any) -> bool:
        """Set ``fields`` if the job is in one of ``expect``; False (and nothing written) if not."""
        values = {k: _column_value(v) for k, v in fields.items()}
        values["updated"] = time.time()
        sql = f"UPDATE jobs SET {', '.join(f'{k} = ?' for k in values)} WHERE id = ?"
        params: list[Any] = [*values.values(), job_id]
        if expect:
            sql += f" AND state IN ({','.join('?' * len(expect))})"
            params.extend(expect)
        with self.store.transaction() as db:
            changed = db.execute(sql, params).rowcount == 1
            if changed and event:
                db.execute("INSERT INTO job_events (job_id, ts, event, detail) VALUES (?,?,?,?)",
                           (job_id, time.time(), event, detail))
        return changed

    def note(self, job_id: str, event: str, detail: str | None = None) -> None:
        with self.store.transaction() as db:
            db.execute("INSERT INTO job_events (job_id, ts, event, detail) VALUES (?,?,?,?)",
                       (job_id, time.time(), event, detail))

    def events(self, job_id: str) -> builtins.list[tuple[float, str, str | None]]:
        rows = self.store.query("SELECT ts, event, detail FROM job_events WHERE job_id = ? ORDER BY ts, rowid", (job_id,))
        return [(r["ts"], r["event"], r["detail"]) for r in rows]


def _column_value(value: Any) -> Any:
    if isinstance(value, JobResult):
        return value.model_dump_json()
    if isinstance(value, list):
        return json.dumps(value)
    if isinstance(value, bool):
        return int(value)
    return value
