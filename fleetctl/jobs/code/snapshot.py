"""Taking a snapshot of a code directory at submit: walk it with git's ignore rules, refuse what
cannot travel safely, check the size limit before reading any content, hash every file and keep
each new content in the state dir's :class:`~fleetctl.jobs.code.store.CodeStore`.

Refused, each with one line naming the path: a symlink that resolves outside the directory (its
target would not exist on the host, or would be a file the user never meant to send), a fifo, socket
or device (no content to send; reading a fifo blocks), and a name a host cannot take safely
(:func:`~fleetctl.jobs.code.manifest.unsafe_path`). Ignored paths are never looked at, so an ignored
fifo or a build directory full of symlinks costs nothing."""

from __future__ import annotations

import contextlib
import json
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fleetctl.errors import CodeError
from fleetctl.jobs.code.ignores import IgnoreRules, listdir_sorted, read_lines, rules_for
from fleetctl.jobs.code.manifest import Entry, Manifest, link_escapes, unsafe_path
from fleetctl.jobs.code.progress import CodeProgress, current
from fleetctl.jobs.code.store import CodeStore, file_digest, human_bytes
from fleetctl.jobs.model import CodeRef

BIGGEST_NAMED = 3
RACY_NS = 2_000_000_000
HASH_CACHE_ENTRIES = 500_000
FIX = "leave it out with a line in .fleetctlignore"


@dataclass(frozen=True)
class Found:
    """A file or symlink the walk keeps, before its content is hashed."""

    path: str
    source: Path
    mode: int
    size: int = 0
    target: str = ""
    stamp: tuple[int, int, int, int] = (0, 0, 0, 0)  # size, mtime_ns, ctime_ns, inode: unchanged file, same stamp


class HashCache:
    """The sha256 of files as last hashed, by absolute path and stamp, as git's index keeps them: a
    re-submit of an unchanged tree reads no content. A file whose modification time was within
    :data:`RACY_NS` of its hashing is always hashed again (it may have changed within the clock's
    granularity without its stamp changing), and an entry whose blob is gone is ignored."""

    def __init__(self, path: Path, entries: dict[str, list[Any]]) -> None:
        self.path = path
        self.entries = entries
        self.changed = False

    @classmethod
    def load(cls, path: Path) -> HashCache:
        try:
            entries = json.loads(path.read_bytes())
        except (OSError, ValueError):
            entries = {}
        return cls(path, entries if isinstance(entries, dict) else {})

    def get(self, item: Found) -> str | None:
        known = self.entries.get(str(item.source))
        if not isinstance(known, list) or len(known) != 3:
            return None
        stamp, digest, hashed_at = known
        if list(item.stamp) != stamp or not isinstance(digest, str) or hashed_at - item.stamp[1] < RACY_NS:
            return None
        return digest

    def put(self, item: Found, digest: str, hashed_at: int) -> None:
        self.entries[str(item.source)] = [list(item.stamp), digest, hashed_at]
        self.changed = True

    def save(self) -> None:
        """Atomically, and never fatal: it is only a cache (two submits at once: the last one's is kept)."""
        if not self.changed:
            return
        if len(self.entries) > HASH_CACHE_ENTRIES:  # bounded: the most recently hashed files stay
            newest = sorted(self.entries.items(), key=lambda item: item[1][2] if isinstance(item[1], list) else 0)
            self.entries = dict(newest[-HASH_CACHE_ENTRIES:])
        with contextlib.suppress(OSError):
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            temporary.write_text(json.dumps(self.entries, separators=(",", ":")))
            os.replace(temporary, self.path)


def walk(directory: Path) -> list[Found]:
    """Every path a snapshot of ``directory`` holds, in path order; raises :class:`CodeError` on the first unsafe one."""
    root = _root(directory)
    real_root = os.path.realpath(root)
    rules, prefix = rules_for(root)
    found: list[Found] = []
    pending: list[tuple[str, IgnoreRules]] = [("", rules)]
    while pending:
        relative_dir, outer = pending.pop()
        absolute_dir = root / relative_dir if relative_dir else root
        level = outer.below(prefix + relative_dir, read_lines(absolute_dir))
        try:
            entries = listdir_sorted(str(absolute_dir))
        except OSError as exc:
            raise _refuse(root, relative_dir.rstrip("/") or ".", f"cannot be read ({exc.strerror})") from None
        subdirectories = []
        for entry in entries:
            relative = relative_dir + entry.name
            try:
                info = entry.stat(follow_symlinks=False)
            except OSError as exc:
                raise _refuse(root, relative, f"cannot be read ({exc.strerror})") from None
            is_dir = stat.S_ISDIR(info.st_mode)
            if level.decide(prefix + relative, is_dir):
                continue
            problem = unsafe_path(relative)
            if problem:
                raise _refuse(root, relative, f"{problem}: it cannot be sent to a host safely")
            if is_dir:
                subdirectories.append((relative + "/", level))
            elif stat.S_ISLNK(info.st_mode):
                found.append(Found(relative, Path(entry.path), 0o777, target=_link_target(root, real_root, relative, entry.path)))
            elif stat.S_ISREG(info.st_mode):
                found.append(Found(relative, Path(entry.path), stat.S_IMODE(info.st_mode), info.st_size,
                                   stamp=(info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_ino)))
            else:
                raise _refuse(root, relative, f"is {_kind(info.st_mode)}, not a file: it has no content to send")
        pending.extend(reversed(subdirectories))
    return sorted(found, key=lambda f: f.path)


