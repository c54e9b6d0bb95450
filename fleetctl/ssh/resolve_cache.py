"""``ssh -G``'s answers kept between processes, so a cron heartbeat from cold asks OpenSSH again only
about what changed (each ``ssh -G`` is an exec of a few milliseconds of CPU: at 300 hosts it was most of
a first round's cost).

An answer is kept under a key made of everything ``ssh -G`` reads: its command line; the ssh binary
(path, inode, size, mtime); every config file it may read (the user's config under both the passwd home
and ``$HOME``, or the ``-F`` file; the system config; and, recursively, every file any ``Include`` line
names, whether or not its block matches), each by its content, a missing one as missing; the
environment variables the files name (``${VAR}``); the local user, uid, homes and hostname (the ``%u``
``%i`` ``%d`` ``%l`` tokens). Change any of it and the key changes, so the answer is asked again.

Nothing is kept when a file has a ``Match`` line (``exec``, ``localnetwork`` and friends depend on the
moment) or canonicalises hostnames (DNS), or names its includes with tokens: those are asked every time,
as before. Entries are small JSON files (mode 0600, in a 0700 folder of the state dir), each used for at
most :data:`MAX_AGE_S`; an unreadable, corrupt or stale one is simply asked again.
"""

from __future__ import annotations

import contextlib
import getpass
import glob
import hashlib
import json
import os
import pwd
import re
import socket
import tempfile
import time
from pathlib import Path

from fleetctl.errors import ConfigError
from fleetctl.ssh.config_file import SYSTEM_CONFIG, split_args

ANSWERS_DIR = "ssh-answers"  # under the state dir
MAX_AGE_S = 7 * 86400.0
MAX_FILES = 256  # a runaway Include glob: past this, the config is not kept (asked every time)
_FORMAT = 1
_INCLUDE = re.compile(r"^\s*include(?:\s*=\s*|\s+)(.*)$", re.IGNORECASE)
# Answers that depend on the moment (Match exec/localnetwork...), on DNS, or on tokens in an Include.
_UNKEEPABLE = re.compile(r"^\s*(match|canonicalizehostname)(\s|=|$)", re.IGNORECASE)
_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _passwd_home() -> str:
    try:
        return pwd.getpwuid(os.getuid()).pw_dir
    except KeyError:
        return str(Path.home())


def _user_bases() -> list[Path]:
    """Where ~/.ssh is: OpenSSH reads the passwd home; fleetctl's own reader reads $HOME."""
    return list(dict.fromkeys([Path(_passwd_home()), Path.home()]))


def config_digest(config_file: Path | None) -> str | None:
    """A digest of every input of ``ssh -G`` but its command line, or None when its answers must not be kept."""
    if config_file is not None and str(config_file) == "none":
        roots: list[tuple[Path, list[Path]]] = []
    elif config_file is not None:
        roots = [(config_file, [base / ".ssh" for base in _user_bases()])]
    else:
        roots = [(base / ".ssh" / "config", [base / ".ssh"]) for base in _user_bases()]
        roots.append((SYSTEM_CONFIG, [SYSTEM_CONFIG.parent]))
    files: dict[str, str | None] = {}
    names: set[str] = set()
    pending = list(roots)
    while pending:
        path, bases = pending.pop(0)
        if str(path) in files:
            continue
        if len(files) >= MAX_FILES:
            return None
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            files[str(path)] = None
            continue
        except OSError:
            return None  # a file ssh may read and we cannot: ask ssh every time
        files[str(path)] = hashlib.sha256(data).hexdigest()
        text = data.decode("utf-8", "replace")
        for number, line in enumerate(text.splitlines(), 1):
            if _UNKEEPABLE.match(line):
                return None
            names.update(_ENV.findall(line))
            found = _INCLUDE.match(line)
            if found is None:
                continue
            try:
                patterns = split_args(found.group(1), f"{path}:{number}")
            except ConfigError:
                return None
            for pattern in patterns:
                if "%" in pattern or "$" in pattern:
                    return None
                for match in _expand(pattern, bases):
                    pending.append((match, bases))
    material = {
        "format": _FORMAT, "files": sorted(files.items(), key=lambda item: item[0]),
        "env": {name: os.environ.get(name) for name in sorted(names)},
        "user": getpass.getuser(), "uid": os.getuid(), "homes": [str(b) for b in _user_bases()],
        "hostname": socket.gethostname(),
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()


def _expand(pattern: str, bases: list[Path]) -> list[Path]:
    """The files an Include pattern names, as ssh globs them (relative to ~/.ssh or /etc/ssh), plus the
    pattern itself when nothing matches, so a file that appears later changes the digest."""
    if pattern.startswith("~"):
        candidates = [str(base.parent / pattern[2:]) if pattern.startswith("~/") else os.path.expanduser(pattern)
                      for base in bases]
    elif pattern.startswith("/"):
        candidates = [pattern]
    else:
        candidates = [str(base / pattern) for base in bases]
    found: list[Path] = []
    for candidate in dict.fromkeys(candidates):
        matches = sorted(glob.glob(candidate))
        found += [Path(m) for m in matches] if matches else [Path(candidate)]
    return found


class AnswerCache:
    """``ssh -G`` answers in ``directory``, one file per key; every failure to read or write is a miss."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._pruned = False

    @staticmethod
    def key(digest: str, binary: str, command: list[str]) -> str | None:
        try:
            stat = os.stat(binary)
        except OSError:
            return None
        material = [digest, binary, stat.st_ino, stat.st_size, stat.st_mtime_ns, command]
        return hashlib.sha256(json.dumps(material).encode()).hexdigest()

    def get(self, key: str) -> dict[str, list[str]] | None:
        path = self.directory / f"{key}.json"
        try:
            if time.time() - path.stat().st_mtime > MAX_AGE_S:
                return None
            values = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(values, dict) or not all(
                isinstance(v, list) and all(isinstance(item, str) for item in v) for v in values.values()):
            return None
        return values

    def put(self, key: str, values: dict[str, list[str]]) -> None:
        with contextlib.suppress(OSError):
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(self.directory, 0o700)  # a folder made looser by hand holds config details: tightened
            handle, temporary = tempfile.mkstemp(dir=self.directory, prefix=".answer-")
            try:
                with os.fdopen(handle, "w") as out:
                    json.dump(values, out)
                os.replace(temporary, self.directory / f"{key}.json")
            except OSError:
                with contextlib.suppress(OSError):
                    os.unlink(temporary)
                raise
            if not self._pruned:
                self._pruned = True
                self._prune()

    def _prune(self) -> None:
        cutoff = time.time() - MAX_AGE_S
        for entry in self.directory.glob("*.json"):
            with contextlib.suppress(OSError):
                if entry.stat().st_mtime < cutoff:
                    entry.unlink()
