"""Code that travels with a job (``submit --code DIR``), against real sshd: ignores, refusals,
snapshots isolated per job, uploads of only what the host lacks, and the host cache pruned."""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fleetctl.fleet import Fleet
from fleetctl.jobs.api import drive_once
from fleetctl.jobs.model import JobRecord
from fleetctl.jobs.queue import JobQueue
from fleetctl.sandbox import HostSpec, Sandbox
from fleetctl.ssh import connect
from fleetctl.ssh.seam import Connection, Route
from tests.conftest import require_sshd, run_cli
from tests.waiting import poll

CONTROLLER = "[controller]\nkill_grace_s = 1\noffline_after_misses = 2\n"
LISTING = ("import json, os; found = sorted(os.path.join(d, n)[2:] for d, dirs, files in os.walk('.') for n in files + "
           "[x for x in dirs if os.path.islink(os.path.join(d, x))]); "
           "json.dump({'files': found, 'cwd': os.getcwd(), 'code_dir': os.environ['FLEETCTL_CODE_DIR'], "
           "'train': open('train.py').read()}, open(os.environ['FLEETCTL_OUTPUT_FILE'], 'w'))")


@pytest.fixture
def host(tmp_path: Path) -> Iterator[Sandbox]:
    require_sshd()
    sandbox = Sandbox(tmp_path / "sb", [HostSpec("one", gpus=1)])
    sandbox.up()
    yield sandbox
    sandbox.down()


class CountingConnection:
    """The real connection, with every file written over SFTP recorded (path, bytes)."""

    def __init__(self, inner: Connection, writes: list[tuple[str, bytes]]) -> None:
        self.inner = inner
        self.writes = writes
        self.route = inner.route
        self.host_keys = inner.host_keys

    @property
    def is_open(self) -> bool:
        return self.inner.is_open

    def write_bytes(self, remote_path: str, data: bytes) -> None:
        self.writes.append((remote_path, data))
        self.inner.write_bytes(remote_path, data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def _fleet(sandbox: Sandbox, tmp_path: Path, extra: str = "", writes: list[tuple[str, bytes]] | None = None) -> Fleet:
    config = tmp_path / "agents.toml"
    config.write_text(CONTROLLER + extra + "\n" + sandbox.inventory_path.read_text())
    if writes is None:
        return Fleet.from_config(config, state_dir=tmp_path / "state")
    fleet: Fleet

    def counting(route: Route) -> Connection:
        return CountingConnection(connect(route, fleet.hosts.connect_options), writes)

    fleet = Fleet.from_config(config, state_dir=tmp_path / "state", connector=counting)
    return fleet


def _drive_until(fleet: Fleet, job_id: str, done: Callable[[JobRecord], bool], timeout: float = 60) -> JobRecord:
    def driven() -> JobRecord | None:
        drive_once(fleet.hosts)
        record = fleet.job(job_id).record
        return record if done(record) else None

    return poll(f"job {job_id} to move on ({JobQueue(fleet.hosts.store).events(job_id)})", driven, timeout, interval=0.1)


def _write(root: Path, files: dict[str, str | bytes]) -> None:
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)


def _cache(sandbox: Sandbox) -> Path:
    return sandbox.host_dir("one") / "home" / ".cache" / "fleetctl"


def _code_event(fleet: Fleet, job_id: str) -> str:
    return next(detail or "" for _, event, detail in JobQueue(fleet.hosts.store).events(job_id) if event == "code_sent")


def _members(writes: list[tuple[str, bytes]]) -> list[str]:
    """The blobs uploaded: member names of every ``code.up.*.tar`` written."""
    names = []
    for path, data in writes:
        if "/code.up." in path:
            with tarfile.open(fileobj=io.BytesIO(data)) as archive:
                names.extend(archive.getnames())
    return names


