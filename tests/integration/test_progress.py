"""Progress on a terminal only: the CLI run under a real pseudo-terminal draws a bar (heartbeat,
``agents import``) or a spinner (``register-ssh``) on stderr; with pipes it writes nothing extra."""

from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fleetctl.sandbox import HostSpec, Sandbox
from tests.conftest import require_sshd, run_cli

HOSTS = ["gpu-a", "gpu-b", "gpu-c"]
BAR = "━"  # rich's bar glyph
ESC = "\x1b["


@dataclass
class Run:
    returncode: int
    stdout: str
    terminal: str  # everything written to the pseudo-terminal


def run_on_tty(*args: str, stdout_tty: bool = False, timeout: float = 60) -> Run:
    """``fleetctl ARGS`` with stderr (and with ``stdout_tty`` stdout too) on a 120-column pseudo-terminal."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "TTY_INTERACTIVE", "TTY_COMPATIBLE", "COLUMNS")}
    env["TERM"] = "xterm-256color"
    process = subprocess.Popen([sys.executable, "-m", "fleetctl", *args], stdin=subprocess.DEVNULL,
                               stdout=slave if stdout_tty else subprocess.PIPE, stderr=slave, env=env)
    os.close(slave)
    chunks: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the last writer closed the terminal
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        stdout, _ = process.communicate(timeout=timeout)
    finally:
        reader.join(timeout=10)
        os.close(master)
    return Run(process.returncode, (stdout or b"").decode(), b"".join(chunks).decode("utf-8", "replace"))


@pytest.fixture(scope="module")
def small_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    require_sshd()
    sandbox = Sandbox(tmp_path_factory.mktemp("progress"), [HostSpec(name) for name in HOSTS])
    sandbox.up()
    yield sandbox
    sandbox.down()


def test_first_heartbeat_round_shows_a_bar_on_a_terminal_only(small_fleet: Sandbox, tmp_path: Path) -> None:
    common = ("--config", str(small_fleet.inventory_path), "--state-dir", str(tmp_path / "state"))
    on_tty = run_on_tty("heartbeat", *common)
    assert on_tty.returncode == 0, on_tty
    assert "heartbeat" in on_tty.terminal and BAR in on_tty.terminal and "3/3" in on_tty.terminal
    assert all(name in on_tty.stdout for name in HOSTS)  # the table, on stdout
    assert ESC not in on_tty.stdout and BAR not in on_tty.stdout  # stdout (a pipe) stays clean

    piped = run_cli("heartbeat", *common)
    assert piped.returncode == 0, piped.stderr
    assert piped.stderr == ""
    assert BAR not in piped.stdout and ESC not in piped.stdout
    forced = run_cli("heartbeat", *common, env={"FORCE_COLOR": "1"})  # set by many CI systems: still no bar
    assert forced.returncode == 0 and forced.stderr == ""


def test_agents_import_shows_progress_per_host(small_fleet: Sandbox, tmp_path: Path) -> None:
    workers = tmp_path / "workers.txt"
    workers.write_text("".join(f"root@{host}:{port}\n" for host, port in (small_fleet.endpoints[n] for n in HOSTS))
                       + "root@127.0.0.1:1\n")  # refused: reported above the bar, the rest still imported
    key = str(small_fleet.client_key)

    def common(where: str) -> tuple[str, ...]:
        return ("--config", str(tmp_path / where / "ssh-agents.toml"), "--state-dir", str(tmp_path / where / "state"))

    on_tty = run_on_tty("agents", "import", str(workers), "--key", key, *common("tty"), stdout_tty=True)
    assert on_tty.returncode == 1, on_tty  # one host failed
    assert "import" in on_tty.terminal and BAR in on_tty.terminal and "4/4" in on_tty.terminal
    assert on_tty.terminal.count("added ") == 3 and "127.0.0.1:1" in on_tty.terminal

    piped = run_cli("agents", "import", str(workers), "--key", key, *common("piped"))
    assert piped.returncode == 1
    assert piped.stdout.count("added ") == 3
    assert len(piped.stderr.splitlines()) == 1 and "127.0.0.1:1" in piped.stderr  # the failure, nothing else
    assert BAR not in piped.stderr + piped.stdout and ESC not in piped.stderr + piped.stdout


def test_register_ssh_shows_a_spinner_on_a_terminal_only(small_fleet: Sandbox, tmp_path: Path) -> None:
    host, port = small_fleet.endpoints["gpu-a"]
    args = ("register-ssh", "--host", f"root@{host}:{port}", "--key", str(small_fleet.client_key))
    on_tty = run_on_tty(*args, "--config", str(tmp_path / "a.toml"), "--state-dir", str(tmp_path / "a"))
    assert on_tty.returncode == 0, on_tty
    assert f"registering root@{host}:{port}" in on_tty.terminal
    assert on_tty.stdout.startswith("added ")

    piped = run_cli(*args, "--config", str(tmp_path / "b.toml"), "--state-dir", str(tmp_path / "b"))
    assert piped.returncode == 0, piped.stderr
    assert piped.stderr == "" and "registering" not in piped.stdout
