"""The controller's settings: every default written once, layered once, each value knowing its source.

Layers, lowest first, a later one winning (:data:`OVERRIDE_ORDER`, after pip's ``configuration.py``):

    default   the field's default in :class:`ControllerSettings` (the only place a default is written)
    file      the inventory's ``[controller]`` table (ssh-agents.toml)
    env       the ``FLEETCTL_*`` variables of :data:`ENVIRONMENT`
    flag      a command-line flag (or the same argument given to ``Fleet``)

An empty value (``""``) counts as unset in every layer. :func:`layered` merges the layers and
validates the result once; :func:`pick` is the same rule for one value (the file paths of
:mod:`fleetctl.paths` use it). ``fleetctl config show`` prints every effective value and its source.
Per-agent values (``connect_timeout_s``, ``command_timeout_s``) are fields of the inventory's
``Agent`` model, their defaults written once in :class:`HostTimeouts`.

A leaf: it imports nothing of fleetctl but the errors, so any layer may read a default from here.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fleetctl.errors import ConfigError

Layer = Literal["default", "file", "env", "flag"]
OVERRIDE_ORDER: tuple[Layer, ...] = ("default", "file", "env", "flag")

CONFIG_ENV = "FLEETCTL_CONFIG"
STATE_ENV = "FLEETCTL_STATE_DIR"
STORE_ENV = "FLEETCTL_STORE"
SSH_CONFIG_ENV = "FLEETCTL_SSH_CONFIG"
# The controller settings the environment may set, and the variable of each.
ENVIRONMENT: Mapping[str, str] = {"store": STORE_ENV, "ssh_config_file": SSH_CONFIG_ENV}
# The flag that sets each setting, to name it as a source.
FLAGS: Mapping[str, str] = {"store": "--store", "max_parallel_ssh": "--max-parallel-ssh",
                            "config": "--config", "state_dir": "--state-dir"}


class ControllerSettings(BaseModel):
    """The optional ``[controller]`` table: fleet-wide defaults for serve, history and health."""

    model_config = ConfigDict(extra="forbid")

    heartbeat_interval_s: float = Field(default=5.0, gt=0, le=86400)
    max_parallel_ssh: int = Field(default=32, ge=1, le=1024)
    retention_days: float = Field(default=7.0, gt=0)
    offline_after_misses: int = Field(default=3, ge=1)
    offline_grace_s: float = Field(default=600.0, gt=0)
    scheduler_tick_s: float = Field(default=1.0, gt=0, le=60)
    kill_grace_s: int = Field(default=10, ge=0, le=3600)  # SIGTERM -> SIGKILL on cancel and timeout
    # Hosts behind one bastion share one connection to it (fleetctl.ssh.hops): a bastion that failed is
    # not tried again for this long (the rest of the round gets its error at once), and at most this many
    # logins run at once to any one sshd (OpenSSH's default MaxStartups 10:30:100 starts dropping at 10).
    hop_retry_after_s: float = Field(default=5.0, ge=0, le=3600)
    handshakes_per_sshd: int = Field(default=4, ge=1, le=100)
    ssh_config: bool = True  # resolve agents through ssh_config as `ssh` does (false: inventory fields only)
    ssh_config_file: Optional[str] = None  # like `ssh -F`; unset: ~/.ssh/config and /etc/ssh/ssh_config
    # A job whose host went offline stays provisionally ``lost`` this long: its result may still come back.
    lost_grace_s: float = Field(default=3600.0, ge=0)
    # A job directory that belongs to no current attempt is removed once seen this long (a live one never is).
    orphan_age_s: float = Field(default=600.0, ge=0)
    # A postgresql:// URL for a store shared by several processes or machines; unset: the SQLite file in
    # the state dir. $FLEETCTL_STORE and --store outrank it.
    store: Optional[str] = None
    # Several serves on one store: an agent's lease lasts this long unrenewed; a dead or paused
    # controller's agents move to the others within lease_s plus lease_s / 3 (fleetctl.store.leases).
    lease_s: float = Field(default=15.0, ge=1.0, le=3600)
    # Code sent with jobs (`submit --code DIR`, fleetctl.jobs.code): the most one snapshot may hold, and the
    # bounds of the per-user blob cache on each host, pruned by the controller when it dispatches there.
    code_max_bytes: int = Field(default=1_073_741_824, ge=0)  # 1 GiB
    code_cache_max_bytes: int = Field(default=10_737_418_240, ge=0)  # 10 GiB
    code_cache_max_age_s: float = Field(default=604_800.0, gt=0)  # a week
    code_cache_prune_interval_s: float = Field(default=3600.0, ge=0)
    # How a job's tree is made from the host's cache: hard links (read-only files sharing the cache's storage),
    # or copies (reflinks where the filesystem has them). auto: links unless the job runs as root, whom
    # read-only modes do not stop, so an edit in place could reach the cache and other jobs.
    code_tree: Literal["auto", "link", "copy"] = "auto"
    # GPU health (issue 22, docs/gpu-health.md): read in every heartbeat (false: the beat as before, for
    # hosts whose tools misbehave, or to measure); overrides of the judgment table, e.g.
    # {"xid:45" = "ok"}; and whether a running job on a GPU that fails is cancelled, not just told.
    gpu_health_checks: bool = True
    gpu_health: dict[str, Any] = Field(default_factory=dict)
    kill_on_gpu_failure: bool = False


class HostTimeouts(BaseModel):
    """Per-agent timeouts, written once: the inventory's ``Agent`` fields take their defaults from
    here, and so does the SSH seam's ``Route`` (which may not import the inventory above it)."""

    connect_timeout_s: float = Field(default=10.0, gt=0, le=600)
    command_timeout_s: float = Field(default=30.0, gt=0, le=86400)


