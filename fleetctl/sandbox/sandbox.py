"""A local fleet of real sshd processes posing as GPU hosts, for tests and ``fleetctl demo``."""

from __future__ import annotations

import base64
import getpass
import json
import shutil
import socket
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fleetctl.errors import SandboxError
from fleetctl.inventory.config import Agent, Bastion, Inventory, write_atomically
from fleetctl.sandbox import netns, sshd
from fleetctl.ssh.known_hosts import fingerprint
from fleetctl.telemetry.gpu_tools import DEFAULT_QUERIES

STATE_FILE = "sandbox.json"
MODES = ("ok", "driver_error", "no_gpus", "no_tool", "mig", "refused", "blackhole", "hung",
         # Hostile hosts (see gpusim.py): what a broken or malicious tool can print.
         "hostile_names", "hostile_error", "nul_bytes", "invalid_utf8", "huge_name", "million_rows", "endless")
ZONES = ("direct", "lan", "deep")
EXTRA_TOOLS = ("nvidia-smi", "rocm-smi", "amd-smi")
MODELS = {"nvidia": ("NVIDIA H100 80GB HBM3", 81559), "amd": ("Arcturus GL-XL [Instinct MI100]", 32752)}


@dataclass
class HostSpec:
    name: str
    vendor: str = "nvidia"
    gpus: int = 2
    zone: str = "direct"  # direct, lan (one bastion away) or deep (two bastions away)
    mode: str = "ok"
    labels: dict[str, str] = field(default_factory=dict)
    busy: list[int] = field(default_factory=list)  # GPUs a foreign process is using
    extra_tools: list[str] = field(default_factory=list)  # more simulated tools on PATH, e.g. ["amd-smi"]

    def __post_init__(self) -> None:
        # A mistyped mode or zone would otherwise quietly give a healthy host in the wrong place.
        for what, value, allowed in (("mode", self.mode, MODES), ("vendor", self.vendor, tuple(MODELS)),
                                     ("zone", self.zone, ZONES)):
            if value not in allowed:
                raise SandboxError(f"sandbox host {self.name!r}: unknown {what} {value!r}",
                                   hint=f"use one of {', '.join(allowed)}")
        for tool in self.extra_tools:
            if tool not in EXTRA_TOOLS:
                raise SandboxError(f"sandbox host {self.name!r}: gpusim does not simulate {tool!r}",
                                   hint=f"use one of {', '.join(EXTRA_TOOLS)}")

    @property
    def tool(self) -> str:
        return "nvidia-smi" if self.vendor == "nvidia" else "rocm-smi"


