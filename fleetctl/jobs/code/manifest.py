"""A snapshot's manifest and the archive a host builds a job's tree from (pure: no I/O).

A file is stored by the sha256 of its content. On a host its blob is named by its *key*: the sha256,
with ``.x`` when the file is executable. A job's tree shares its files' storage with the host's cache
(hard links), and files that share storage share their mode, so an executable and a plain file with
the same content need two blobs; every other permission bit is the cache's (read-only, owner only).
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
import re
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass

KEY = re.compile(r"^[0-9a-f]{64}(\.x)?$")
SHA256 = re.compile(r"^[0-9a-f]{64}$")
TREE_DIR = "code"  # the job's tree, in its job directory
WANT_MEMBER = "code.want"  # the keys the tree needs, one a line: what the host is asked about
BLOBS_LINK = ".blobs"  # in the job directory while the tree is built: the blobs its hard links point at
FORMAT_VERSION = 1
_UNSAFE_CHARS = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True)
class Entry:
    """One file or symlink of the tree. ``path`` is posix, relative to the code directory."""

    path: str
    mode: int = 0o644  # permission bits as found
    sha256: str = ""  # a file's content
    size: int = 0
    target: str = ""  # a symlink's target, relative to its own directory; empty for a file

    @property
    def is_link(self) -> bool:
        return bool(self.target)

    @property
    def executable(self) -> bool:
        return bool(self.mode & 0o100)

    @property
    def key(self) -> str:
        """The blob's name in a host's cache."""
        return self.sha256 + (".x" if self.executable else "")


@dataclass(frozen=True)
class Manifest:
    entries: tuple[Entry, ...]

    @property
    def files(self) -> list[Entry]:
        return [e for e in self.entries if not e.is_link]

    @property
    def total_bytes(self) -> int:
        return sum(e.size for e in self.files)

    def blobs(self) -> dict[str, Entry]:
        """One entry per key the tree needs (the first path with it), in key order."""
        found: dict[str, Entry] = {}
        for entry in self.files:
            found.setdefault(entry.key, entry)
        return dict(sorted(found.items()))

    def to_json(self) -> bytes:
        """Canonical: the same tree always gives the same bytes, so the same digest."""
        rows = [[e.path, e.mode, e.sha256, e.size, e.target] for e in sorted(self.entries, key=lambda e: e.path)]
        return json.dumps({"version": FORMAT_VERSION, "entries": rows}, separators=(",", ":")).encode()

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.to_json()).hexdigest()

    @classmethod
    def from_json(cls, data: bytes) -> Manifest:
        document = json.loads(data)
        if document.get("version") != FORMAT_VERSION:
            raise ValueError(f"manifest version {document.get('version')!r} is not {FORMAT_VERSION}")
        entries = tuple(Entry(path, mode, sha, size, target) for path, mode, sha, size, target in document["entries"])
        for entry in entries:
            problem = unsafe_path(entry.path) or (link_escapes(entry.path, entry.target) if entry.is_link else None)
            if problem or (not entry.is_link and not SHA256.match(entry.sha256)):
                raise ValueError(f"manifest entry {entry.path!r}: {problem or 'not a sha256'}")
        return cls(entries)


def unsafe_path(path: str) -> str | None:
    """Why ``path`` (posix, relative) cannot be a name on a host, or None. Control characters
    (newlines included) break line-based listings and terminals; ``..``, absolute paths and empty
    parts could reach outside the job's tree; names that are not UTF-8 cannot be stored as text."""
    if not path or path.startswith("/"):
        return "an absolute or empty path"
    if _UNSAFE_CHARS.search(path):
        return "a control character (a newline?) in the name"
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return "a name that is not valid UTF-8"
    if any(part in ("", ".", "..") for part in path.split("/")):
        return "an empty, '.' or '..' part"
    return None


def link_escapes(path: str, target: str) -> str | None:
    """Why the symlink ``path`` -> ``target`` would point outside the tree, or None (lexically:
    the snapshot already resolved it, and this holds on the host too)."""
    if target.startswith("/"):
        return f"it points to the absolute path {target}"
    if _UNSAFE_CHARS.search(target):
        return "a control character in its target"
    resolved = posixpath.normpath(posixpath.join(posixpath.dirname(path), target))
    if resolved == ".." or resolved.startswith("../"):
        return f"it points outside the directory ({target})"
    return None


def tree_archive(manifest: Manifest) -> bytes:
    """The tar the host extracts in the job directory: ``code.want`` (the keys), then the tree as
    hard links to ``.blobs/<key>`` (the host points ``.blobs`` at its cache or at copies) and symlinks.
    Every name in it was checked by :func:`unsafe_path` and the host's tar refuses ``..`` as well."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT, encoding="utf-8") as archive:
        want = "".join(f"{key}\n" for key in manifest.blobs()).encode()
        _add(archive, WANT_MEMBER, tarfile.REGTYPE, 0o600, data=want)
        _add(archive, TREE_DIR, tarfile.DIRTYPE, 0o700)
        for entry in sorted(manifest.entries, key=lambda e: e.path):
            name = f"{TREE_DIR}/{entry.path}"
            if entry.is_link:
                _add(archive, name, tarfile.SYMTYPE, 0o777, link=entry.target)
            else:
                _add(archive, name, tarfile.LNKTYPE, 0o500 if entry.executable else 0o400, link=f"{BLOBS_LINK}/{entry.key}")
    return buffer.getvalue()


def _add(archive: tarfile.TarFile, name: str, kind: bytes, mode: int, *, link: str = "", data: bytes = b"") -> None:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.linkname, info.size, info.mtime = kind, mode, link, len(data), 0
    archive.addfile(info, io.BytesIO(data) if data else None)


def blob_archive(members: Iterable[tuple[str, int, bytes]]) -> bytes:
    """A tar of blobs (name, mode, content) for a host's cache: ``<key>`` or ``<key>.part.NNNNNN``."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as archive:
        for name, mode, data in members:
            _add(archive, name, tarfile.REGTYPE, mode, data=data)
    return buffer.getvalue()
