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
from fleetctl.jobs.driver import NO_CONTROLLER, controller_live
from fleetctl.jobs.model import FINAL_STATES, JobRecord, JobSpec, SweepRecord, parse_duration
from fleetctl.jobs.queue import JobQueue
from fleetctl.jobs.sweeps import cancel_sweep, is_sweep_id, parse_sweep_option, read_params_file
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
@click.option("--array", "array", type=click.IntRange(min=1), metavar="N",
              help="Submit N tasks of COMMAND as one sweep; each sees $FLEETCTL_TASK_INDEX (0..N-1) and $FLEETCTL_TASK_COUNT.")
@click.option("--sweep", "sweep", multiple=True, metavar="NAME=V1,V2",
              help="A sweep over every combination of these values (repeatable); each task sees $FLEETCTL_PARAM_<NAME>.")
@click.option("--sweep-file", "sweep_file", type=click.Path(dir_okay=False), metavar="FILE.jsonl",
              help="A sweep with one task per line of FILE (a JSON object of parameters each).")
@click.option("--max-concurrent", "max_concurrent", type=click.IntRange(min=1), metavar="N",
              help="At most N tasks of this sweep dispatching or running at once.")
@click.option("--wait", "wait", is_flag=True, help="Wait for the job (every task) to end; exit 0 if it succeeded, 3 if not.")
@click.argument("command", nargs=-1, required=True)
@common_options
def submit_command(gpus: int, min_free_mem_mib: float | None, labels: tuple[str, ...], agent: str | None,
                   env: tuple[str, ...], workdir: str | None, timeout: str | None, retries: int, payload: str | None,
                   outputs: tuple[str, ...], after: tuple[str, ...], name: str | None, priority: int, code: str | None,
                   array: int | None, sweep: tuple[str, ...], sweep_file: str | None, max_concurrent: int | None,
                   wait: bool, command: tuple[str, ...]) -> None:
    """Queue COMMAND for the fleet and print the job id (durable once printed); with --array,
    --sweep or --sweep-file, one sweep of tasks in one transaction, and print the sweep's id.

    \b
    fleetctl submit --gpus 2 -- python3 train.py --epochs 3
    fleetctl submit --code . --gpus 1 -- python3 train.py   # runs in a snapshot of .
    fleetctl submit --sweep lr=0.1,0.01 --sweep batch=32,64 -- sh -c 'python3 train.py --lr $FLEETCTL_PARAM_LR'
    """
    options: dict[str, object] = {"code": code} if code is not None else {}
    options.update(gpus=gpus, min_free_mem_mib=min_free_mem_mib, labels=parse_labels(labels), agent=agent,
                   env=parse_labels(env, "--env"), workdir=workdir, timeout_s=parse_duration(timeout) if timeout else None,
                   retries=retries, payload=_payload(payload), outputs=list(outputs), after=list(after), name=name,
                   priority=priority)
    given = [flag for flag, value in (("--array", array), ("--sweep", sweep), ("--sweep-file", sweep_file)) if value]
    if len(given) > 1:
        raise ConfigError(f"{' and '.join(given)} cannot be combined", hint="one sweep is an array, a grid or a file")
    if max_concurrent is not None and not given:
        raise ConfigError("--max-concurrent caps the tasks of a sweep", hint="add --array N, --sweep or --sweep-file")
    if given:
        sweep_options: dict[str, object] = (
            {"array": array} if array else {"grid": dict(parse_sweep_option(text) for text in sweep)} if sweep
            else {"params": read_params_file(sweep_file or "")})
        with _fleet() as fleet, reporting(TerminalCodeProgress()):
            handle = fleet.submit_sweep(list(command), max_concurrent=max_concurrent, **sweep_options, **options)  # type: ignore[arg-type]
            click.echo(handle.id)
            if wait:
                _report_sweep_end(handle.wait())
            elif not controller_live(fleet.hosts):
                sys.stderr.write(f"fleetctl: {NO_CONTROLLER}; the tasks wait until `fleetctl serve` or "
                                 f"`fleetctl jobs wait {handle.id}` runs\n")
        return
    with _fleet() as fleet, reporting(TerminalCodeProgress()):
        job = fleet.submit(list(command), **options)
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


def _report_sweep_end(record: SweepRecord) -> None:
    sys.stderr.write(f"sweep {record.id} {record.state}: {record.describe_counts()}\n")
    if record.state != "succeeded":
        raise click.exceptions.Exit(EXIT_JOB_FAILED)


@click.group("jobs")
def jobs_group() -> None:
    """The job queue: list, show, logs, wait, cancel."""


def _when(value: object) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if hasattr(value, "strftime") else ""


