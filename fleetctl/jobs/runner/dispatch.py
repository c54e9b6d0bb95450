"""Dispatching one claimed job: ``mktemp -d`` on its host, its code (if any), job.json and run.sh
over SFTP, then the detached launch, and the job marked running.

Every step that changes the host is bound to the lease the claim was made under: a controller that
lost it stops, and the lease's new holder settles the job with the host (:mod:`fleetctl.jobs.runner.reconcile`).
A dispatch that fails before the launch puts the job back in the queue (it started nowhere); a
launch whose answer is lost leaves it ``dispatching`` for reconciliation (it never launches twice)."""

from __future__ import annotations

import json
import logging

from fleetctl._text import one_line
from fleetctl.errors import CodeError, LeaseLost, TransportError
from fleetctl.inventory.config import Agent
from fleetctl.jobs.code.store import CodeStore
from fleetctl.jobs.code.upload import send_code
from fleetctl.jobs.model import JobRecord
from fleetctl.jobs.remote import LAUNCH_ALREADY_STARTED, gpu_environment, launch_command, make_dir_command, wrapper_script
from fleetctl.jobs.runner import failpoints
from fleetctl.jobs.runner.cancels import signal
from fleetctl.jobs.runner.context import RunnerContext
from fleetctl.ssh.seam import Connection
from fleetctl.telemetry.outcomes import status_of
from fleetctl.telemetry.snapshot import GpuSample

log = logging.getLogger("fleetctl.jobs")
CODE_BUILD_TIMEOUT_S = 300.0  # unpacking an upload of many files on a slow disk takes longer than a plain command


class Dispatcher:
    def __init__(self, ctx: RunnerContext) -> None:
        self.ctx = ctx
        self.queue = ctx.queue

    def dispatch(self, job: JobRecord, gpus: list[GpuSample]) -> bool:
        """Dispatch ``job`` (just claimed, ``dispatching``) on its agent with ``gpus``; True once it runs."""
        agent = self.ctx.agent(job.agent)
        if agent is None:  # the inventory was reloaded without it since the claim: it started nowhere
            self.queue.requeue(job.id, "requeue", detail=f"agent {job.agent} no longer in the inventory", reason=None)
            return False
        remote_dir = None
        claimed_under = self.ctx.token(agent.name)  # the lease this claim was made under: the whole dispatch is bound to it
        try:
            self.ctx.still_mine(agent.name, claimed_under)
            conn = self.ctx.fleet.connection(agent)
            made = conn.run(make_dir_command(job.id, job.attempt, agent.name), timeout=agent.command_timeout_s)
            if not made.ok or not made.stdout.strip().startswith("/"):
                raise TransportError(f"mktemp -d failed on {agent.name}: {one_line(made.stderr) or made.exit_code}")
            remote_dir = made.stdout.strip()
            if not self.queue.set_remote_dir(job.id, remote_dir, job.attempt):
                raise LeaseLost(f"job {job.id} moved on (or the lease of {agent.name} lapsed) during its dispatch")
            failpoints.reached("sigterm-after-mkdir", conn)
            self._upload(conn, agent, job, remote_dir, gpus)
        except LeaseLost as exc:  # the job stays as it is; the lease's new holder reconciles it
            log.warning("job %s: not dispatched: %s", job.id, exc)
            return False
        except CodeError as exc:  # its code cannot run there as it is (snapshot gone, host cannot build it): no retry helps
            self.queue.finish(job.id, "dispatch_failed", reason=one_line(str(exc)))
            if remote_dir is not None:
                self.ctx.remove(agent.name, remote_dir)
            return False
        except TransportError as exc:
            if remote_dir is not None:
                self.ctx.remove(agent.name, remote_dir)  # if this fails too, the orphan scan removes it later
            self.queue.requeue(job.id, "requeue", detail=one_line(str(exc)),
                               reason=f"dispatch to {agent.name} failed ({status_of(exc)}): {one_line(str(exc))}")
            return False
        return self._launch(conn, agent, job, remote_dir, claimed_under)

    def _upload(self, conn: Connection, agent: Agent, job: JobRecord, remote_dir: str, gpus: list[GpuSample]) -> None:
        vendor = gpus[0].vendor if gpus else "nvidia"
        ids = [g.uuid if vendor == "nvidia" and g.uuid else str(g.index) for g in gpus]
        gpu_env = gpu_environment(vendor, ids) if gpus else {}
        fleet = self.ctx.fleet
        prepare = ""
        if job.spec.code is not None:  # the code first: a directory with job.json and run.sh is ready to launch
            sent = send_code(conn, remote_dir, job.spec.code, CodeStore(fleet.state_dir), fleet.settings,
                             agent=agent.name, timeout=max(agent.command_timeout_s, CODE_BUILD_TIMEOUT_S))
            self.queue.note(job.id, "code_sent", sent.describe(agent.name), agent=agent.name)
            prepare = sent.build  # the job's own tree is built by its wrapper on the host, off the dispatch's path
        document = {"id": job.id, "name": job.spec.name, "command": job.spec.command, "env": job.spec.env,
                    "payload": job.spec.payload, "gpus": ids, "timeout_s": job.spec.timeout_s, "attempt": job.attempt}
        if job.spec.task is not None:
            document["task"] = job.spec.task.model_dump(include={"parent", "index", "count", "params"})
        conn.write_bytes(f"{remote_dir}/job.json", json.dumps(document, indent=1).encode())
        conn.write_bytes(f"{remote_dir}/run.sh", wrapper_script(job.id, remote_dir, job.spec, gpu_env,
                                                                    fleet.settings.kill_grace_s, prepare).encode())
        failpoints.reached("after-upload")

    def _launch(self, conn: Connection, agent: Agent, job: JobRecord, remote_dir: str, token: int | None) -> bool:
        if self.queue.get(job.id).cancel_requested:
            # Cancelled while it was being dispatched (its sweep, or the job itself): it never starts.
            if self.queue.finish(job.id, "cancel_before_launch", attempt=job.attempt, reason="cancelled before it started"):
                self.ctx.remove(agent.name, remote_dir)
            return False
        try:
            self.ctx.still_mine(agent.name, token)
            launched = conn.run(launch_command(remote_dir), timeout=agent.command_timeout_s)
        except LeaseLost as exc:
            log.warning("job %s: not launched: %s", job.id, exc)
            return False
        except TransportError as exc:
            # The launch may have run before the link broke, and only the directory knows: the job
            # stays ``dispatching`` and reconciliation reads started/ (it never launches twice).
            log.warning("job %s: launch on %s unconfirmed, reconciling later: %s", job.id, agent.name, one_line(str(exc)))
            return False
        failpoints.reached("after-launch")
        if launched.ok or launched.exit_code == LAUNCH_ALREADY_STARTED:
            running = self.queue.mark_running(job.id, remote_dir, attempt=job.attempt)
            if running:
                self._cancel_if_requested(job.id)
            return running
        self.queue.finish(job.id, "dispatch_failed",
                          reason=f"launch on {agent.name} failed: {one_line(launched.stderr) or launched.exit_code}")
        self.ctx.remove(agent.name, remote_dir)
        return False

    def _cancel_if_requested(self, job_id: str) -> None:
        """A cancel recorded while the launch's round trip was in flight found the job ``dispatching``:
        nobody signalled it, and the check before the launch had passed. Send it now (if the job's
        process group is not written yet, the cancel stays marked and the next tick sends it)."""
        job = self.queue.get(job_id)
        if job.cancel_requested:
            signal(self.ctx, job, force=False)