def _root(directory: Path) -> Path:
    root = Path(directory).expanduser().absolute()
    if not root.is_dir():
        why = "does not exist" if not root.exists() else "is not a directory"
        raise CodeError(f"--code {directory}: {why}", hint="give the directory the job's code is in")
    return root


def _link_target(root: Path, real_root: str, relative: str, absolute: str) -> str:
    """The symlink's target, made relative to its own directory; refused if it resolves outside."""
    raw = os.readlink(absolute)
    resolved = os.path.realpath(absolute)
    if resolved != real_root and not resolved.startswith(real_root.rstrip("/") + "/"):
        raise _refuse(root, relative, f"is a symlink to {raw}, outside the directory: its target would not travel")
    target = os.path.relpath(resolved, os.path.realpath(os.path.dirname(absolute)))
    problem = link_escapes(relative, Path(target).as_posix())
    if problem:
        raise _refuse(root, relative, f"is a symlink that {problem}")
    return Path(target).as_posix()


def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a fifo"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "a special file"


def _refuse(root: Path, relative: str, why: str) -> CodeError:
    shown = relative.encode("utf-8", "backslashreplace").decode("utf-8")
    return CodeError(f"--code {root}: {shown!r} {why}", hint=FIX)


def check_size(root: Path, found: list[Found], max_bytes: int) -> None:
    """Over ``max_bytes`` in all: one line naming the biggest paths (before any content is read)."""
    total = sum(f.size for f in found)
    if total <= max_bytes:
        return
    biggest = sorted(found, key=lambda f: f.size, reverse=True)[:BIGGEST_NAMED]
    named = ", ".join(f"{f.path} ({human_bytes(f.size)})" for f in biggest)
    raise CodeError(f"--code {root}: {human_bytes(total)} in {len(found)} files is over the limit of "
                    f"{human_bytes(max_bytes)}; biggest: {named}",
                    hint="leave them out with lines in .fleetctlignore, or raise [controller] code_max_bytes")


def take_snapshot(directory: str | os.PathLike[str], store: CodeStore, max_bytes: int,
                  progress: CodeProgress | None = None) -> CodeRef:
    """Walk, check, hash and keep ``directory``; the job's reference to its snapshot."""
    root = _root(Path(directory))
    found = walk(root)
    check_size(root, found, max_bytes)
    progress = progress or current()
    files = [f for f in found if not f.target]
    progress.start(f"snapshot of {root}", sum(f.size for f in files), len(files))
    entries = []
    hashes = HashCache.load(store.root / "hash-cache.json")
    try:
        for item in found:
            if item.target:
                entries.append(Entry(item.path, item.mode, target=item.target))
                continue
            try:
                known = hashes.get(item)
                if known is not None and store.has(known):  # unchanged since it was hashed, and kept: not read again
                    digest, size = known, item.size
                else:
                    hashed_at = time.time_ns()
                    digest, size = file_digest(item.source)
                    if not store.has(digest):
                        store.put(item.source, digest)
                    hashes.put(item, digest, hashed_at)
            except OSError as exc:
                raise _refuse(root, item.path, f"cannot be read ({exc.strerror})") from None
            entries.append(Entry(item.path, item.mode, digest, size))
            progress.advance(size, 1)
    finally:
        progress.finish()
    hashes.save()
    manifest = Manifest(tuple(entries))
    check_size(root, [Found(e.path, root, e.mode, e.size) for e in manifest.files], max_bytes)  # grown meanwhile?
    store.put_manifest(manifest)
    return CodeRef(manifest=manifest.digest, files=len(manifest.files), bytes=manifest.total_bytes, source=str(root))