def default_of(model: type[BaseModel], name: str) -> Any:
    """The default of one field of a settings model: what a module-level constant elsewhere reads,
    so the number itself is written only in the model."""
    return model.model_fields[name].get_default(call_default_factory=True)


@dataclass(frozen=True)
class Setting:
    """One effective value and where it came from: ``source`` is ``default``, ``PATH:LINE`` (or the
    path alone), ``env NAME`` or ``flag --name``."""

    name: str
    value: Any
    layer: Layer
    source: str


def _is_set(value: Any) -> bool:
    return value is not None and value != ""


def pick(name: str, candidates: Mapping[Layer, tuple[Any, str]]) -> Setting:
    """The value of the highest layer in :data:`OVERRIDE_ORDER` that sets one; ``candidates`` maps a
    layer to (value, source). The default layer always counts, even when it is None."""
    for layer in reversed(OVERRIDE_ORDER):
        if layer in candidates:
            value, source = candidates[layer]
            if layer == "default" or _is_set(value):
                return Setting(name, value, layer, source)
    return Setting(name, None, "default", "default")


@dataclass(frozen=True)
class LayeredSettings:
    """The effective controller settings and the source of each."""

    settings: ControllerSettings
    sources: Mapping[str, Setting]

    def __iter__(self) -> Iterator[Setting]:
        return iter(self.sources.values())

    def source(self, name: str) -> str:
        return self.sources[name].source


def _problem(error: Mapping[str, Any]) -> str:
    return str(error["msg"]).removeprefix("Value error, ")


def layered(file: Mapping[str, Any] | None = None, *, origin: str = "file", lines: Mapping[str, int] | None = None,
            environ: Mapping[str, str] | None = None, flags: Mapping[str, Any] | None = None,
            environment: Mapping[str, str] = ENVIRONMENT) -> LayeredSettings:
    """Merge the layers of :data:`OVERRIDE_ORDER` into validated :class:`ControllerSettings`.

    ``file`` holds the values the inventory set (``origin`` is its path, ``lines`` the line of each
    key there), ``environ`` defaults to the process environment, ``flags`` holds the flags given
    (None or empty: not given). A value a layer above the file gets wrong is a one-line
    :class:`ConfigError` naming the variable or flag."""
    file, lines, flags = file or {}, lines or {}, flags or {}
    environ = os.environ if environ is None else environ
    chosen: dict[str, Setting] = {}
    for name, field in ControllerSettings.model_fields.items():
        candidates: dict[Layer, tuple[Any, str]] = {"default": (field.get_default(call_default_factory=True), "default")}
        if name in file:
            candidates["file"] = (file[name], f"{origin}:{lines[name]}" if name in lines else origin)
        if name in environment:
            candidates["env"] = (environ.get(environment[name]), f"env {environment[name]}")
        if name in flags:
            candidates["flag"] = (flags[name], f"flag {FLAGS.get(name, name)}")
        chosen[name] = pick(name, candidates)
    unknown = (set(file) | set(flags)) - set(chosen)
    if unknown:
        raise ConfigError(f"unknown controller setting {sorted(unknown)[0]!r}", hint="see `fleetctl config show`")
    try:
        settings = ControllerSettings.model_validate({s.name: s.value for s in chosen.values() if s.layer != "default"})
    except ValidationError as exc:
        error = exc.errors()[0]
        wrong = chosen[str(error["loc"][0])]
        fix = {"env": f"set {wrong.source.removeprefix('env ')} to a valid value, or unset it",
               "flag": f"pass a valid {wrong.source.removeprefix('flag ')}"}.get(wrong.layer, f"fix {wrong.name} there")
        raise ConfigError(f"{wrong.source}: {wrong.name}: {_problem(error)} (got {wrong.value!r})", hint=fix) from None
    # The sources show the values as validated (an env "15" is 15.0, as the settings hold it).
    return LayeredSettings(settings, {name: replace(s, value=getattr(settings, name)) for name, s in chosen.items()})
