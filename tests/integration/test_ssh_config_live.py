"""~/.ssh/config, certificates and known_hosts, end to end against real sshd: where `ssh HOST true`
works, fleetctl reaches HOST the same way (heartbeat, doctor), or says in one line why not."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleetctl.errors import AuthError, HostKeyError
from fleetctl.fleet import Fleet
from fleetctl.inventory.config import load_config
from fleetctl.inventory.routes import resolver_for, route_for
from fleetctl.sandbox import Sandbox, sshd
from fleetctl.sandbox.sandbox import _free_port
from fleetctl.ssh import ConnectOptions, HostKeyPolicy, KnownHosts, connect
from tests.conftest import needs_netns, require_sshd, run_cli

QUERY = "nvidia-smi --query-gpu=index,uuid,name,memory.total,memory.used --format=csv,noheader,nounits"


def _keygen(path: Path, kind: str = "ed25519") -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", kind, "-N", "", "-C", path.name, "-f", str(path)], check=True)
    return path


def _pub_blob(path: Path) -> str:
    return path.with_suffix(".pub").read_text().split()[1] if path.suffix != ".pub" else path.read_text().split()[1]


class Sshd:
    """One sshd of the test's own (certificates, several host keys), stopped by PID at teardown."""

    def __init__(self, root: Path, *, authorized: Path, host_keys: list[Path], extra: list[str]) -> None:
        self.port = _free_port()
        spec = sshd.SshdSpec(name=root.name, listen=[("127.0.0.1", self.port)], host_key=host_keys[0],
                             authorized_keys=authorized, path_dirs=[], environment={"HOME": str(root)},
                             extra_host_keys=host_keys[1:], extra_config=extra)
        self.pid = sshd.start(spec, root, [])

    def stop(self) -> None:
        sshd.stop(self.pid)


@pytest.fixture
def own_sshd_factory(tmp_path: Path) -> Iterator[list[Sshd]]:
    require_sshd()
    started: list[Sshd] = []
    yield started
    for server in started:
        server.stop()


def _inventory(path: Path, body: str) -> Path:
    path.write_text(body)
    return path


# -- ProxyJump to an alias, ProxyCommand ----------------------------------------------------------
@needs_netns
def test_proxyjump_to_an_alias_through_the_netns_bastion(fleet_sandbox: Sandbox, isolated_env: Path, tmp_path: Path) -> None:
    bastion, _ = fleet_sandbox.endpoints["bastion-1"]
    target, _ = fleet_sandbox.endpoints["lan-nv"]
    key = fleet_sandbox.client_key
    (isolated_env / ".ssh" / "config").write_text(
        f"Host jump\n  HostName {bastion}\n  User root\n  IdentityFile {key}\n\n"
        f"Host gpu-lan\n  HostName {target}\n  User root\n  ProxyJump jump  # the bastion is an alias too\n"
        f"  IdentityFile {key}\n")
    config = _inventory(tmp_path / "agents.toml", f'[[agents]]\nname = "lan"\nssh_config_host = "gpu-lan"\n'
                                                  f'gpu_query_cmd = "{QUERY}"\n')
    beat = run_cli("heartbeat", "--json", "--config", str(config), "--state-dir", str(tmp_path / "state"))
    assert beat.returncode == 0, beat.stdout + beat.stderr
    assert '"status": "ok"' in beat.stdout
    doctor = run_cli("doctor", "--config", str(config), "--state-dir", str(tmp_path / "state"))
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    assert f"root@{bastion}:22" in doctor.stdout and "hop 1 (bastion)" in doctor.stdout and "forwarding allowed" in doctor.stdout
    route = route_for(load_config(config).get("lan"), resolver_for(load_config(config).controller))
    assert [h.address for h in route.hops] == [f"root@{bastion}:22", f"root@{target}:22"]
    # agents show: each hop, and where each value came from.
    shown = run_cli("agents", "show", "lan", "--json", "--config", str(config), "--state-dir", str(tmp_path / "state"))
    assert shown.returncode == 0, shown.stderr
    data = json.loads(shown.stdout)
    assert [(hop["role"], hop["host"]) for hop in data["route"]] == [("bastion", bastion), ("target", target)]
    assert data["route"][0]["sources"]["user"].endswith(".ssh/config:3")  # the alias's own User line
    assert data["route"][1]["sources"]["proxy_jump"].endswith(".ssh/config:9")  # ProxyJump jump
    assert data["health"] == "online" and data["draining"] is False and data["last_heartbeat"].endswith("Z")
    text = run_cli("agents", "show", "lan", "--config", str(config), "--state-dir", str(tmp_path / "state"))
    assert "hop 1 (bastion)" in text.stdout and ".ssh/config:3]" in text.stdout and "health: online" in text.stdout
    listed = run_cli("agents", "list", "--config", str(config), "--state-dir", str(tmp_path / "state"))
    assert listed.returncode == 0 and f"via root@{bastion}:22" in listed.stdout and "online" in listed.stdout


