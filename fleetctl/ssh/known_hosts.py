"""known_hosts files read as OpenSSH reads them (hostfile.c), and fleetctl's own trust-on-first-use file.

Names are matched like ``match_hostname``: comma lists, ``*``/``?`` wildcards, ``!`` negation (a
negated match vetoes the line), case-insensitive, ``[host]:port`` for ports other than 22, and
hashed ``|1|salt|hmac`` entries. ``@revoked`` lines are never accepted; ``@cert-authority`` lines
are CA keys, never host keys (paramiko cannot check host certificates, so the plain key is judged).
Every verdict carries the ``file:line`` it rests on, so an error can point at the line to fix.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import hmac
import os
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from fleetctl.ssh.config_file import wildcard_match

Verdict = Literal["ok", "revoked", "changed", "other_type", "unknown"]


def fingerprint(key_blob: bytes) -> str:
    """``SHA256:...`` exactly as ``ssh-keygen -lf`` prints it."""
    digest = hashlib.sha256(key_blob).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def host_id(hostname: str, port: int) -> str:
    """The name OpenSSH files a host under: ``host`` on port 22, ``[host]:port`` otherwise."""
    return hostname if port == 22 else f"[{hostname}]:{port}"


def hashed_name(name: str, salt: bytes | None = None) -> str:
    """``|1|salt|hmac`` as ``ssh-keygen -H`` and HashKnownHosts write it."""
    salt = salt or secrets.token_bytes(20)
    digest = hmac.new(salt, name.encode(), hashlib.sha1).digest()
    return f"|1|{base64.b64encode(salt).decode()}|{base64.b64encode(digest).decode()}"


@dataclass(frozen=True)
class KnownKey:
    key_type: str
    blob: bytes

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.blob)


@dataclass(frozen=True)
class KnownLine:
    """One key line of a known_hosts file."""

    path: str
    line: int
    marker: str | None  # "revoked", "cert-authority" or None
    patterns: str
    key: KnownKey

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"


@dataclass(frozen=True)
class Judgement:
    verdict: Verdict
    lines: tuple[KnownLine, ...] = ()  # the lines the verdict rests on

    @property
    def where(self) -> str:
        return ", ".join(line.where for line in self.lines)


def name_matches(patterns: str, name: str) -> bool:
    """Does a known_hosts host field match ``name`` (already ``[host]:port`` when port != 22)?"""
    if patterns.startswith("|1|"):
        try:
            _, _, salt_b64, hash_b64 = patterns.split("|", 3)
            salt, expected = base64.b64decode(salt_b64), base64.b64decode(hash_b64)
        except (ValueError, TypeError):
            return False
        return hmac.compare_digest(hmac.new(salt, name.encode(), hashlib.sha1).digest(), expected)
    subject = name.lower()
    matched = False
    for pattern in patterns.lower().split(","):
        negated = pattern.startswith("!")
        pattern = pattern[1:] if negated else pattern
        if pattern and wildcard_match(subject, pattern):
            if negated:
                return False
            matched = True
    return matched


def parse_lines(path: Path) -> list[KnownLine]:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    entries: list[KnownLine] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        parts = raw.split()
        if not parts or parts[0].startswith("#"):
            continue
        marker = None
        if parts[0].startswith("@"):
            marker = parts[0][1:].lower()
            parts = parts[1:]
            if marker not in ("revoked", "cert-authority"):
                continue  # an unknown marker: OpenSSH skips the line
        if len(parts) < 3:
            continue
        try:
            blob = base64.b64decode(parts[2], validate=True)
        except ValueError:
            continue
        entries.append(KnownLine(str(path), number, marker, parts[0], KnownKey(parts[1], blob)))
    return entries


class KnownHosts:
    """fleetctl's own known_hosts (``path``, where first contacts are recorded) and the files
    OpenSSH would read (``read_only``: UserKnownHostsFile, GlobalKnownHostsFile). Parsed files are
    cached by mtime and size, so a heartbeat does not re-read them."""

    def __init__(self, path: Path, read_only: list[Path] | None = None) -> None:
        self.path = path
        self.read_only = list(read_only or [])
        self._lock = threading.Lock()
        self._cache: dict[Path, tuple[tuple[int, int], list[KnownLine]]] = {}

    @classmethod
    def default(cls, state_dir: Path) -> KnownHosts:
        home = Path.home() / ".ssh"
        return cls(state_dir / "known_hosts", [home / "known_hosts", home / "known_hosts2",
                                              Path("/etc/ssh/ssh_known_hosts"), Path("/etc/ssh/ssh_known_hosts2")])

    def _entries(self, path: Path) -> list[KnownLine]:
        try:
            stat = path.stat()
        except OSError:
            return []
        stamp = (stat.st_mtime_ns, stat.st_size)
        with self._lock:
            cached = self._cache.get(path)
        if cached and cached[0] == stamp:
            return cached[1]
        entries = parse_lines(path)
        with self._lock:
            self._cache[path] = (stamp, entries)
        return entries

    def files(self, extra: tuple[Path, ...] = ()) -> list[Path]:
        """fleetctl's file first, then ``extra`` (a hop's own ssh_config files) or the defaults."""
        others = list(extra) if extra else self.read_only
        return [self.path, *(p for p in dict.fromkeys(others) if p != self.path)]

    def lines_for(self, name: str, extra: tuple[Path, ...] = ()) -> list[KnownLine]:
        return [line for path in self.files(extra) for line in self._entries(path) if name_matches(line.patterns, name)]

    def lookup(self, name: str, extra: tuple[Path, ...] = ()) -> list[KnownKey]:
        """Plain host keys known for ``name`` (not revoked, not CA keys)."""
        return [line.key for line in self.lines_for(name, extra) if line.marker is None]

    def known_types(self, name: str, extra: tuple[Path, ...] = ()) -> list[str]:
        return list(dict.fromkeys(key.key_type for key in self.lookup(name, extra)))

    def judge(self, name: str, key: KnownKey, extra: tuple[Path, ...] = ()) -> Judgement:
        """OpenSSH's check_key_in_hostkeys over every file: revoked beats everything, then any
        exact match is ok, then a different key of the same type means changed."""
        lines = self.lines_for(name, extra)
        revoked = [line for line in lines if line.marker == "revoked" and line.key.blob == key.blob]
        if revoked:
            return Judgement("revoked", tuple(revoked))
        plain = [line for line in lines if line.marker is None]
        if any(line.key.blob == key.blob for line in plain):
            return Judgement("ok", tuple(line for line in plain if line.key.blob == key.blob))
        same_type = [line for line in plain if line.key.key_type == key.key_type]
        if same_type:
            return Judgement("changed", tuple(same_type))
        if plain:
            return Judgement("other_type", tuple(plain))
        return Judgement("unknown")

    def record(self, name: str, key: KnownKey, *, hashed: bool = False) -> None:
        """Append one line to fleetctl's file, under a lock so parallel first contacts never interleave."""
        shown = hashed_name(name) if hashed else name
        self._append(f"{shown} {key.key_type} {base64.b64encode(key.blob).decode()}\n")

    def replace(self, name: str, key: KnownKey, *, hashed: bool = False) -> int:
        """``agents trust``: drop fleetctl's own plain lines for ``name``, record ``key``. Returns
        the lines dropped. Other files are never touched."""
        with self._lock:
            kept, dropped = [], 0
            try:
                lines = self.path.read_text(encoding="utf-8").splitlines(keepends=True)
            except FileNotFoundError:
                lines = []
            for raw in lines:
                parts = raw.split()
                if parts and not parts[0].startswith(("#", "@")) and name_matches(parts[0], name):
                    dropped += 1
                    continue
                kept.append(raw)
            temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            temporary.write_text("".join(kept), encoding="utf-8")
            os.chmod(temporary, 0o600)
            os.replace(temporary, self.path)
            self._cache.pop(self.path, None)
        self.record(name, key, hashed=hashed)
        return dropped

    def _append(self, line: str) -> None:
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                os.write(fd, line.encode())
            finally:
                os.close(fd)
