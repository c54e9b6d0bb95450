"""Where fleetctl keeps its files. Precedence: flag > environment > XDG default, the layers of
:data:`fleetctl.settings.OVERRIDE_ORDER` (a path is never set in the inventory file)."""

from __future__ import annotations

import os
from pathlib import Path

from fleetctl.settings import CONFIG_ENV, FLAGS, STATE_ENV, STORE_ENV, Setting, layered, pick

__all__ = ["CONFIG_ENV", "STATE_ENV", "STORE_ENV", "config_path", "config_setting", "state_dir", "state_setting", "store_url"]


def _xdg(var: str, fallback: str) -> Path:
    value = os.environ.get(var)
    # The XDG spec says relative values are invalid and must be ignored.
    if value and os.path.isabs(value):
        return Path(value)
    return Path.home() / fallback


def _path_setting(name: str, explicit: str | os.PathLike[str] | None, variable: str, default: Path) -> Setting:
    chosen = pick(name, {"default": (str(default), "default"), "env": (os.environ.get(variable), f"env {variable}"),
                         "flag": (os.fspath(explicit) if explicit else None, f"flag {FLAGS[name]}")})
    return Setting(name, Path(chosen.value).expanduser(), chosen.layer, chosen.source)


def config_setting(explicit: str | os.PathLike[str] | None = None) -> Setting:
    """The inventory file and where it was chosen: ``--config`` > ``$FLEETCTL_CONFIG`` > XDG config dir."""
    return _path_setting("config", explicit, CONFIG_ENV, _xdg("XDG_CONFIG_HOME", ".config") / "fleetctl" / "ssh-agents.toml")


def state_setting(explicit: str | os.PathLike[str] | None = None) -> Setting:
    """History, queue, known hosts: ``--state-dir`` > ``$FLEETCTL_STATE_DIR`` > XDG state dir."""
    return _path_setting("state_dir", explicit, STATE_ENV, _xdg("XDG_STATE_HOME", ".local/state") / "fleetctl")


def config_path(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The inventory file: ``--config`` > ``$FLEETCTL_CONFIG`` > XDG config dir."""
    path: Path = config_setting(explicit).value
    return path


def state_dir(explicit: str | os.PathLike[str] | None = None) -> Path:
    """History, queue, known hosts: ``--state-dir`` > ``$FLEETCTL_STATE_DIR`` > XDG state dir."""
    path: Path = state_setting(explicit).value
    return path


def store_url(explicit: str | None = None, configured: str | None = None) -> str | None:
    """The store: ``--store`` > ``$FLEETCTL_STORE`` > ``[controller] store`` in the inventory; None
    (the default) is the SQLite file in the state dir. An empty value counts as unset."""
    store: str | None = layered({"store": configured}, flags={"store": explicit}).settings.store
    return store
