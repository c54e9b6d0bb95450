"""The job runner: each tick it collects finished jobs (seen by the heartbeat's scan), marks lost
ones, sends cancels, resolves dependencies, then places and dispatches queued jobs.

The remote directory is the truth: a restarted controller reconciles every ``dispatching`` job
with it, and the launch step refuses a directory that was already started, so no job starts twice
unless its retries ask for it."""

from __future__ import annotations

import json
import logging
import os
import shlex
import signal
import time
from pathlib import Path

from fleetctl.config import Agent
from fleetctl.durations import utc
from fleetctl.errors import FleetError, TransportError
from fleetctl.fleet import Fleet
from fleetctl.history import AgentStatus, agent_statuses
from fleetctl.jobs.model import ACTIVE_STATES, FINAL_STATES, JobRecord, JobResult, JobState
from fleetctl.jobs.placement import Candidate, never_satisfiable, place
from fleetctl.jobs.queue import JobQueue
from fleetctl.jobs.remote import (
    LAUNCH_ALREADY_STARTED,
    cancel_command,
    dir_prefix,
    gpu_environment,
    launch_command,
    make_dir_command,
    parse_scan_line,
    remove_command,
    wrapper_script,
)
from fleetctl.telemetry import GpuSample
from fleetctl.text import one_line
from fleetctl.transport import Connection

log = logging.getLogger("fleetctl.jobs")
LOG_TAIL_BYTES = 10 * 1024 * 1024
STARTING_GRACE_S = 120.0
EXEC_RAN = ("ok", "no_gpus", "tool_missing", "driver_error")  # the heartbeat exec ran, so its job scan is valid
_FAILPOINT = os.environ.get("FLEETCTL_FAILPOINT", "")  # test hook: die by SIGKILL at a named step


def _failpoint(name: str) -> None:
    if name == _FAILPOINT:
        os.kill(os.getpid(), signal.SIGKILL)


