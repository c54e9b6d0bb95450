from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from fleetctl.errors import ConfigError, UnknownAgentError
from fleetctl.inventory.config import Agent, edit_inventory, load_config, parse_inventory

pytestmark = pytest.mark.no_store  # never opens a store: the PostgreSQL pass deselects it

DOCUMENTED = Path(__file__).resolve().parents[3] / "config" / "ssh-agents.example.toml"
README_EXAMPLE = '''[[agents]]
name = "vast-rental-1"
hostname = "123.45.67.89"
ssh_user = "root"
ssh_key_path = "~/.ssh/id_ed25519"
ssh_port = 22
gpu_query_cmd = "nvidia-smi --query-gpu=index,name,memory.total,memory.free --format=csv,noheader"

[[agents]]
name = "lambda-labs-2"
hostname = "compute-2.lambda-labs.com"
ssh_user = "ubuntu"
ssh_key_path = "~/.ssh/lambda_key"
gpu_query_cmd = "rocm-smi --showtemp --showmeminfo --csv"

[[agents]]
name = "vpn-private-gpu"
hostname = "internal-gpu.local"
ssh_user = "ubuntu"
ssh_key_path = "~/.ssh/id_ed25519"

[agents.bastion]
hostname = "bastion.example.com"
ssh_user = "root"
ssh_key_path = "~/.ssh/bastion_key"
'''


def test_documented_format_loads_and_round_trips_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "ssh-agents.toml"
    path.write_text(README_EXAMPLE)
    inventory = load_config(path)
    assert inventory.names() == ["vast-rental-1", "lambda-labs-2", "vpn-private-gpu"]
    assert inventory.get("lambda-labs-2").ssh_port == 22
    assert inventory.get("vpn-private-gpu").bastions()[0].hostname == "bastion.example.com"
    assert inventory.to_toml() == README_EXAMPLE


def test_example_config_file_is_valid() -> None:
    inventory = load_config(DOCUMENTED)
    assert len(inventory) >= 3


def test_bastion_chain_order_innermost_is_nearest_controller() -> None:
    inv = parse_inventory('''[[agents]]
name = "deep"
hostname = "10.0.0.5"
[agents.bastion]
hostname = "inner.example"
[agents.bastion.bastion]
hostname = "outer.example"
''', Path("x.toml"))
    assert [b.hostname for b in inv.get("deep").bastions()] == ["outer.example", "inner.example"]


@pytest.mark.parametrize(("body", "expected"), [
    ('[[agents]]\nname = "a"\nhostname = "h"\nssh_prot = 22\n', "agent 'a' (agents[0]): unknown key 'ssh_prot' (did you mean 'ssh_port'?)"),
    ('[[agents]]\nname = "a"\nhostname = "h"\nssh_port = 70000\n', "agent 'a' (agents[0]): ssh_port: Input should be less than or equal to 65535 (got 70000)"),
    ('[[agents]]\nname = "a"\nhostname = "h"\nssh_port = 0\n', "ssh_port: Input should be greater than or equal to 1"),
    ('[[agents]]\nname = ""\nhostname = "h"\n', "name: must not be empty"),
    ('[[agents]]\nname = "bad name!"\nhostname = "h"\n', "name: may contain only letters, digits"),
    ('[[agents]]\nname = "a"\nhostname = "h"\n[[agents]]\nname = "a"\nhostname = "g"\n', "duplicate name 'a'"),
    ('[[agents]]\nname = "a"\nhostname = "h"\n[[agents]]\nname = "b"\nhostname = "h"\nssh_port = 22\n', "h:22 is already agent 'a'"),
    ('[[agents]]\nname = "a"\n', "agent 'a' (agents[0]): missing required key 'hostname'"),
    ('[[agents]]\nname = "a"\nhostname = "h"\npassword = "x"\n', "passwords are not accepted"),
    ('[[agents]]\nname = "a"\nhostname = "h"\n[agents.bastion]\nhostnme = "b"\n', "bastion: unknown key 'hostnme' (did you mean 'hostname'?)"),
    ('[[agents]]\nname = "a"\nhostname = "h"\nhost_key_fingerprint = "MD5:aa"\n', "host_key_fingerprint: must look like SHA256"),
    ('[agents]\nname = "a"\n', "write [[agents]], not [agents]"),
    ('[[agent]]\nname = "a"\n', "unknown top-level key 'agent' (did you mean 'agents'?)"),
])
def test_every_mistake_is_one_line_naming_file_agent_and_field(body: str, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_inventory(body, Path("/etc/fleet.toml"))
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("/etc/fleet.toml")
    assert expected in message


def test_same_host_behind_different_bastions_is_allowed() -> None:
    parse_inventory('''[[agents]]
name = "a"
hostname = "10.0.0.5"
[agents.bastion]
hostname = "b1"
[[agents]]
name = "b"
hostname = "10.0.0.5"
[agents.bastion]
hostname = "b2"
''', Path("x.toml"))


def test_toml_syntax_error_names_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[[agents]]\nname = "a"\nhostname = \n')
    with pytest.raises(ConfigError, match=rf"^{path}:3:\d+: invalid TOML"):
        load_config(path)


def test_missing_file_says_how_to_start() -> None:
    with pytest.raises(ConfigError, match="register-ssh"):
        load_config("/nonexistent/ssh-agents.toml")


def test_unknown_agent_suggests_close_name(tmp_path: Path) -> None:
    path = tmp_path / "a.toml"
    path.write_text('[[agents]]\nname = "gpu-1"\nhostname = "h"\n')
    with pytest.raises(UnknownAgentError, match="did you mean 'gpu-1'"):
        load_config(path).get("gpu-l")


def test_writes_are_atomic_private_and_keep_other_agents_and_unknown_tables(tmp_path: Path) -> None:
    path = tmp_path / "inv.toml"
    original = '[future_feature]\nknob = 1\n\n[[agents]]\nname = "keep"\nhostname = "h1"\nssh_port = 22\n'
    path.write_text(original)
    with edit_inventory(path) as inventory:
        inventory.upsert(Agent(name="new", hostname="h2"))
    text = path.read_text()
    assert 'name = "keep"\nhostname = "h1"\nssh_port = 22\n' in text  # untouched agent, explicit default kept
    assert "[future_feature]\nknob = 1" in text
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    with edit_inventory(path) as inventory:
        inventory.remove("new")
    assert load_config(path).names() == ["keep"]


def test_failed_write_leaves_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "inv.toml"
    path.write_text('[[agents]]\nname = "keep"\nhostname = "h1"\n')
    before = path.read_text()

    def crash(*_args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError), edit_inventory(path) as inventory:
        inventory.upsert(Agent(name="new", hostname="h2"))
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
