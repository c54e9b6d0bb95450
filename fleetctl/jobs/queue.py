"""The durable job queue, in the same store as history (SQLite or PostgreSQL: the SQL here runs on
both). Job state is written only here, by the transitions of the declared table
(:mod:`fleetctl.jobs.states`): each is a compare-and-set from the states its event may leave, so a
``serve`` process and a CLI cancel can never both win.

A queue opened with a :class:`~fleetctl.store.leases.Fence` (a controller of a shared store) also checks,
in the same statement, that its controller still holds the lease of the job's agent: a controller
that lost the agent (died, paused, partitioned) cannot move the job any more. Claims lock the job
row (:meth:`~fleetctl.store.base.Store.for_claim`: ``FOR UPDATE SKIP LOCKED`` on PostgreSQL), so
controllers never wait on each other's claims."""

from __future__ import annotations

import builtins
import json
import secrets
import time
from collections.abc import Sequence
from typing import Any

from fleetctl._durations import utc
from fleetctl.errors import JobError
from fleetctl.jobs.model import ACTIVE_STATES, FINAL_STATES, JobRecord, JobResult, JobSpec, JobState, SweepKind, SweepRecord, TaskRef
from fleetctl.jobs.states import JobEvent, sources, target
from fleetctl.store import Connection, Row, Store
from fleetctl.store.leases import Fence, FenceSource

_COLUMNS = ("id", "name", "state", "priority", "spec", "agent", "gpus", "remote_dir", "attempt", "submitted",
            "dispatched", "started", "finished", "exit_code", "signal", "reason", "result", "cancel_requested")


SWEEP_PREFIX = "s"


def new_job_id() -> str:
    return "j" + secrets.token_hex(5)


def new_sweep_id() -> str:
    return SWEEP_PREFIX + secrets.token_hex(5)


def _record(row: Row) -> JobRecord:
    return JobRecord(
        id=row["id"], name=row["name"], state=row["state"], spec=JobSpec.model_validate_json(row["spec"]),
        agent=row["agent"], gpus=json.loads(row["gpus"] or "[]"), remote_dir=row["remote_dir"], attempt=row["attempt"],
        submitted=utc(row["submitted"]), dispatched=utc(row["dispatched"]), started=utc(row["started"]),  # type: ignore[arg-type]
        finished=utc(row["finished"]), exit_code=row["exit_code"], signal=row["signal"], reason=row["reason"],
        result=JobResult.model_validate_json(row["result"]) if row["result"] else None,
        cancel_requested=bool(row["cancel_requested"]))