RELAY = """
import socket, sys, threading
s = socket.create_connection((sys.argv[1], int(sys.argv[2])))
def pump():
    while data := s.recv(65536):
        sys.stdout.buffer.write(data); sys.stdout.buffer.flush()
threading.Thread(target=pump, daemon=True).start()
while data := sys.stdin.buffer.read1(65536):
    s.sendall(data)
"""


def _beat(config: Path, state: Path, name: str) -> dict[str, object]:
    done = run_cli("heartbeat", "--json", "--agent", name, "--config", str(config), "--state-dir", str(state))
    assert "Traceback" not in done.stderr
    snapshots: list[dict[str, object]] = json.loads(done.stdout)
    return snapshots[0]


def test_proxycommand_relay_and_a_failing_proxy(fleet_sandbox: Sandbox, isolated_env: Path, tmp_path: Path) -> None:
    host, port = fleet_sandbox.endpoints["direct-nv"]
    relay = tmp_path / "relay.py"
    relay.write_text(RELAY)
    (isolated_env / ".ssh" / "config").write_text(
        f"Host relayed\n  HostName {host}\n  Port {port}\n  User root\n  IdentityFile {fleet_sandbox.client_key}\n"
        f"  ProxyCommand {sys.executable} {relay} %h %p\n"
        f"Host broken\n  HostName {host}\n  ProxyCommand sh -c 'echo proxy says no >&2; exit 7'\n")
    config = _inventory(tmp_path / "agents.toml",
                        f'[[agents]]\nname = "relayed"\nssh_config_host = "relayed"\ngpu_query_cmd = "{QUERY}"\n\n'
                        '[[agents]]\nname = "broken"\nssh_config_host = "broken"\n')
    assert _beat(config, tmp_path / "state", "relayed")["status"] == "ok"
    failed = _beat(config, tmp_path / "state", "broken")
    assert failed["status"] == "unreachable" and "proxy says no" in str(failed["error"]) and "exited 7" in str(failed["error"])


@needs_netns
def test_proxycommand_ssh_W_through_the_bastion(fleet_sandbox: Sandbox, isolated_env: Path, tmp_path: Path) -> None:
    bastion, _ = fleet_sandbox.endpoints["bastion-1"]
    target, _ = fleet_sandbox.endpoints["lan-nv"]
    key = fleet_sandbox.client_key
    (isolated_env / ".ssh" / "config").write_text(
        f"Host via-w\n  HostName {target}\n  User root\n  IdentityFile {key}\n"
        f"  ProxyCommand ssh -F /dev/null -i {key} -o BatchMode=yes -o StrictHostKeyChecking=no "
        f"-o UserKnownHostsFile=/dev/null -o LogLevel=ERROR -W %h:%p root@{bastion}\n")
    config = _inventory(tmp_path / "agents.toml", f'[[agents]]\nname = "w"\nssh_config_host = "via-w"\ngpu_query_cmd = "{QUERY}"\n')
    assert _beat(config, tmp_path / "state", "w")["status"] == "ok"


