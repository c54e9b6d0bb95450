"""Where fleetctl keeps its files. Precedence: flag > environment > XDG default."""

from __future__ import annotations

import os
from pathlib import Path

CONFIG_ENV = "FLEETCTL_CONFIG"
STATE_ENV = "FLEETCTL_STATE_DIR"
STORE_ENV = "FLEETCTL_STORE"


def _xdg(var: str, fallback: str) -> Path:
    value = os.environ.get(var)
    # The XDG spec says relative values are invalid and must be ignored.
    if value and os.path.isabs(value):
        return Path(value)
    return Path.home() / fallback


def config_path(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The inventory file: ``--config`` > ``$FLEETCTL_CONFIG`` > XDG config dir."""
    if explicit:
        return Path(explicit).expanduser()
    if os.environ.get(CONFIG_ENV):
        return Path(os.environ[CONFIG_ENV]).expanduser()
    return _xdg("XDG_CONFIG_HOME", ".config") / "fleetctl" / "ssh-agents.toml"


def state_dir(explicit: str | os.PathLike[str] | None = None) -> Path:
    """History, queue, known hosts: ``--state-dir`` > ``$FLEETCTL_STATE_DIR`` > XDG state dir."""
    if explicit:
        return Path(explicit).expanduser()
    if os.environ.get(STATE_ENV):
        return Path(os.environ[STATE_ENV]).expanduser()
    return _xdg("XDG_STATE_HOME", ".local/state") / "fleetctl"



def store_url(explicit: str | None = None, configured: str | None = None) -> str | None:
    """The store: ``--store`` > ``$FLEETCTL_STORE`` > ``[controller] store`` in the inventory; None
    (the default) is the SQLite file in the state dir. An empty value counts as unset."""
    for value in (explicit, os.environ.get(STORE_ENV), configured):
        if value:
            return value
    return None
