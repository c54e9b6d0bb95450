"""The job runner: each tick it collects finished jobs (seen by the heartbeat's scan), marks lost
ones, sends cancels, resolves dependencies, then places and dispatches queued jobs.

The remote directory is the truth: a restarted controller reconciles every ``dispatching`` job
with it, and the launch step refuses a directory that was already started, so no job starts twice
unless its retries ask for it. A job whose host goes offline is ``lost`` provisionally (or requeued
with its last attempt remembered): if that attempt reports back before a retry starts, its result is
the job's and no retry runs. Directories of no current attempt are orphans, removed after a safety age."""

from __future__ import annotations

import json
import logging
import os
import shlex
import signal
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from fleetctl._durations import utc
from fleetctl._text import one_line
from fleetctl.errors import CodeError, FleetError, JobError, LeaseLost, RemoteFileNotFound, TransportError
from fleetctl.hosts.core import Hosts
from fleetctl.inventory.config import Agent
from fleetctl.jobs.code.store import CodeStore
from fleetctl.jobs.code.upload import send_code
from fleetctl.jobs.model import ACTIVE_STATES, JobRecord, JobResult, JobState, SweepRecord
from fleetctl.jobs.placement import Candidate, concurrency_cap, never_satisfiable, place, waiting_reason
from fleetctl.jobs.queue import JobQueue
from fleetctl.jobs.remote import (
    LAUNCH_ALREADY_STARTED,
    cancel_command,
    gpu_environment,
    launch_command,
    make_dir_command,
    remove_command,
    working_dir,
    wrapper_script,
)
from fleetctl.jobs.states import collected
from fleetctl.ssh.seam import Connection
from fleetctl.store.leases import FenceSource
from fleetctl.telemetry.history import AgentStatus, agent_statuses
from fleetctl.telemetry.jobdirs import RemoteJobDir, dir_prefix, parse_scan_line
from fleetctl.telemetry.outcomes import status_of
from fleetctl.telemetry.snapshot import GpuSample

log = logging.getLogger("fleetctl.jobs")
LOG_TAIL_BYTES = 10 * 1024 * 1024
STARTING_GRACE_S = 120.0
CODE_BUILD_TIMEOUT_S = 300.0  # unpacking an upload of many files on a slow disk takes longer than a plain command
EXEC_RAN = ("ok", "no_gpus", "tool_missing", "driver_error")  # the heartbeat exec ran, so its job scan is valid
_FAILPOINT = os.environ.get("FLEETCTL_FAILPOINT", "")  # test hook: die at a named step


def _failpoint(name: str, conn: Connection | None = None) -> None:
    """``after-upload``, ``after-launch``: SIGKILL. ``sigterm-after-mkdir``: SIGTERM to this process
    (``serve`` stops), then go on once the stop has closed ``conn``, as a dispatch racing a real
    SIGTERM would."""
    if name != _FAILPOINT:
        return
    if not name.startswith("sigterm-"):
        os.kill(os.getpid(), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGTERM)
    deadline = time.monotonic() + 10
    while conn is not None and conn.is_open and time.monotonic() < deadline:
        time.sleep(0.05)


