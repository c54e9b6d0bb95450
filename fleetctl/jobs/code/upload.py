"""Sending a job's code snapshot to its host at dispatch, over the connection's SFTP and exec.

Per dispatch: one SFTP write (``code.tar``: the tree and the keys it needs) and one command that
builds the tree from the host's cache. Only when the cache lacks blobs does that command list them;
they then go as tar archives of about :data:`ARCHIVE_BYTES` each (many small files cost one SFTP
write per archive, not one per file; a big file is cut in parts, so memory stays bounded and the
progress moves), and the command runs again to unpack them and build. An unchanged tree sends no
content at all; a tree with one changed file sends that file."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

from fleetctl.config import ControllerSettings
from fleetctl.errors import CodeError, TransportError
from fleetctl.jobs.code.host import MISSING, build_command, tree_name, upload_name
from fleetctl.jobs.code.manifest import Entry, blob_archive, tree_archive
from fleetctl.jobs.code.progress import CodeProgress, current
from fleetctl.jobs.code.store import CodeStore, human_bytes
from fleetctl.jobs.model import CodeRef
from fleetctl.text import one_line
from fleetctl.transport import Connection

ARCHIVE_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True)
class SendStats:
    """What one dispatch sent: content bytes (of files) and the bytes the archives took on the wire."""

    files: int
    blobs: int
    blobs_sent: int
    bytes_sent: int
    wire_bytes: int
    how: str  # linked (hard links into the host's cache) or copied
    seconds: float

    def describe(self, agent: str) -> str:
        sent = (f"{self.blobs_sent} of {self.blobs} blobs sent ({human_bytes(self.bytes_sent)})" if self.blobs_sent
                else f"nothing sent, {agent} had all {self.blobs} blobs")
        return f"code: {self.files} files; {sent}; tree {self.how} in {self.seconds:.2f}s"


def send_code(conn: Connection, remote_dir: str, code: CodeRef, store: CodeStore, settings: ControllerSettings, *,
              agent: str, timeout: float, progress: CodeProgress | None = None) -> SendStats:
    """Build ``remote_dir``/code on the host from ``code``'s snapshot. Raises :class:`CodeError` if
    the snapshot is gone or the host cannot build the tree (the job cannot run there as it is), a
    ``TransportError`` if the host could not be reached or lost blobs meanwhile (the dispatch is retried)."""
    started = time.monotonic()
    manifest = store.manifest(code.manifest)
    blobs = manifest.blobs()
    tree = tree_archive(manifest)
    conn.write_bytes(tree_name(remote_dir), tree)

    def build(step: str) -> tuple[int, str, str]:
        command = build_command(remote_dir, code.manifest, step, now=time.time(),
                                prune_every_s=settings.code_cache_prune_interval_s,
                                max_age_s=settings.code_cache_max_age_s, max_bytes=settings.code_cache_max_bytes,
                                tree=settings.code_tree)
        result = conn.run(command, timeout=timeout)
        return result.exit_code, result.stdout, result.stderr

    code_, stdout, stderr = build("first")
    sent: list[Entry] = []
    wire = len(tree)
    if code_ == MISSING:
        sent = _lacking(stdout, blobs, agent)
        wire += _upload(conn, remote_dir, sent, store, progress or current(), agent)
        code_, stdout, stderr = build("upload")
        if code_ == MISSING:
            raise TransportError(f"{agent} lost blobs of the job's code while it was being sent (its cache was pruned meanwhile?)",
                                 hop=agent)
    if code_ != 0:
        raise CodeError(f"cannot build the job's code tree on {agent}: {one_line(stderr) or f'exit {code_}'}")
    how = stdout.strip().rsplit(" ", 1)[-1] if stdout.strip().startswith("code ") else "built"
    return SendStats(len(manifest.files), len(blobs), len(sent), sum(e.size for e in sent), wire, how,
                     time.monotonic() - started)


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