# -- identities and certificates ------------------------------------------------------------------
@pytest.fixture
def cert_host(own_sshd_factory: list[Sshd], tmp_path: Path) -> tuple[Sshd, Path]:
    """An sshd that trusts only certificates signed by a CA (its authorized_keys is empty)."""
    root = tmp_path / "certhost"
    root.mkdir()
    ca = _keygen(root / "ca")
    empty = root / "authorized_keys"
    empty.write_text("")
    server = Sshd(root, authorized=empty, host_keys=[_keygen(root / "host_ed25519")],
                  extra=[f"TrustedUserCAKeys {ca}.pub"])
    own_sshd_factory.append(server)
    return server, ca


def _sign(ca: Path, key: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-s", str(ca), "-I", "fleetctl-test", "-n", "root", f"{key}.pub"], check=True)
    return Path(f"{key}-cert.pub")


def _options(tmp_path: Path) -> ConnectOptions:
    return ConnectOptions(host_keys=HostKeyPolicy(KnownHosts(tmp_path / "state_known_hosts", [])))


def _route_to(isolated_env: Path, alias: str):  # type: ignore[no-untyped-def]
    from fleetctl.inventory.config import Agent, ControllerSettings

    return route_for(Agent(name="a", ssh_config_host=alias), resolver_for(ControllerSettings()))


def test_user_certificate_from_key_cert_pub_certificatefile_and_agent(cert_host: tuple[Sshd, Path], isolated_env: Path,
                                                                      tmp_path: Path) -> None:
    server, ca = cert_host
    key = _keygen(isolated_env / ".ssh" / "id_cert")
    base = f"Host certhost\n  HostName 127.0.0.1\n  Port {server.port}\n  User root\n  IdentitiesOnly yes\n"
    config = isolated_env / ".ssh" / "config"
    # No certificate yet: the plain key is refused, and the error lists what was tried.
    config.write_text(base + f"  IdentityFile {key}\n")
    with pytest.raises(AuthError, match="refused every key.*id_cert"):
        connect(_route_to(isolated_env, "certhost"), _options(tmp_path))
    # <key>-cert.pub beside the key is picked up, as ssh does.
    cert = _sign(ca, key)
    with connect(_route_to(isolated_env, "certhost"), _options(tmp_path)) as conn:
        assert conn.run("echo in").stdout == "in\n"
        assert "with certificate" in conn.host_keys[-1].identity
    # CertificateFile elsewhere, paired with its private key.
    moved = tmp_path / "elsewhere-cert.pub"
    cert.rename(moved)
    config.write_text(base + f"  IdentityFile {key}\n  CertificateFile {moved}\n")
    with connect(_route_to(isolated_env, "certhost"), _options(tmp_path)) as conn:
        assert "with certificate" in conn.host_keys[-1].identity
    # From ssh-agent: `ssh-add` loads the key and its certificate; no IdentityFile at all.
    moved.rename(cert)
    agent_socket = tmp_path / "agent.sock"
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", str(agent_socket)], stdout=subprocess.DEVNULL)
    try:
        for _ in range(200):
            if agent_socket.exists():
                break
            threading.Event().wait(0.01)
        subprocess.run(["ssh-add", str(key)], env={**os.environ, "SSH_AUTH_SOCK": str(agent_socket)}, check=True,
                       capture_output=True)
        config.write_text(f"Host certhost\n  HostName 127.0.0.1\n  Port {server.port}\n  User root\n"
                          f"  IdentityAgent {agent_socket}\n  IdentityFile ~/.ssh/none_of_these\n")
        with connect(_route_to(isolated_env, "certhost"), _options(tmp_path)) as conn:
            assert "ssh-agent" in conn.host_keys[-1].identity
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(5)


def test_several_identity_files_with_the_first_missing(fleet_sandbox: Sandbox, isolated_env: Path, tmp_path: Path) -> None:
    host, port = fleet_sandbox.endpoints["direct-nv"]
    wrong = _keygen(tmp_path / "wrong")
    config = isolated_env / ".ssh" / "config"
    config.write_text(f"Host h\n  HostName {host}\n  Port {port}\n  User root\n  IdentityFile ~/.ssh/missing\n"
                      f"  IdentityFile {wrong}\n  IdentityFile {fleet_sandbox.client_key}\n")
    with connect(_route_to(isolated_env, "h"), _options(tmp_path)) as conn:
        assert conn.host_keys[-1].identity.startswith(str(fleet_sandbox.client_key))
    config.write_text(f"Host h\n  HostName {host}\n  Port {port}\n  User root\n  IdentityFile ~/.ssh/missing\n"
                      f"  IdentityFile {wrong}\n")
    with pytest.raises(AuthError) as caught:
        connect(_route_to(isolated_env, "h"), _options(tmp_path))
    assert f"tried {wrong}" in str(caught.value) and "skipped ~/.ssh/missing (not found)" in str(caught.value)


# -- known_hosts as OpenSSH judges it -------------------------------------------------------------
@pytest.fixture
def two_key_host(own_sshd_factory: list[Sshd], fleet_sandbox: Sandbox, tmp_path: Path) -> tuple[Sshd, Path, Path]:
    """An sshd serving ed25519 and ECDSA host keys (ed25519 is what a client prefers)."""
    root = tmp_path / "twokeys"
    root.mkdir()
    ed, ec = _keygen(root / "host_ed25519"), _keygen(root / "host_ecdsa", "ecdsa")
    authorized = root / "authorized_keys"
    authorized.write_text(fleet_sandbox.client_key.with_suffix(".pub").read_text())
    server = Sshd(root, authorized=authorized, host_keys=[ed, ec], extra=[])
    own_sshd_factory.append(server)
    return server, ed, ec


def _agent_config(isolated_env: Path, fleet_sandbox: Sandbox, port: int, extra: str = "") -> None:
    (isolated_env / ".ssh" / "config").write_text(
        f"Host kh\n  HostName 127.0.0.1\n  Port {port}\n  User root\n  IdentityFile {fleet_sandbox.client_key}\n{extra}")


def test_a_host_serving_two_key_types_is_judged_by_the_type_already_known(
        two_key_host: tuple[Sshd, Path, Path], fleet_sandbox: Sandbox, isolated_env: Path, tmp_path: Path) -> None:
    server, _ed, ec = two_key_host
    _agent_config(isolated_env, fleet_sandbox, server.port)
    known = isolated_env / ".ssh" / "known_hosts"
    known.write_text(f"# only the ECDSA key is known\n[127.0.0.1]:{server.port} ecdsa-sha2-nistp256 {_pub_blob(ec)}\n")
    options = ConnectOptions(host_keys=HostKeyPolicy(KnownHosts(tmp_path / "state_known_hosts", [known])))
    with connect(_route_to(isolated_env, "kh"), options) as conn:
        assert conn.host_keys[-1].key_type == "ecdsa-sha2-nistp256"
        assert "known_hosts:2" in conn.host_keys[-1].verdict
    assert not (tmp_path / "state_known_hosts").exists()  # nothing recorded: the host was known


def test_revoked_key_is_refused_and_never_recorded(two_key_host: tuple[Sshd, Path, Path], fleet_sandbox: Sandbox,
                                                   isolated_env: Path, tmp_path: Path) -> None:
    server, ed, _ec = two_key_host
    _agent_config(isolated_env, fleet_sandbox, server.port)
    known = isolated_env / ".ssh" / "known_hosts"
    known.write_text(f"@revoked [127.0.0.1]:{server.port} ssh-ed25519 {_pub_blob(ed)}\n")
    options = ConnectOptions(host_keys=HostKeyPolicy(KnownHosts(tmp_path / "state_known_hosts", [known])))
    with pytest.raises(HostKeyError, match=r"@revoked in .*known_hosts:1"):
        connect(_route_to(isolated_env, "kh"), options)
    assert not (tmp_path / "state_known_hosts").exists()


def test_wildcards_case_and_hashed_names_match_like_openssh(two_key_host: tuple[Sshd, Path, Path], fleet_sandbox: Sandbox,
                                                            isolated_env: Path, tmp_path: Path) -> None:
    from fleetctl.ssh.known_hosts import hashed_name

    server, ed, _ec = two_key_host
    known = isolated_env / ".ssh" / "known_hosts"
    options = ConnectOptions(host_keys=HostKeyPolicy(KnownHosts(tmp_path / "state_known_hosts", [known])))
    for field in (f"[127.0.0.*]:{server.port}", f"!other,[127.0.0.1]:{server.port}", hashed_name(f"[127.0.0.1]:{server.port}")):
        known.write_text(f"{field} ssh-ed25519 {_pub_blob(ed)}\n")
        _agent_config(isolated_env, fleet_sandbox, server.port)
        with connect(_route_to(isolated_env, "kh"), options) as conn:
            assert conn.host_keys[-1].verdict.startswith("known")
    known.write_text(f"![127.0.0.1]:{server.port},[127.0.0.*]:{server.port} ssh-ed25519 {_pub_blob(ed)}\n")
    with connect(_route_to(isolated_env, "kh"), options) as conn:  # negated: not known, so first contact
        assert conn.host_keys[-1].verdict.startswith("first contact")


def test_strict_host_key_checking_yes_refuses_an_unknown_host(two_key_host: tuple[Sshd, Path, Path], fleet_sandbox: Sandbox,
                                                              isolated_env: Path, tmp_path: Path) -> None:
    server, _ed, _ec = two_key_host
    _agent_config(isolated_env, fleet_sandbox, server.port, "  StrictHostKeyChecking yes\n")
    with pytest.raises(HostKeyError, match="StrictHostKeyChecking is yes"):
        connect(_route_to(isolated_env, "kh"), _options(tmp_path))
    assert not (tmp_path / "state_known_hosts").exists()


def test_changed_key_names_the_file_and_line_then_agents_trust_accepts_it(own_sandbox: Sandbox, tmp_path: Path) -> None:
    state = tmp_path / "state"
    pinned = own_sandbox.inventory_path.read_text()
    unpinned = "\n".join(line for line in pinned.splitlines() if not line.startswith("host_key_fingerprint"))
    config = _inventory(tmp_path / "agents.toml", unpinned + "\n")
    assert _beat(config, state, "solo")["status"] == "ok"  # first contact, recorded
    # The host is rebuilt: a new host key.
    old_key = own_sandbox.fingerprints["solo"]
    own_sandbox.stop_host("solo")
    for old in own_sandbox.host_dir("solo").glob("ssh_host_ed25519_key*"):
        old.unlink()
    own_sandbox.restart_host("solo")
    changed = _beat(config, state, "solo")
    assert changed["status"] == "host_key_mismatch"
    assert f"{state}/known_hosts:1" in str(changed["error"]) and "agents trust" in str(changed["error"])
    refused = run_cli("agents", "trust", "solo", "--config", str(config), "--state-dir", str(state))
    assert refused.returncode == 1 and "pass --yes" in refused.stderr and "Traceback" not in refused.stderr
    trusted = run_cli("agents", "trust", "solo", "--yes", "--config", str(config), "--state-dir", str(state))
    assert trusted.returncode == 0, trusted.stderr
    assert "known before" in trusted.stderr and "now trusting" in trusted.stdout
    assert _beat(config, state, "solo")["status"] == "ok"
    # Pinned in the inventory: trust updates the pin instead.
    pinned_config = _inventory(tmp_path / "pinned.toml", pinned)
    assert _beat(pinned_config, state, "solo")["status"] == "host_key_mismatch"
    assert run_cli("agents", "trust", "solo", "--yes", "--config", str(pinned_config), "--state-dir", str(state)).returncode == 0
    assert _beat(pinned_config, state, "solo")["status"] == "ok"
    assert old_key not in pinned_config.read_text() and own_sandbox.fingerprints["solo"] in pinned_config.read_text()


# -- failures stay one line, and one agent's ----------------------------------------------------
def test_a_non_ssh_port_is_one_line_without_paramiko_traceback(tmp_path: Path) -> None:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]

    def answer() -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return
            client.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
            client.close()
    threading.Thread(target=answer, daemon=True).start()
    try:
        config = _inventory(tmp_path / "agents.toml", f'[[agents]]\nname = "web"\nhostname = "127.0.0.1"\nssh_port = {port}\n')
        done = run_cli("heartbeat", "--config", str(config), "--state-dir", str(tmp_path / "state"))
    finally:
        server.close()
    assert done.returncode == 3
    assert "Traceback" not in done.stderr and "paramiko" not in done.stderr.lower() and done.stderr.strip() == ""
    assert "unreachable" in done.stdout


