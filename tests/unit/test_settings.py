"""Settings layered once: defaults < inventory file < environment < flags, each value with its source."""

from __future__ import annotations

from pathlib import Path

import pytest

from fleetctl.errors import ConfigError
from fleetctl.fleet import DEFAULT_MAX_PARALLEL_SSH, Fleet
from fleetctl.hosts import fanout
from fleetctl.inventory import routes
from fleetctl.inventory.config import Agent, Inventory, parse_inventory
from fleetctl.jobs import remote
from fleetctl.paths import config_setting, state_setting, store_url
from fleetctl.settings import OVERRIDE_ORDER, ControllerSettings, default_of, layered, pick
from fleetctl.ssh.seam import Route
from fleetctl.store import leases
from fleetctl.telemetry.health import HealthPolicy

pytestmark = pytest.mark.no_store  # never opens a store: the PostgreSQL pass deselects it

INVENTORY = """\
[controller]
lease_s = 20
# a comment between keys
store = "postgresql://file/db"
max_parallel_ssh = 8

[[agents]]
name = "a"
hostname = "h"
"""


def _inventory(tmp_path: Path, text: str = INVENTORY) -> Inventory:
    return parse_inventory(text, tmp_path / "ssh-agents.toml")


def test_override_order_is_defaults_file_env_flags() -> None:
    assert OVERRIDE_ORDER == ("default", "file", "env", "flag")


def test_each_layer_overrides_the_one_below(tmp_path: Path) -> None:
    inventory = _inventory(tmp_path)
    path = tmp_path / "ssh-agents.toml"
    # The store is the one setting every layer can set: walk it up the layers.
    bare = Inventory(path, [], {}).layered(environ={})
    assert (bare.settings.store, bare.source("store")) == (None, "default")
    in_file = inventory.layered(environ={})
    assert (in_file.settings.store, in_file.source("store")) == ("postgresql://file/db", f"{path}:4")
    in_env = inventory.layered(environ={"FLEETCTL_STORE": "postgresql://env/db"})
    assert (in_env.settings.store, in_env.source("store")) == ("postgresql://env/db", "env FLEETCTL_STORE")
    flagged = inventory.layered(environ={"FLEETCTL_STORE": "postgresql://env/db"}, store="postgresql://flag/db")
    assert (flagged.settings.store, flagged.source("store")) == ("postgresql://flag/db", "flag --store")
    assert flagged.sources["store"].layer == "flag"


def test_every_setting_has_a_source_and_the_file_line_of_each_key(tmp_path: Path) -> None:
    settings = _inventory(tmp_path).layered(environ={}, max_parallel_ssh=None)
    path = tmp_path / "ssh-agents.toml"
    assert [s.name for s in settings] == list(ControllerSettings.model_fields)
    assert settings.source("lease_s") == f"{path}:2"
    assert settings.source("max_parallel_ssh") == f"{path}:5"  # a flag of None is a flag not given
    assert settings.settings.lease_s == 20.0 and settings.sources["lease_s"].value == 20.0
    assert settings.source("retention_days") == "default"
    assert settings.settings.retention_days == default_of(ControllerSettings, "retention_days")


def test_a_key_written_inline_is_sourced_to_the_file_alone(tmp_path: Path) -> None:
    settings = _inventory(tmp_path, 'controller = { lease_s = 30 }\n').layered(environ={})
    assert settings.settings.lease_s == 30.0
    assert settings.source("lease_s") == str(tmp_path / "ssh-agents.toml")


def test_keys_of_other_tables_are_not_taken_for_the_controllers(tmp_path: Path) -> None:
    text = '[[agents]]\nname = "a"\nhostname = "h"\n\n[agents.labels]\nlease_s = "x"\n\n[controller]\n\nlease_s = 5\n'
    assert _inventory(tmp_path, text).layered(environ={}).source("lease_s") == f"{tmp_path / 'ssh-agents.toml'}:10"


def test_an_empty_value_is_unset_in_every_layer(tmp_path: Path) -> None:
    settings = _inventory(tmp_path).layered(environ={"FLEETCTL_STORE": ""}, store="")
    assert (settings.settings.store, settings.source("store")) == ("postgresql://file/db", f"{tmp_path / 'ssh-agents.toml'}:4")
    assert layered({"store": ""}, environ={}).source("store") == "default"


def test_the_environment_sets_only_its_variables(tmp_path: Path) -> None:
    settings = _inventory(tmp_path).layered(environ={"FLEETCTL_SSH_CONFIG": "/etc/fleet/ssh_config", "FLEETCTL_LEASE_S": "99"})
    assert (settings.settings.ssh_config_file, settings.source("ssh_config_file")) == ("/etc/fleet/ssh_config", "env FLEETCTL_SSH_CONFIG")
    assert settings.settings.lease_s == 20.0  # no such variable today: the file's value stands