class JobQueue:
    def __init__(self, store: Store, fence: Fence | FenceSource | None = None) -> None:
        self.store = store
        # Set by a controller: every transition it makes is fenced by its leases. A source is read at
        # each transition, so a long tick always checks the latest renewal's fence.
        self.fence_source: FenceSource | None = (lambda: fence) if isinstance(fence, Fence) else fence

    @property
    def fence(self) -> Fence | None:
        return self.fence_source() if self.fence_source is not None else None

    @property
    def _writer(self) -> str | None:
        return self.fence.controller if self.fence is not None else None

    def submit(self, spec: JobSpec) -> JobRecord:
        """Durable when this returns: the row is committed (WAL) before the id is handed out."""
        for parent in spec.after:
            self.dependency(parent)
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
            # Ids are lower-case; lowered here because SQLite's LIKE ignores ASCII case and PostgreSQL's does not.
            rows = self.store.query(f"SELECT {', '.join(_COLUMNS)} FROM jobs WHERE id LIKE ? LIMIT 2",
                                    (job_id.lower().replace("%", "").replace("_", "") + "%",))
        if len(rows) != 1:
            problem = "is ambiguous" if rows else "does not exist"
            sweep = not rows and job_id.startswith(SWEEP_PREFIX)
            raise JobError(f"job {job_id!r} {problem}" + (" (a sweep's id? its tasks are jobs)" if sweep else ""),
                           hint=f"`fleetctl jobs show {job_id}` lists its tasks" if sweep else "see `fleetctl jobs list`")
        return _record(rows[0])

    def list(self, states: Sequence[JobState] | None = None, *, tasks: bool = True) -> builtins.list[JobRecord]:
        """Jobs in ``states`` (all), highest priority then oldest first; ``tasks=False`` leaves out
        the tasks of sweeps (``jobs list`` shows each sweep as one line instead)."""
        clauses = [f"state IN ({','.join('?' * len(states))})"] if states else []
        if not tasks:
            clauses.append("parent IS NULL")
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        rows = self.store.query(f"SELECT {', '.join(_COLUMNS)} FROM jobs{where} ORDER BY priority DESC, seq",
                                tuple(states or ()))
        return [_record(r) for r in rows]

    # -- sweeps: one parent, many tasks that are ordinary jobs ------------------------------------
    def submit_sweep(self, template: JobSpec, params: Sequence[dict[str, Any]], kind: SweepKind,
                     max_concurrent: int | None = None) -> SweepRecord:
        """The parent and every task, in one transaction: all of them are queued, or none."""
        if not params:
            raise JobError("a sweep needs at least one task", hint="give --array N, --sweep NAME=V1,V2 or --sweep-file")
        for parent in template.after:
            self.dependency(parent)
        sweep_id, now, count = new_sweep_id(), time.time(), len(params)
        rows, events = [], []
        for index, values in enumerate(params):
            task = TaskRef(parent=sweep_id, index=index, count=count, params=values, max_concurrent=max_concurrent)
            name = f"{template.name}[{index}]" if template.name else None
            spec = template.model_copy(update={"task": task, "name": name})
            job_id = new_job_id()
            rows.append((job_id, name, "queued", spec.priority, spec.model_dump_json(), now, now, sweep_id, index))
            events.append((job_id, now, "submitted", f"task {index} of {count} of sweep {sweep_id}"))
        with self.store.transaction() as db:
            db.execute("INSERT INTO sweeps (id, name, kind, spec, count, max_concurrent, submitted) VALUES (?,?,?,?,?,?,?)",
                       (sweep_id, template.name, kind, template.model_dump_json(), count, max_concurrent, now))
            db.executemany("INSERT INTO jobs (id, name, state, priority, spec, submitted, updated, parent, task_index) "
                           "VALUES (?,?,?,?,?,?,?,?,?)", rows)
            db.executemany("INSERT INTO job_events (job_id, ts, event, detail) VALUES (?,?,?,?)", events)
        return self.get_sweep(sweep_id)

    def get_sweep(self, sweep_id: str) -> SweepRecord:
        """By id, or by a unique prefix of one."""
        columns = "id, name, kind, spec, count, max_concurrent, submitted, cancelled"
        rows = self.store.query(f"SELECT {columns} FROM sweeps WHERE id = ?", (sweep_id,))
        if not rows and len(sweep_id) >= 3:
            rows = self.store.query(f"SELECT {columns} FROM sweeps WHERE id LIKE ? LIMIT 2",
                                    (sweep_id.lower().replace("%", "").replace("_", "") + "%",))
        if len(rows) != 1:
            problem = "is ambiguous" if rows else "does not exist"
            raise JobError(f"sweep {sweep_id!r} {problem}", hint="see `fleetctl jobs list`")
        row = rows[0]
        return SweepRecord(id=row["id"], name=row["name"], kind=row["kind"], spec=JobSpec.model_validate_json(row["spec"]),
                           count=row["count"], max_concurrent=row["max_concurrent"], submitted=utc(row["submitted"]),  # type: ignore[arg-type]
                           cancelled=utc(row["cancelled"]), counts=self.task_counts(row["id"]))

    def sweeps(self, ids: Sequence[str] | None = None) -> builtins.list[SweepRecord]:
        """Every sweep (or those named), oldest first."""
        if ids is None:
            ids = [r["id"] for r in self.store.query("SELECT id FROM sweeps ORDER BY seq")]
        return [self.get_sweep(i) for i in ids]

    def task_counts(self, sweep_id: str) -> dict[str, int]:
        """How many of the sweep's tasks are in each state; a provisionally lost one counts as ``lost?``."""
        rows = self.store.query("SELECT state, CASE WHEN state = 'lost' AND finished IS NULL THEN 1 ELSE 0 END AS open, "
                                "COUNT(*) AS n FROM jobs WHERE parent = ? GROUP BY state, "
                                "CASE WHEN state = 'lost' AND finished IS NULL THEN 1 ELSE 0 END", (sweep_id,))
        counts: dict[str, int] = {}
        for row in rows:
            key = "lost?" if row["open"] else row["state"]
            counts[key] = counts.get(key, 0) + int(row["n"])
        return counts

    def tasks(self, sweep_id: str) -> builtins.list[JobRecord]:
        """The sweep's tasks, by index."""
        rows = self.store.query(f"SELECT {', '.join(_COLUMNS)} FROM jobs WHERE parent = ? ORDER BY task_index", (sweep_id,))
        return [_record(r) for r in rows]

    def cancelled_sweeps(self, sweep_ids: Sequence[str]) -> set[str]:
        """Which of these sweeps were cancelled (their tasks are never claimed again, a requeued one included)."""
        if not sweep_ids:
            return set()
        rows = self.store.query(f"SELECT id FROM sweeps WHERE cancelled IS NOT NULL AND id IN ({','.join('?' * len(sweep_ids))})",
                                tuple(sweep_ids))
        return {r["id"] for r in rows}

    def cancel_sweep(self, sweep_id: str, *, force: bool) -> int:
        """In one transaction: the cancel is recorded, every queued task is cancelled and every active
        one marked for cancel (the runner signals it, or drops it before its launch). A claim racing
        this either committed first (its task is marked) or finds its task no longer queued. Returns
        how many tasks were cancelled outright."""
        now = time.time()
        reason = "cancelled with its sweep before it started"
        with self.store.transaction() as db:
            db.execute("UPDATE sweeps SET cancelled = ? WHERE id = ? AND cancelled IS NULL", (now, sweep_id))
            (queued,) = sources("cancel")  # the table's own states, as every transition uses them
            db.execute("INSERT INTO job_events (job_id, ts, event, detail) SELECT id, ?, ?, ? FROM jobs "
                       "WHERE parent = ? AND state = ?", (now, "cancelled", reason, sweep_id, queued))
            cancelled = db.execute("UPDATE jobs SET state = ?, reason = ?, finished = ?, updated = ? WHERE parent = ? AND state = ?",
                                   (target("cancel"), reason, now, now, sweep_id, queued)).rowcount
            db.execute("INSERT INTO job_events (job_id, ts, event, detail) SELECT id, ?, ?, ? FROM jobs "
                       "WHERE parent = ? AND state IN ('dispatching', 'running') AND cancel_requested = 0",
                       (now, "cancel_requested", "force" if force else None, sweep_id))
            db.execute("UPDATE jobs SET cancel_requested = 1, updated = ? WHERE parent = ? AND state IN ('dispatching', 'running')",
                       (now, sweep_id))
            # A provisionally lost task ends now, as a lost single job does on cancel.
            (lost,) = sources("cancel_lost")
            db.execute("INSERT INTO job_events (job_id, ts, event, detail) SELECT id, ?, ?, ? FROM jobs "
                       "WHERE parent = ? AND state = ? AND finished IS NULL", (now, "cancelled", reason, sweep_id, lost))
            db.execute("UPDATE jobs SET state = ?, finished = ?, updated = ?, reason = ? WHERE parent = ? AND state = ? AND finished IS NULL",
                       (target("cancel_lost"), now, now, "cancelled with its sweep while its host was unreachable", sweep_id, lost))
        return cancelled

    def dependency(self, dep_id: str) -> JobRecord | SweepRecord:
        """What ``--after`` names: a job, or a whole sweep (it succeeded once every task did)."""
        if dep_id.startswith(SWEEP_PREFIX):
            return self.get_sweep(dep_id)
        return self.get(dep_id)

    # -- named transitions: each state change written once, as a compare-and-set ------------------
    def claim(self, job_id: str, agent: str, gpus: builtins.list[str], attempt: int) -> bool:
        """queued -> dispatching as ``attempt`` on ``agent``; False if someone else moved it first,
        or is claiming it right now, or (fenced) this controller no longer holds ``agent``, or (a task of
        a sweep with ``--max-concurrent``) its sweep already has that many tasks dispatching or running."""
        fence = self.fence
        if fence is not None and not fence.holds(agent):
            return False
        fields = {"state": "dispatching", "agent": agent, "gpus": gpus, "attempt": attempt,
                  "dispatched": time.time(), "remote_dir": None, "reason": None}
        # One code path on every backend: on SQLite the transaction is the only writer anyway, so the
        # row read is the row written; on PostgreSQL the claiming transaction locks the row, and a
        # controller claiming the same job skips it.
        with self.store.transaction(serialized=False) as db:
            if not self._under_cap(db, job_id):
                return False
            if db.execute(self.store.for_claim("SELECT id FROM jobs WHERE id = ? AND state = 'queued' AND attempt = ?"),
                          (job_id, attempt - 1)).fetchone() is None:
                return False
            if fence is not None and fence.held_tokens(db, self.store, agent).get(agent) != fence.tokens.get(agent):
                return False  # the lease row stays share-locked to commit: a takeover waits for it
            return self._write(db, job_id, sources("claim"), "attempt = ?", (attempt - 1,), "dispatching", agent,
                               {**fields, "state": target("claim")}, agent)

    def _under_cap(self, db: Connection, job_id: str) -> bool:
        """A task of a sweep with ``--max-concurrent``: may it be claimed, its sweep's active tasks
        counted in the claim's own transaction? (A count taken at the tick let each extra controller
        overshoot by one.) The claims of one capped sweep take turns on the sweep's row, locked before
        the job's row as ``cancel_sweep`` locks them, so each counts what the one before committed."""
        row = db.execute("SELECT s.id, s.max_concurrent FROM jobs j JOIN sweeps s ON s.id = j.parent WHERE j.id = ?",
                         (job_id,)).fetchone()
        if row is None or row[1] is None:
            return True  # a single job, or a sweep without a cap
        sweep_id, cap = row[0], int(row[1])
        db.execute(self.store.for_update("SELECT id FROM sweeps WHERE id = ?"), (sweep_id,)).fetchone()
        (active,) = db.execute(f"SELECT COUNT(*) FROM jobs WHERE parent = ? AND state IN ({','.join('?' * len(ACTIVE_STATES))})",
                               (sweep_id, *ACTIVE_STATES)).fetchone()
        return int(active) < cap

    def set_remote_dir(self, job_id: str, remote_dir: str, attempt: int) -> bool:
        """Where the dispatching ``attempt``'s files are, once ``mktemp -d`` made the directory."""
        return self._cas(job_id, ("dispatching",), "attempt = ?", (attempt,), None, None, {"remote_dir": remote_dir})

    def requeue(self, job_id: str, event: JobEvent, *, detail: str | None, reason: str | None,
                keep_location: bool = False) -> bool:
        """Back to ``queued``: ``requeue`` (a dispatch that did not start the job) or ``retry`` (its host
        is lost, a retry is left; recorded as ``lost``). ``keep_location`` keeps the last attempt's agent,
        GPUs and directory, so that attempt can still be collected or resumed if its host comes back
        before a retry starts."""
        if target(event) != "queued":
            raise JobError(f"{event!r} does not requeue a job", hint="requeue with 'requeue' or 'retry'")
        fields: dict[str, Any] = {"reason": reason}
        if not keep_location:
            fields.update(agent=None, gpus=[], remote_dir=None)
        return self._move(job_id, event, "", (), "lost" if event == "retry" else "requeued", detail, fields)

    def mark_running(self, job_id: str, remote_dir: str, detail: str | None = None, *, attempt: int | None = None) -> bool:
        guard, params = ("attempt = ?", (attempt,)) if attempt is not None else ("", ())
        return self._move(job_id, "launch", guard, params, "running", detail or remote_dir,
                          {"remote_dir": remote_dir, "started": time.time()})

    def resume(self, job_id: str, attempt: int, detail: str) -> bool:
        """A requeued job whose lost attempt turned out to be still running: running again, no retry."""
        return self._move(job_id, "resume", "attempt = ? AND remote_dir IS NOT NULL", (attempt,), "resumed", detail,
                          {"reason": None})

    def lose(self, job_id: str, *, detail: str, reason: str) -> bool:
        """Active -> ``lost``, provisionally: ``finished`` stays empty until the result comes back or
        ``lost_grace_s`` passes (``finalize_lost``)."""
        return self._move(job_id, "lose", "", (), "lost", detail, {"finished": None, "reason": reason})

    def finalize_lost(self, job_id: str, reason: str) -> bool:
        return self._move(job_id, "finalize_lost", "finished IS NULL", (), "lost_final", reason,
                          {"finished": time.time(), "reason": reason})

    def finish(self, job_id: str, event: JobEvent, *, reason: str, result: JobResult | None = None,
               log_as: str | None = None, detail: str | None = None, attempt: int | None = None, **location: Any) -> bool:
        """To the final state ``event`` leads to (recorded as ``log_as``, else that state's name). From
        ``lost`` only while the job is provisionally lost; ``attempt`` guards against a newer attempt;
        ``location`` (agent, remote_dir, gpus) names the attempt that ended."""
        state = target(event)
        if state not in FINAL_STATES:
            raise JobError(f"{event!r} does not end a job", hint="finish with an event that leads to a final state")
        guards, params = [], []
        if "lost" in sources(event):
            guards.append("(state != 'lost' OR finished IS NULL)")
        if attempt is not None:
            guards.append("attempt = ?")
            params.append(attempt)
        fields: dict[str, Any] = {"reason": reason, **location}
        if result is not None:
            fields.update(result=result, exit_code=result.exit_code, signal=result.signal,
                          finished=result.finished.timestamp() if result.finished else time.time())
        else:
            fields["finished"] = time.time()
        return self._move(job_id, event, " AND ".join(guards), tuple(params), log_as or state, detail or reason, fields,
                          agent_param=location.get("agent"))

    def request_cancel(self, job_id: str, *, force: bool, event: bool = True) -> bool:
        """Mark a dispatching or running job for cancel; whoever takes the mark sends the signal."""
        return self._cas(job_id, ("dispatching", "running"), "", (), "cancel_requested" if event else None,
                         "force" if force else None, {"cancel_requested": True})

    def take_cancel(self, job_id: str) -> bool:
        """Claim a pending cancel (the mark goes 1 -> 0): of a CLI cancel and serve's tick racing,
        exactly one sends the signal and records ``cancel_sent``."""
        return self._cas(job_id, None, "cancel_requested = ?", (1,), None, None, {"cancel_requested": False})

    def set_reason(self, job_id: str, reason: str) -> bool:
        """Why a queued job waits; written only when it changed, and no event (it is not a transition)."""
        # Not SQLite's ``IS NOT ?``, which PostgreSQL lacks; ``reason`` is never None here.
        return self._cas(job_id, ("queued",), "(reason IS NULL OR reason <> ?)", (reason,), None, None, {"reason": reason})

    def first_event(self, job_id: str, event: str, detail_prefix: str) -> float | None:
        """When ``event`` was first recorded for this job with a detail starting ``detail_prefix``."""
        # The prefix length is a parameter: PostgreSQL cannot type length() of an untyped parameter.
        rows = self.store.query("SELECT MIN(ts) AS ts FROM job_events WHERE job_id = ? AND event = ? "
                                "AND substr(detail, 1, ?) = ?", (job_id, event, len(detail_prefix), detail_prefix))
        return rows[0]["ts"] if rows else None

    def lost_at(self, job_id: str) -> float | None:
        rows = self.store.query("SELECT MAX(ts) AS ts FROM job_events WHERE job_id = ? AND event = 'lost'", (job_id,))
        return rows[0]["ts"] if rows else None

    def _move(self, job_id: str, event: JobEvent, guard: str, guard_params: tuple[Any, ...], log_as: str,
              detail: str | None, fields: dict[str, Any], agent_param: str | None = None) -> bool:
        """One transition of the table: from the states ``event`` may leave to the one it leads to."""
        return self._cas(job_id, sources(event), guard, guard_params, log_as, detail, {"state": target(event), **fields},
                         agent_param)

    def _cas(self, job_id: str, expect: Sequence[JobState] | None, guard: str, guard_params: tuple[Any, ...],
             event: str | None, detail: str | None, fields: dict[str, Any], agent_param: str | None = None) -> bool:
        with self.store.transaction() as db:
            return self._write(db, job_id, expect, guard, guard_params, event, detail, fields, agent_param)

    def _write(self, db: Connection, job_id: str, expect: Sequence[JobState] | None, guard: str,
               guard_params: tuple[Any, ...], event: str | None, detail: str | None, fields: dict[str, Any],
               agent_param: str | None) -> bool:
        """The one UPDATE of job state. Fenced: only while this controller holds the lease of the
        job's agent with the token it was granted (``agent_param`` when the transition moves the job
        to an agent; a job on no agent yet, queued, is anyone's)."""
        fence = self.fence
        if fence is not None and not fence.live():
            return False  # this controller's leases lapsed (it slept, or the store was away): it writes nothing
        values = {k: _column_value(v) for k, v in fields.items()}
        values["updated"] = time.time()
        sql = f"UPDATE jobs SET {', '.join(f'{k} = ?' for k in values)} WHERE id = ?"
        params: list[Any] = [*values.values(), job_id]
        if expect:
            sql += f" AND state IN ({','.join('?' * len(expect))})"
            params.extend(expect)
        if guard:
            sql += f" AND {guard}"
            params.extend(guard_params)
        if fence is not None:
            agent = agent_param
            if agent is None:  # the job's own agent, pinned in the UPDATE so it cannot change meanwhile
                agent = _job_agent(db, job_id)
                sql += " AND jobs.agent IS NULL" if agent is None else " AND jobs.agent = ?"
                params.extend(() if agent is None else (agent,))
            if agent is not None:
                fenced, fence_params = fence.guard(agent, self.store)
                sql += f" AND {fenced}"
                params.extend(fence_params)
        changed = db.execute(sql, params).rowcount == 1
        if changed and event:
            db.execute("INSERT INTO job_events (job_id, ts, event, detail, controller) VALUES (?,?,?,?,?)",
                       (job_id, time.time(), event, detail, self._writer))
        return changed

    def note(self, job_id: str, event: str, detail: str | None = None, *, agent: str | None = None) -> bool:
        """An event that is no transition (a duplicate seen, an orphan removed, a cancel sent). Fenced
        like a transition, by the lease of ``agent`` (where the attempt it is about ran) or else the
        job's agent: a controller that lost that agent records nothing."""
        fence = self.fence
        if fence is not None and not fence.live():
            return False
        with self.store.transaction() as db:
            sql = "INSERT INTO job_events (job_id, ts, event, detail, controller) SELECT ?, ?, ?, ?, ?"
            params: list[Any] = [job_id, time.time(), event, detail, self._writer]
            if fence is not None:
                agent = agent if agent is not None else _job_agent(db, job_id)
                if agent is not None:
                    fenced, fence_params = fence.guard(agent, self.store)
                    sql += f" WHERE {fenced}"
                    params.extend(fence_params)
            return db.execute(sql, params).rowcount == 1

    def events(self, job_id: str) -> builtins.list[tuple[float, str, str | None]]:
        rows = self.store.query("SELECT ts, event, detail FROM job_events WHERE job_id = ? ORDER BY ts, rowid", (job_id,))
        return [(r["ts"], r["event"], r["detail"]) for r in rows]


def _job_agent(db: Connection, job_id: str) -> str | None:
    row = db.execute("SELECT agent FROM jobs WHERE id = ?", (job_id,)).fetchone()
    return row[0] if row is not None else None


def _column_value(value: Any) -> Any:
    if isinstance(value, JobResult):
        return value.model_dump_json()
    if isinstance(value, list):
        return json.dumps(value)
    if isinstance(value, bool):
        return int(value)
    return value
