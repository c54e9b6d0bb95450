"""Ad-hoc fan-out: one command on many hosts at once, every host's outcome returned.

``fleet.run(["nvidia-smi", "-L"])`` runs on the Fleet's kept-open connections through its bounded
pool. A host that cannot be reached, times out or prints too much is a row that says so; nothing
stops at the first failure and nothing raises for a host (results are data)."""

from __future__ import annotations

import html
import shlex
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal

from fleetctl._text import one_line
from fleetctl.errors import (
    ConfigError,
    ConnectionLost,
    FleetError,
    OutputTooLarge,
)
from fleetctl.inventory.config import Agent
from fleetctl.inventory.labels import labels_match
from fleetctl.settings import default_of
from fleetctl.telemetry.outcomes import status_of

if TYPE_CHECKING:
    import pandas as pd

    from fleetctl.hosts.core import Hosts

# Per host. Smaller than a heartbeat's bound: a fan-out holds every host's output at once.
MAX_STDOUT = 1024 * 1024
MAX_STDERR = 256 * 1024
DEFAULT_TIMEOUT_S: float = default_of(Agent, "command_timeout_s")

# ok / failed: the command ran (exit 0 or not); truncated: it ran and its output passed the limit;
# anything else: the host's error status (fleetctl.telemetry.outcomes), the same a heartbeat would give.
Status = Literal["ok", "failed", "truncated", "host_key_mismatch", "auth_failed", "bastion_unreachable", "timeout",
                 "connection_lost", "unreachable", "config_error", "tool_missing", "driver_error", "parse_error", "error"]
COLUMNS = ["agent", "status", "exit_code", "duration_s", "stdout", "stderr", "error"]


@dataclass(frozen=True)
class HostResult:
    """One host's outcome. ``exit_code`` is None when the command did not run to its end
    (``status`` and the one-line ``error`` say why); ``stdout``/``stderr`` keep what was read."""

    agent: str
    status: Status
    exit_code: int | None = None
    stdout: str = ""
    stderr: str = ""
    duration_s: float = 0.0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class FanoutResult(Mapping[str, HostResult]):
    """Every chosen host's :class:`HostResult`, by agent name, in inventory order."""

    def __init__(self, argv: Sequence[str], results: Iterable[HostResult], duration_s: float = 0.0) -> None:
        self.argv = list(argv)
        self.duration_s = duration_s
        self._results = {r.agent: r for r in results}

    def __getitem__(self, agent: str) -> HostResult:
        return self._results[agent]

    def __iter__(self) -> Iterator[str]:
        return iter(self._results)

    def __len__(self) -> int:
        return len(self._results)

    @property
    def ok(self) -> list[HostResult]:
        """Hosts where the command exited 0."""
        return [r for r in self._results.values() if r.ok]

    @property
    def failed(self) -> list[HostResult]:
        """Every other host: non-zero exit, cut off, timed out or never reached."""
        return [r for r in self._results.values() if not r.ok]

    def to_dataframe(self) -> pd.DataFrame:
        import pandas as pd  # late: the CLI's cold start should not pay for pandas

        frame = pd.DataFrame([r.to_dict() for r in self._results.values()], columns=COLUMNS)
        frame["exit_code"] = frame["exit_code"].astype("Int64")
        return frame

    def _repr_html_(self) -> str:
        rows = []
        for r in self._results.values():
            output = "\n".join(part for part in (_clip(r.stdout), r.stderr and f"[stderr]\n{_clip(r.stderr)}") if part)
            rows.append("<tr>" + "".join(
                f"<td>{html.escape(str(cell))}</td>"
                for cell in (r.agent, r.status, "" if r.exit_code is None else r.exit_code, f"{r.duration_s:.2f}s",
                             r.error or "")) +
                f'<td style="text-align:left"><pre style="margin:0">{html.escape(output)}</pre></td></tr>')
        head = "".join(f"<th>{name}</th>" for name in ("agent", "status", "exit", "time", "error", "output"))
        caption = html.escape(f"{_short(self.argv)}: {len(self.ok)} ok, {len(self.failed)} failed, {self.duration_s:.2f}s")
        return f"<table><caption>{caption}</caption><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"

    def __repr__(self) -> str:
        return (f"<FanoutResult `{_short(self.argv)}` on {len(self)} hosts: {len(self.ok)} ok, "
                f"{len(self.failed)} failed, {self.duration_s:.2f}s>")


def _clip(text: str, limit: int = 4000) -> str:
    return text if len(text) <= limit else text[:limit] + f"\n... ({len(text) - limit} more characters)"


def _short(argv: Sequence[str], limit: int = 60) -> str:
    return one_line(shlex.join(argv), limit)


def remote_command(command: Sequence[str] | str) -> tuple[list[str], str]:
    """argv, and the line sent to the host: every word ``shlex.quote``d, as jobs do; a string
    is one ``sh -c`` script."""
    argv = ["sh", "-c", command] if isinstance(command, str) else list(command)
    if not argv or not all(isinstance(word, str) for word in argv):
        raise ConfigError("fleet.run needs a command: a non-empty list of strings, or one shell string")
    return argv, shlex.join(argv)


def select(fleet: Hosts, agents: str | Sequence[str] | None, labels: Mapping[str, str] | None) -> list[Agent]:
    """The named agents (unknown names fail with a did-you-mean), narrowed to those whose labels match the globs."""
    names = [agents] if isinstance(agents, str) else (list(agents) if agents is not None else None)
    return [a for a in fleet.inventory.select(names) if labels_match(labels or {}, a.labels)]


def run(fleet: Hosts, command: Sequence[str] | str, *, agents: str | Sequence[str] | None = None,
        labels: Mapping[str, str] | None = None, timeout: float = DEFAULT_TIMEOUT_S,
        max_stdout: int = MAX_STDOUT, max_stderr: int = MAX_STDERR) -> FanoutResult:
    """``command`` on every chosen host in parallel (up to the fleet's cap), each bounded by its
    agent's connect timeout plus ``timeout`` seconds and by the output limits."""
    if not timeout > 0:
        raise ConfigError(f"fleet.run timeout must be positive, not {timeout!r}")
    argv, line = remote_command(command)
    chosen = select(fleet, agents, labels)
    started = time.monotonic()
    results = fleet.map_agents(lambda agent: _run_one(fleet, agent, line, timeout, max_stdout, max_stderr), chosen)
    return FanoutResult(argv, results, time.monotonic() - started)


def _run_one(fleet: Hosts, agent: Agent, line: str, timeout: float, max_stdout: int, max_stderr: int) -> HostResult:
    # No retry on a lost connection: unlike a heartbeat, a user's command may not be safe to run twice.
    started = time.monotonic()
    try:
        result = fleet.connection(agent).run(line, timeout=timeout, max_stdout=max_stdout, max_stderr=max_stderr)
    except OutputTooLarge as exc:
        part = exc.result
        return HostResult(agent.name, "truncated", None, part.stdout, part.stderr, time.monotonic() - started,
                          one_line(exc.message))
    except FleetError as exc:
        if isinstance(exc, ConnectionLost):
            fleet.drop(agent.name)  # the next call reconnects
        return HostResult(agent.name, status_of(exc), duration_s=time.monotonic() - started, error=one_line(str(exc)))
    return HostResult(agent.name, "ok" if result.exit_code == 0 else "failed", result.exit_code, result.stdout,
                      result.stderr, result.duration_s)
