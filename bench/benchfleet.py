"""A bench fleet: many sshd processes, each listening on several loopback ports, one host per port,
optionally all behind one bastion sshd; and the baseline of the reference design (one OpenSSH
``ssh`` client process per step)."""

from __future__ import annotations

import base64
import getpass
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fleetctl.inventory.config import Agent, Bastion, Inventory
from fleetctl.sandbox import sshd
from fleetctl.sandbox.sandbox import _free_port
from fleetctl.ssh.known_hosts import fingerprint
from fleetctl.telemetry.gpu_tools import DEFAULT_QUERIES
from fleetctl.telemetry.parsers.nvidia_health import health_query_fields, parse_help_query_gpu

MAX_PORTS_PER_SSHD = 16


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def rss_mib() -> float:
    return _status_mib("VmRSS")


def peak_rss_mib() -> float:
    return _status_mib("VmHWM")


class BenchFleet:
    def __init__(self, directory: Path, count: int, ports_per_sshd: int = 10, gpus: int = 4, bastion: bool = False) -> None:
        self.directory = directory
        self.count = count
        self.ports_per_sshd = max(1, min(ports_per_sshd, count, MAX_PORTS_PER_SSHD))
        self.gpus = gpus
        self.pids: list[int] = []
        self.hosts: list[tuple[str, int, str]] = []  # (name, port, host key fingerprint)
        self.host_keys: dict[int, str] = {}  # port -> "ssh-ed25519 AAAA..."
        # With ``bastion``, one more sshd that every host is reached through (it forwards to
        # 127.0.0.1:PORT). It keeps OpenSSH's default MaxStartups 10:30:100 and MaxSessions 10, as
        # real bastions do: a client that logs in to it once per host gets connections dropped.
        self.bastion = bastion
        self.bastion_port: int | None = None

    @property
    def bastion_log(self) -> Path:
        return self.directory / "sshd_bastion.log"

    def bastion_logins(self) -> int:
        """Logins the bastion's sshd accepted so far (its log, LogLevel INFO)."""
        if not self.bastion_log.exists():
            return 0
        return self.bastion_log.read_text(errors="replace").count("Accepted publickey")

    @property
    def client_key(self) -> Path:
        return self.directory / "id_ed25519"

    def _tool_dir(self) -> Path:
        """A cached capture behind an ``sh`` wrapper: the host side costs a ``cat``, not a Python start."""
        bin_dir = self.directory / "bin"
        bin_dir.mkdir()
        spec = self.directory / "gpusim.json"
        spec.write_text(f'{{"vendor": "nvidia", "count": {self.gpus}, "model": "NVIDIA H100 80GB HBM3", '
                        '"memory_total_mib": 81559, "mode": "ok", "seed": 7}')
        simulator = Path(sshd.__file__).with_name("gpusim.py")

        def capture(*args: str) -> str:
            return subprocess.run([sys.executable, str(simulator), "nvidia-smi", *args], check=True, text=True,
                                  capture_output=True, env={**os.environ, "FLEETCTL_GPUSIM_SPEC": str(spec)}).stdout

        (self.directory / "nvidia-smi.out").write_text(capture(*DEFAULT_QUERIES["nvidia-smi"].split()[1:]))
        # GPU health (issue 22): the help, and the health query with the fields a host learns from it.
        help_text = capture("--help-query-gpu")
        (self.directory / "help.out").write_text(help_text)
        fields = [*health_query_fields(parse_help_query_gpu(help_text)), "driver_version"]
        (self.directory / "health.out").write_text(capture(f"--query-gpu={','.join(fields)}", "--format=csv,nounits"))
        wrapper = bin_dir / "nvidia-smi"
        wrapper.write_text(f'#!/bin/sh\ncase "$*" in\n  *--help-query-gpu*) exec cat {self.directory / "help.out"};;\n'
                           f'  *pci.bus_id*) exec cat {self.directory / "health.out"};;\n'
                           f'  *) exec cat {self.directory / "nvidia-smi.out"};;\nesac\n')
        wrapper.chmod(0o755)
        # A kernel journal with nothing new after the first read: what a healthy host's beats see.
        journal = bin_dir / "journalctl"
        journal.write_text('#!/bin/sh\ncase "$*" in *--after-cursor*) ;; *) echo "-- cursor: s=bench;i=1";; esac\n')
        journal.chmod(0o755)
        return bin_dir

    def up(self) -> BenchFleet:
        sshd.keygen(self.client_key, "fleetctl-bench")
        shutil.copyfile(self.client_key.with_suffix(".pub"), self.directory / "authorized_keys")
        bin_dir = self._tool_dir()
        home = self.directory / "home"
        home.mkdir()
        # The heartbeat scans ${TMPDIR:-/tmp} for job directories. An empty TMPDIR of the fleet's own:
        # the machine's /tmp holds whatever job directories other runs left (dozens on a shared box),
        # and each would add a line, a shell write and an SSH packet to every heartbeat.
        (self.directory / "tmp").mkdir()
        servers = -(-self.count // self.ports_per_sshd)
        ports: set[int] = set()
        while len(ports) < servers * self.ports_per_sshd + self.bastion:  # distinct, chosen before any sshd binds
            ports.add(_free_port())
        chosen = sorted(ports)
        if self.bastion:
            self.bastion_port = chosen.pop()
        groups = [chosen[n * self.ports_per_sshd:(n + 1) * self.ports_per_sshd] for n in range(servers)]
        try:
            with ThreadPoolExecutor(8) as pool:
                started = list(pool.map(lambda n: self._start(n, groups[n], bin_dir, home), range(servers)))
            if self.bastion_port is not None:
                self._start_bastion(self.bastion_port)
        except BaseException:
            self.down()
            raise
        for pid, listening, key_line in started:
            self.pids.append(pid)
            blob = base64.b64decode(key_line.split()[1])
            for port in listening:
                self.hosts.append((f"h{len(self.hosts) + 1:04d}", port, fingerprint(blob)))
                self.host_keys[port] = key_line
        del self.hosts[self.count:]
        return self

    def _start(self, number: int, ports: list[int], bin_dir: Path, home: Path) -> tuple[int, list[int], str]:
        host_key = self.directory / f"ssh_host_{number}"
        sshd.keygen(host_key, f"bench-{number}")
        spec = sshd.SshdSpec(name=f"s{number}", listen=[("127.0.0.1", p) for p in ports], host_key=host_key,
                             authorized_keys=self.directory / "authorized_keys", path_dirs=[bin_dir],
                             environment={"HOME": str(home), "TMPDIR": str(self.directory / "tmp")})
        pid = sshd.start(spec, self.directory, [])
        return pid, ports, " ".join(host_key.with_suffix(".pub").read_text().split()[:2])

    def _start_bastion(self, port: int) -> None:
        host_key = self.directory / "ssh_host_bastion"
        sshd.keygen(host_key, "bench-bastion")
        # allow_forwarding: AllowTcpForwarding yes, and no MaxStartups/MaxSessions lines (OpenSSH's defaults).
        spec = sshd.SshdSpec(name="bastion", listen=[("127.0.0.1", port)], host_key=host_key,
                             authorized_keys=self.directory / "authorized_keys", path_dirs=[], environment={},
                             allow_forwarding=True)
        self.pids.append(sshd.start(spec, self.directory, []))
        # Pinned like a host's: in the agents' [agents.bastion] and in the peers' known_hosts.
        self.host_keys[port] = " ".join(host_key.with_suffix(".pub").read_text().split()[:2])

    def bastion_hop(self) -> Bastion | None:
        """What every agent names as its bastion (``[agents.bastion]``), its host key pinned."""
        if self.bastion_port is None:
            return None
        blob = base64.b64decode(self.host_keys[self.bastion_port].split()[1])
        return Bastion(hostname="127.0.0.1", ssh_port=self.bastion_port, ssh_user=getpass.getuser(),
                       ssh_key_path=str(self.client_key), host_key_fingerprint=fingerprint(blob))

    def inventory(self) -> Inventory:
        bastion = self.bastion_hop()
        agents = [Agent(name=name, hostname="127.0.0.1", ssh_port=port, ssh_user=getpass.getuser(),
                        ssh_key_path=str(self.client_key), host_key_fingerprint=fp, bastion=bastion,
                        gpu_query_cmd=DEFAULT_QUERIES["nvidia-smi"], connect_timeout_s=30, command_timeout_s=60)
                  for name, port, fp in self.hosts]
        return Inventory(self.directory / "ssh-agents.toml", agents, {})

    def known_hosts_file(self) -> Path:
        path = self.directory / "known_hosts"
        path.write_text("".join(f"[127.0.0.1]:{port} {key}\n" for port, key in self.host_keys.items()))
        return path

    def ssh_command(self, port: int, remote: str) -> list[str]:
        """What the reference design runs: a fresh OpenSSH client (and handshake) per step."""
        return ["ssh", "-F", "/dev/null", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
                "-o", f"UserKnownHostsFile={self.known_hosts_file()}", "-i", str(self.client_key),
                "-p", str(port), f"{getpass.getuser()}@127.0.0.1", remote]

    def down(self) -> None:
        pids, self.pids = self.pids, []
        sshd.stop_all(pids)

    # A running fleet described for a client in another process (bench/heartbeat.py measures each
    # client in its own process). The description has no PIDs: only the process that started the
    # fleet stops it.
    def save(self, path: Path) -> Path:
        path.write_text(json.dumps({"directory": str(self.directory), "count": self.count,
                                    "ports_per_sshd": self.ports_per_sshd, "gpus": self.gpus,
                                    "hosts": self.hosts, "host_keys": {str(k): v for k, v in self.host_keys.items()},
                                    "bastion_port": self.bastion_port}))
        return path

    @classmethod
    def attach(cls, path: Path) -> BenchFleet:
        spec = json.loads(path.read_text())
        bench = cls(Path(spec["directory"]), spec["count"], spec["ports_per_sshd"], spec["gpus"],
                    bastion=spec.get("bastion_port") is not None)
        bench.hosts = [(name, port, fp) for name, port, fp in spec["hosts"]]
        bench.host_keys = {int(k): v for k, v in spec["host_keys"].items()}
        bench.bastion_port = spec.get("bastion_port")
        return bench


def ssh_baseline(bench: BenchFleet, remote: str, sample: int, parallel: int = 32) -> dict[str, float]:
    """One ``ssh`` process per heartbeat over ``sample`` hosts, ``parallel`` at a time."""
    commands = [bench.ssh_command(port, remote) for _, port, _ in bench.hosts[:sample]]

    def run(argv: list[str]) -> None:
        subprocess.run(argv, check=True, capture_output=True, stdin=subprocess.DEVNULL, timeout=120)
    run(commands[0])  # warm the page cache for the ssh binary
    cpu0, wall0 = children_cpu_seconds(), time.monotonic()
    with ThreadPoolExecutor(parallel) as pool:
        list(pool.map(run, commands))
    wall = time.monotonic() - wall0
    return {"beats_per_s": sample / wall, "cpu_ms": (children_cpu_seconds() - cpu0) / sample * 1000,
            "sample": float(sample)}
