"""The controller's side of code snapshots: content-addressed blobs and manifests in the state dir.

Why a copy here rather than the code directory read again at dispatch: a job runs the code as it was
when it was submitted. A dispatch may come hours later (a queue, ``--after``, a retry on another
host), and by then the user has edited, switched branches or deleted the directory; read again and
checked against the hashes, such a job could only fail. The copy costs one blob per distinct content
(a re-submit of an unchanged tree adds nothing) and is pruned once no job that may still dispatch
names it. The copy lives with the submitting state dir: a controller elsewhere (another machine on a
shared PostgreSQL store) has no snapshot to send, and the job fails saying so.

    <state-dir>/code/blobs/ab/abcdef...   file contents, read-only
    <state-dir>/code/manifests/<sha256>   manifests (JSON, see manifest.py)
    <state-dir>/code/trees/<sha256>.tgz   each manifest's tree archive, as sent to hosts
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from fleetctl.errors import CodeError
from fleetctl.jobs.code.manifest import Manifest, tree_archive

CHUNK = 1024 * 1024


def file_digest(path: Path | str) -> tuple[str, int]:
    """sha256 (hex) and length of a file's content, read once."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(CHUNK), b""):
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size


def human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(count) < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} GiB"


class CodeStore:
    def __init__(self, state_dir: Path) -> None:
        self.root = Path(state_dir) / "code"

    def blob_path(self, sha256: str) -> Path:
        return self.root / "blobs" / sha256[:2] / sha256

    def manifest_path(self, digest: str) -> Path:
        return self.root / "manifests" / digest

    def has(self, sha256: str) -> bool:
        """Present; its time is renewed, so a prune running meanwhile keeps it (it is in use again)."""
        try:
            os.utime(self.blob_path(sha256))
            return True
        except FileNotFoundError:
            return False

    def put(self, source: Path, sha256: str) -> None:
        """Copy ``source`` in as ``sha256``, hashing what is copied: a file that changed since it was
        hashed is refused (its snapshot would not be what was hashed)."""
        target = self.blob_path(sha256)
        target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        temporary = target.with_name(f".{sha256}.{os.getpid()}.tmp")
        digest = hashlib.sha256()
        try:
            with open(source, "rb") as reader, open(temporary, "wb") as writer:
                for block in iter(lambda: reader.read(CHUNK), b""):
                    digest.update(block)
                    writer.write(block)
            if digest.hexdigest() != sha256:
                raise CodeError(f"{source} changed while it was being snapshot", hint="submit again once it stops changing")
            temporary.chmod(0o400)
            os.replace(temporary, target)
        finally:
            with contextlib.suppress(FileNotFoundError):
                temporary.unlink()

    def open_blob(self, sha256: str) -> BinaryIO:
        try:
            return open(self.blob_path(sha256), "rb")
        except FileNotFoundError:
            raise self._gone(f"blob {sha256[:12]}") from None

    def put_manifest(self, manifest: Manifest) -> str:
        digest = manifest.digest
        path = self.manifest_path(digest)
        if path.exists():
            os.utime(path)
            return digest
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        temporary = path.with_name(f".{digest}.{os.getpid()}.tmp")
        temporary.write_bytes(manifest.to_json())
        os.replace(temporary, path)
        self.tree(digest)  # at submit, not on the dispatch's path
        return digest

    def tree_path(self, digest: str) -> Path:
        return self.root / "trees" / f"{digest}.tgz"

    def tree(self, digest: str) -> bytes:
        """The manifest's tree archive, gzipped (hard-link headers shrink tenfold), made once and kept:
        building a tar of 10,000 members takes longer than the rest of a dispatch."""
        path = self.tree_path(digest)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            pass
        data = gzip.compress(tree_archive(self.manifest(digest)), compresslevel=6, mtime=0)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        temporary = path.with_name(f".{digest}.{os.getpid()}.tmp")
        temporary.write_bytes(data)
        os.replace(temporary, path)
        return data

    def manifest(self, digest: str) -> Manifest:
        try:
            return Manifest.from_json(self.manifest_path(digest).read_bytes())
        except FileNotFoundError:
            raise self._gone(f"manifest {digest[:12]}") from None
        except ValueError as exc:
            raise CodeError(f"code manifest {digest[:12]} in {self.root} is damaged: {exc}") from None

    def _gone(self, what: str) -> CodeError:
        return CodeError(f"the job's code snapshot ({what}) is not in {self.root}",
                         hint="a job with --code runs from the state dir it was submitted to; submit it again there")

    # -- pruning ----------------------------------------------------------------------------------
    def prune(self, keep: set[str], older_than_s: float, every_s: float) -> int:
        """Remove the manifests not in ``keep`` and the blobs none of the kept ones names, once
        unused for ``older_than_s`` (a snapshot being taken now is never removed); at most once per
        ``every_s``. Returns how many files went."""
        stamp = self.root / "pruned"
        with contextlib.suppress(FileNotFoundError):
            if time.time() - stamp.stat().st_mtime < every_s:
                return 0
        if not self.root.is_dir():
            return 0
        stamp.touch()
        cutoff = time.time() - older_than_s
        needed: set[str] = set()
        for digest in keep:
            with contextlib.suppress(CodeError):
                needed.update(entry.sha256 for entry in self.manifest(digest).files)
        removed = 0
        for path in self._files("manifests"):
            if path.name not in keep and _older(path, cutoff):
                removed += _unlink(path)
                _unlink(self.tree_path(path.name))
        for path in self._files("blobs"):
            if path.name not in needed and _older(path, cutoff):
                removed += _unlink(path)
        return removed

    def _files(self, kind: str) -> Iterator[Path]:
        base = self.root / kind
        if base.is_dir():
            for directory, _, names in os.walk(base):
                for name in names:
                    yield Path(directory) / name


def _older(path: Path, cutoff: float) -> bool:
    try:
        return path.stat().st_mtime < cutoff
    except FileNotFoundError:
        return False


def _unlink(path: Path) -> int:
    try:
        path.unlink()
        return 1
    except FileNotFoundError:
        return 0