def test_the_tree_honours_ignores_like_git_and_is_the_snapshot_taken_at_submit(host: Sandbox, tmp_path: Path) -> None:
    code = tmp_path / "project"
    _write(code, {
        "train.py": "version 1\n", "run.sh": "#!/bin/sh\necho ran from $(pwd)\n",
        ".gitignore": "*.log\n!keep.log\nbuild/\ndata/*\n!data/small.csv\n",
        "keep.log": "kept by a negation", "noise.log": "ignored", "build/out.bin": "ignored dir",
        "data/small.csv": "re-included", "data/huge.csv": "ignored by data/*",
        "sub/.gitignore": "!debug.log\n*.cache\n", "sub/debug.log": "re-included by a nested negation",
        "sub/x.cache": "ignored by the nested file", "sub/deeper/other.log": "ignored by the root pattern",
        ".fleetctlignore": "checkpoints/\n", "checkpoints/step1.pt": "ignored by .fleetctlignore",
        ".git/HEAD": "ref: refs/heads/main\n", ".git/info/exclude": "secret.txt\n", "secret.txt": "ignored by info/exclude",
    })
    (code / "run.sh").chmod(0o755)
    (code / "latest").symlink_to("sub/debug.log")
    os.mkfifo(code / "build" / "pipe")  # special, but ignored: never looked at
    with _fleet(host, tmp_path) as fleet:
        job = fleet.submit(["python3", "-c", LISTING + "; import subprocess; print(subprocess.run(['./run.sh'], "
                            "capture_output=True, text=True).stdout)"], code=str(code))
        (code / "train.py").write_text("version 2, edited after the submit\n")
        record = _drive_until(fleet, job.id, lambda r: r.done)
        assert record.state == "succeeded", (record.reason, job.logs("stderr"))
        output = record.result.output  # type: ignore[union-attr]
        assert output["files"] == sorted([".fleetctlignore", ".gitignore", "data/small.csv", "keep.log", "latest", "run.sh",
                                          "sub/.gitignore", "sub/debug.log", "train.py"])
        assert output["train"] == "version 1\n"  # the snapshot taken at submit, not the directory now
        assert output["cwd"] == output["code_dir"] == f"{record.remote_dir}/code"
        assert job.logs().startswith(f"ran from {record.remote_dir}/code")  # the execute bit travelled
        assert _code_event(fleet, job.id).startswith("code: 8 files; 8 of 8 blobs sent")
        assert [p.name for p in (_cache(host) / "trees").iterdir()] == [f"{record.spec.code.manifest}.tgz"]  # type: ignore[union-attr]
    cache = _cache(host)
    assert oct(cache.stat().st_mode & 0o777) == "0o700" and oct((cache / "blobs").stat().st_mode & 0o777) == "0o700"
    assert not Path(record.remote_dir or "").exists()  # removed with its job directory; the cache stays
    assert len(list((cache / "blobs").iterdir())) == 8  # one per distinct (content, executable) of the 8 files


def _refused(tmp_path: Path, sandbox: Sandbox, code: Path, extra: str = "") -> str:
    config = tmp_path / "agents.toml"
    config.write_text(CONTROLLER + extra + "\n" + sandbox.inventory_path.read_text())
    result = run_cli("submit", "--code", str(code), "--config", str(config), "--state-dir", str(tmp_path / "state"), "--", "true")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    listed = run_cli("jobs", "list", "--json", "--config", str(config), "--state-dir", str(tmp_path / "state"))
    assert json.loads(listed.stdout or "[]") == []  # nothing queued
    return result.stderr.strip()