class JobRunner:
    def __init__(self, fleet: Hosts) -> None:
        self.fleet = fleet
        self.queue = JobQueue(fleet.store)
        self.results_dir = fleet.state_dir / "jobs"

    def use_fence(self, source: FenceSource | None) -> None:
        """A controller acts only on the agents it leases: their jobs, their hosts, and every queue
        transition fenced by the lease (None: all agents). ``source`` gives the current fence at each
        check, so a tick longer than a renewal period goes on with the renewed leases."""
        self.queue.fence_source = source

    def _mine(self, agent: str | None) -> bool:
        fence = self.queue.fence
        return fence is None or fence.holds(agent)

    def _token(self, agent: str) -> int | None:
        fence = self.queue.fence
        return fence.tokens.get(agent) if fence is not None else None

    # -- the tick ----------------------------------------------------------------------------
    def tick(self) -> None:
        """One pass over the queue (the :class:`~fleetctl.jobs.driver.Driver` calls it, holding the controller lock)."""
        statuses = agent_statuses(self.fleet.store)
        # A launch whose answer was lost leaves its job ``dispatching``; settle it with the host.
        self.reconcile({name for name, status in statuses.items() if status.health.state == "online"})
        self.observe(statuses)
        self.send_cancels()
        self.resolve_dependencies()
        self.dispatch_queued(statuses)

    def _agent(self, name: str | None) -> Agent | None:
        try:
            return self.fleet.inventory.get(name) if name else None
        except FleetError:
            return None

    # -- observing the hosts -----------------------------------------------------------------
    def observe(self, statuses: dict[str, AgentStatus]) -> None:
        """Act on what each agent's latest heartbeat scan says about job directories."""
        for job in self.queue.list(ACTIVE_STATES):
            status = statuses.get(job.agent or "")
            if status is None or not self._mine(job.agent):
                continue
            if status.health.state == "offline":
                self._lose(job, f"agent {job.agent} went offline")
                continue
            snap = status.snapshot
            if snap is None or snap.status not in EXEC_RAN or job.remote_dir is None or job.state != "running":
                continue
            seen = snap.job_dirs.get(job.remote_dir)
            fresh = job.started is not None and snap.timestamp.timestamp() > job.started.timestamp() + 1
            if seen == "done":
                self.collect(job.id, job.agent or "", job.remote_dir, job.attempt)
            elif seen == "vanished":
                self._lose(job, f"the job's processes on {job.agent} vanished without a result (host rebooted or killed?)")
            elif seen is None and fresh:
                self._lose(job, f"the job's directory on {job.agent} disappeared")
            elif seen in ("new", "starting") and fresh and time.time() - job.started.timestamp() > STARTING_GRACE_S:  # type: ignore[union-attr]
                self._lose(job, f"the job never started on {job.agent}")
        self._observe_lost(statuses)
        self._observe_other_attempts(statuses)

    def _observe_lost(self, statuses: dict[str, AgentStatus]) -> None:
        """Provisionally lost jobs: back to running, collected, or finally lost once their host
        answers again or ``lost_grace_s`` has passed."""
        grace = self.fleet.settings.lost_grace_s
        for job in self.queue.list(("lost",)):
            if not job.lost_provisionally or not self._mine(job.agent):
                continue
            since = self.queue.lost_at(job.id) or time.time()
            status = statuses.get(job.agent or "")
            snap = status.snapshot if status else None
            back = (status is not None and status.health.state == "online" and snap is not None
                    and snap.status in EXEC_RAN and snap.timestamp.timestamp() > since)
            seen = snap.job_dirs.get(job.remote_dir) if back and snap and job.remote_dir else None
            if back and job.remote_dir and seen == "done":
                self.collect(job.id, job.agent or "", job.remote_dir, job.attempt)
            elif back and job.remote_dir and seen == "running":
                if self.queue.resume(job.id, job.attempt, f"attempt {job.attempt} on {job.agent} is still running"):
                    log.warning("job %s: %s is back and the job still runs there", job.id, job.agent)
            elif back and seen in (None, "vanished"):
                gone = "vanished without a result" if seen else "is gone"
                self.queue.finalize_lost(job.id, f"{job.reason}; back online, the run {gone}")
            elif time.time() - since >= grace:
                self.queue.finalize_lost(job.id, f"{job.reason}; no result within lost_grace_s ({grace:g}s)")

    def _observe_other_attempts(self, statuses: dict[str, AgentStatus]) -> None:
        """Directories the active-job pass does not cover: the last attempt of a requeued job (its
        result ends the job, no retry needed), a duplicate of a retried job, leftovers of a
        collection interrupted by a crash, and orphans of an interrupted dispatch."""
        for name, status in statuses.items():
            snap = status.snapshot
            if snap is None or snap.status not in EXEC_RAN or not self._mine(name):
                continue
            for path, state in snap.job_dirs.items():
                found = parse_scan_line(f"{state} {path}")
                if found is None or found.agent != name:
                    continue
                try:
                    job = self.queue.get(found.job_id)
                except JobError:
                    continue  # not ours (another controller's state dir); a StoreError still stops the tick
                self._other_attempt(job, found)

    def _other_attempt(self, job: JobRecord, found: RemoteJobDir) -> None:
        pointed = job.attempt == found.attempt and job.remote_dir == found.path  # the attempt the record names
        if pointed and (job.state in ACTIVE_STATES or job.lost_provisionally):
            return  # observe() and _observe_lost() own it
        if job.state == "dispatching" and job.attempt == found.attempt:
            return  # reconcile() owns it
        if found.state == "done":
            collected = (job.result is not None and job.result.agent == found.agent and job.result.attempt == found.attempt
                         and job.remote_dir == found.path)
            if collected:
                self._remove(found.agent, found.path)  # a collection interrupted before its removal
            else:
                self.collect(job.id, found.agent, found.path, found.attempt)
        elif found.state == "running":
            if pointed and job.state == "queued" and self.queue.resume(
                    job.id, job.attempt, f"attempt {job.attempt} on {found.agent} is still running; no retry needed"):
                log.warning("job %s: its lost attempt still runs on %s; resumed instead of retried", job.id, found.agent)
            # else a duplicate still running: collected and reported when it ends
        elif found.state == "vanished":
            self._remove_orphan(job, found, "its processes are gone and it left no result")
        else:
            self._age_orphan(job, found)

    def _age_orphan(self, job: JobRecord, found: RemoteJobDir) -> None:
        """A ``new`` or ``starting`` directory of no current attempt (a dispatch cut short by a crash or
        a SIGTERM): nothing will launch it, but wait ``orphan_age_s`` in case a launch is in flight."""
        first_seen = self.queue.first_event(job.id, "orphan_found", found.path)
        age = self.fleet.settings.orphan_age_s
        if first_seen is None:
            self.queue.note(job.id, "orphan_found", f"{found.path} on {found.agent} ({found.state}, attempt "
                            f"{found.attempt}): belongs to no current attempt; removed after {age:g}s", agent=found.agent)
            first_seen = time.time()
        if time.time() - first_seen >= age:
            self._remove_orphan(job, found, f"{found.state}, never launched by a current attempt")

    def _remove_orphan(self, job: JobRecord, found: RemoteJobDir, why: str) -> None:
        if self._remove(found.agent, found.path):
            self.queue.note(job.id, "orphan_removed", f"{found.path} on {found.agent} (attempt {found.attempt}): {why}",
                            agent=found.agent)
            log.info("job %s: removed orphan %s on %s (%s)", job.id, found.path, found.agent, why)

    def _lose(self, job: JobRecord, why: str) -> None:
        lost_before = sum(1 for _, event, _ in self.queue.events(job.id) if event == "lost")
        detail = f"attempt {job.attempt} on {job.agent} ({job.remote_dir}): {why}"
        if lost_before < job.spec.retries:
            # The attempt is remembered: if its host comes back with a result before a retry starts,
            # that result is the job's and the retry never runs.
            if self.queue.requeue(job.id, "retry", detail=detail, reason=f"requeued: {why}", keep_location=True):
                log.warning("job %s: %s; requeued (retry %d of %d)", job.id, why, lost_before + 1, job.spec.retries)
        elif self.queue.lose(job.id, detail=f"{detail}; provisional for up to "
                             f"{self.fleet.settings.lost_grace_s:g}s while its result may still come back", reason=why):
            log.warning("job %s lost: %s", job.id, why)

    # -- collection --------------------------------------------------------------------------
    def collect(self, job_id: str, agent_name: str, remote_dir: str, attempt: int) -> JobRecord | None:
        """Pull result, output, logs and declared outputs; record; remove the remote directory.
        Idempotent: files are overwritten with the same bytes and the state change is a CAS.
        The job's result is the first attempt that finished; any other is reported as a duplicate."""
        agent = self._agent(agent_name)
        if agent is None or not self._mine(agent_name):
            return None
        job = self.queue.get(job_id)
        pointed = job.remote_dir == remote_dir and job.attempt == attempt
        # A retry already running, and this earlier attempt finished first: its result is the job's.
        earlier = job.state in ACTIVE_STATES and attempt < job.attempt and job.result is None
        owner = earlier or (pointed and (job.state in ACTIVE_STATES or job.lost_provisionally or job.state == "queued"))
        local = self.results_dir / job.id
        if not owner:
            local = local / f"attempt-{attempt}"  # a duplicate run: keep it beside, not over, the result
        try:
            conn = self.fleet.connection(agent)
            result = self._pull(conn, job, agent_name, remote_dir, attempt, local)
        except TransportError as exc:
            log.warning("job %s: collecting from %s failed, will retry: %s", job.id, agent_name, one_line(str(exc)))
            return None
        if not self._mine(agent_name):
            return None  # the lease lapsed during the pull: the new holder collects and removes it
        state, reason = _final_state(job, result)
        where = f"attempt {attempt} on {agent_name}"
        if not owner:
            event = "late_result_ignored" if job.state == "lost" else "duplicate"
            self.queue.note(job.id, event, f"{where} also ran and ended: {reason}; its files are in {local}", agent=agent_name)
            log.warning("job %s: %s also ran (%s): the job ran twice", job.id, where, reason)
        elif not self._record(job, state, reason, result, where, earlier, agent=agent_name, remote_dir=remote_dir):
            return None  # the job moved on meanwhile: the next scan looks again
        self._remove(agent_name, remote_dir)
        return self.queue.get(job.id)

    def _record(self, job: JobRecord, state: JobState, reason: str, result: JobResult, where: str, earlier: bool,
                **location: str) -> bool:
        if earlier:
            done = self.queue.finish(job.id, collected(state), attempt=job.attempt, result=result,
                                     log_as="late_result", detail=f"{where} finished first: {reason}",
                                     reason=f"{reason} ({where}, collected after a retry had started)", **location)
            if done:
                self.queue.note(job.id, "duplicate", f"attempt {job.attempt} on {job.agent} had already started; it runs "
                                f"on and is reported when it ends", agent=location.get("agent"))
            return done
        if job.state in ACTIVE_STATES:
            return self.queue.finish(job.id, collected(state), attempt=job.attempt, reason=reason, result=result)
        # The host came back and the run had finished after all: record its true result.
        after = "marked lost" if job.state == "lost" else "requeued; no retry ran"
        return self.queue.finish(job.id, collected(state, late=True), attempt=job.attempt, result=result,
                                 log_as="late_result", detail=f"{where}: {reason}",
                                 reason=f"{reason} (collected after the job was {after})", **location)

    def _pull(self, conn: Connection, job: JobRecord, agent_name: str, remote_dir: str, attempt: int,
              local: Path) -> JobResult:
        local.mkdir(parents=True, exist_ok=True, mode=0o700)
        raw = conn.read_bytes(f"{remote_dir}/result.json")
        (local / "result.json").write_bytes(raw)
        try:
            facts = json.loads(raw)
        except ValueError:
            facts = {}
        result = JobResult(exit_code=facts.get("exit_code"), signal=facts.get("signal"), agent=agent_name,
                           gpus=job.gpus, started=utc(facts.get("started")), finished=utc(facts.get("finished")),
                           timed_out=bool(facts.get("timed_out")), cancelled=bool(facts.get("cancelled")), attempt=attempt)
        for stream in ("stdout", "stderr"):
            data = _optional(conn, f"{remote_dir}/{stream}.log", LOG_TAIL_BYTES)
            target = local / f"{stream}.log"
            target.write_bytes(data or b"")
            setattr(result, f"{stream}_path", str(target))
            result.logs_truncated |= data is not None and len(data) >= LOG_TAIL_BYTES
        output = _optional(conn, f"{remote_dir}/output.json", LOG_TAIL_BYTES)
        if output is not None:
            (local / "output.json").write_bytes(output)
            try:
                result.output = json.loads(output)
            except ValueError:
                result.output = {"error": "output.json is not valid JSON", "path": str(local / "output.json")}
        base = working_dir(job.spec, remote_dir)
        for declared in job.spec.outputs:
            remote = declared if declared.startswith("/") else f"{base.rstrip('/')}/{declared}"
            if remote.startswith("~/"):
                remote = remote[2:]  # SFTP paths are relative to the login directory
            data = _optional(conn, remote, None)
            if data is not None:
                target = local / "outputs" / Path(declared).name
                target.parent.mkdir(exist_ok=True)
                target.write_bytes(data)
                result.outputs[declared] = str(target)
        return result

    def _remove(self, agent_name: str, remote_dir: str) -> bool:
        agent = self._agent(agent_name)
        if agent is None or not self._mine(agent_name):
            return False  # only the lease holder changes a host
        try:
            return self.fleet.connection(agent).run(remove_command(remote_dir), timeout=agent.command_timeout_s).ok
        except (TransportError, ValueError) as exc:
            log.warning("could not remove %s on %s: %s", remote_dir, agent_name, one_line(str(exc)))
            return False

    # -- cancels, dependencies -----------------------------------------------------------------
    def send_cancels(self) -> None:
        for job in self.queue.list(ACTIVE_STATES):
            if job.cancel_requested and job.remote_dir and job.state == "running" and self._mine(job.agent):
                self.signal(job, force=False)

    def signal(self, job: JobRecord, force: bool) -> bool:
        agent = self._agent(job.agent)
        if agent is None or job.remote_dir is None or not self.queue.take_cancel(job.id):
            return False
        try:
            command = cancel_command(job.remote_dir, force, self.fleet.settings.kill_grace_s)
            result = self.fleet.connection(agent).run(command, timeout=agent.command_timeout_s)
        except TransportError as exc:
            log.warning("job %s: cancel not delivered yet: %s", job.id, one_line(str(exc)))
            self.queue.request_cancel(job.id, force=force, event=False)  # the next tick tries again
            return False
        if not result.ok:
            self.queue.request_cancel(job.id, force=force, event=False)
            return False
        self.queue.note(job.id, "cancel_sent", "SIGKILL" if force else "SIGTERM")
        return True

    def resolve_dependencies(self) -> None:
        dependencies = self._dependencies()
        for job in self.queue.list(("queued",)):
            for parent_id in job.spec.after:
                parent = dependencies(parent_id)
                if parent.done and parent.state != "succeeded":
                    self.queue.finish(job.id, "reject", reason=f"dependency {parent.id} ended {parent.state}; not run")
                    break

    def _dependencies(self) -> Callable[[str], JobRecord | SweepRecord]:
        """What ``--after`` names, each read once per pass (a thousand tasks after one sweep read it once)."""
        seen: dict[str, JobRecord | SweepRecord] = {}

        def read(dep_id: str) -> JobRecord | SweepRecord:
            if dep_id not in seen:
                seen[dep_id] = self.queue.dependency(dep_id)
            return seen[dep_id]
        return read

    # -- placement and dispatch ----------------------------------------------------------------
    def _candidates(self, statuses: dict[str, AgentStatus], active: list[JobRecord]) -> list[Candidate]:
        candidates = []
        for agent in self.fleet.inventory:
            status = statuses.get(agent.name)
            mine = [j for j in active if j.agent == agent.name]
            held = frozenset(int(g) for j in mine for g in j.gpus)
            candidates.append(Candidate(agent, bool(status and status.health.state == "online"),
                                        bool(status and status.draining), status.snapshot if status else None,
                                        held, len(mine)))
        return candidates

    def dispatch_queued(self, statuses: dict[str, AgentStatus]) -> list[str]:
        """Place and dispatch what can run; give every job left queued its current reason."""
        dispatched = []
        # Read once per tick (not once per queued job: 300 queued jobs made that 90,000 rows a tick),
        # and kept current with what this tick claims.
        active = self.queue.list(ACTIVE_STATES)
        # Placed only on agents held when the tick began: one taken over mid-tick has jobs ``active``
        # and ``statuses`` do not show yet.
        held = {agent.name for agent in self.fleet.inventory if self._mine(agent.name)}
        queued = self.queue.list(("queued",))
        dependencies = self._dependencies()
        # Tasks of a cancelled sweep (a lost one requeued after the cancel, say) are never claimed again.
        stopped = self.queue.cancelled_sweeps(sorted({j.spec.task.parent for j in queued if j.spec.task}))
        running_tasks = Counter(j.spec.task.parent for j in active if j.spec.task)  # per sweep, for --max-concurrent
        for job in queued:
            task = job.spec.task
            if task is not None and task.parent in stopped:
                self.queue.finish(job.id, "cancel", reason="cancelled with its sweep before it started")
                continue
            waiting = [p for p in (dependencies(p) for p in job.spec.after) if p.state != "succeeded"]
            if waiting:
                parent = waiting[0]
                how = "lost for now; its host may come back" if parent.lost_provisionally else parent.state
                self.queue.set_reason(job.id, f"waiting for dependency {parent.id} ({how})")
                continue
            capped = concurrency_cap(job.spec, running_tasks)
            if capped:
                self.queue.set_reason(job.id, capped)
                continue
            candidates = self._candidates(statuses, active)
            impossible = never_satisfiable(job.spec, candidates)
            if impossible:
                self.queue.finish(job.id, "reject", reason=f"cannot be placed: {impossible}")
                continue
            # Placed only on agents this controller leases; the reason why not still weighs them all.
            placement = place(job.spec, [c for c in candidates if c.agent.name in held and self._mine(c.agent.name)])
            if placement is None:
                self.queue.set_reason(job.id, waiting_reason(job.spec, candidates))
                continue
            gpu_ids = [str(g.index) for g in placement.gpus]
            if not self.queue.claim(job.id, placement.agent, gpu_ids, job.attempt + 1):
                continue
            # Snapshots do not change within a tick; the GPUs this claim took are held in ``active``.
            claimed = self.queue.get(job.id)
            active.append(claimed)
            if task is not None:
                running_tasks[task.parent] += 1
            if self.dispatch(claimed, placement.gpus):
                dispatched.append(job.id)
        return dispatched

    def dispatch(self, job: JobRecord, gpus: list[GpuSample]) -> bool:
        """mktemp -d, upload job.json and run.sh over SFTP, launch detached. Back to the queue
        (not started anywhere) if the host cannot be reached before the launch."""
        agent = self._agent(job.agent)
        assert agent is not None
        remote_dir = None
        claimed_under = self._token(agent.name)  # the lease this claim was made under: the whole dispatch is bound to it
        try:
            self._still_mine(agent.name, claimed_under)
            conn = self.fleet.connection(agent)
            made = conn.run(make_dir_command(job.id, job.attempt, agent.name), timeout=agent.command_timeout_s)
            if not made.ok or not made.stdout.strip().startswith("/"):
                raise TransportError(f"mktemp -d failed on {agent.name}: {one_line(made.stderr) or made.exit_code}")
            remote_dir = made.stdout.strip()
            if not self.queue.set_remote_dir(job.id, remote_dir, job.attempt):
                raise LeaseLost(f"job {job.id} moved on (or the lease of {agent.name} lapsed) during its dispatch")
            _failpoint("sigterm-after-mkdir", conn)
            self._upload(conn, job, remote_dir, gpus)
        except LeaseLost as exc:  # the job stays as it is; the lease's new holder reconciles it
            log.warning("job %s: not dispatched: %s", job.id, exc)
            return False
        except CodeError as exc:  # its code cannot run there as it is (snapshot gone, host cannot build it): no retry helps
            self.queue.finish(job.id, "dispatch_failed", reason=one_line(str(exc)))
            if remote_dir is not None:
                self._remove(agent.name, remote_dir)
            return False
        except TransportError as exc:
            if remote_dir is not None:
                self._remove(agent.name, remote_dir)  # if this fails too, the orphan scan removes it later
            self.queue.requeue(job.id, "requeue", detail=one_line(str(exc)),
                               reason=f"dispatch to {agent.name} failed ({status_of(exc)}): {one_line(str(exc))}")
            return False
        return self._launch(conn, agent, job, remote_dir, claimed_under)

    def _upload(self, conn: Connection, job: JobRecord, remote_dir: str, gpus: list[GpuSample]) -> None:
        vendor = gpus[0].vendor if gpus else "nvidia"
        ids = [g.uuid if vendor == "nvidia" and g.uuid else str(g.index) for g in gpus]
        gpu_env = gpu_environment(vendor, ids) if gpus else {}
        prepare = ""
        if job.spec.code is not None:  # the code first: a directory with job.json and run.sh is ready to launch
            agent = self._agent(job.agent)
            sent = send_code(conn, remote_dir, job.spec.code, CodeStore(self.fleet.state_dir), self.fleet.settings,
                             agent=job.agent or "", timeout=max(agent.command_timeout_s if agent else 0.0, CODE_BUILD_TIMEOUT_S))
            self.queue.note(job.id, "code_sent", sent.describe(job.agent or ""), agent=job.agent)
            prepare = sent.build  # the job's own tree is built by its wrapper on the host, off the dispatch's path
        document = {"id": job.id, "name": job.spec.name, "command": job.spec.command, "env": job.spec.env,
                    "payload": job.spec.payload, "gpus": ids, "timeout_s": job.spec.timeout_s, "attempt": job.attempt}
        if job.spec.task is not None:
            document["task"] = job.spec.task.model_dump(include={"parent", "index", "count", "params"})
        conn.write_bytes(f"{remote_dir}/job.json", json.dumps(document, indent=1).encode())
        conn.write_bytes(f"{remote_dir}/run.sh", wrapper_script(job.id, remote_dir, job.spec, gpu_env,
                                                                    self.fleet.settings.kill_grace_s, prepare).encode())
        _failpoint("after-upload")

    def _still_mine(self, agent: str, token: int | None) -> None:
        """Checked right before each step that changes a host: a controller that lost the lease
        (paused past it, partitioned), even if it holds the agent again now (a new token), stops
        here; the lease's holder settles the job with the host."""
        if not self._mine(agent) or self._token(agent) != token:
            raise LeaseLost(f"this controller no longer holds the lease of {agent} it claimed the job under")

    def _launch(self, conn: Connection, agent: Agent, job: JobRecord, remote_dir: str, token: int | None) -> bool:
        if self.queue.get(job.id).cancel_requested:
            # Cancelled while it was being dispatched (its sweep, or the job itself): it never starts.
            if self.queue.finish(job.id, "cancel_before_launch", attempt=job.attempt, reason="cancelled before it started"):
                self._remove(agent.name, remote_dir)
            return False
        try:
            self._still_mine(agent.name, token)
            launched = conn.run(launch_command(remote_dir), timeout=agent.command_timeout_s)
        except LeaseLost as exc:
            log.warning("job %s: not launched: %s", job.id, exc)
            return False
        except TransportError as exc:
            # The launch may have run before the link broke, and only the directory knows: the job
            # stays ``dispatching`` and reconcile() reads started/ (it never launches twice).
            log.warning("job %s: launch on %s unconfirmed, reconciling later: %s", job.id, agent.name, one_line(str(exc)))
            return False
        _failpoint("after-launch")
        if launched.ok or launched.exit_code == LAUNCH_ALREADY_STARTED:
            return self.queue.mark_running(job.id, remote_dir, attempt=job.attempt)
        self.queue.finish(job.id, "dispatch_failed",
                          reason=f"launch on {agent.name} failed: {one_line(launched.stderr) or launched.exit_code}")
        self._remove(agent.name, remote_dir)
        return False

    # -- restart -------------------------------------------------------------------------------
    def reconcile(self, agents: set[str] | None = None) -> None:
        """Settle every ``dispatching`` job (of ``agents`` only, if given) with its host: after a
        controller restart or a takeover, or a launch whose answer never came."""
        for job in self.queue.list(("dispatching",)):
            if (agents is not None and job.agent not in agents) or not self._mine(job.agent):
                continue
            agent = self._agent(job.agent)
            if agent is None:
                self.queue.requeue(job.id, "requeue", detail="agent no longer in the inventory", reason=None)
                continue
            try:
                self._reconcile_one(job, agent)
            except TransportError as exc:
                log.warning("job %s: cannot reconcile with %s yet: %s", job.id, agent.name, one_line(str(exc)))

    def _reconcile_one(self, job: JobRecord, agent: Agent) -> None:
        conn = self.fleet.connection(agent)
        pattern = f'"${{TMPDIR:-/tmp}}"/{dir_prefix(job.id, job.attempt, agent.name)}.*'
        probe = (f"for d in {pattern}; do [ -d \"$d\" ] || continue; s=partial; "
                 '[ -f "$d/job.json" ] && [ -f "$d/run.sh" ] && s=ready; [ -d "$d/started" ] && s=started; '
                 'printf "%s %s\\n" "$s" "$d"; done')
        found = conn.run("sh -c " + shlex.quote(probe), timeout=agent.command_timeout_s).stdout.split()
        if len(found) < 2:
            self.queue.requeue(job.id, "requeue", reason=None, detail="controller restarted before the job directory existed")
            return
        state, remote_dir = found[0], found[1]
        if not self.queue.set_remote_dir(job.id, remote_dir, job.attempt):
            return
        if state == "partial":
            self._remove(agent.name, remote_dir)
            self.queue.requeue(job.id, "requeue", reason=None, detail="controller restarted mid-upload")
            return
        if state == "ready":
            launched = conn.run(launch_command(remote_dir), timeout=agent.command_timeout_s)
            if not (launched.ok or launched.exit_code == LAUNCH_ALREADY_STARTED):
                return
        self.queue.mark_running(job.id, remote_dir, f"{remote_dir} (reconciled)", attempt=job.attempt)


def _final_state(job: JobRecord, result: JobResult) -> tuple[JobState, str]:
    if result.timed_out:
        return "timed_out", f"exceeded its timeout of {job.spec.timeout_s:g}s and was killed"
    if result.cancelled:
        return "cancelled", "cancelled" + (f" (signal {result.signal})" if result.signal else "")
    if result.exit_code == 0:
        return "succeeded", "exit code 0"
    if result.signal:
        return "failed", f"killed by signal {result.signal}"
    return "failed", f"exit code {result.exit_code}"


def _optional(conn: Connection, path: str, max_bytes: int | None) -> bytes | None:
    try:
        return conn.read_bytes(path, max_bytes=max_bytes)
    except RemoteFileNotFound:
        return None