@jobs_group.command("list")
@click.option("--state", "states", multiple=True, type=click.Choice(STATES), help="Only jobs in this state; repeatable.")
@click.option("--tasks", "tasks", is_flag=True, help="List every task of every sweep too (default: one line per sweep).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@common_options
def list_jobs(states: tuple[str, ...], tasks: bool, as_json: bool) -> None:
    """Jobs, highest priority then oldest first; a sweep is one line with its tasks counted per state."""
    with _fleet(store_only=True) as fleet:
        refresh_reasons(fleet.hosts)  # queued jobs say so when nothing drives the queue
        queue = JobQueue(fleet.hosts.store)
        records = queue.list(list(states) or None, tasks=tasks)  # type: ignore[arg-type]
        sweeps = [] if tasks else [s for s in queue.sweeps() if not states or s.state in states]
    if as_json:
        # A sweep is told from a job by its id (``s...``) and its ``count`` and ``counts`` per state.
        print_json([*records, *({**s.model_dump(mode="json"), "state": s.state} for s in sweeps)])
        return
    columns = [Column("ID"), Column("NAME", priority=40, flex=2, min_width=6), Column("STATE"),
               Column("AGENT", priority=60, flex=3, min_width=6), Column("GPU#", priority=50),
               Column("SUBMITTED", priority=30), Column("REASON", priority=70, flex=1, min_width=12, hide_empty=True),
               Column("COMMAND", priority=20, flex=4, min_width=10)]
    rows: list[tuple[object, ...]] = [(r.submitted, r.id, r.name, r.state, r.agent, ",".join(r.gpus), _when(r.submitted), r.reason, " ".join(r.spec.command))
            for r in records]
    rows += [(s.submitted, s.id, s.name, s.state, None, None, _when(s.submitted), s.describe_counts(), " ".join(s.spec.command))
             for s in sweeps]
    if sweeps:  # jobs keep their order (priority, then oldest); a sweep goes in by when it was submitted
        rows.sort(key=lambda row: row[0])  # type: ignore[arg-type,return-value]
    out.print(list_table(columns, [row[1:] for row in rows]))


@jobs_group.command("show")
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@common_options
def show_job(job_id: str, as_json: bool) -> None:
    """One job: its spec, state, result and history of events; a sweep: its counts and every task."""
    if is_sweep_id(job_id):
        _show_sweep(job_id, as_json)
        return
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


def _show_sweep(sweep_id: str, as_json: bool) -> None:
    with _fleet(store_only=True) as fleet:
        refresh_reasons(fleet.hosts)
        queue = JobQueue(fleet.hosts.store)
        sweep = queue.get_sweep(sweep_id)
        tasks = queue.tasks(sweep.id)
    if as_json:
        print_json({**sweep.model_dump(mode="json"), "state": sweep.state,
                    "tasks": [{"id": t.id, "index": t.spec.task.index if t.spec.task else None,
                               "params": t.spec.task.params if t.spec.task else {}, "state": t.state, "agent": t.agent,
                               "exit_code": t.exit_code, "reason": t.reason,
                               "output": t.result.output if t.result else None} for t in tasks]})
        return
    out.print(f"sweep {sweep.id} ({visible(sweep.name or 'unnamed')}): {sweep.state}, {sweep.describe_counts()}")
    out.print(f"  command: {visible(' '.join(sweep.spec.command))}")
    if sweep.max_concurrent:
        out.print(f"  max concurrent: {sweep.max_concurrent}")
    if sweep.cancelled:
        out.print(f"  cancelled: {_when(sweep.cancelled)}")
    columns = [Column("#"), Column("ID"), Column("PARAMS", priority=40, flex=2, min_width=6), Column("STATE"),
               Column("AGENT", priority=60, flex=2, min_width=6), Column("EXIT", priority=50),
               Column("REASON", priority=70, flex=2, min_width=12, hide_empty=True)]
    out.print(list_table(columns, [(t.spec.task.index if t.spec.task else "", t.id,
                                    json.dumps(t.spec.task.params) if t.spec.task and t.spec.task.params else "",
                                    t.state, t.agent, t.exit_code, t.reason) for t in tasks]))


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
    """Until the job (a sweep: every task) ends, driving the queue if no `fleetctl serve` runs. Exit 0
    if it succeeded, 3 if not."""
    if is_sweep_id(job_id):
        with _fleet() as fleet, reporting(TerminalCodeProgress()):
            sweep = fleet.sweep(job_id).wait(timeout=parse_duration(timeout) if timeout else None)
        _report_sweep_end(sweep)
        return
    with _fleet() as fleet, reporting(TerminalCodeProgress()):
        record = fleet.job(job_id).wait(timeout=parse_duration(timeout) if timeout else None)
    _report_end(record)


@jobs_group.command("cancel")
@click.argument("job_id")
@click.option("--force", is_flag=True, help="SIGKILL at once instead of SIGTERM then SIGKILL after a grace period.")
@common_options
def cancel_command(job_id: str, force: bool) -> None:
    """Cancel a queued or running job; a sweep: every task of it (none starts after this)."""
    if is_sweep_id(job_id):
        with _fleet() as fleet:
            sweep = cancel_sweep(fleet.hosts, job_id, force=force)
        out.print(f"sweep {sweep.id}: cancelled; {sweep.describe_counts()}", markup=False)
        return
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
