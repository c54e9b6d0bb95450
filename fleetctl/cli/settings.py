"""``fleetctl config show``: every effective controller setting, its value, and where it came from."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import click

from fleetctl.cli.common import common_options, out, print_json, settings
from fleetctl.cli.tables import Column, list_table
from fleetctl.inventory.config import load_config
from fleetctl.paths import config_setting, state_setting
from fleetctl.settings import Setting

_PASSWORD_PARAMETER = re.compile(r"(password=)[^&\s]*", re.IGNORECASE)


def without_password(url: str) -> str:
    """A store URL as it may be printed: a password in it (``user:secret@`` or ``password=``) is ``***``."""
    parts = urlsplit(url)
    if parts.password is not None:
        host = parts.netloc.rpartition("@")[2]
        parts = parts._replace(netloc=f"{parts.username or ''}:***@{host}")
        url = urlunsplit(parts)
    return _PASSWORD_PARAMETER.sub(r"\1***", url)


def _shown(setting: Setting) -> Any:
    """The value as JSON holds it: paths as text, the store without its password."""
    if setting.value is None:
        return None
    if setting.name == "store":
        return without_password(str(setting.value))
    return setting.value if isinstance(setting.value, (bool, int, float, str)) else str(setting.value)


def _text(value: Any) -> str:
    """The value as the table prints it: TOML's spelling (true, 15, 0.5), "-" for unset."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


@click.group("config")
def config_group() -> None:
    """fleetctl's own settings: defaults < inventory [controller] < FLEETCTL_* environment < flags."""


@config_group.command("show")
@click.option("--json", "as_json", is_flag=True, help="Print JSON: each setting's value, layer and source.")
@common_options
def config_show_command(as_json: bool) -> None:
    """Every effective controller setting with its value and its source: "default", the inventory
    file and line (PATH:LINE), "env FLEETCTL_..." or "flag --...". Works without an inventory file."""
    s = settings()
    inventory = load_config(s.config_path, missing_ok=True)
    rows = [config_setting(s.config), state_setting(s.state_dir), *inventory.layered(store=s.store)]
    if as_json:
        print_json({row.name: {"value": _shown(row), "layer": row.layer, "source": row.source} for row in rows})
        return
    columns = [Column("SETTING"), Column("VALUE", flex=2, min_width=8), Column("SOURCE", flex=1, min_width=8)]
    out.print(list_table(columns, [(row.name, _text(_shown(row)), row.source) for row in rows]))
