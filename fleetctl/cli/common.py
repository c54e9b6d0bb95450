"""What every command shares: --config/--state-dir, output consoles, error reporting."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Console

from fleetctl.errors import ConfigError
from fleetctl.paths import config_path, state_dir

F = TypeVar("F", bound=Callable[..., Any])

# rich drops colour by itself when stdout is not a terminal or NO_COLOR is set.
# Piped output (cron, logs, CI) gets wide lines instead of tables wrapped at 80 columns.
out = Console(highlight=False, width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, highlight=False, soft_wrap=True)


class Settings:
    def __init__(self) -> None:
        self.config: Path | None = None
        self.state_dir: Path | None = None

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


def common_options(func: F) -> F:
    """``--config`` and ``--state-dir`` on every command, before or after the command name."""
    func = click.option("--state-dir", type=click.Path(file_okay=False), expose_value=False, is_eager=True,
                        callback=_remember("state_dir"),
                        help="History, queue and known hosts [env FLEETCTL_STATE_DIR].")(func)
    func = click.option("--config", type=click.Path(dir_okay=False), expose_value=False, is_eager=True,
                        callback=_remember("config"),
                        help="Inventory file [env FLEETCTL_CONFIG].")(func)
    return func


def settings() -> Settings:
    return click.get_current_context().ensure_object(Settings)


def print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def parse_labels(values: tuple[str, ...], flag: str = "--label") -> dict[str, str]:
    labels: dict[str, str] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"{flag} {item!r} is not KEY=VALUE", hint=f"write {flag} gpu_type=a100")
        labels[key] = value
    return labels
