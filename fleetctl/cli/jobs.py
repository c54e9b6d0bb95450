"""``fleetctl submit``, ``jobs ...`` and ``agents drain/undrain``."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from fleetctl._text import one_line, visible
from fleetctl.cli.code_progress import TerminalCodeProgress
from fleetctl.cli.common import common_options, iso_utc, option_range, out, parse_labels, print_json, settings
from fleetctl.cli.tables import Column, list_table
from fleetctl.errors import ConfigError, JobError
from fleetctl.fleet import Fleet
from fleetctl.inventory.config import load_config
from fleetctl.jobs.api import cancel_job, refresh_reasons
from fleetctl.jobs.code.progress import reporting
from fleetctl.jobs.driver import NO_CONTROLLER
from fleetctl.jobs.model import FINAL_STATES, JobRecord, JobSpec, parse_duration
from fleetctl.jobs.queue import JobQueue
from fleetctl.settings import default_of

STATES = ("queued", "dispatching", "running", *FINAL_STATES)
EXIT_JOB_FAILED = 3


def _fleet(*, store_only: bool = False) -> Fleet:
    """``store_only``: the command reads the state dir alone (jobs list/show/logs of ended jobs) and
    works with no inventory file; anything that needs an agent still says there is none."""
    s = settings()
    return Fleet(load_config(s.config_path, missing_ok=store_only), state_dir=s.state_path)


def _payload(path: str | None) -> object:
    if path is None:
        return None
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"--payload {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise ConfigError(f"--payload {path}: not valid JSON: {exc}", hint="the payload must be a JSON document") from None


@click.command("submit", context_settings={"ignore_unknown_options": False})
@click.option("--gpus", type=option_range(JobSpec, "gpus"), default=default_of(JobSpec, "gpus"), show_default=True, help="GPUs the job needs.")
@click.option("--min-free-mem-mib", type=option_range(JobSpec, "min_free_mem_mib"), help="Free memory each GPU must have.")
@click.option("--label", "labels", multiple=True, metavar="KEY=GLOB", help="Agent label to match (gpu_type=a100*).")
@click.option("--agent", metavar="NAME", help="Run on this agent only.")
@click.option("--env", "env", multiple=True, metavar="K=V", help="Environment variable for the job; repeatable.")
@click.option("--workdir", metavar="DIR", help="Remote working directory (default: the job's private dir).")
@click.option("--timeout", metavar="DURATION", help="Kill the job after this long (90s, 15m, 2h).")
@click.option("--retries", type=option_range(JobSpec, "retries"), default=default_of(JobSpec, "retries"), show_default=True,
              help="Times to re-run the job if its host is lost (0: side-effecting work runs at most once).")
@click.option("--payload", type=click.Path(dir_okay=False), metavar="FILE.json", help="JSON the job reads from $FLEETCTL_JOB_FILE.")
@click.option("--output", "outputs", multiple=True, metavar="REMOTE_PATH", help="File to pull back when the job ends.")
@click.option("--after", "after", multiple=True, metavar="JOB_ID", help="Start only after this job succeeded.")
@click.option("--name", help="A name to recognise the job by.")
@click.option("--priority", type=int, default=default_of(JobSpec, "priority"), show_default=True, help="Higher runs first; FIFO within a priority.")
@click.option("--code", "code", metavar="DIR",
              help="Run in a snapshot of DIR taken now (its .gitignore and .fleetctlignore honoured), as the working directory.")
@click.option("--wait", "wait", is_flag=True, help="Wait for the job to end; exit 0 if it succeeded, 3 if not.")
@click.argument("command", nargs=-1, required=True)
@common_options
def submit_command(gpus: int, min_free_mem_mib: float | None, labels: tuple[str, ...], agent: str | None,
                   env: tuple[str, ...], workdir: str | None, timeout: str | None, retries: int, payload: str | None,
                   outputs: tuple[str, ...], after: tuple[str, ...], name: str | None, priority: int, code: str | None,
                   wait: bool, command: tuple[str, ...]) -> None:
    """Queue COMMAND for the fleet and print the job id (durable once printed).

    \b
    fleetctl submit --gpus 2 -- python3 train.py --epochs 3
    fleetctl submit --code . --gpus 1 -- python3 train.py   # runs in a snapshot of .
    """
    options = {"code": code} if code is not None else {}
    with _fleet() as fleet, reporting(TerminalCodeProgress()):
        job = fleet.submit(list(command), gpus=gpus, min_free_mem_mib=min_free_mem_mib, labels=parse_labels(labels),
                           agent=agent, env=parse_labels(env, "--env"), workdir=workdir,
                           timeout_s=parse_duration(timeout) if timeout else None, retries=retries,
                           payload=_payload(payload), outputs=list(outputs), after=list(after), name=name,
                           priority=priority, **options)
        click.echo(job.id)
        if wait:
            _report_end(job.wait())
        elif (job.record.reason or "").startswith(NO_CONTROLLER):
            sys.stderr.write(f"fleetctl: {NO_CONTROLLER}; the job waits until `fleetctl serve` or "
                             f"`fleetctl jobs wait {job.id}` runs\n")


def _report_end(record: JobRecord) -> None:
    sys.stderr.write(f"job {record.id} {record.state}: {one_line(record.reason or '', limit=2000)}\n")
    if record.state != "succeeded":
        raise click.exceptions.Exit(EXIT_JOB_FAILED)


@click.group("jobs")
def jobs_group() -> None:
    """The job queue: list, show, logs, wait, cancel."""


def _when(value: object) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if hasattr(value, "strftime") else ""


@jobs_group.command("list")
@click.option("--state", "states", multiple=True, type=click.Choice(STATES), help="Only jobs in this state; repeatable.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@common_options
def list_jobs(states: tuple[str, ...], as_json: bool) -> None:
    """Jobs, highest priority then oldest first."""
    with _fleet(store_only=True) as fleet:
        refresh_reasons(fleet.hosts)  # queued jobs say so when nothing drives the queue
        records = JobQueue(fleet.hosts.store).list(list(states) or None)  # type: ignore[arg-type]
    if as_json:
        print_json(records)
        return
    columns = [Column("ID"), Column("NAME", priority=40, flex=2, min_width=6), Column("STATE"),
               Column("AGENT", priority=60, flex=3, min_width=6), Column("GPU#", priority=50),
               Column("SUBMITTED", priority=30), Column("REASON", priority=70, flex=1, min_width=12, hide_empty=True),
               Column("COMMAND", priority=20, flex=4, min_width=10)]
    out.print(list_table(columns, [(r.id, r.name, r.state, r.agent, ",".join(r.gpus), _when(r.submitted), r.reason,
                                    " ".join(r.spec.command)) for r in records]))


@jobs_group.command("show")
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@common_options
def show_job(job_id: str, as_json: bool) -> None:
    """One job: its spec, state, result and history of events."""
    with _fleet(store_only=True) as fleet:
        refresh_reasons(fleet.hosts)
        queue = JobQueue(fleet.hosts.store)
        record = queue.get(job_id)
        events = queue.events(record.id)
    if as_json:
        print_json({**record.model_dump(mode="json"),
                    "events": [{"ts": iso_utc(t), "event": e, "detail": d} for t, e, d in events]})
        return
    out.print(f"job {record.id} ({visible(record.name or 'unnamed')}): {record.state}")
    code = record.spec.code
    for label, value in (("command", " ".join(record.spec.command)),
                         ("code", f"{code.files} files ({code.bytes} bytes) from {code.source}, snapshot {code.manifest[:12]}" if code else None),
                         ("agent", record.agent), ("gpu indices", ",".join(record.gpus)),
                         ("attempt", record.attempt), ("remote dir", record.remote_dir), ("reason", record.reason),
                         ("exit code", record.exit_code), ("output", json.dumps(record.result.output) if record.result else None),
                         ("logs", record.result.stdout_path if record.result else None)):
        if value not in (None, ""):
            out.print(f"  {label}: {visible(value)}")
    for ts, event, detail in events:
        out.print(f"  {time.strftime('%H:%M:%S', time.localtime(ts))} {event}{': ' + one_line(detail, 2000) if detail else ''}")


@jobs_group.command("logs")
@click.argument("job_id")
@click.option("--stderr", "use_stderr", is_flag=True, help="stderr instead of stdout.")
@click.option("--follow", "-f", is_flag=True, help="Keep printing while the job runs (read over SSH).")
@common_options
def job_logs(job_id: str, use_stderr: bool, follow: bool) -> None:
    """The job's stdout (or stderr): collected copy once ended, the remote file while it runs.
    Exit 1 when the job has none (it never ran, or nothing came back from its host)."""
    name = "stderr" if use_stderr else "stdout"
    with _fleet(store_only=True) as fleet:
        job = fleet.job(job_id)
        printed = 0
        while True:
            record = job.record
            missing = _no_logs(record)
            if missing and (record.done or not follow):
                if printed:
                    return  # followed a run whose host then went away: what it printed was shown
                raise JobError(f"job {record.id} has no {name} log: {missing}",
                               hint=f"see `fleetctl jobs show {record.id}`")
            if not missing:
                text = job.logs(name)  # the job's own bytes, as written: not made visible
                sys.stdout.write(text[printed:])
                sys.stdout.flush()
                printed = len(text)
            if not follow or record.done:
                return
            time.sleep(1.0)


def _no_logs(record: JobRecord) -> str | None:
    """Why ``record`` has no log to show, or None when it has one (collected, or remote while running)."""
    if record.result is not None or (record.state == "running" and record.remote_dir and record.agent):
        return None
    why = f"{record.state}: {one_line(record.reason, 300)}" if record.reason else record.state
    if record.state in ("queued", "dispatching", "running"):
        return f"it has not started yet ({why})"
    if record.started is None:
        return f"it never ran ({why})"
    return f"nothing came back from {record.agent or 'its host'} ({why})"


@jobs_group.command("wait")
@click.argument("job_id")
@click.option("--timeout", metavar="DURATION", help="Give up after this long (exit 1).")
@common_options
def wait_job(job_id: str, timeout: str | None) -> None:
    """Until the job ends (driving the queue if no `fleetctl serve` runs). Exit 0 if it succeeded, 3 if not."""
    with _fleet() as fleet, reporting(TerminalCodeProgress()):
        record = fleet.job(job_id).wait(timeout=parse_duration(timeout) if timeout else None)
    _report_end(record)


@jobs_group.command("cancel")
@click.argument("job_id")
@click.option("--force", is_flag=True, help="SIGKILL at once instead of SIGTERM then SIGKILL after a grace period.")
@common_options
def cancel_command(job_id: str, force: bool) -> None:
    """Cancel a queued or running job."""
    with _fleet() as fleet:
        record = cancel_job(fleet.hosts, job_id, force=force)
    out.print(f"job {record.id}: {'cancelled' if record.state == 'cancelled' else 'signalled; it ends as cancelled'}",
              markup=False)


@click.command("drain")
@click.argument("name")
@common_options
def drain_command(name: str) -> None:
    """Place no new jobs on NAME; running jobs finish."""
    with _fleet() as fleet:
        fleet.drain(name)
    out.print(f"{visible(name)}: draining (running jobs finish, no new ones are placed)")


@click.command("undrain")
@click.argument("name")
@common_options
def undrain_command(name: str) -> None:
    """Place jobs on NAME again."""
    with _fleet() as fleet:
        fleet.drain(name, False)
    out.print(f"{visible(name)}: accepting jobs")


__all__ = ["drain_command", "jobs_group", "submit_command", "undrain_command"]
