"""Trust on first use, OpenSSH style, without paramiko.

fleetctl keeps its own ``known_hosts`` (OpenSSH format, so ``ssh-keygen -F`` reads it) in the
state dir and also consults the user's ``~/.ssh/known_hosts`` read-only. A host seen for the first
time is recorded (like ``StrictHostKeyChecking=accept-new``); a host offering a different key is
refused by the caller.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import hmac
import os
import threading
from dataclasses import dataclass
from pathlib import Path


def fingerprint(key_blob: bytes) -> str:
    """``SHA256:...`` exactly as ``ssh-keygen -lf`` prints it."""
    digest = hashlib.sha256(key_blob).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def host_id(hostname: str, port: int) -> str:
    """The name OpenSSH files a host under: ``host`` on port 22, ``[host]:port`` otherwise."""
    return hostname if port == 22 else f"[{hostname}]:{port}"


@dataclass(frozen=True)
class KnownKey:
    key_type: str
    blob: bytes

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.blob)


def _matches(pattern: str, name: str) -> bool:
    if pattern.startswith("|1|"):
        try:
            salt_b64, hash_b64 = pattern[3:].split("|", 1)
            salt, expected = base64.b64decode(salt_b64), base64.b64decode(hash_b64)
        except (ValueError, TypeError):
            return False
        return hmac.compare_digest(hmac.new(salt, name.encode(), hashlib.sha1).digest(), expected)
    return name in pattern.split(",")


def _parse(path: Path) -> list[tuple[str, KnownKey]]:
    entries: list[tuple[str, KnownKey]] = []
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return entries
    for line in lines:
        parts = line.split()
        if len(parts) < 3 or parts[0].startswith("#"):
            continue
        if parts[0].startswith("@"):  # @revoked / @cert-authority: not host keys we can pin
            continue
        try:
            blob = base64.b64decode(parts[2], validate=True)
        except ValueError:
            continue
        entries.append((parts[0], KnownKey(parts[1], blob)))
    return entries


class KnownHosts:
    """fleetctl's own known_hosts file plus read-only ones (the user's)."""

    def __init__(self, path: Path, read_only: list[Path] | None = None) -> None:
        self.path = path
        self.read_only = list(read_only or [])
        self._lock = threading.Lock()
        self._cache: dict[Path, tuple[tuple[int, int], list[tuple[str, KnownKey]]]] = {}

    @classmethod
    def default(cls, state_dir: Path) -> KnownHosts:
        return cls(state_dir / "known_hosts", [Path.home() / ".ssh" / "known_hosts"])

    def _entries(self, path: Path) -> list[tuple[str, KnownKey]]:
        try:
            stat = path.stat()
        except OSError:
            return []
        stamp = (stat.st_mtime_ns, stat.st_size)
        cached = self._cache.get(path)
        if cached and cached[0] == stamp:
            return cached[1]
        entries = _parse(path)
        self._cache[path] = (stamp, entries)
        return entries

    def lookup(self, name: str) -> list[KnownKey]:
        found: list[KnownKey] = []
        for path in [self.path, *self.read_only]:
            found.extend(key for pattern, key in self._entries(path) if _matches(pattern, name))
        return found

    def record(self, name: str, key: KnownKey) -> None:
        """Append one line, under a lock so parallel first contacts never interleave."""
        line = f"{name} {key.key_type} {base64.b64encode(key.blob).decode()}\n"
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                os.write(fd, line.encode())
            finally:
                os.close(fd)