def test_an_env_value_that_does_not_parse_is_one_line_naming_the_variable() -> None:
    numbers = {"lease_s": "FLEETCTL_LEASE_S", "max_parallel_ssh": "FLEETCTL_MAX_PARALLEL_SSH"}
    for environ, problem in [({"FLEETCTL_LEASE_S": "soon"}, "valid number"),
                             ({"FLEETCTL_LEASE_S": "0.5"}, "greater than or equal to 1"),
                             ({"FLEETCTL_MAX_PARALLEL_SSH": "4.5"}, "valid integer")]:
        with pytest.raises(ConfigError) as caught:
            layered(environ=environ, environment=numbers)
        message = str(caught.value)
        variable = next(iter(environ))
        assert message.startswith(f"env {variable}: ") and problem in message, message
        assert f"(got {environ[variable]!r})" in message and f"set {variable}" in caught.value.hint  # type: ignore[operator]
        assert "\n" not in message
    parsed = layered(environ={"FLEETCTL_LEASE_S": "30", "FLEETCTL_MAX_PARALLEL_SSH": "64"}, environment=numbers)
    assert (parsed.settings.lease_s, parsed.settings.max_parallel_ssh) == (30.0, 64)
    assert parsed.sources["lease_s"].value == 30.0  # as validated, not the variable's text


def test_a_bad_flag_is_one_line_naming_the_flag() -> None:
    with pytest.raises(ConfigError, match=r"^flag --max-parallel-ssh: max_parallel_ssh: .*1024 \(got 5000\)"):
        layered(environ={}, flags={"max_parallel_ssh": 5000})
    with pytest.raises(ConfigError, match="unknown controller setting 'nope'"):
        layered(environ={}, flags={"nope": 1})


def test_pick_takes_the_highest_layer_that_sets_a_value() -> None:
    assert pick("x", {"default": (1, "default"), "file": (2, "f:1"), "env": (None, "env X")}).source == "f:1"
    assert pick("x", {"default": (None, "default"), "flag": ("", "flag --x")}).layer == "default"


def test_paths_are_layered_the_same_way_without_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = Path.home()
    assert config_setting().source == "default" and config_setting().value == home / ".config" / "fleetctl" / "ssh-agents.toml"
    monkeypatch.setenv("FLEETCTL_CONFIG", str(tmp_path / "env.toml"))
    monkeypatch.setenv("FLEETCTL_STATE_DIR", str(tmp_path / "state"))
    assert (config_setting().value, config_setting().source) == (tmp_path / "env.toml", "env FLEETCTL_CONFIG")
    assert (config_setting(tmp_path / "flag.toml").source, state_setting().source) == ("flag --config", "env FLEETCTL_STATE_DIR")
    assert state_setting("~/s").value == home / "s"


def test_store_url_and_fleet_read_the_same_layers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FLEETCTL_STORE", raising=False)
    inventory = _inventory(tmp_path)
    fleet = Fleet(inventory, state_dir=tmp_path / "state", max_parallel_ssh=3)
    assert (fleet.hosts.store_url, fleet.hosts.max_parallel_ssh) == ("postgresql://file/db", 3)
    assert fleet.hosts.layered.source("max_parallel_ssh") == "flag --max-parallel-ssh"
    monkeypatch.setenv("FLEETCTL_STORE", "postgresql://env/db")
    assert store_url(None, "postgresql://file/db") == "postgresql://env/db"
    assert Fleet(inventory, state_dir=tmp_path / "state").hosts.layered.source("store") == "env FLEETCTL_STORE"
    assert Fleet(Inventory(tmp_path / "none.toml", [], {}), state_dir=tmp_path / "state", max_parallel_ssh=0).hosts.max_parallel_ssh == 32


def test_the_ssh_config_file_comes_through_the_layers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FLEETCTL_SSH_CONFIG")
    assert routes.resolver_for(ControllerSettings(ssh_config_file=str(tmp_path / "file"))).config_file == tmp_path / "file"
    monkeypatch.setenv("FLEETCTL_SSH_CONFIG", str(tmp_path / "env"))
    assert routes.resolver_for(ControllerSettings(ssh_config_file=str(tmp_path / "file"))).config_file == tmp_path / "env"


def test_constants_elsewhere_are_read_from_the_models() -> None:
    controller = ControllerSettings()
    agent = Agent(name="a", hostname="h")
    assert controller.lease_s == leases.DEFAULT_LEASE_S
    assert controller.max_parallel_ssh == DEFAULT_MAX_PARALLEL_SSH
    assert controller.kill_grace_s == remote.KILL_GRACE_S
    assert HealthPolicy() == HealthPolicy(controller.offline_after_misses, controller.offline_grace_s)
    assert routes.DEFAULT_CONNECT_TIMEOUT_S == Route(()).connect_timeout == agent.connect_timeout_s
    assert agent.command_timeout_s == fanout.DEFAULT_TIMEOUT_S


def test_bastion_sharing_is_set_from_the_controller_table(tmp_path: Path) -> None:
    """``[controller]`` hop_retry_after_s and handshakes_per_sshd reach the fleet's connections; unset,
    the SSH package's own defaults are the models' (written once)."""
    from fleetctl.ssh import ConnectOptions

    assert (ConnectOptions().hop_retry_after_s, ConnectOptions().handshakes_per_sshd) == (
        ControllerSettings().hop_retry_after_s, ControllerSettings().handshakes_per_sshd)
    inventory = _inventory(tmp_path, "[controller]\nhop_retry_after_s = 0.5\nhandshakes_per_sshd = 8\n")
    options = Fleet(inventory, state_dir=tmp_path / "state").hosts.connect_options
    assert (options.hop_retry_after_s, options.handshakes_per_sshd) == (0.5, 8)
