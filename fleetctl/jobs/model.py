"""What a job is: the spec a user submits, and the record the queue keeps."""

from __future__ import annotations

import json
import re
from datetime import datetime
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator

from fleetctl._durations import seconds_of
from fleetctl.errors import ConfigError

JobState = Literal["queued", "dispatching", "running", "succeeded", "failed", "cancelled", "timed_out", "lost"]
# ``lost`` is final only once ``finished`` is set: until then it is provisional (the host may come
# back with the result), see ``JobRecord.done``.
FINAL_STATES: tuple[JobState, ...] = ("succeeded", "failed", "cancelled", "timed_out", "lost")
ACTIVE_STATES: tuple[JobState, ...] = ("dispatching", "running")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def parse_duration(text: str | float | int, what: str = "--timeout") -> float:
    """``90``, ``90s``, ``15m``, ``2h``, ``1d`` -> seconds."""
    if isinstance(text, (int, float)):
        return float(text)
    seconds = seconds_of(text)
    if not seconds:
        raise ConfigError(f"{what} {text!r} is not a duration", hint="write e.g. 90s, 15m or 2h")
    return seconds


class CodeRef(BaseModel):
    """The snapshot of a directory a job runs in (``submit --code DIR``): its manifest is a blob in
    the submitting state dir's code store (``fleetctl.jobs.code``), named by its sha256."""

    model_config = ConfigDict(extra="forbid")

    manifest: str = Field(pattern=r"^[0-9a-f]{64}$")
    files: int = Field(ge=0)
    bytes: int = Field(ge=0)
    source: str  # the directory it was taken from, for people: never read again


class TaskRef(BaseModel):
    """A job that is one task of a sweep or array (``submit --array/--sweep``): which one, of how
    many, and its parameters. The job sees them in ``job.json`` (``task``) and as environment:
    ``FLEETCTL_TASK_INDEX``, ``FLEETCTL_TASK_COUNT`` and ``FLEETCTL_PARAM_<NAME>`` (see :func:`task_environment`)."""

    model_config = ConfigDict(extra="forbid")

    parent: str
    index: int = Field(ge=0)
    count: int = Field(ge=1)
    params: dict[str, Any] = Field(default_factory=dict)
    max_concurrent: Optional[int] = Field(default=None, ge=1)  # the parent's cap, kept here for placement


def param_env_name(name: str) -> str:
    """``lr`` -> ``FLEETCTL_PARAM_LR``; ``batch-size`` -> ``FLEETCTL_PARAM_BATCH_SIZE``."""
    return "FLEETCTL_PARAM_" + re.sub(r"[^A-Za-z0-9_]", "_", name).upper()


def param_env_value(value: Any) -> str:
    """Strings as they are; anything else as JSON (``0.1``, ``32``, ``true``, ``[1, 2]``)."""
    return value if isinstance(value, str) else json.dumps(value)


def task_environment(task: TaskRef) -> dict[str, str]:
    env = {"FLEETCTL_TASK_INDEX": str(task.index), "FLEETCTL_TASK_COUNT": str(task.count), "FLEETCTL_SWEEP_ID": task.parent}
    env.update({param_env_name(name): param_env_value(value) for name, value in task.params.items()})
    return env


class JobSpec(BaseModel):
    """Everything ``fleetctl submit`` accepts; stored as JSON in the queue."""

    model_config = ConfigDict(extra="forbid")

    command: list[str] = Field(min_length=1)
    name: Optional[str] = None
    gpus: int = Field(default=0, ge=0, le=64)
    min_free_mem_mib: Optional[float] = Field(default=None, ge=0)
    labels: dict[str, str] = Field(default_factory=dict)  # glob patterns
    agent: Optional[str] = None
    env: dict[str, str] = Field(default_factory=dict)
    workdir: Optional[str] = None
    timeout_s: Optional[float] = Field(default=None, gt=0)
    retries: int = Field(default=0, ge=0, le=100)
    payload: Any = None
    outputs: list[str] = Field(default_factory=list)
    after: list[str] = Field(default_factory=list)
    priority: int = 0
    allow_busy_gpus: bool = False  # place on GPUs a foreign process is using
    code: Optional[CodeRef] = None  # runs in its own copy of this snapshot, the working directory
    task: Optional[TaskRef] = None  # one task of a sweep (set by the queue, never by a user)

    @field_validator("command", "name", "workdir", "outputs", "after", "labels", "env", mode="before")
    @classmethod
    def _utf8(cls, value: Any) -> Any:
        """Command-line text that is not UTF-8 arrives with surrogate escapes; refuse it here, in one
        line, rather than fail later when it is stored."""
        texts = value if isinstance(value, list) else list(value.items()) if isinstance(value, dict) else [value]
        for text in texts:
            for part in text if isinstance(text, tuple) else (text,):
                if isinstance(part, str):
                    try:
                        part.encode("utf-8")
                    except UnicodeEncodeError:
                        raise ValueError(f"{part.encode('utf-8', 'backslashreplace').decode()!r} is not valid UTF-8") from None
        return value

    @field_validator("env")
    @classmethod
    def _env_names(cls, value: dict[str, str]) -> dict[str, str]:
        for key in value:
            if not _ENV_NAME.match(key):
                raise ValueError(f"{key!r} is not a valid environment variable name")
        return value


