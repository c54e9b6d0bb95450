"""Sweeps and arrays: one parent, many tasks, submitted in one transaction.

``fleet.submit_sweep(command, array=N | grid={...} | params=[...], max_concurrent=..., **options)``
and ``fleetctl submit --array/--sweep/--sweep-file``. Each task is an ordinary job (placement, retries,
``--after``, cancel and ``lost`` work on it exactly as on a single job) that also knows its place in
the sweep: ``FLEETCTL_TASK_INDEX``, ``FLEETCTL_TASK_COUNT``, ``FLEETCTL_SWEEP_ID`` and one
``FLEETCTL_PARAM_<NAME>`` per parameter (the name upper-cased, anything but letters, digits and ``_``
turned into ``_``; the value as given for a string, else as JSON), and ``task`` in ``job.json``."""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fleetctl.errors import ConfigError, JobError, StoreError
from fleetctl.hosts.core import Hosts
from fleetctl.jobs.api import job_spec, prune_snapshots, snapshot_code, wait_driving
from fleetctl.jobs.driver import controller_live, no_controller_reason
from fleetctl.jobs.model import JobRecord, SweepKind, SweepRecord, param_env_name
from fleetctl.jobs.queue import SWEEP_PREFIX, JobQueue
from fleetctl.jobs.runner import JobRunner

if TYPE_CHECKING:
    import pandas as pd

MAX_TASKS = 100_000
_PARAM_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")


def is_sweep_id(text: str) -> bool:
    return text.startswith(SWEEP_PREFIX)


