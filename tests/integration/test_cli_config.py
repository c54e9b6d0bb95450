"""``fleetctl config show`` as a user runs it: every effective setting with the layer it came from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fleetctl.settings import ControllerSettings
from tests.conftest import run_cli

pytestmark = pytest.mark.no_store  # never opens a store: the PostgreSQL pass deselects it

INVENTORY = """\
[controller]
lease_s = 20
store = "postgresql://fleet:s3cret@db.example/fleet"

[[agents]]
name = "a"
hostname = "h"
"""


def _show(*args: str, env: dict[str, str] | None = None) -> dict[str, dict[str, object]]:
    result = run_cli("config", "show", "--json", *args, env=env)
    assert result.returncode == 0, result.stderr
    shown: dict[str, dict[str, object]] = json.loads(result.stdout)
    return shown


def test_config_show_names_the_source_of_every_setting(tmp_path: Path) -> None:
    inventory = tmp_path / "ssh-agents.toml"
    inventory.write_text(INVENTORY)
    shown = _show("--config", str(inventory), "--state-dir", str(tmp_path / "state"),
                  env={"FLEETCTL_SSH_CONFIG": str(tmp_path / "ssh_config")})
    assert list(shown) == ["config", "state_dir", *ControllerSettings.model_fields]
    assert shown["config"] == {"value": str(inventory), "layer": "flag", "source": "flag --config"}
    assert shown["state_dir"]["source"] == "flag --state-dir"
    assert shown["lease_s"] == {"value": 20.0, "layer": "file", "source": f"{inventory}:2"}
    assert shown["store"] == {"value": "postgresql://fleet:***@db.example/fleet", "layer": "file", "source": f"{inventory}:3"}
    assert shown["ssh_config_file"] == {"value": str(tmp_path / "ssh_config"), "layer": "env", "source": "env FLEETCTL_SSH_CONFIG"}
    assert shown["max_parallel_ssh"] == {"value": 32, "layer": "default", "source": "default"}


def test_config_show_flag_over_env_over_file(tmp_path: Path) -> None:
    inventory = tmp_path / "ssh-agents.toml"
    inventory.write_text(INVENTORY)
    env = {"FLEETCTL_CONFIG": str(inventory), "FLEETCTL_STORE": "postgresql://env.example/fleet"}
    assert _show(env=env)["store"]["source"] == "env FLEETCTL_STORE"
    assert _show(env=env)["config"]["source"] == "env FLEETCTL_CONFIG"
    flagged = _show("--store", "postgresql://flag.example/fleet", env=env)["store"]
    assert flagged == {"value": "postgresql://flag.example/fleet", "layer": "flag", "source": "flag --store"}


def test_config_show_without_an_inventory_prints_the_defaults_as_a_table(tmp_path: Path) -> None:
    result = run_cli("config", "show")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["SETTING", "VALUE", "SOURCE"]
    rows = {line.split()[0]: line.split()[1:] for line in lines[1:]}
    assert rows["lease_s"] == ["15", "default"] and rows["ssh_config"] == ["true", "default"]
    assert rows["store"] == ["-", "default"]
    assert rows["config"][-1] == "default"  # the XDG path: no file there is fine
