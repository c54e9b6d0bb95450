"""The inventory: ``ssh-agents.toml`` read, validated, and written back atomically.

Reading is strict (unknown keys, bad ports and duplicate hosts are errors naming the file, the
agent and the field); writing is conservative: agents this process did not touch are written back
exactly as they were read, and top-level tables this version does not know are kept.
"""

from __future__ import annotations

import contextlib
import difflib
import fcntl
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import tomli_w
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from fleetctl.errors import ConfigError, UnknownAgentError
from fleetctl.paths import config_path
from fleetctl.settings import ControllerSettings as ControllerSettings  # its home before fleetctl.settings: still importable here
from fleetctl.settings import HostTimeouts, LayeredSettings, default_of, layered
from fleetctl.ssh.addresses import format_address

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

NAME_PATTERN = re.compile(r"^[A-Za-z0-9._-]+$")
FINGERPRINT_PATTERN = re.compile(r"^SHA256:[A-Za-z0-9+/]{43}$")
_PASSWORD_KEYS = {"password", "ssh_password", "passphrase", "ssh_passphrase", "key_passphrase"}
_KNOWN_TOP_LEVEL = {"agents", "controller"}
NO_INVENTORY_HINT = "add a host with `fleetctl register-ssh --host USER@HOST --key KEY`, or pass --config"
# tomli-w never writes multi-line strings here, so a "[" in column 0 always starts a table header.
_SUBTABLE_HEADER = re.compile(r"^\[(?!\[)", re.MULTILINE)
_TABLE_HEADER = re.compile(r"^\s*\[\[?([^\]]+)\]")
_BARE_KEY = re.compile(r"^\s*([A-Za-z0-9_-]+|\"[^\"]*\"|'[^']*')\s*=")


def _check_fingerprint(value: Optional[str]) -> Optional[str]:
    if value is not None and not FINGERPRINT_PATTERN.match(value):
        raise ValueError("must look like SHA256:<43 base64 characters> (as `ssh-keygen -lf` prints)")
    return value


class Bastion(BaseModel):
    """A jump host. Its own ``bastion`` is the hop one step nearer the controller."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    hostname: str = Field(min_length=1)
    ssh_user: Optional[str] = None
    ssh_key_path: Optional[str] = None
    ssh_port: int = Field(default=22, ge=1, le=65535)
    host_key_fingerprint: Optional[str] = None
    resolved_ip: Optional[str] = None
    bastion: Optional[Bastion] = None

    _fingerprint = field_validator("host_key_fingerprint")(_check_fingerprint)

    @property
    def address(self) -> str:
        return format_address(self.hostname, self.ssh_port, self.ssh_user)

    def chain(self) -> list[Bastion]:
        """This bastion and those behind it, nearest the controller first."""
        hops: list[Bastion] = []
        node: Optional[Bastion] = self
        while node is not None:
            hops.append(node)
            node = node.bastion
        return list(reversed(hops))


class Agent(BaseModel):
    """One GPU host, as one ``[[agents]]`` table."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    name: str
    hostname: Optional[str] = None
    ssh_user: Optional[str] = None
    ssh_key_path: Optional[str] = None
    ssh_port: int = Field(default=22, ge=1, le=65535)
    gpu_query_cmd: Optional[str] = None
    bastion: Optional[Bastion] = None
    labels: dict[str, str] = Field(default_factory=dict)
    host_key_fingerprint: Optional[str] = None
    resolved_ip: Optional[str] = None
    connect_timeout_s: float = Field(default=default_of(HostTimeouts, "connect_timeout_s"), gt=0, le=600)
    command_timeout_s: float = Field(default=default_of(HostTimeouts, "command_timeout_s"), gt=0, le=86400)
    heartbeat_interval_s: Optional[float] = Field(default=None, gt=0, le=86400)
    ssh_config_host: Optional[str] = None
    ssh_config: Optional[bool] = None  # false: ignore ssh_config for this agent (default: [controller] ssh_config)

    _fingerprint = field_validator("host_key_fingerprint")(_check_fingerprint)

    @field_validator("name")
    @classmethod
    def _name_is_simple(cls, value: str) -> str:
        if not value:
            raise ValueError("must not be empty")
        if not NAME_PATTERN.match(value):
            raise ValueError("may contain only letters, digits, '.', '_' and '-'")
        return value

    @property
    def address(self) -> str:
        return format_address(self.hostname or self.ssh_config_host or "?", self.ssh_port, self.ssh_user)

    def bastions(self) -> list[Bastion]:
        """The jump hosts in the order they are crossed, nearest the controller first."""
        return self.bastion.chain() if self.bastion else []

    def to_toml(self) -> dict[str, Any]:
        """Only what was set, so defaults are not written out and old files stay small."""
        return self.model_dump(exclude_unset=True, exclude_none=True)