def grid_params(grid: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """Every combination, the first name varying slowest: ``{"lr": [0.1, 0.01], "batch": [32, 64]}``
    -> 4 tasks."""
    for name, values in grid.items():
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
            raise JobError(f"sweep parameter {name!r} needs a non-empty list of values", hint="e.g. grid={'lr': [0.1, 0.01]}")
    names = list(grid)
    return [dict(zip(names, combo, strict=True)) for combo in itertools.product(*(grid[n] for n in names))]


def parse_sweep_option(text: str) -> tuple[str, list[Any]]:
    """``lr=0.1,0.01`` -> ``("lr", [0.1, 0.01])``: each value read as JSON where it is (numbers,
    true/false), else kept as text."""
    name, sep, values = text.partition("=")
    if not sep or not name.strip() or not values:
        raise ConfigError(f"--sweep {text!r} is not NAME=V1,V2,...", hint="e.g. --sweep lr=0.1,0.01")
    return name.strip(), [_value(v.strip()) for v in values.split(",")]


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def read_params_file(path: str | Path) -> list[dict[str, Any]]:
    """``--sweep-file``: one JSON object per line (blank lines skipped), one task each."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ConfigError(f"--sweep-file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"--sweep-file {path}: not UTF-8 text", hint="one JSON object per line") from None
    params = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except ValueError as exc:
            raise ConfigError(f"--sweep-file {path} line {number}: not valid JSON: {exc}", hint="one JSON object per line") from None
        if not isinstance(value, dict):
            raise ConfigError(f"--sweep-file {path} line {number}: a JSON object is needed, not {type(value).__name__}",
                              hint='e.g. {"lr": 0.1, "batch": 32}')
        params.append(value)
    return params


def _check_params(params: list[dict[str, Any]]) -> None:
    if not params:
        raise JobError("a sweep needs at least one task", hint="give array=N, grid={...} or params=[...]")
    if len(params) > MAX_TASKS:
        raise JobError(f"a sweep of {len(params)} tasks is more than {MAX_TASKS}", hint="split it into several sweeps")
    for index, values in enumerate(params):
        if not isinstance(values, dict):
            raise JobError(f"sweep task {index}: parameters must be a dict, not {type(values).__name__}")
        env_names: dict[str, str] = {}
        for name in values:
            if not isinstance(name, str) or not _PARAM_NAME.match(name):
                raise JobError(f"sweep parameter name {name!r} is not usable",
                               hint="start with a letter or _, then letters, digits, _ . or -")
            other = env_names.setdefault(param_env_name(name), name)
            if other != name:
                raise JobError(f"sweep parameters {other!r} and {name!r} would both be ${param_env_name(name)}",
                               hint="rename one of them")


def submit_sweep(hosts: Hosts, command: list[str] | str, *, params: Sequence[Mapping[str, Any]] | None = None,
                 grid: Mapping[str, Sequence[Any]] | None = None, array: int | None = None,
                 max_concurrent: int | None = None, **options: Any) -> Sweep:
    """Queue one task per parameter set (exactly one of ``params``, ``grid``, ``array``); durable
    when this returns. ``code="DIR"`` is snapshotted once for every task."""
    given = [k for k, v in (("params", params), ("grid", grid), ("array", array)) if v is not None]
    if len(given) != 1:
        raise JobError("a sweep takes exactly one of params=, grid= or array=" + (f" (got {', '.join(given)})" if given else ""),
                       hint="array=N for N tasks, grid={'lr': [0.1, 0.01]} for every combination, params=[{...}, ...] for a list")
    kind: SweepKind
    if array is not None:
        if isinstance(array, bool) or not isinstance(array, int) or array < 1:
            raise JobError(f"array={array!r}: the number of tasks must be a whole number of at least 1", hint="e.g. --array 100")
        task_params: list[dict[str, Any]] = [{} for _ in range(array)]
        kind = "array"
    elif grid is not None:
        task_params, kind = grid_params(grid), "grid"
    else:
        task_params, kind = [dict(p) if isinstance(p, Mapping) else p for p in params or ()], "list"
    _check_params(task_params)
    if max_concurrent is not None and (isinstance(max_concurrent, bool) or not isinstance(max_concurrent, int) or max_concurrent < 1):
        raise JobError(f"max_concurrent={max_concurrent!r} must be a whole number of at least 1", hint="e.g. --max-concurrent 8")
    code = options.pop("code", None)
    spec = job_spec(hosts, command, options)
    if code is not None:
        spec = spec.model_copy(update={"code": snapshot_code(hosts, code)})
    queue = JobQueue(hosts.store)
    sweep = queue.submit_sweep(spec, task_params, kind, max_concurrent)
    if code is not None:
        prune_snapshots(hosts, queue)
    if not controller_live(hosts):
        reason = no_controller_reason(sweep.id)
        with hosts.store.transaction() as db:  # one statement for every task, not one per task
            db.execute("UPDATE jobs SET reason = ? WHERE parent = ? AND state = 'queued'", (reason, sweep.id))
    return Sweep(hosts, sweep.id)


def cancel_sweep(hosts: Hosts, sweep_id: str, force: bool = False) -> SweepRecord:
    """Every task: queued ones cancelled at once (in one transaction, with the cancel recorded: no
    task is claimed after it), running ones signalled, dispatching ones dropped before their launch."""
    queue = JobQueue(hosts.store)
    sweep = queue.get_sweep(sweep_id)
    if sweep.done:
        raise JobError(f"sweep {sweep.id} already ended ({sweep.state})")
    queue.cancel_sweep(sweep.id, force=force)
    runner = JobRunner(hosts)
    for task in queue.tasks(sweep.id):
        if task.state == "running" and task.cancel_requested:
            runner.signal(task, force)  # a task whose host cannot be reached now is signalled by the next tick
    return queue.get_sweep(sweep.id)


class Sweep:
    """The handle of a sweep: ``wait()``, ``cancel()``, ``results()`` (a DataFrame, one row per task)."""

    def __init__(self, hosts: Hosts, sweep_id: str) -> None:
        self.hosts = hosts
        self.id = sweep_id

    @property
    def record(self) -> SweepRecord:
        return JobQueue(self.hosts.store).get_sweep(self.id)

    @property
    def status(self) -> str:
        return self.record.state

    @property
    def tasks(self) -> list[JobRecord]:
        return JobQueue(self.hosts.store).tasks(self.id)

    def wait(self, timeout: float | None = None, poll_s: float = 1.0) -> SweepRecord:
        """Until every task ended; drives the queue itself when no ``serve`` is running."""
        return wait_driving(self.hosts, lambda: self.record,
                            lambda record: f"sweep {self.id} still {record.state} ({record.describe_counts()})",
                            self.id, timeout, poll_s)

    def cancel(self, force: bool = False) -> SweepRecord:
        return cancel_sweep(self.hosts, self.id, force=force)

    def results(self) -> pd.DataFrame:
        """One row per task, by index: ``index``, each parameter, ``state``, ``exit_code``, ``output``
        (what the task wrote to ``$FLEETCTL_OUTPUT_FILE``), ``id``, ``agent``, ``reason``."""
        return results_frame(self.tasks)

    def __repr__(self) -> str:
        try:
            record = self.record
        except (StoreError, JobError):
            return f"<Sweep {self.id}>"
        return f"<Sweep {self.id} {record.state}, {record.describe_counts()}>"

    def _repr_html_(self) -> str:
        return str(self.results().to_html(index=False, na_rep=""))


def results_frame(tasks: list[JobRecord]) -> pd.DataFrame:
    import pandas as pd

    names: list[str] = []
    for task in tasks:
        for name in task.spec.task.params if task.spec.task else {}:
            if name not in names:
                names.append(name)
    rows = []
    for task in tasks:
        params = task.spec.task.params if task.spec.task else {}
        rows.append({"index": task.spec.task.index if task.spec.task else None, **{n: params.get(n) for n in names},
                     "state": task.state, "exit_code": task.exit_code, "output": task.result.output if task.result else None,
                     "id": task.id, "agent": task.agent, "reason": task.reason})
    return pd.DataFrame(rows, columns=["index", *names, "state", "exit_code", "output", "id", "agent", "reason"])
