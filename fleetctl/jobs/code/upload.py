"""Sending a job's code snapshot to its host at dispatch, over the connection's SFTP and exec.

Per dispatch of an unchanged tree: one command, which finds the tree ready in the host's cache. The
first time a host sees a tree, the tree's archive (kept since submit, ``code.tgz``: hard links and the
keys it needs) goes over SFTP; only the blobs the cache lacks follow, as tar archives of about
:data:`ARCHIVE_BYTES` each (many small files cost one SFTP write per archive, not one per file; a big
file is cut in parts, so memory stays bounded and the progress moves). A tree with one changed file
sends that file. The job's wrapper builds its own tree from the cache on the host (``SendStats.build``)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

from fleetctl._text import one_line
from fleetctl.errors import CodeError, TransportError
from fleetctl.inventory.config import ControllerSettings
from fleetctl.jobs.code.host import MISSING, NEED_TREE, code_command, tree_name, upload_name
from fleetctl.jobs.code.manifest import Entry, blob_archive
from fleetctl.jobs.code.progress import CodeProgress, current
from fleetctl.jobs.code.store import CodeStore, human_bytes
from fleetctl.jobs.model import CodeRef
from fleetctl.ssh.seam import MAX_STDOUT, Connection

ARCHIVE_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True)
class SendStats:
    """What one dispatch sent, and the command the job's wrapper runs to build its tree."""

    files: int
    blobs_sent: int
    blobs: int | None  # how many the tree needs (known only when some were missing)
    bytes_sent: int  # file content
    wire_bytes: int  # archives as written, the tree's included
    seconds: float
    build: str  # for run.sh: builds $d/code from the cache, before the command starts

    def describe(self, agent: str) -> str:
        sent = (f"{self.blobs_sent} of {self.blobs} blobs sent ({human_bytes(self.bytes_sent)})" if self.blobs_sent
                else f"no content sent, {agent} had every blob")
        return f"code: {self.files} files; {sent}; {human_bytes(self.wire_bytes)} written in {self.seconds:.2f}s"


def send_code(conn: Connection, remote_dir: str, code: CodeRef, store: CodeStore, settings: ControllerSettings, *,
              agent: str, timeout: float, progress: CodeProgress | None = None) -> SendStats:
    """Make sure the host's cache holds ``code``'s tree and every blob it needs. Raises
    :class:`CodeError` if the snapshot is gone or the host cannot hold it (the job cannot run there as
    it is), a ``TransportError`` if the host could not be reached or lost blobs meanwhile (the
    dispatch is retried)."""
    started = time.monotonic()

    def step(name: str) -> tuple[int, str, str]:
        command = code_command(remote_dir, code.manifest, name, now=time.time(), prune_every_s=settings.code_cache_prune_interval_s,
                               max_age_s=settings.code_cache_max_age_s, max_bytes=settings.code_cache_max_bytes)
        # A listing of missing keys is 66 bytes a file: a tree of a million files must not hit the default cap.
        result = conn.run(command, timeout=timeout, max_stdout=max(MAX_STDOUT, 80 * (code.files + 1)))
        return result.exit_code, result.stdout, result.stderr

    status, stdout, stderr = step("check")
    wire = 0
    if status == NEED_TREE:  # the host has never held this tree (or pruned it): the archive kept since submit
        tree = store.tree(code.manifest)
        conn.write_bytes(tree_name(remote_dir), tree)
        wire += len(tree)
        status, stdout, stderr = step("check")
    sent: list[Entry] = []
    blobs: int | None = None
    if status == MISSING:
        needed = store.manifest(code.manifest).blobs()
        blobs = len(needed)
        sent = _lacking(stdout, needed, agent)
        wire += _upload(conn, remote_dir, sent, store, progress or current(), agent)
        status, stdout, stderr = step("upload")
        if status == MISSING:
            raise TransportError(f"{agent} lost blobs of the job's code while it was being sent (its cache was pruned meanwhile?)",
                                 hop=agent)
    if status != 0:
        raise CodeError(f"cannot keep the job's code on {agent}: {one_line(stderr) or f'exit {status}'}")
    build = code_command(remote_dir, code.manifest, "build", tree=settings.code_tree)
    return SendStats(code.files, len(sent), blobs, sum(e.size for e in sent), wire, time.monotonic() - started, build)


def _lacking(stdout: str, blobs: dict[str, Entry], agent: str) -> list[Entry]:
    """The entries of the keys the host listed; anything else it says is an error (never read as a path)."""
    keys = [line.strip() for line in stdout.splitlines() if line.strip()]
    unknown = [k for k in keys if k not in blobs]
    if unknown or not keys:
        raise CodeError(f"{agent} answered with keys that are not in the job's code: {one_line(' '.join(unknown[:3]) or stdout)}")
    return [blobs[k] for k in keys]


def _upload(conn: Connection, remote_dir: str, entries: list[Entry], store: CodeStore, progress: CodeProgress,
            agent: str) -> int:
    progress.start(f"upload to {agent}", sum(e.size for e in entries), len(entries))
    wire = 0
    try:
        for number, (archive, content, files) in enumerate(archives(entries, store), start=1):
            conn.write_bytes(upload_name(remote_dir, number), archive)
            wire += len(archive)
            progress.advance(content, files)
    finally:
        progress.finish()
    return wire


def archives(entries: list[Entry], store: CodeStore, size: int = ARCHIVE_BYTES) -> Iterator[tuple[bytes, int, int]]:
    """Tar archives of about ``size`` bytes holding ``entries``' blobs: (archive, content bytes, files
    completed in it). A blob larger than ``size`` travels as parts ``<key>.part.NNNNNN`` the host joins."""
    members: list[tuple[str, int, bytes]] = []
    content = files = 0
    for entry in entries:
        mode = 0o500 if entry.executable else 0o400
        parts = max(1, -(-entry.size // size))
        with store.open_blob(entry.sha256) as handle:
            for part in range(1, parts + 1):
                data = handle.read(size)
                members.append((entry.key if parts == 1 else f"{entry.key}.part.{part:06d}", mode, data))
                content += len(data)
                files += part == parts
                if content >= size:
                    yield blob_archive(members), content, files
                    members, content, files = [], 0, 0
    if members:
        yield blob_archive(members), content, files
