"""A private PostgreSQL cluster for the sandbox and the tests: ``initdb`` + ``pg_ctl`` in a directory
of its own, on a free loopback port, trust auth on 127.0.0.1 only and no Unix socket, stopped by PID.

PostgreSQL refuses to run as root, so as root the cluster runs as a system user (``fleetctl-pg``,
created when missing, else ``nobody``) and its files live in a private temp dir owned by that user:
the sandbox dir under root's home is not reachable by anyone else. ``postgres.json`` in the
directory given records where, so ``stop`` (``sandbox down``) finds it from another process."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import tomli_w

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

from fleetctl.errors import FleetError, SandboxError
from fleetctl.inventory.config import write_atomically

STATE_FILE = "postgres.json"
SERVICE_USER = "fleetctl-pg"
DATABASE = "fleetctl"
START_TIMEOUT_S = 60
# A throwaway cluster: durability settings off (a crash loses it anyway), small memory, loopback only.
_SETTINGS = """
listen_addresses = '127.0.0.1'
port = {port}
unix_socket_directories = ''
fsync = off
synchronous_commit = off
full_page_writes = off
shared_buffers = 32MB
max_connections = 200
log_min_messages = warning
"""
_HBA = "# fleetctl's private cluster: loopback TCP only, no passwords (nothing else can reach it)\nhost all all 127.0.0.1/32 trust\n"


class PostgresMissing(SandboxError):
    """No PostgreSQL server binaries (initdb, pg_ctl) on this machine."""


def bindir() -> Path | None:
    """Where ``initdb`` and ``pg_ctl`` are: ``pg_config --bindir``, PATH, or Debian's versioned dirs."""
    candidates: list[str] = []
    if shutil.which("pg_config"):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            candidates.append(subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True,
                                             timeout=10).stdout.strip())
    if shutil.which("initdb"):
        candidates.append(str(Path(str(shutil.which("initdb"))).parent))
    # Highest version first; the numeric sort puts 9.6 below 15.
    debian = glob.glob("/usr/lib/postgresql/*/bin")
    candidates += sorted(debian, key=lambda d: [int(p) for p in Path(d).parent.name.split(".") if p.isdigit()], reverse=True)
    for directory in candidates:
        if directory and (Path(directory) / "initdb").is_file() and (Path(directory) / "pg_ctl").is_file():
            return Path(directory)
    return None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _service_user() -> pwd.struct_passwd | None:
    """The user the server runs as: None (ourselves) unless we are root."""
    if os.geteuid() != 0:
        return None
    with contextlib.suppress(KeyError):
        return pwd.getpwnam(SERVICE_USER)
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        subprocess.run(["useradd", "--system", "--no-create-home", "--user-group", "--shell", "/usr/sbin/nologin",
                        SERVICE_USER], capture_output=True, timeout=30, check=True)
    try:
        return pwd.getpwnam(SERVICE_USER)
    except KeyError:
        return pwd.getpwnam("nobody")  # useradd missing or refused: a user with no rights is enough


@dataclass
class _State:
    root: str  # holds data/ and postgres.log
    port: int
    user: str | None
    temporary: bool  # root is a temp dir of ours, removed at stop