class JobResult(BaseModel):
    """What came back from the host."""

    exit_code: Optional[int] = None
    signal: Optional[int] = None
    started: Optional[datetime] = None
    finished: Optional[datetime] = None
    agent: Optional[str] = None
    gpus: list[str] = Field(default_factory=list)
    output: Any = None
    outputs: dict[str, str] = Field(default_factory=dict)  # remote path -> local path
    stdout_path: Optional[str] = None
    stderr_path: Optional[str] = None
    logs_truncated: bool = False
    timed_out: bool = False
    cancelled: bool = False
    attempt: int = 0

    def __repr__(self) -> str:
        # One line (the output and paths are in the fields): how it ended, and where.
        if self.timed_out or self.cancelled:
            end = "timed out" if self.timed_out else "cancelled"
        else:
            end = f"signal {self.signal}" if self.signal is not None else f"exit {self.exit_code}"
        where = f" on {self.agent}" if self.agent else ""
        return f"<JobResult {end}{where}, {len(self.gpus)} GPUs>"


class JobRecord(BaseModel):
    """One row of the queue."""

    id: str
    name: Optional[str] = None
    state: JobState
    spec: JobSpec
    agent: Optional[str] = None
    gpus: list[str] = Field(default_factory=list)
    remote_dir: Optional[str] = None
    attempt: int = 0
    submitted: datetime
    dispatched: Optional[datetime] = None
    started: Optional[datetime] = None
    finished: Optional[datetime] = None
    exit_code: Optional[int] = None
    signal: Optional[int] = None
    reason: Optional[str] = None
    result: Optional[JobResult] = None
    cancel_requested: bool = False

    def __repr__(self) -> str:
        where = f" on {self.agent}" if self.agent else ""
        name = f" {self.name!r}" if self.name else ""
        return f"<JobRecord {self.id}{name} {self.state}{where}>"

    @property
    def lost_provisionally(self) -> bool:
        """Lost with its host, but the run may still report back until ``lost_grace_s`` passes."""
        return self.state == "lost" and self.finished is None

    @property
    def done(self) -> bool:
        """Nothing about this job will change any more (waiters and ``--after`` children go on)."""
        return self.state in FINAL_STATES and not self.lost_provisionally


SweepKind = Literal["array", "grid", "list"]
# The order ``jobs list`` names a sweep's counts in.
COUNT_ORDER: tuple[str, ...] = ("queued", "dispatching", "running", "lost?", "succeeded", "failed", "cancelled", "timed_out", "lost")


class SweepRecord(BaseModel):
    """The parent of a sweep or array: what was submitted once, and how many of its tasks are in
    each state (``lost?``: provisionally lost). Its own state is derived from its tasks'."""

    id: str
    name: Optional[str] = None
    kind: SweepKind
    spec: JobSpec  # the template every task was made from (without ``task``)
    count: int
    max_concurrent: Optional[int] = None
    submitted: datetime
    cancelled: Optional[datetime] = None
    counts: dict[str, int] = Field(default_factory=dict)

    def __repr__(self) -> str:
        name = f" {self.name!r}" if self.name else ""
        return f"<SweepRecord {self.id}{name} {self.state}, {self.count} tasks>"

    @property
    def open(self) -> int:
        """Tasks that may still change."""
        return sum(self.counts.get(state, 0) for state in ("queued", "dispatching", "running", "lost?"))

    @property
    def done(self) -> bool:
        return self.open == 0

    @property
    def lost_provisionally(self) -> bool:
        return False  # (a dependency reads it: a sweep waits for its tasks, each lost one included)

    @property
    def state(self) -> str:
        """``succeeded`` once every task did; ``cancelled`` or ``failed`` once all ended otherwise;
        while any is open, ``running`` (one is dispatching or running) or ``queued``."""
        if not self.done:
            active = self.counts.get("running", 0) + self.counts.get("dispatching", 0)
            return "running" if active or not self.counts.get("queued") else "queued"
        if self.counts.get("succeeded", 0) == self.count:
            return "succeeded"
        return "cancelled" if self.cancelled is not None else "failed"

    def describe_counts(self) -> str:
        """``200 tasks: 3 running, 150 succeeded, 47 queued``, in a fixed order."""
        parts = [f"{self.counts[s]} {s}" for s in COUNT_ORDER if self.counts.get(s)]
        return f"{self.count} tasks: " + ", ".join(parts)