def test_unsafe_trees_are_refused_with_one_line_before_anything_is_queued(host: Sandbox, tmp_path: Path) -> None:
    outside = tmp_path / "outside.txt"
    outside.write_text("not part of the project")
    escaping = tmp_path / "escaping"
    _write(escaping, {"train.py": "x"})
    (escaping / "creds").symlink_to(outside)
    assert "'creds' is a symlink to" in _refused(tmp_path, host, escaping)

    fifo = tmp_path / "fifo"
    _write(fifo, {"train.py": "x"})
    os.mkfifo(fifo / "pipe")
    assert "'pipe' is a fifo, not a file" in _refused(tmp_path, host, fifo)

    sock = tmp_path / "sock"
    _write(sock, {"train.py": "x"})
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(sock / "s"))
    try:
        assert "'s' is a socket" in _refused(tmp_path, host, sock)
    finally:
        server.close()

    newline = tmp_path / "newline"
    _write(newline, {"ok.py": "x", "bad\nname.py": "x"})
    assert "control character" in _refused(tmp_path, host, newline)

    assert "does not exist" in _refused(tmp_path, host, tmp_path / "nowhere")

    huge = tmp_path / "huge"
    _write(huge, {"train.py": "x" * 100, "weights/model.bin": b""})
    with open(huge / "weights" / "model.bin", "wb") as handle:
        handle.truncate(3 * 1024**3)  # sparse: the limit is checked before any content is read
    message = _refused(tmp_path, host, huge)
    assert "over the limit of 1.0 GiB" in message and "weights/model.bin (3.0 GiB)" in message and "code_max_bytes" in message
    (huge / ".fleetctlignore").write_text("weights/\n")
    small = run_cli("submit", "--code", str(huge), "--config", str(tmp_path / "agents.toml"), "--state-dir", str(tmp_path / "state"),
                    "--", "true")
    assert small.returncode == 0, small.stderr  # ignored, it is no longer counted
    shown = run_cli("jobs", "show", small.stdout.strip(), "--config", str(tmp_path / "agents.toml"), "--state-dir", str(tmp_path / "state"))
    assert f"code: 2 files (109 bytes) from {huge}" in shown.stdout, shown.stdout



def test_two_jobs_with_different_snapshots_on_one_host_see_only_their_own_files(host: Sandbox, tmp_path: Path) -> None:
    code, marks = tmp_path / "project", tmp_path / "marks"
    marks.mkdir()
    wait_for = "for i in $(seq 300); do [ -e {m} ] && break; sleep 0.1; done; [ -e {m} ]"
    first = (f"touch {marks}/a; {wait_for.format(m=f'{marks}/b')} || exit 9; "
             "if echo more >> value.txt 2>/dev/null; then echo wrote-in-place; else echo read-only; fi; "
             f"rm -f value.txt; echo changed-by-a > value.txt; touch {marks}/a2; cat value.txt")
    second = f"touch {marks}/b; {wait_for.format(m=f'{marks}/a2')} || exit 9; cat value.txt"
    with _fleet(host, tmp_path) as fleet:
        _write(code, {"value.txt": "snapshot-a\n", "shared.py": "the same in both\n"})
        a = fleet.submit(first, code=str(code), agent="one")
        _write(code, {"value.txt": "snapshot-b\n"})
        b = fleet.submit(second, code=str(code), agent="one")
        done_a = _drive_until(fleet, a.id, lambda r: r.done)
        done_b = _drive_until(fleet, b.id, lambda r: r.done)
        assert done_a.state == done_b.state == "succeeded", (done_a.reason, done_b.reason, a.logs("stderr"), b.logs("stderr"))
        # Hard links (not root) are read-only: replaced, never edited in place; root's copies take the edit.
        assert a.logs() == ("wrote-in-place" if os.geteuid() == 0 else "read-only") + "\nchanged-by-a\n"
        assert b.logs() == "snapshot-b\n"  # a's changes to its own tree never reached b's


def test_resubmitting_sends_nothing_and_one_changed_file_sends_one_blob(host: Sandbox, tmp_path: Path) -> None:
    code = tmp_path / "project"
    _write(code, {f"pkg/module_{i}.py": f"value = {i}\n" * 50 for i in range(40)})
    writes: list[tuple[str, bytes]] = []
    with _fleet(host, tmp_path, 'code_tree = "link"', writes=writes) as fleet:
        first = fleet.submit("cat pkg/module_7.py | head -1", code=str(code))
        assert _drive_until(fleet, first.id, lambda r: r.done).state == "succeeded"
        assert len(_members(writes)) == 40 and "40 of 40 blobs sent" in _code_event(fleet, first.id)

        writes.clear()
        again = fleet.submit("stat -c %h pkg/module_7.py; head -1 pkg/module_7.py", code=str(code))
        assert _drive_until(fleet, again.id, lambda r: r.done).state == "succeeded"
        assert not [p for p, _ in writes if "/code." in p] and "no content sent, one had every blob" in _code_event(fleet, again.id)
        assert again.logs() == "2\nvalue = 7\n"  # a hard link into the host's cache

        writes.clear()
        _write(code, {"pkg/module_7.py": "value = 'changed'\n"})
        changed = fleet.submit("cat pkg/module_7.py", code=str(code))
        assert _drive_until(fleet, changed.id, lambda r: r.done).state == "succeeded"
        uploaded = _members(writes)
        assert len(uploaded) == 1 and "1 of 40 blobs sent (18 B)" in _code_event(fleet, changed.id), _code_event(fleet, changed.id)
        assert changed.logs() == "value = 'changed'\n"


