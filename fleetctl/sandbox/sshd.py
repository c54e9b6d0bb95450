"""Real OpenSSH ``sshd`` processes for the sandbox: configure, start detached, wait, stop by PID."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from fleetctl.errors import SandboxError

INSTALL_HINT = "install it with `sudo apt-get install -y openssh-server` (Debian/Ubuntu)"


def sshd_binary() -> str:
    found = shutil.which("sshd") or next(
        (p for p in ("/usr/sbin/sshd", "/usr/local/sbin/sshd") if os.access(p, os.X_OK)), None)
    if not found:
        raise SandboxError("OpenSSH server (sshd) is not installed", hint=INSTALL_HINT)
    return found


def keygen(path: Path, comment: str) -> None:
    """An ed25519 key pair without a passphrase, as ``ssh-keygen`` makes it."""
    if path.exists():
        return
    keygen_bin = shutil.which("ssh-keygen")
    if not keygen_bin:
        raise SandboxError("ssh-keygen is not installed", hint="install openssh-client")
    subprocess.run([keygen_bin, "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
                   check=True, capture_output=True)


def _listen(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


@dataclass
class SshdSpec:
    name: str
    listen: list[tuple[str, int]]
    host_key: Path
    authorized_keys: Path
    path_dirs: list[Path]
    environment: dict[str, str]
    allow_forwarding: bool = False
    extra_host_keys: list[Path] = field(default_factory=list)  # a host serving several key types
    extra_config: list[str] = field(default_factory=list)  # e.g. TrustedUserCAKeys for certificate tests


def render_config(spec: SshdSpec) -> str:
    path = ":".join([*(str(p) for p in spec.path_dirs), "/usr/local/bin", "/usr/bin", "/bin"])
    env = " ".join(f"{k}={v}" for k, v in {"PATH": path, **spec.environment}.items())
    lines = [f"ListenAddress {_listen(a, p)}" for a, p in spec.listen] + [
        f"HostKey {spec.host_key}",
        *(f"HostKey {key}" for key in spec.extra_host_keys),
        "PidFile none",
        f"AuthorizedKeysFile {spec.authorized_keys}",
        # The sandbox dir lives wherever the user asked; sshd's ownership checks would refuse it.
        "StrictModes no",
        "UsePAM no",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "PubkeyAuthentication yes",
        "PermitRootLogin prohibit-password",
        f"AllowTcpForwarding {'yes' if spec.allow_forwarding else 'no'}",
        "Subsystem sftp internal-sftp",
        "UseDNS no",
        # Bastions keep OpenSSH's defaults (MaxStartups 10:30:100, MaxSessions 10), as real ones do:
        # fleetctl must share its connections to them. Simulated GPU hosts take many logins at once
        # (a test's several fleets on one sandbox).
        *([] if spec.allow_forwarding else ["MaxStartups 1000:30:2000", "MaxSessions 100"]),
        "LogLevel INFO",
        f"SetEnv {env}",
        *spec.extra_config,
    ]
    return "\n".join(lines) + "\n"


def start(spec: SshdSpec, workdir: Path, prefix: list[str], timeout: float = 10.0) -> int:
    """Start sshd in the foreground of its own session (so it outlives this CLI); return its PID."""
    binary = sshd_binary()
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # privilege separation dir
    config = workdir / f"sshd_{spec.name}.conf"
    log = workdir / f"sshd_{spec.name}.log"
    config.write_text(render_config(spec))
    with open(log, "wb") as log_handle:
        process = subprocess.Popen([*prefix, binary, "-D", "-e", "-f", str(config)], stdin=subprocess.DEVNULL,
                                   stdout=log_handle, stderr=log_handle, start_new_session=True)
    wanted = {f"Server listening on {a} port {p}." for a, p in spec.listen}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace")
        if all(w in text for w in wanted):
            return process.pid
        if process.poll() is not None:
            tail = (text.strip().splitlines() or ["(no output)"])[-1]
            raise SandboxError(f"sshd for {spec.name} exited at start: {tail}", hint=f"see {log}")
        time.sleep(0.02)
    stop(process.pid)
    raise SandboxError(f"sshd for {spec.name} did not start listening within {timeout:g}s", hint=f"see {log}")


def _process_table() -> tuple[dict[int, list[int]], dict[int, str]]:
    """children by parent PID, and each PID's command name, from one scan of /proc."""
    children: dict[int, list[int]] = {}
    names: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        parent = int(stat[stat.rindex(")") + 2 :].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
        names[int(entry.name)] = name
    return children, names


def _sshd_descendants(root: int, table: tuple[dict[int, list[int]], dict[int, str]] | None = None) -> list[int]:
    """sshd processes below ``root``: each connection's handler calls setsid(), so signalling the
    listener's group alone would leave established sessions running."""
    children, names = table or _process_table()
    found, stack = [], [root]
    while stack:
        for child in children.get(stack.pop(), []):
            stack.append(child)
            if names.get(child, "").startswith("sshd"):
                found.append(child)
    return found


def _signal(pid: int, sig: int) -> None:
    # sshd was started as a session leader, so its group holds the per-connection children too.
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def running(pid: int) -> bool:
    """Whether ``pid`` still runs. Our own child is reaped here; any other process counts as gone
    once it is a zombie: an sshd left by an earlier ``sandbox up`` has init (or nobody) as its
    parent, may never be reaped, and ``os.kill(pid, 0)`` succeeds on a zombie."""
    try:
        finished, _ = os.waitpid(pid, os.WNOHANG)
        return not finished
    except ChildProcessError:
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:  # no /proc to read: fall back to existence, which a zombie passes
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    return stat[stat.rindex(")") + 2 :].split()[0] not in ("Z", "X")


def stop_all(pids: list[int], grace: float = 3.0) -> None:
    """SIGTERM to every sshd and its connections at once, then one shared wait, then SIGKILL for
    any left after ``grace`` s; gone already is fine. So 50 hosts stop in about the time of one.
    Programs started over SSH are left running, as they would be on a real host."""
    table = _process_table()
    for pid in pids:
        connections = _sshd_descendants(pid, table)
        _signal(pid, signal.SIGTERM)
        for child in connections:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)
    left = list(pids)
    deadline = time.monotonic() + grace
    while True:
        left = [pid for pid in left if running(pid)]
        if not left or time.monotonic() >= deadline:
            break
        time.sleep(0.02)
    for pid in left:
        _signal(pid, signal.SIGKILL)
    for pid in left:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)


def stop(pid: int, grace: float = 3.0) -> None:
    """Stop one sshd as :func:`stop_all` does."""
    stop_all([pid], grace)