def test_a_bad_config_line_fails_that_agent_only(fleet_sandbox: Sandbox, isolated_env: Path, tmp_path: Path) -> None:
    host, port = fleet_sandbox.endpoints["direct-nv"]
    other, other_port = fleet_sandbox.endpoints["direct-amd"]
    (isolated_env / ".ssh" / "config").write_text("Host x\n  Port 2424  # lab\n  Bogus yes\n")
    config = _inventory(tmp_path / "agents.toml",
                        f'[[agents]]\nname = "uses-config"\nhostname = "{host}"\nssh_port = {port}\n\n'
                        f'[[agents]]\nname = "no-config"\nhostname = "{other}"\nssh_port = {other_port}\nssh_config = false\n'
                        f'ssh_user = "root"\nssh_key_path = "{fleet_sandbox.client_key}"\ngpu_query_cmd = "rocm-smi --showuse --json"\n')
    bad = _beat(config, tmp_path / "state", "uses-config")
    assert bad["status"] == "config_error" and "line 3: Bad configuration option: bogus" in str(bad["error"])
    assert _beat(config, tmp_path / "state", "no-config")["status"] == "ok"
    with Fleet.from_config(config, state_dir=tmp_path / "s2") as fleet:  # the round goes on for the other agent
        round_ = fleet.heartbeat()
    assert [s.status for s in round_] == ["config_error", "ok"]



def test_doctor_names_the_failing_check_and_its_fix(fleet_sandbox: Sandbox, tmp_path: Path) -> None:
    config, state = str(fleet_sandbox.inventory_path), str(tmp_path / "state")
    done = run_cli("doctor", "direct-nv", "refused", "broken-driver", "--config", config, "--state-dir", state)
    assert done.returncode == 3 and "Traceback" not in done.stderr
    lines = done.stdout.splitlines()
    assert any(line.startswith("ok   direct-nv  sftp") for line in lines)
    failed = [line for line in lines if line.startswith("FAIL")]
    assert any("refused  hop 1 (target) connect: connection refused" in line for line in failed), failed
    assert any("broken-driver  driver: driver_error" in line for line in failed), failed
    assert all(lines[lines.index(f) + 1].strip().startswith("fix:") for f in failed)
    as_json = run_cli("doctor", "refused", "--json", "--config", config, "--state-dir", state)
    checks = json.loads(as_json.stdout)
    assert as_json.returncode == 3 and checks[-1]["ok"] is False and checks[-1]["fix"]
