"""Code snapshots without SSH: git's ignore rules, the manifest, the archives, the store, the host
script run by a local ``sh``, and the upload on the shipped fake connection."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import subprocess
import tarfile
import time
from pathlib import Path

import pytest
from pathspec import GitIgnoreSpec

from fleetctl.errors import CodeError, TransportError
from fleetctl.inventory.config import ControllerSettings
from fleetctl.jobs.code.host import MISSING, NEED_TREE, code_command
from fleetctl.jobs.code.ignores import IgnoreRules, Level
from fleetctl.jobs.code.manifest import Entry, Manifest, blob_archive, link_escapes, tree_archive, unsafe_path
from fleetctl.jobs.code.snapshot import take_snapshot, walk
from fleetctl.jobs.code.store import CodeStore
from fleetctl.jobs.code.upload import archives, send_code
from fleetctl.jobs.model import CodeRef
from fleetctl.ssh.seam import CommandResult, Hop, Route
from fleetctl.testing import ScriptedConnection

pytestmark = pytest.mark.no_store


def _rules(*levels: tuple[str, str]) -> IgnoreRules:
    return IgnoreRules([Level(base, GitIgnoreSpec.from_lines(text.splitlines())) for base, text in levels])


@pytest.mark.parametrize(("path", "is_dir", "ignored"), [
    ("noise.log", False, True), ("keep.log", False, False),  # a negation after the pattern re-includes
    ("sub/debug.log", False, False),  # the deeper file decides first: its negation wins over the root's *.log
    ("sub/other.log", False, True),  # no match in sub/.gitignore: the root's rule applies
    ("sub/x.cache", False, True), ("x.cache", False, False),  # a nested pattern applies below its own directory only
    ("build", True, True), ("build", False, False),  # `build/` matches directories only
    ("data/huge.csv", False, True), ("data/small.csv", False, False), ("data", True, False),
    ("top.txt", False, True), ("sub/top.txt", False, False),  # `/top.txt` is anchored to its file's directory
    (".git", True, True), ("sub/.git", True, True),  # always left out
    ("src/app.py", False, False),
])
def test_ignore_rules_decide_as_git(path: str, is_dir: bool, ignored: bool) -> None:
    rules = _rules(("", "*.log\n!keep.log\nbuild/\ndata/*\n!data/small.csv\n/top.txt\n"), ("sub/", "!debug.log\n*.cache\n"))
    assert rules.decide(path, is_dir) is ignored


def test_the_walk_never_enters_an_ignored_directory_and_reads_the_repository_above(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    files = {".gitignore": "*.pyc\nsrc/generated/\n", ".git/info/exclude": "local.cfg\n", "src/app.py": "",
             "src/app.pyc": "", "src/generated/out.py": "", "src/local.cfg": "", "src/cfg/local.cfg": "",
             "src/vendor/.gitignore": "*\n!keep.py\n", "src/vendor/keep.py": "", "src/vendor/drop.py": "",
             "src/dist/x.py": "", "src/.fleetctlignore": "dist/\n!app.pyc\n"}
    for name, content in files.items():
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_text(content)
    (repo / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    # A negation cannot re-include a file below an ignored directory (git does not enter it).
    (repo / "src" / ".gitignore").write_text("negated/\n!negated/inside.py\n")
    (repo / "src" / "negated").mkdir()
    (repo / "src" / "negated" / "inside.py").write_text("")
    found = [f.path for f in walk(repo / "src")]
    assert found == [".fleetctlignore", ".gitignore", "app.py", "app.pyc", "vendor/keep.py"]


@pytest.mark.parametrize(("path", "problem"), [
    ("ok/name.py", None), ("spaces and ünïcode.py", None), ("a/../b", "'..'"), ("/etc/passwd", "absolute"),
    ("bad\nname", "control character"), ("tab\there", "control character"), ("a//b", "empty"), ("esc\x1b[2J", "control"),
    ("bad\udcffbyte", "UTF-8"), ("", "empty"),
])
def test_unsafe_paths(path: str, problem: str | None) -> None:
    found = unsafe_path(path)
    assert (found is None) if problem is None else (problem in (found or ""))


@pytest.mark.parametrize(("path", "target", "escapes"), [
    ("latest", "sub/debug.log", False), ("sub/up", "..", False), ("sub/x", "../y", False),
    ("x", "../outside", True), ("sub/x", "../../outside", True), ("x", "/etc/passwd", True), ("x", "a\nb", True),
])
def test_link_escapes(path: str, target: str, escapes: bool) -> None:
    assert (link_escapes(path, target) is not None) is escapes


def _entry(path: str, content: bytes, mode: int = 0o644) -> Entry:
    return Entry(path, mode, hashlib.sha256(content).hexdigest(), len(content))


def test_manifest_is_canonical_and_checked_when_read() -> None:
    a, b = _entry("b.py", b"b"), _entry("a.py", b"a", 0o755)
    link = Entry("latest", 0o777, target="a.py")
    first, second = Manifest((a, b, link)), Manifest((link, b, a))
    assert first.to_json() == second.to_json() and first.digest == second.digest
    assert Manifest.from_json(first.to_json()) == Manifest(tuple(sorted((a, b, link), key=lambda e: e.path)))
    assert list(first.blobs()) == sorted([a.sha256, b.sha256 + ".x"])  # the executable variant is a blob of its own
    with pytest.raises(ValueError, match="'..'"):
        Manifest.from_json(first.to_json().replace(b'"a.py"', b'"../a.py"', 1))
    with pytest.raises(ValueError, match="outside"):
        Manifest.from_json(Manifest((Entry("x", 0o777, target="../../etc"),)).to_json())


def test_the_tree_archive_links_every_file_to_its_blob() -> None:
    same = b"same content"
    manifest = Manifest((_entry("one.py", same), _entry("sub/two.py", same), _entry("run.sh", b"#!/bin/sh\n", 0o755),
                         Entry("latest", 0o777, target="one.py")))
    with tarfile.open(fileobj=io.BytesIO(tree_archive(manifest))) as archive:
        members = {m.name: m for m in archive.getmembers()}
        want = archive.extractfile("code.want").read().decode().split()  # type: ignore[union-attr]
    key = hashlib.sha256(same).hexdigest()
    assert want == list(manifest.blobs()) and len(want) == 2
    assert members["code/one.py"].islnk() and members["code/one.py"].linkname == f".blobs/{key}"
    assert members["code/sub/two.py"].linkname == f".blobs/{key}"
    assert members["code/run.sh"].linkname.endswith(".x") and members["code/latest"].issym()
    assert members["code"].isdir()


def _store_with(tmp_path: Path, contents: list[bytes]) -> tuple[CodeStore, list[Entry]]:
    store = CodeStore(tmp_path / "state")
    entries = []
    for number, content in enumerate(contents):
        source = tmp_path / f"f{number}"
        source.write_bytes(content)
        entry = _entry(f"f{number}", content)
        store.put(source, entry.sha256)
        entries.append(entry)
    return store, entries


def test_archives_batch_small_blobs_and_cut_big_ones_in_parts(tmp_path: Path) -> None:
    big = os.urandom(2500)
    store, entries = _store_with(tmp_path, [b"a" * 300, b"b" * 300, big, b"c" * 10])
    batches = list(archives(entries, store, size=1000))
    assert sum(files for _, _, files in batches) == 4 and sum(content for _, content, _ in batches) == 3110
    names = []
    for data, _, _ in batches:
        with tarfile.open(fileobj=io.BytesIO(data)) as archive:
            names.append(archive.getnames())
            assert all(m.mode == 0o400 for m in archive.getmembers())
    key = entries[2].sha256
    assert names[0] == [entries[0].sha256, entries[1].sha256, f"{key}.part.000001"]
    assert [n for batch in names for n in batch if n.startswith(key)] == [f"{key}.part.{i:06d}" for i in (1, 2, 3)]


def test_the_size_limit_names_the_biggest_paths_before_reading_them(tmp_path: Path) -> None:
    code = tmp_path / "code"
    code.mkdir()
    for name, size in (("small.py", 10), ("model.bin", 5000), ("data.npz", 3000), ("tiny", 1)):
        with open(code / name, "wb") as handle:
            handle.truncate(size)
    with pytest.raises(CodeError) as raised:
        take_snapshot(code, CodeStore(tmp_path / "state"), max_bytes=4096)
    assert "7.8 KiB in 4 files is over the limit of 4.0 KiB; biggest: model.bin (4.9 KiB), data.npz (2.9 KiB), small.py (10 B)" in str(raised.value)
    assert not (tmp_path / "state" / "code" / "blobs").exists()  # nothing read, nothing kept


def test_the_store_keeps_what_queued_jobs_name_and_prunes_the_rest_once_old(tmp_path: Path) -> None:
    store, entries = _store_with(tmp_path, [b"kept", b"dropped", b"fresh"])
    kept = store.put_manifest(Manifest((entries[0],)))
    dropped = store.put_manifest(Manifest((entries[1],)))
    old = 1_000_000.0
    for path in (store.blob_path(entries[0].sha256), store.blob_path(entries[1].sha256), store.manifest_path(dropped),
                 store.manifest_path(kept)):
        os.utime(path, (old, old))
    assert store.prune({kept}, older_than_s=3600, every_s=0) == 2
    assert store.manifest(kept) and store.blob_path(entries[0].sha256).exists()
    assert not store.blob_path(entries[1].sha256).exists() and store.blob_path(entries[2].sha256).exists()
    with pytest.raises(CodeError, match="not in .*submit it again there"):
        store.manifest(dropped)
    assert store.prune(set(), older_than_s=0, every_s=3600) == 0  # at most once per interval


def test_a_file_that_changes_while_it_is_copied_in_is_refused(tmp_path: Path) -> None:
    source = tmp_path / "moving"
    source.write_bytes(b"before")
    with pytest.raises(CodeError, match="changed while it was being snapshot"):
        CodeStore(tmp_path / "state").put(source, hashlib.sha256(b"something else").hexdigest())


def _conn() -> ScriptedConnection:
    return ScriptedConnection(Route((Hop("h", "u"),)))


def test_send_code_sends_the_tree_and_the_blobs_only_when_the_host_asks(tmp_path: Path) -> None:
    store, entries = _store_with(tmp_path, [b"one", b"two", b"three"])
    manifest = Manifest(tuple(entries))
    store.put_manifest(manifest)
    ref = take_ref(manifest)
    conn = _conn()
    conn.answers = [CommandResult("", NEED_TREE, "", ""), CommandResult("", MISSING, entries[1].sha256 + "\n", ""),
                    CommandResult("", 0, "code ready\n", "")]
    stats = send_code(conn, "/tmp/job dir", ref, store, ControllerSettings(), agent="h", timeout=10)
    assert stats.blobs_sent == 1 and stats.bytes_sent == 3 and stats.blobs == 3
    assert list(conn.files) == ["/tmp/job dir/code.tgz", "/tmp/job dir/code.up.000001.tar"]
    with tarfile.open(fileobj=io.BytesIO(conn.files["/tmp/job dir/code.up.000001.tar"])) as archive:
        assert archive.getnames() == [entries[1].sha256]
    assert ["'/tmp/job dir'" in c and f" {step} " in c for c, step in zip(conn.commands, ("check", "check", "upload"), strict=True)] == [True] * 3
    assert " build " in stats.build and "'/tmp/job dir'" in stats.build

    unchanged = _conn()
    unchanged.answers = [CommandResult("", 0, "code ready\n", "")]
    stats = send_code(unchanged, "/d", ref, store, ControllerSettings(), agent="h", timeout=10)
    assert stats.blobs_sent == 0 and unchanged.files == {} and len(unchanged.commands) == 1  # one command, nothing written
    assert "no content sent, h had every blob" in stats.describe("h")

    for answers, error in (([CommandResult("", MISSING, "../../etc/passwd\n", "")], CodeError),
                           ([CommandResult("", 22, "", "fleetctl: cannot make the code cache /x")], CodeError),
                           ([CommandResult("", MISSING, entries[0].sha256, ""), CommandResult("", MISSING, entries[0].sha256, "")],
                            TransportError)):
        failing = _conn()
        failing.answers = list(answers)
        with pytest.raises(error):
            send_code(failing, "/d", ref, store, ControllerSettings(), agent="h", timeout=10)


def take_ref(manifest: Manifest) -> CodeRef:
    return CodeRef(manifest=manifest.digest, files=len(manifest.files), bytes=manifest.total_bytes, source="/src")


def _host(tmp_path: Path, job: Path, step: str, tree: str = "link") -> subprocess.CompletedProcess[str]:
    command = code_command(str(job), "0" * 64, step, now=time.time(), prune_every_s=0, max_age_s=3600, max_bytes=10**9, tree=tree)
    return subprocess.run(["sh", "-c", command], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")})


@pytest.mark.parametrize("tree", ["link", "copy", "auto"])
def test_the_host_script_fills_the_cache_refuses_damaged_blobs_and_builds_trees(tmp_path: Path, tree: str) -> None:
    job = tmp_path / "job dir 'quoted'"
    job.mkdir()
    manifest = Manifest((_entry("a.py", b"print(1)\n"), _entry("bin/run", b"#!/bin/sh\n", 0o755), _entry("b.py", b"print(1)\n")))
    assert _host(tmp_path, job, "check", tree).returncode == NEED_TREE
    (job / "code.tgz").write_bytes(gzip.compress(tree_archive(manifest)))
    first = _host(tmp_path, job, "check", tree)
    assert first.returncode == MISSING and sorted(first.stdout.split()) == list(manifest.blobs())
    damaged = blob_archive([(manifest.entries[0].key, 0o400, b"not what was hashed"), (manifest.entries[1].key, 0o500, b"#!/bin/sh\n")])
    (job / "code.up.000001.tar").write_bytes(damaged)
    refused = _host(tmp_path, job, "upload", tree)
    assert refused.returncode == 25 and "arrived damaged" in refused.stderr
    good = blob_archive([(manifest.entries[0].key, 0o400, b"print(1)\n"), (manifest.entries[1].key, 0o500, b"#!/bin/sh\n")])
    (job / "code.up.000001.tar").write_bytes(good)
    ready = _host(tmp_path, job, "upload", tree)
    assert ready.returncode == 0 and ready.stdout.strip() == "code ready", ready.stderr
    built = _host(tmp_path, job, "build", tree)
    assert built.returncode == 0, built.stderr
    assert (job / "code" / "a.py").read_bytes() == b"print(1)\n" and os.access(job / "code" / "bin" / "run", os.X_OK)
    assert sorted(p.name for p in job.iterdir()) == ["code"]  # nothing left behind but the tree
    linked = tree == "link" or (tree == "auto" and os.geteuid() != 0)  # read-only files do not stop root: copies
    links = os.stat(job / "code" / "a.py").st_nlink  # a.py, b.py (same content) and, linked, the cache's blob
    assert links == (3 if linked else 2)
    assert list((tmp_path / "cache" / "fleetctl").glob("pruned.*"))

    again = tmp_path / "another job"
    again.mkdir()
    unchanged = _host(tmp_path, again, "check", tree)  # the prune kept a recent tree's blobs: nothing to send
    assert unchanged.returncode == 0 and sorted(p.name for p in again.iterdir()) == [], unchanged.stdout + unchanged.stderr
    assert _host(tmp_path, again, "build", tree).returncode == 0 and (again / "code" / "b.py").exists()

    for tgz in (tmp_path / "cache" / "fleetctl" / "trees").iterdir():
        tgz.unlink()  # pruned between a dispatch and the job's start
    gone = _host(tmp_path, again, "build", tree)
    assert gone.returncode == 26 and "code tree is gone from the cache" in gone.stderr
    for blob in (tmp_path / "cache" / "fleetctl" / "blobs").iterdir():
        blob.unlink()  # a cache emptied by hand: the ready marker no longer tells the truth
    third = tmp_path / "third job"
    third.mkdir()
    assert _host(tmp_path, third, "check", tree).returncode == NEED_TREE  # the failed build dropped the marker
    (third / "code.tgz").write_bytes(gzip.compress(tree_archive(manifest)))
    assert _host(tmp_path, third, "check", tree).returncode == MISSING


def test_progress_is_drawn_only_once_a_phase_lasts_a_moment() -> None:
    from fleetctl.cli.code_progress import TerminalCodeProgress
    from fleetctl.jobs.code.progress import current, reporting

    slow = TerminalCodeProgress(after_s=0.0, force=True)
    with reporting(slow):
        progress = current()
        progress.start("upload to h", 3 * 1024 * 1024, 3)
        progress.advance(1024 * 1024, 1)
        assert slow.shown
        progress.finish()
        assert not slow.shown
    quick = TerminalCodeProgress(after_s=3600, force=True)
    quick.start("upload to h", 10, 1)
    quick.advance(10, 1)
    assert not quick.shown
    assert not TerminalCodeProgress(after_s=0.0).enabled  # stderr is no terminal under pytest: nothing drawn


def test_an_empty_tree_is_ready_at_once_and_builds_an_empty_directory(tmp_path: Path) -> None:
    job = tmp_path / "job"
    job.mkdir()
    (job / "code.tgz").write_bytes(gzip.compress(tree_archive(Manifest(()))))
    assert _host(tmp_path, job, "check").stdout.strip() == "code ready"
    assert _host(tmp_path, job, "build").returncode == 0 and list((job / "code").iterdir()) == []


def test_a_tree_that_cannot_be_built_ends_the_job_with_126_and_says_why(tmp_path: Path) -> None:
    from fleetctl.jobs.model import JobSpec
    from fleetctl.jobs.remote import wrapper_script

    spec = JobSpec(command=["echo", "never runs"], code=CodeRef(manifest="0" * 64, files=0, bytes=0, source="/src"))
    job = tmp_path / "job"
    job.mkdir()
    prepare = code_command(str(job), "0" * 64, "build")  # no cache there: the tree is gone
    (job / "run.sh").write_text(wrapper_script("j1", str(job), spec, {}, prepare=prepare))
    subprocess.run(["sh", str(job / "run.sh")], env={**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}, timeout=60, check=True)
    assert '"exit_code": 126' in (job / "result.json").read_text()
    assert "fleetctl: the job's code tree is gone from the cache" in (job / "stderr.log").read_text()
    assert not (job / "stdout.log").exists()


def test_an_unchanged_file_is_not_read_again_and_a_changed_one_always_is(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import fleetctl.jobs.code.snapshot as snapshot

    code, store = tmp_path / "code", CodeStore(tmp_path / "state")
    code.mkdir()
    for name in ("old.py", "fresh.py"):
        (code / name).write_text(f"{name}\n")
    long_ago = time.time() - 3600
    os.utime(code / "old.py", (long_ago, long_ago))
    read: list[str] = []
    digest = snapshot.file_digest
    monkeypatch.setattr(snapshot, "file_digest", lambda path: read.append(Path(path).name) or digest(path))
    first = take_snapshot(code, store, 10**9)
    assert sorted(read) == ["fresh.py", "old.py"]
    read.clear()
    assert take_snapshot(code, store, 10**9) == first
    assert read == ["fresh.py"]  # modified within the last seconds: hashed again, as git treats a racily clean file
    (code / "old.py").write_text("new.py\n")  # same size, same mtime set back: the ctime still tells
    os.utime(code / "old.py", (long_ago, long_ago))
    read.clear()
    changed = take_snapshot(code, store, 10**9)
    assert "old.py" in read and changed.manifest != first.manifest