def test_a_big_file_travels_in_parts_and_the_cache_is_pruned_by_size_and_age(host: Sandbox, tmp_path: Path) -> None:
    code = tmp_path / "project"
    big = os.urandom(20 * 1024 * 1024 + 5)  # more than one archive: sent in parts, joined and verified on the host
    _write(code, {"weights.bin": big, "a.txt": "tree a\n"})
    extra = f"code_cache_max_bytes = {30 * 1024 * 1024}\ncode_cache_prune_interval_s = 0\ncode_cache_max_age_s = 3600"
    with _fleet(host, tmp_path, extra) as fleet:
        first = fleet.submit("sha256sum weights.bin", code=str(code))
        assert _drive_until(fleet, first.id, lambda r: r.done).state == "succeeded"
        assert first.logs().split()[0] == hashlib.sha256(big).hexdigest()
        blobs = _cache(host) / "blobs"
        assert len(list(blobs.iterdir())) == 2

        # A second tree as big: over the size bound together, so the least recently used tree's blobs go.
        _write(code, {"weights.bin": os.urandom(20 * 1024 * 1024), "a.txt": "tree b\n"})
        second = fleet.submit("true", code=str(code))
        assert _drive_until(fleet, second.id, lambda r: r.done).state == "succeeded"
        kept = {p.name for p in blobs.iterdir()}
        assert hashlib.sha256(big).hexdigest() not in kept  # tree a's small file still fits, and stays
        assert {hashlib.sha256((code / n).read_bytes()).hexdigest() for n in ("weights.bin", "a.txt")} <= kept

        # Unused for longer than the age bound: pruned at the next dispatch there, whatever the size.
        for use in (_cache(host) / "uses").iterdir():
            os.utime(use, (time.time() - 7200, time.time() - 7200))
        _write(code, {"weights.bin": b"small now", "a.txt": "tree c\n"})
        third = fleet.submit("true", code=str(code))
        assert _drive_until(fleet, third.id, lambda r: r.done).state == "succeeded"
        assert len(list(blobs.iterdir())) == 2 and len(list((_cache(host) / "uses").iterdir())) == 1


def test_an_upload_that_takes_a_while_shows_bytes_and_files_on_a_terminal_only(host: Sandbox, tmp_path: Path) -> None:
    from tests.integration.test_progress import run_on_tty

    code = tmp_path / "project"
    _write(code, {f"weights/part{i}.bin": os.urandom(4 * 1024 * 1024) for i in range(30)})  # 120 MiB: more than a moment
    config = tmp_path / "agents.toml"
    config.write_text(CONTROLLER + "\n" + host.inventory_path.read_text())
    args = ("--config", str(config), "--state-dir", str(tmp_path / "state"))
    shown = run_on_tty("submit", "--code", str(code), "--wait", *args, "--", "true", timeout=120)
    assert shown.returncode == 0, shown.terminal
    assert "upload to one" in shown.terminal and "/30 files" in shown.terminal and "MB" in shown.terminal
    _write(code, {"weights/part0.bin": os.urandom(4 * 1024 * 1024)})
    piped = run_cli("submit", "--code", str(code), "--wait", *args, "--", "true", timeout=120)
    assert piped.returncode == 0 and "upload" not in piped.stderr and "━" not in piped.stderr, piped.stderr