class Inventory:
    """The agents of one ``ssh-agents.toml`` plus whatever else the file holds."""

    def __init__(self, path: Path, agents: list[Agent], document: dict[str, Any],
                 controller: ControllerSettings | None = None, *, missing: bool = False,
                 controller_lines: dict[str, int] | None = None) -> None:
        self.path = path
        self.missing = missing  # no file there: store-only work (history, jobs) goes on; agents are asked for in vain
        self.agents = agents
        self.controller = controller or ControllerSettings()  # defaults < this file only; see layered()
        self.controller_lines = controller_lines or {}  # [controller] key -> its line in the file
        self._document = document
        self._raw = {a.name: raw for a, raw in zip(agents, document.get("agents", []), strict=False)}

    def __iter__(self) -> Iterator[Agent]:
        return iter(self.agents)

    def __len__(self) -> int:
        return len(self.agents)

    def names(self) -> list[str]:
        return [a.name for a in self.agents]

    def layered(self, *, environ: dict[str, str] | None = None, **flags: Any) -> LayeredSettings:
        """The effective controller settings: defaults < this file's ``[controller]`` < environment <
        ``flags`` (None: not given), each with its source (:mod:`fleetctl.settings`)."""
        file = self.controller.model_dump(include=self.controller.model_fields_set)
        return layered(file, origin=str(self.path), lines=self.controller_lines, environ=environ, flags=flags)

    def require(self) -> None:
        """The one-line error for work that needs agents when there is no inventory file."""
        if self.missing:
            raise ConfigError(f"no inventory at {self.path}", hint=NO_INVENTORY_HINT)

    def get(self, name: str) -> Agent:
        self.require()
        for agent in self.agents:
            if agent.name == name:
                return agent
        close = difflib.get_close_matches(name, self.names(), n=1)
        hint = f"did you mean {close[0]!r}?" if close else "see `fleetctl agents list`"
        raise UnknownAgentError(f"no agent named {name!r} in {self.path}", hint=hint)

    def select(self, names: list[str] | None) -> list[Agent]:
        self.require()
        return [self.get(n) for n in names] if names else list(self.agents)

    def upsert(self, agent: Agent) -> bool:
        """Add or replace by name; True when it replaced one."""
        _check_unique([*[a for a in self.agents if a.name != agent.name], agent], self.path)
        self._raw[agent.name] = agent.to_toml()
        for i, existing in enumerate(self.agents):
            if existing.name == agent.name:
                self.agents[i] = agent
                return True
        self.agents.append(agent)
        return False

    def remove(self, name: str) -> Agent:
        agent = self.get(name)
        self.agents.remove(agent)
        del self._raw[name]
        return agent

    def to_toml(self) -> str:
        """Top-level keys this version does not know first, then one ``[[agents]]`` block per agent
        (tomli-w alone would inline short agents, which is not the documented layout)."""
        others = {k: v for k, v in self._document.items() if k != "agents"}
        blocks = [tomli_w.dumps(others)] if others else []
        for agent in self.agents:
            body = _SUBTABLE_HEADER.sub("[agents.", tomli_w.dumps(self._raw[agent.name]))
            blocks.append("[[agents]]\n" + body)
        return "\n".join(blocks)

    def save(self) -> None:
        write_atomically(self.path, self.to_toml())