class PostgresCluster:
    """``start()`` returns it running with an empty database ``fleetctl``; ``stop()`` stops it by PID
    and removes its files. ``url`` is what ``[controller] store`` takes."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.state: _State | None = None

    @property
    def url(self) -> str:
        return self.url_for(DATABASE)

    def url_for(self, database: str) -> str:
        if self.state is None:
            raise FleetError("the PostgreSQL cluster is not running", hint="start it first")
        return f"postgresql://{DATABASE}@127.0.0.1:{self.state.port}/{database}"

    @property
    def pid(self) -> int | None:
        """The postmaster's PID, from its pid file (None when it is not running)."""
        if self.state is None:
            return None
        try:
            return int((Path(self.state.root) / "data" / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None

    # -- start ------------------------------------------------------------------------------
    def start(self) -> PostgresCluster:
        binaries = bindir()
        if binaries is None:
            raise PostgresMissing("PostgreSQL's server (initdb, pg_ctl) is not installed",
                                  hint="apt-get install postgresql (scripts/bootstrap.sh --with-postgres does it)")
        if (self.directory / STATE_FILE).exists():
            raise FleetError(f"a PostgreSQL cluster already runs for {self.directory}", hint="stop it first (sandbox down)")
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        user = _service_user()
        root = Path(tempfile.mkdtemp(prefix="fleetctl-pg-")) if user else self.directory / "postgres"
        root.mkdir(exist_ok=True, mode=0o700)
        if user:
            os.chown(root, user.pw_uid, user.pw_gid)
        self.state = _State(str(root), 0, user.pw_name if user else None, temporary=user is not None)
        try:
            self._run(binaries / "initdb", "-D", str(root / "data"), "-U", DATABASE, "--auth=trust",
                      "-E", "UTF8", "--locale=C", "--no-instructions")
            (root / "data" / "pg_hba.conf").write_text(_HBA)
            for _attempt in range(3):  # the free port can be taken between the probe and the bind
                self.state.port = _free_port()
                with open(root / "data" / "postgresql.conf", "a") as conf:
                    conf.write(_SETTINGS.format(port=self.state.port))
                started = self._run(binaries / "pg_ctl", "start", "-D", str(root / "data"), "-l", str(root / "postgres.log"),
                                    "-w", "-t", str(START_TIMEOUT_S), check=False)
                if started.returncode == 0:
                    break
            else:
                log = (root / "postgres.log").read_text(errors="replace")[-2000:] if (root / "postgres.log").exists() else ""
                raise FleetError(f"PostgreSQL did not start in {root}: {started.stderr.strip()} {log.strip()}")
            self._run(binaries / "createdb", "-h", "127.0.0.1", "-p", str(self.state.port), "-U", DATABASE, DATABASE)
            write_atomically(self.directory / STATE_FILE, json.dumps(asdict(self.state)))
        except BaseException:
            self.stop()
            raise
        return self

    def _run(self, *args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
        assert self.state is not None
        user = pwd.getpwnam(self.state.user) if self.state.user else None
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "PGTZ": "UTC"}
        # stdout to DEVNULL: the postmaster inherits it, and a pipe would keep this call waiting.
        result = subprocess.run([str(a) for a in args], cwd=self.state.root, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=START_TIMEOUT_S + 30,
                                user=user.pw_uid if user else None, group=user.pw_gid if user else None,
                                extra_groups=[] if user else None)
        if check and result.returncode != 0:
            raise FleetError(f"{Path(str(args[0])).name} failed: {' '.join(result.stderr.split())}")
        return result

    def create_database(self, name: str) -> str:
        """A new empty database in this cluster (for a test that needs its own); its URL."""
        binaries = bindir()
        assert binaries is not None and self.state is not None
        self._run(binaries / "createdb", "-h", "127.0.0.1", "-p", str(self.state.port), "-U", DATABASE, name)
        return self.url_for(name)

    # -- stop -------------------------------------------------------------------------------
    @classmethod
    def load(cls, directory: Path) -> PostgresCluster | None:
        """The cluster started for ``directory`` by any process, or None if none runs."""
        cluster = cls(directory)
        try:
            cluster.state = _State(**json.loads((Path(directory) / STATE_FILE).read_text()))
        except (OSError, ValueError, TypeError):
            return None
        return cluster

    def stop(self) -> None:
        """``pg_ctl stop -m fast``; a postmaster still alive after it is killed by the PID in its pid
        file. Then its files go. Safe to call twice, and on a cluster that never started."""
        if self.state is None:
            return
        pid = self.pid
        binaries = bindir()
        if pid is not None and binaries is not None:
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                self._run(binaries / "pg_ctl", "stop", "-D", str(Path(self.state.root) / "data"), "-m", "fast",
                          "-w", "-t", "30", check=False)
        if pid is not None and _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)  # its children exit when the postmaster is gone
            _wait_gone(pid, 10)
        shutil.rmtree(self.state.root, ignore_errors=True)
        (self.directory / STATE_FILE).unlink(missing_ok=True)
        self.state = None


def set_inventory_store(inventory: Path, url: str) -> None:
    """Put ``[controller] store = URL`` at the top of a sandbox inventory (only ``[[agents]]`` in it)."""
    text = inventory.read_text(encoding="utf-8") if inventory.exists() else ""
    if set(tomllib.loads(text)) - {"agents"}:
        # A header put above top-level keys or another [controller] would change what they mean.
        raise FleetError(f"{inventory} holds more than [[agents]]", hint=f"set store = {url!r} in its [controller] table by hand")
    write_atomically(inventory, tomli_w.dumps({"controller": {"store": url}}) + "\n" + text)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours answers signal 0 too; it is gone for our purposes once reaped.
    with contextlib.suppress(ChildProcessError):
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    return True


def _wait_gone(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