class JobRunner:
    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.queue = JobQueue(fleet.store)
        self.results_dir = fleet.state_dir / "jobs"

    # -- the tick ----------------------------------------------------------------------------
    def tick(self) -> None:
        statuses = agent_statuses(self.fleet.store)
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
            if status is None:
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
        self._observe_other_attempts(statuses)

    def _observe_other_attempts(self, statuses: dict[str, AgentStatus]) -> None:
        """Directories of attempts the queue no longer waits for: a lost run that finished after
        all, a duplicate of a retried job, or leftovers of a collection interrupted by a crash."""
        for name, status in statuses.items():
            snap = status.snapshot
            if snap is None or snap.status not in EXEC_RAN:
                continue
            for path, state in snap.job_dirs.items():
                found = parse_scan_line(f"{state} {path}")
                if found is None or found.agent != name:
                    continue
                try:
                    job = self.queue.get(found.job_id)
                except FleetError:
                    continue  # not ours (another controller's state dir)
                current = job.state in ACTIVE_STATES and job.attempt == found.attempt and job.remote_dir == path
                if current or state in ("running", "starting", "new"):
                    continue
                collected = job.result is not None and job.result.agent == name and job.remote_dir == path
                if state == "done" and not collected:
                    self.collect(job.id, name, path, found.attempt)
                else:
                    self._remove(name, path)

    def _lose(self, job: JobRecord, why: str) -> None:
        lost_before = sum(1 for _, event, _ in self.queue.events(job.id) if event == "lost")
        detail = f"attempt {job.attempt} on {job.agent} ({job.remote_dir}): {why}"
        if lost_before < job.spec.retries:
            if self.queue.update(job.id, expect=ACTIVE_STATES, event="lost", detail=detail, state="queued", agent=None,
                                 gpus=[], remote_dir=None, reason=f"requeued: {why}"):
                log.warning("job %s: %s; requeued (retry %d of %d)", job.id, why, lost_before + 1, job.spec.retries)
        elif self.queue.update(job.id, expect=ACTIVE_STATES, event="lost", detail=detail, state="lost",
                               finished=time.time(), reason=why):
            log.warning("job %s lost: %s", job.id, why)

    # -- collection --------------------------------------------------------------------------
    def collect(self, job_id: str, agent_name: str, remote_dir: str, attempt: int) -> JobRecord | None:
        """Pull result, output, logs and declared outputs; record; remove the remote directory.
        Idempotent: files are overwritten with the same bytes and the state change is a CAS."""
        agent = self._agent(agent_name)
        if agent is None:
            return None
        job = self.queue.get(job_id)
        is_current = job.remote_dir == remote_dir and job.state in ACTIVE_STATES
        local = self.results_dir / job.id
        if not is_current and job.state != "lost":
            local = local / f"attempt-{attempt}"  # a duplicate run: keep it beside, not over, the result
        try:
            conn = self.fleet.connection(agent)
            result = self._pull(conn, job, agent_name, remote_dir, attempt, local)
        except TransportError as exc:
            log.warning("job %s: collecting from %s failed, will retry: %s", job.id, agent_name, one_line(str(exc)))
            return None
        state, reason = _final_state(job, result)
        fields = {"result": result, "exit_code": result.exit_code, "signal": result.signal,
                  "finished": result.finished.timestamp() if result.finished else time.time()}
        if is_current:
            self.queue.update(job.id, expect=ACTIVE_STATES, event=state, detail=reason, state=state, reason=reason, **fields)
        elif job.state == "lost":
            # The host came back and the run had finished after all: record its true result.
            self.queue.update(job.id, expect=("lost",), event="late_result", detail=f"attempt {attempt} on {agent_name}: {reason}",
                              state=state, reason=f"{reason} (collected after the job was marked lost)", agent=agent_name,
                              remote_dir=remote_dir, **fields)
        else:
            self.queue.note(job.id, "duplicate", f"attempt {attempt} on {agent_name} also ran and ended: {reason}; "
                            f"its files are in {local}")
            log.warning("job %s: attempt %d on %s also ran (%s): the job ran twice", job.id, attempt, agent_name, reason)
        self._remove(agent_name, remote_dir)
        return self.queue.get(job.id)

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
        base = job.spec.workdir or remote_dir
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

    def _remove(self, agent_name: str, remote_dir: str) -> None:
        agent = self._agent(agent_name)
        if agent is None:
            return
        try:
            self.fleet.connection(agent).run(remove_command(remote_dir), timeout=agent.command_timeout_s)
        except (TransportError, ValueError) as exc:
            log.warning("could not remove %s on %s: %s", remote_dir, agent_name, exc)

    # -- cancels, dependencies -----------------------------------------------------------------
    def send_cancels(self) -> None:
        for job in self.queue.list(ACTIVE_STATES):
            if job.cancel_requested and job.remote_dir and job.state == "running":
                self.signal(job, force=False)

    def signal(self, job: JobRecord, force: bool) -> bool:
        agent = self._agent(job.agent)
        if agent is None or job.remote_dir is None:
            return False
        try:
            command = cancel_command(job.remote_dir, force, self.fleet.settings.kill_grace_s)
            result = self.fleet.connection(agent).run(command, timeout=agent.command_timeout_s)
        except TransportError as exc:
            log.warning("job %s: cancel not delivered yet: %s", job.id, one_line(str(exc)))
            return False
        if result.ok:
            self.queue.update(job.id, event="cancel_sent", detail="SIGKILL" if force else "SIGTERM", cancel_requested=False)
        return result.ok

    def resolve_dependencies(self) -> None:
        for job in self.queue.list(("queued",)):
            for parent_id in job.spec.after:
                parent = self.queue.get(parent_id)
                if parent.state in FINAL_STATES and parent.state != "succeeded":
                    self.queue.update(job.id, expect=("queued",), event="failed", state="failed", finished=time.time(),
                                      reason=f"dependency {parent.id} ended {parent.state}; not run")
                    break

    # -- placement and dispatch ----------------------------------------------------------------
    def _candidates(self, statuses: dict[str, AgentStatus]) -> list[Candidate]:
        active = self.queue.list(ACTIVE_STATES)
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
        dispatched = []
        for job in self.queue.list(("queued",)):
            parents = [self.queue.get(p) for p in job.spec.after]
            if any(p.state != "succeeded" for p in parents):
                continue
            candidates = self._candidates(statuses)
            impossible = never_satisfiable(job.spec, candidates)
            if impossible:
                self.queue.update(job.id, expect=("queued",), event="failed", state="failed", finished=time.time(),
                                  reason=f"cannot be placed: {impossible}")
                continue
            placement = place(job.spec, candidates)
            if placement is None:
                continue
            gpu_ids = [str(g.index) for g in placement.gpus]
            if not self.queue.update(job.id, expect=("queued",), event="dispatching", detail=placement.agent,
                                     state="dispatching", agent=placement.agent, gpus=gpu_ids, attempt=job.attempt + 1,
                                     dispatched=time.time(), reason=None):
                continue
            # Snapshots do not change within a tick; GPUs this dispatch took are held in the queue,
            # which the next _candidates() reads.
            if self.dispatch(self.queue.get(job.id), placement.gpus):
                dispatched.append(job.id)
        return dispatched

    def dispatch(self, job: JobRecord, gpus: list[GpuSample]) -> bool:
        """mktemp -d, upload job.json and run.sh over SFTP, launch detached. Back to the queue
        (not started anywhere) if the host cannot be reached before the launch."""
        agent = self._agent(job.agent)
        assert agent is not None
        try:
            conn = self.fleet.connection(agent)
            made = conn.run(make_dir_command(job.id, job.attempt, agent.name), timeout=agent.command_timeout_s)
            remote_dir = made.stdout.strip()
            if not made.ok or not remote_dir.startswith("/"):
                raise TransportError(f"mktemp -d failed on {agent.name}: {one_line(made.stderr) or made.exit_code}")
            self.queue.update(job.id, expect=("dispatching",), remote_dir=remote_dir)
            return self._upload_and_launch(conn, agent, job, remote_dir, gpus)
        except TransportError as exc:
            self.queue.update(job.id, expect=("dispatching",), event="requeued", detail=one_line(str(exc)), state="queued",
                              agent=None, gpus=[], remote_dir=None, reason=f"dispatch to {agent.name} failed: {one_line(str(exc))}")
            return False

    def _upload_and_launch(self, conn: Connection, agent: Agent, job: JobRecord, remote_dir: str, gpus: list[GpuSample]) -> bool:
        vendor = gpus[0].vendor if gpus else "nvidia"
        ids = [g.uuid if vendor == "nvidia" and g.uuid else str(g.index) for g in gpus]
        gpu_env = gpu_environment(vendor, ids) if gpus else {}
        document = {"id": job.id, "name": job.spec.name, "command": job.spec.command, "env": job.spec.env,
                    "payload": job.spec.payload, "gpus": ids, "timeout_s": job.spec.timeout_s, "attempt": job.attempt}
        conn.write_bytes(f"{remote_dir}/job.json", json.dumps(document, indent=1).encode())
        conn.write_bytes(f"{remote_dir}/run.sh", wrapper_script(job.id, remote_dir, job.spec, gpu_env,
                                                                    self.fleet.settings.kill_grace_s).encode())
        _failpoint("after-upload")
        launched = conn.run(launch_command(remote_dir), timeout=agent.command_timeout_s)
        _failpoint("after-launch")
        if launched.ok or launched.exit_code == LAUNCH_ALREADY_STARTED:
            self.queue.update(job.id, expect=("dispatching",), event="running", detail=remote_dir, state="running",
                              started=time.time())
            return True
        self.queue.update(job.id, expect=("dispatching",), event="failed", state="failed", finished=time.time(),
                          reason=f"launch on {agent.name} failed: {one_line(launched.stderr) or launched.exit_code}")
        self._remove(agent.name, remote_dir)
        return False

    # -- restart -------------------------------------------------------------------------------
    def reconcile(self) -> None:
        """After a controller restart: settle every ``dispatching`` job with its host."""
        for job in self.queue.list(("dispatching",)):
            agent = self._agent(job.agent)
            if agent is None:
                self.queue.update(job.id, expect=("dispatching",), state="queued", agent=None, gpus=[], remote_dir=None,
                                  event="requeued", detail="agent no longer in the inventory")
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
            self.queue.update(job.id, expect=("dispatching",), state="queued", agent=None, gpus=[], remote_dir=None,
                              event="requeued", detail="controller restarted before the job directory existed")
            return
        state, remote_dir = found[0], found[1]
        self.queue.update(job.id, expect=("dispatching",), remote_dir=remote_dir)
        if state == "partial":
            self._remove(agent.name, remote_dir)
            self.queue.update(job.id, expect=("dispatching",), state="queued", agent=None, gpus=[], remote_dir=None,
                              event="requeued", detail="controller restarted mid-upload")
            return
        if state == "ready":
            launched = conn.run(launch_command(remote_dir), timeout=agent.command_timeout_s)
            if not (launched.ok or launched.exit_code == LAUNCH_ALREADY_STARTED):
                return
        self.queue.update(job.id, expect=("dispatching",), event="running", detail=f"{remote_dir} (reconciled)",
                          state="running", started=time.time())


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
    except TransportError as exc:
        if "No such file" in str(exc) or "Errno 2" in str(exc):
            return None
        raise
