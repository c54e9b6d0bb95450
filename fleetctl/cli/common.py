"""What every command shares: --config/--state-dir/--store, output consoles, error reporting."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

import annotated_types
import click
from pydantic import BaseModel
from rich.console import Console

from fleetctl.errors import ConfigError
from fleetctl.paths import STORE_ENV, config_path, state_dir

F = TypeVar("F", bound=Callable[..., Any])



class _Console(Console):
    """A console whose text is data: no markup, no emoji codes, no highlighting, and (NO_COLOR set to
    anything) no styling at all. rich itself only drops colours for NO_COLOR and keeps bold/italic."""

    def __init__(self, **options: Any) -> None:
        if os.environ.get("NO_COLOR"):
            options.update(no_color=True, color_system=None)  # no colour system: no SGR code at all
        super().__init__(markup=False, emoji=False, highlight=False, **options)

    def on_broken_pipe(self) -> None:
        # rich's default raises SystemExit(1) and points stdout (even for the stderr console) at
        # /dev/null; main() decides instead: quiet exit 141, as cat does.
        self.quiet = True
        raise BrokenPipeError


def _is_tty(stream: Any) -> bool:
    # sys.stdout is None when fleetctl starts with stdout closed (`>&-`); main() reports that.
    return stream is not None and bool(stream.isatty())


# Piped output (cron, logs, CI) gets wide lines instead of tables wrapped at 80 columns.
out = _Console(width=None if _is_tty(sys.stdout) else 200)
err = _Console(stderr=True, soft_wrap=True)


class Settings:
    """The global flags given on this command line (None: not given)."""

    def __init__(self) -> None:
        self.config: Path | None = None
        self.state_dir: Path | None = None
        self.store: str | None = None  # also put in $FLEETCTL_STORE (see _remember_store); kept to name it as the source

    @property
    def config_path(self) -> Path:
        return config_path(self.config)

    @property
    def state_path(self) -> Path:
        return state_dir(self.state_dir)


def _remember(name: str) -> Callable[[click.Context, click.Parameter, Any], Any]:
    def callback(ctx: click.Context, _param: click.Parameter, value: Any) -> Any:
        if value is not None:
            setattr(ctx.ensure_object(Settings), name, Path(value))
        return value
    return callback


def _remember_store(ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    # Through the environment layer it outranks (flag > $FLEETCTL_STORE > [controller] store): so the
    # flag reaches every Fleet a command opens, and a process it starts, without each call passing it.
    if value is not None:
        os.environ[STORE_ENV] = value
        ctx.ensure_object(Settings).store = value
    return value


def option_range(model: type[BaseModel], name: str) -> click.IntRange | click.FloatRange:
    """A flag's type and bounds, read from the model field it fills so they are written once:
    ``type=option_range(JobSpec, "gpus"), default=default_of(JobSpec, "gpus")``."""
    field = model.model_fields[name]
    bounds: dict[str, Any] = {}
    for rule in field.metadata:
        for kind in (annotated_types.Ge, annotated_types.Gt, annotated_types.Le, annotated_types.Lt):
            if isinstance(rule, kind):
                bounds[kind.__name__.lower()] = next(iter(dataclasses.asdict(rule).values()))
    low, high = bounds.get("ge", bounds.get("gt")), bounds.get("le", bounds.get("lt"))
    if field.annotation is int:
        return click.IntRange(low, high, min_open="gt" in bounds, max_open="lt" in bounds)
    return click.FloatRange(low, high, min_open="gt" in bounds, max_open="lt" in bounds)


def common_options(func: F) -> F:
    """``--config``, ``--state-dir`` and ``--store`` on every command, before or after the command name."""
    func = click.option("--store", metavar="URL", expose_value=False, is_eager=True, callback=_remember_store,
                        help="A postgresql:// store instead of the SQLite file in the state dir "
                             "[env FLEETCTL_STORE; inventory [controller] store].")(func)
    func = click.option("--state-dir", type=click.Path(file_okay=False), expose_value=False, is_eager=True,
                        callback=_remember("state_dir"),
                        help="History, queue and known hosts [env FLEETCTL_STATE_DIR].")(func)
    func = click.option("--config", type=click.Path(dir_okay=False), expose_value=False, is_eager=True,
                        callback=_remember("config"),
                        help="Inventory file [env FLEETCTL_CONFIG].")(func)
    return func


def settings() -> Settings:
    return click.get_current_context().ensure_object(Settings)


def iso_utc(moment: datetime | float) -> str:
    """The one time format of fleetctl's JSON: ISO 8601 in UTC with ``Z``, sub-second only where the
    value has it (as pydantic writes an aware UTC datetime). Epoch seconds and naive times (taken as
    UTC) are accepted so no document mixes forms."""
    if not isinstance(moment, datetime):
        moment = datetime.fromtimestamp(moment, timezone.utc)
    elif moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    moment = moment.astimezone(timezone.utc)
    return moment.replace(tzinfo=None).isoformat(timespec="microseconds" if moment.microsecond else "seconds") + "Z"


def json_ready(data: Any) -> Any:
    """``data`` with models dumped as JSON and every datetime in :func:`iso_utc` form."""
    if isinstance(data, BaseModel):
        return json_ready(data.model_dump(mode="json"))
    if isinstance(data, datetime):
        return iso_utc(data)
    if isinstance(data, dict):
        return {key: json_ready(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return [json_ready(value) for value in data]
    return data


def print_json(data: Any) -> None:
    click.echo(json.dumps(json_ready(data), indent=2, default=str))


# What each repeatable KEY=VALUE flag looks like when written right.
_FLAG_EXAMPLES = {"--label": ("KEY=VALUE", "--label gpu_type=a100"), "--env": ("NAME=VALUE", "--env NAME=value")}


def parse_labels(values: tuple[str, ...], flag: str = "--label") -> dict[str, str]:
    """``KEY=VALUE`` flags as a dict; a malformed one is a one-line error whose hint fits the flag."""
    shape, example = _FLAG_EXAMPLES.get(flag, ("KEY=VALUE", f"{flag} KEY=VALUE"))
    labels: dict[str, str] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"{flag} {item!r} is not {shape}", hint=f"write {example}")
        labels[key] = value
    return labels