def default_hosts(count: int) -> list[HostSpec]:
    """gpu-1 (NVIDIA, direct), gpu-2 (AMD, direct), gpu-3 behind the bastion, and so on."""
    hosts = []
    for number in range(1, count + 1):
        vendor = "amd" if number % 3 == 2 else "nvidia"
        zone = "lan" if number % 3 == 0 else "direct"
        # An AMD host has amd-smi beside rocm-smi, as ROCm 6 and later install them: health is read through it.
        hosts.append(HostSpec(f"gpu-{number}", vendor, gpus=4 if zone == "lan" else 2, zone=zone,
                              labels={"gpu_type": "mi100" if vendor == "amd" else "h100"},
                              extra_tools=["amd-smi"] if vendor == "amd" else []))
    return hosts


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Sandbox:
    """``up()`` starts it, ``down()`` stops every process by PID and removes the namespaces."""

    def __init__(self, directory: Path, hosts: list[HostSpec] | None = None, *,
                 use_netns: bool | None = None) -> None:
        self.directory = Path(directory).absolute()
        self.use_netns = netns.available() if use_netns is None else use_netns
        self.hosts = hosts if hosts is not None else default_hosts(3)
        self.topology: netns.Topology | None = None
        self.pids: dict[str, int] = {}
        self.endpoints: dict[str, tuple[str, int]] = {}
        self._refusing: list[socket.socket] = []  # ports of "refused" hosts, held until down()
        self.fingerprints: dict[str, str] = {}

    # -- paths -------------------------------------------------------------------------------
    @property
    def client_key(self) -> Path:
        return self.directory / "id_ed25519"

    @property
    def inventory_path(self) -> Path:
        return self.directory / "ssh-agents.toml"

    def host_dir(self, name: str) -> Path:
        return self.directory / "hosts" / name

    def spec_file(self, name: str) -> Path:
        return self.host_dir(name) / "gpusim.json"

    # -- lifecycle ---------------------------------------------------------------------------
    def bastions(self) -> list[tuple[str, str]]:
        """(name, zone) of the bastions this fleet needs: one per zone boundary crossed."""
        zones = {h.zone for h in self.hosts}
        needed = []
        if zones & {"lan", "deep"}:
            needed.append(("bastion-1", "dmz" if self.use_netns else "direct"))
        if "deep" in zones:
            needed.append(("bastion-2", "lan" if self.use_netns else "direct"))
        return needed

    def up(self) -> Sandbox:
        if (self.directory / STATE_FILE).exists():
            raise SandboxError(f"a sandbox already runs in {self.directory}",
                               hint=f"run `fleetctl sandbox down --dir {self.directory}` first")
        sshd.sshd_binary()
        if not self.use_netns and any(h.mode == "blackhole" for h in self.hosts):
            raise SandboxError("a black-holed host needs network namespaces", hint="run as root with iproute2")
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        sshd.keygen(self.client_key, "fleetctl-sandbox")
        authorized = self.directory / "authorized_keys"
        shutil.copyfile(self.client_key.with_suffix(".pub"), authorized)
        gpusim = self.directory / "gpusim.py"
        shutil.copyfile(Path(__file__).with_name("gpusim.py"), gpusim)
        try:
            if self.use_netns:
                self.topology = netns.create()
            self._save_state()
            numbers = {"lan": 1, "deep": 0}
            for name, zone in self.bastions():
                address, numbers = self._address_for(zone, numbers)
                self._start(name, zone, address, forwarding=True, tool_dirs=[])
            for host in self.hosts:
                self._write_spec(host)
                if host.mode == "refused":
                    self.endpoints[host.name] = ("127.0.0.1", self._refusing_port())
                    continue
                if host.mode == "blackhole":
                    assert self.topology is not None
                    self.endpoints[host.name] = (self.topology.blackhole_address, 22)
                    continue
                address, numbers = self._address_for(host.zone, numbers)
                bin_dir = self.host_dir(host.name) / "bin"
                self._start(host.name, host.zone, address, forwarding=False, tool_dirs=[bin_dir])
            self._save_state()
            self.write_inventory()
        except BaseException:
            self.down()
            raise
        return self

    def _address_for(self, zone: str, numbers: dict[str, int]) -> tuple[tuple[str, int], dict[str, int]]:
        if self.topology is None or zone == "direct":
            return ("127.0.0.1", _free_port()), numbers
        if zone == "dmz":
            return (self.topology.dmz_address, 22), numbers
        address = self.topology.zone_address(zone, numbers[zone])
        self.topology.add_address(zone, address)
        return (address, 22), {**numbers, zone: numbers[zone] + 1}

    def _start(self, name: str, zone: str, endpoint: tuple[str, int], *, forwarding: bool,
               tool_dirs: list[Path]) -> None:
        directory = self.host_dir(name)
        # Each simulated host gets a home of its own, so the controller machine's shell profile
        # (sourced by bash on every SSH exec) neither slows nor alters the hosts.
        (directory / "home").mkdir(parents=True, exist_ok=True)
        # A temp dir of its own too: job directories and the kept shell's files stay in the sandbox
        # (removed with it), and two sandboxes on one machine never see each other's jobs.
        (directory / "tmp").mkdir(mode=0o700, exist_ok=True)
        host_key = directory / "ssh_host_ed25519_key"
        sshd.keygen(host_key, f"fleetctl-sandbox-{name}")
        blob = host_key.with_suffix(".pub").read_text().split()[1]
        self.fingerprints[name] = fingerprint(base64.b64decode(blob))
        spec = sshd.SshdSpec(name=name, listen=[endpoint], host_key=host_key,
                             authorized_keys=self.directory / "authorized_keys", path_dirs=tool_dirs,
                             environment={"HOME": str(directory / "home"), "TMPDIR": str(directory / "tmp"),
                                          "FLEETCTL_GPUSIM_SPEC": str(self.spec_file(name)),
                                          "FLEETCTL_SANDBOX_HOST": name},
                             allow_forwarding=forwarding)
        self.pids[name] = sshd.start(spec, self.directory, netns.exec_prefix(self.topology, zone))
        self.endpoints[name] = endpoint
        self._save_state()

    def _write_spec(self, host: HostSpec) -> None:
        directory = self.host_dir(host.name)
        (directory / "bin").mkdir(parents=True, exist_ok=True)
        model, memory = MODELS[host.vendor]
        self.write_host_state(host.name, {"vendor": host.vendor, "model": model, "count": host.gpus,
                                          "memory_total_mib": memory, "mode": host.mode, "busy": host.busy,
                                          "seed": sum(map(ord, host.name))})
        # A journalctl that prints the simulated kernel log (gpusim.py: kernel_log), ahead of the real one.
        tools = ["journalctl"] if host.mode == "no_tool" else [host.tool, *host.extra_tools, "journalctl"]
        for tool in tools:
            wrapper = directory / "bin" / tool
            wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} -S -I {self.directory / "gpusim.py"} '
                               f'{tool} "$@"\n')
            wrapper.chmod(0o755)

    def write_host_state(self, name: str, state: dict[str, Any]) -> None:
        """Change a simulated host's GPUs (mode, busy GPUs...) while the sandbox runs."""
        write_atomically(self.spec_file(name), json.dumps(state), mode=0o644)

    def host_state(self, name: str) -> dict[str, Any]:
        return dict(json.loads(self.spec_file(name).read_text()))

    def _save_state(self) -> None:
        state = {"hosts": [asdict(h) for h in self.hosts], "use_netns": self.use_netns, "pids": self.pids,
                 "endpoints": self.endpoints, "fingerprints": self.fingerprints,
                 "topology": self.topology.to_dict() if self.topology else None}
        write_atomically(self.directory / STATE_FILE, json.dumps(state, indent=1))

    @classmethod
    def load(cls, directory: Path) -> Sandbox:
        state_file = Path(directory) / STATE_FILE
        try:
            state = json.loads(state_file.read_text())
        except FileNotFoundError:
            raise SandboxError(f"no sandbox in {directory}", hint="start one with `fleetctl sandbox up`") from None
        sandbox = cls(Path(directory), [HostSpec(**h) for h in state["hosts"]], use_netns=state["use_netns"])
        sandbox.pids = {k: int(v) for k, v in state["pids"].items()}
        sandbox.endpoints = {k: (v[0], int(v[1])) for k, v in state["endpoints"].items()}
        sandbox.fingerprints = state["fingerprints"]
        sandbox.topology = netns.Topology.from_dict(state["topology"]) if state["topology"] else None
        return sandbox

    def stop_host(self, name: str) -> None:
        """Stop one host's sshd (and its connections), as if the machine went away."""
        pid = self.pids.pop(name, None)
        if pid is not None:
            sshd.stop(pid)
            self._save_state()

    def restart_host(self, name: str) -> None:
        """Start a stopped host's (or bastion's) sshd again on the same address, as if the machine came back."""
        bastion_zones = dict(self.bastions())
        if name in bastion_zones:
            self._start(name, bastion_zones[name], self.endpoints[name], forwarding=True, tool_dirs=[])
            return
        host = next(h for h in self.hosts if h.name == name)
        self._start(name, host.zone, self.endpoints[name], forwarding=False, tool_dirs=[self.host_dir(name) / "bin"])

    def _refusing_port(self) -> int:
        """A port bound but never listened on, held while this object lives: connecting is refused,
        and no other process (another sandbox's sshd) can take the port in the meantime."""
        held = socket.socket()
        held.bind(("127.0.0.1", 0))
        self._refusing.append(held)
        return int(held.getsockname()[1])

    def down(self) -> None:
        sshd.stop_all(list(self.pids.values()))  # all signalled first, then one wait: 50 hosts in ~1 s
        self.pids.clear()
        for held in self._refusing:
            held.close()
        self._refusing.clear()
        if self.topology is not None:
            netns.destroy(self.topology)
            self.topology = None
        (self.directory / STATE_FILE).unlink(missing_ok=True)

    # -- inventory ---------------------------------------------------------------------------
    def _bastion_chain(self, zone: str) -> Bastion | None:
        user = getpass.getuser()
        chain: Bastion | None = None
        crossed = {"direct": 0, "lan": 1, "deep": 2}[zone]
        for name, _ in self.bastions()[:crossed]:
            host, port = self.endpoints[name]
            chain = Bastion(hostname=host, ssh_port=port, ssh_user=user, ssh_key_path=str(self.client_key),
                            host_key_fingerprint=self.fingerprints[name], bastion=chain)
        return chain

    def agents(self) -> list[Agent]:
        agents = []
        for host in self.hosts:
            hostname, port = self.endpoints[host.name]
            fields: dict[str, Any] = {
                "name": host.name, "hostname": hostname, "ssh_port": port, "ssh_user": getpass.getuser(),
                "ssh_key_path": str(self.client_key), "labels": {"vendor": host.vendor, **host.labels},
                "connect_timeout_s": 3.0, "command_timeout_s": 10.0,
            }
            if host.mode != "no_tool":
                fields["gpu_query_cmd"] = DEFAULT_QUERIES[host.tool]
            if host.name in self.fingerprints:
                fields["host_key_fingerprint"] = self.fingerprints[host.name]
            bastion = self._bastion_chain(host.zone)
            if bastion is not None:
                fields["bastion"] = bastion
            agents.append(Agent(**fields))
        return agents

    def write_inventory(self) -> Path:
        inventory = Inventory(self.inventory_path, [], {})
        for agent in self.agents():
            inventory.upsert(agent)
        inventory.save()
        return self.inventory_path


def sandbox_dir(state_dir: Path) -> Path:
    return state_dir / "sandbox"


__all__ = ["MODES", "HostSpec", "Sandbox", "default_hosts", "sandbox_dir"]