def write_atomically(path: Path, text: str, mode: int = 0o600) -> None:
    """Write to a temp file beside ``path``, fsync, rename: a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            os.fchmod(handle.fileno(), mode)
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _agent_label(raw: Any, index: int) -> str:
    name = raw.get("name") if isinstance(raw, dict) else None
    return f"agent {name!r} (agents[{index}])" if isinstance(name, str) and name else f"agents[{index}]"


def _unknown_key_message(key: str, model: type[BaseModel]) -> str:
    if key in _PASSWORD_KEYS:
        return f"{key}: passwords are not accepted in the inventory; use ssh_key_path or an ssh-agent"
    close = difflib.get_close_matches(key, list(model.model_fields), n=1, cutoff=0.6)
    return f"unknown key {key!r}" + (f" (did you mean {close[0]!r}?)" if close else "")


def _describe(error: dict[str, Any], document: dict[str, Any]) -> str:
    loc = list(error["loc"])
    raw_agents = document.get("agents", [])
    prefix = ""
    if len(loc) >= 2 and loc[0] == "agents" and isinstance(loc[1], int):
        prefix = _agent_label(raw_agents[loc[1]], loc[1]) + ": "
        loc = loc[2:]
    path = ".".join(str(p) for p in loc)
    if error["type"] == "extra_forbidden":
        owner: type[BaseModel] = Bastion if len(loc) > 1 and "bastion" in loc[:-1] else Agent
        scope = ".".join(str(p) for p in loc[:-1])
        return prefix + (f"{scope}: " if scope else "") + _unknown_key_message(str(loc[-1]), owner)
    if error["type"] == "missing":
        return f"{prefix}missing required key {path!r}"
    message = str(error["msg"]).removeprefix("Value error, ")
    shown = error.get("input")
    value = f" (got {shown!r})" if isinstance(shown, (str, int, float)) else ""
    return f"{prefix}{path}: {message}{value}"


def _check_unique(agents: list[Agent], path: Path) -> None:
    names: dict[str, int] = {}
    endpoints: dict[tuple[Any, ...], str] = {}
    for index, agent in enumerate(agents):
        if agent.name in names:
            raise ConfigError(
                f"{path}: agents[{index}]: duplicate name {agent.name!r} (also agents[{names[agent.name]}])",
                hint="agent names must be unique",
            )
        names[agent.name] = index
        if agent.hostname is None:
            continue
        via = tuple((b.hostname.lower(), b.ssh_port) for b in agent.bastions())
        key = (agent.hostname.lower(), agent.ssh_port, via)
        if key in endpoints:
            raise ConfigError(
                f"{path}: agent {agent.name!r}: {format_address(agent.hostname, agent.ssh_port)} "
                f"is already agent {endpoints[key]!r}",
                hint="one host, one agent; remove or rename the duplicate",
            )
        endpoints[key] = agent.name


def parse_inventory(text: str, path: Path) -> Inventory:
    """Validate the text of an inventory file; every error is one line naming where."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        detail = str(exc)
        where = re.search(r"\(at line (\d+), column (\d+)\)", detail)
        reason = re.sub(r"\s*\(at line \d+, column \d+\)", "", detail)
        position = f":{where.group(1)}:{where.group(2)}" if where else ""
        raise ConfigError(f"{path}{position}: invalid TOML: {reason}", hint="fix the syntax at that line") from None
    raw_agents = document.get("agents", [])
    if isinstance(raw_agents, dict):
        raise ConfigError(f"{path}: 'agents' must be an array of tables", hint="write [[agents]], not [agents]")
    if not isinstance(raw_agents, list) or not all(isinstance(a, dict) for a in raw_agents):
        raise ConfigError(f"{path}: 'agents' must be an array of tables", hint="write one [[agents]] table per host")
    for key in document:
        close = difflib.get_close_matches(key, _KNOWN_TOP_LEVEL, n=1, cutoff=0.75)
        if key not in _KNOWN_TOP_LEVEL and close:
            raise ConfigError(f"{path}: unknown top-level key {key!r} (did you mean {close[0]!r}?)")
    agents: list[Agent] = []
    for index, raw in enumerate(raw_agents):
        try:
            agents.append(Agent.model_validate(raw))
        except ValidationError as exc:
            # An unknown key usually explains a "missing" one (a typo): report it first.
            errors = sorted(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")
            errors_shown = [{**e, "loc": ("agents", index, *e["loc"])} for e in errors]
            more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
            raise ConfigError(f"{path}: {_describe(errors_shown[0], document)}{more}") from None
        if raw.get("hostname") is None and raw.get("ssh_config_host") is None:
            raise ConfigError(
                f"{path}: {_agent_label(raw, index)}: missing required key 'hostname'",
                hint="set hostname, or ssh_config_host to use an alias from ~/.ssh/config",
            )
    _check_unique(agents, path)
    return Inventory(path, agents, document, _controller_settings(document.get("controller", {}), path),
                     controller_lines=_table_lines(text, "controller"))


def _table_lines(text: str, table: str) -> dict[str, int]:
    """The line (from 1) of each ``key =`` inside ``[table]``, for sources such as ``ssh-agents.toml:12``.
    Keys written another way (inline or dotted) are missing; their source is then the file alone."""
    lines: dict[str, int] = {}
    inside = False
    for number, line in enumerate(text.splitlines(), start=1):
        header = _TABLE_HEADER.match(line)
        if header:
            inside = header.group(1).strip() == table
        elif inside and (key := _BARE_KEY.match(line)):
            lines.setdefault(key.group(1).strip("\"'"), number)
    return lines


def _controller_settings(raw: Any, path: Path) -> ControllerSettings:
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: 'controller' must be a table", hint="write [controller]")
    try:
        return ControllerSettings.model_validate(raw)
    except ValidationError as exc:
        error = exc.errors()[0]
        key = ".".join(str(p) for p in error["loc"])
        if error["type"] == "extra_forbidden":
            raise ConfigError(f"{path}: controller: {_unknown_key_message(key, ControllerSettings)}") from None
        message = str(error["msg"]).removeprefix("Value error, ")
        raise ConfigError(f"{path}: controller.{key}: {message} (got {error.get('input')!r})") from None


def load_config(path: str | os.PathLike[str] | None = None, *, missing_ok: bool = False) -> Inventory:
    """Read the inventory (``--config`` > ``$FLEETCTL_CONFIG`` > XDG default)."""
    resolved = config_path(path)
    try:
        text = resolved.read_text(encoding="utf-8")
    except FileNotFoundError:
        if missing_ok:
            return Inventory(resolved, [], {}, missing=True)
        raise ConfigError(f"no inventory at {resolved}", hint=NO_INVENTORY_HINT) from None
    except OSError as exc:
        raise ConfigError(f"cannot read {resolved}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{resolved}: not UTF-8 text", hint="TOML files must be UTF-8") from None
    return parse_inventory(text, resolved)


@contextlib.contextmanager
def edit_inventory(path: str | os.PathLike[str] | None = None) -> Iterator[Inventory]:
    """Load, let the caller change, save: under a lock so two writers never lose an update."""
    resolved = config_path(path)
    resolved.parent.mkdir(parents=True, exist_ok=True)
    lock_path = resolved.with_name(f".{resolved.name}.lock")
    with open(lock_path, "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        inventory = load_config(resolved, missing_ok=True)
        yield inventory
        inventory.save()
