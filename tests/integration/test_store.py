"""The store under stress, against real sshd: processes that start together on a fresh state dir,
a damaged file, a read-only state dir. Each ends in one line, never a traceback or a lost round.

The tests of the store's interface, the same on both backends, are here too, once, parametrized
over SQLite and PostgreSQL (``make_store`` / ``store_url``); tests/integration/test_postgres.py
keeps what only PostgreSQL does."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from pathlib import Path

import psycopg
import pytest

from fleetctl.errors import StoreError
from fleetctl.jobs.model import JobSpec
from fleetctl.jobs.queue import JobQueue
from fleetctl.sandbox import Sandbox
from fleetctl.store import SQLiteStore, Store, open_store
from fleetctl.store.postgres import PostgresStore
from fleetctl.store.schema import SCHEMA_VERSION
from fleetctl.telemetry.health import HealthPolicy
from fleetctl.telemetry.history import record
from fleetctl.telemetry.snapshot import GpuSample, TelemetrySnapshot
from tests.conftest import run_cli
from tests.processes import run_together

FLEETCTL = [sys.executable, "-m", "fleetctl"]


def _config(sandbox: Sandbox, path: Path, interval: float = 0.5) -> str:
    path.write_text(f"[controller]\nheartbeat_interval_s = {interval}\nscheduler_tick_s = 0.5\n\n"
                    + sandbox.inventory_path.read_text())
    return str(path)


def _popen(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([*FLEETCTL, *args], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _stop(process: subprocess.Popen[str], timeout: float = 30) -> tuple[str, str]:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    return process.communicate(timeout=timeout)


def _one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr and "internal error" not in stderr, stderr
    return lines[0]


def test_eight_processes_on_a_fresh_state_dir_never_fail(own_sandbox: Sandbox, tmp_path: Path) -> None:
    """serve, three submits, two heartbeats, an export and a jobs list, started at once, three times
    over: the first opens of a fresh store take turns instead of failing with "database is locked"."""
    config = _config(own_sandbox, tmp_path / "agents.toml")
    for round_ in range(3):
        state = str(tmp_path / f"state-{round_}")
        common = ("--config", config, "--state-dir", state)
        serve = _popen("serve", *common)
        others = [_popen("submit", *common, "--", "true") for _ in range(3)]
        others += [_popen("heartbeat", *common) for _ in range(2)]
        others += [_popen("telemetry", "export", "--csv", str(tmp_path / f"export-{round_}.csv"), *common),
                   _popen("jobs", "list", *common)]
        try:
            results = [(p.args, *p.communicate(timeout=120), p.wait()) for p in others]
        finally:
            for process in others:
                if process.poll() is None:
                    process.kill()
                    process.communicate()
            _, serve_err = _stop(serve)
        for args, _out, err, code in results:
            assert code == 0 and "locked" not in err and "Traceback" not in err, (args, err)
        assert serve.returncode == 0 and "Traceback" not in serve_err, serve_err


def _open_and_write(where: tuple[str | None, str], barrier: Barrier, errors: Queue[str | None]) -> None:
    url, state = where
    barrier.wait()  # all of them open the same fresh store at the same moment
    try:
        store = open_store(url, state)
        with store.transaction() as db:
            db.execute("INSERT INTO job_events (job_id, ts, event, detail) VALUES ('j', 0, 'opened', NULL)")
        store.close()
        errors.put(None)
    except Exception as exc:
        errors.put(repr(exc))


def test_first_opens_of_a_fresh_store_take_turns_and_migrate_it_once(store_url: str | None, tmp_path: Path) -> None:
    """Forked processes released by a barrier open one fresh store and write to it. SQLite: the
    narrow race behind the processes above, made likely (setting WAL without the setup lock failed
    here in 14 of 200 opens), 25 rounds of 8. PostgreSQL: four processes migrate one empty database
    (the test's own) once, under the advisory lock."""
    rounds, processes = (25, 8) if store_url is None else (1, 4)
    for round_ in range(rounds):
        state = str(tmp_path / f"state-{round_}")
        outcomes = run_together(_open_and_write, (store_url, state), processes)
        assert outcomes == [None] * processes, outcomes
        store = open_store(store_url, state)
        try:
            assert store.query("SELECT count(*) FROM job_events")[0][0] == processes
            assert store.schema_version() == SCHEMA_VERSION
            if isinstance(store, PostgresStore):  # one version row, however many processes migrated
                assert [tuple(r) for r in store.query("SELECT version FROM schema_version")] == [(SCHEMA_VERSION,)]
        finally:
            store.close()


def test_a_closed_store_says_it_was_used_wrongly(make_store: Callable[[], Store]) -> None:
    store = make_store()
    store.close()
    with pytest.raises(StoreError, match="was used wrongly") as closed:
        store.query("SELECT 1")
    assert "\n" not in str(closed.value)
    cause = sqlite3.ProgrammingError if isinstance(store, SQLiteStore) else psycopg.InterfaceError
    assert isinstance(closed.value.__cause__, cause)


def test_a_job_submitted_on_one_store_is_claimed_once_from_another(make_store: Callable[[], Store]) -> None:
    """Two Store instances (two controllers) see one queue, and the claim is a compare-and-set only
    one of them wins."""
    first, second = JobQueue(make_store()), JobQueue(make_store())
    job = first.submit(JobSpec(command=["true"], name="shared"))
    seen = second.get(job.id[:6].upper())  # a prefix, in either case
    assert (seen.id, seen.state, seen.name) == (job.id, "queued", "shared")
    assert second.claim(job.id, "gpu-1", ["0"], attempt=1)
    assert not first.claim(job.id, "gpu-2", ["1"], attempt=1)
    assert first.get(job.id).agent == "gpu-1" and first.get(job.id).gpus == ["0"]
    assert first.set_reason(job.id, "x") is False  # not queued any more
    assert first.mark_running(job.id, "/tmp/j", detail="attempt 1 on gpu-1")
    assert first.first_event(job.id, "running", "attempt 1") is not None
    assert first.first_event(job.id, "running", "attempt 2") is None
    assert [event for _ts, event, _detail in second.events(job.id)] == ["submitted", "dispatching", "running"]
    assert second.list(["running"])[0].id == job.id


def test_set_reason_writes_only_a_change(make_store: Callable[[], Store]) -> None:
    queue = JobQueue(make_store())
    job = queue.submit(JobSpec(command=["true"]))
    assert queue.set_reason(job.id, "no agent free")
    assert not queue.set_reason(job.id, "no agent free")
    assert queue.set_reason(job.id, "draining")


@pytest.mark.sqlite_only(reason="sqlite3's own errors, on a garbage file")
def test_every_sqlite_error_leaves_as_one_store_error(tmp_path: Path) -> None:
    """By result code where SQLite gives one, by class where the sqlite3 module raises on its own."""
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"not sqlite\n" * 1000)
    with pytest.raises(StoreError) as opened:
        SQLiteStore(garbage)
    assert str(opened.value) == (f"the store {garbage} is not a fleetctl store: file is not a database "
                                 "(move it away; fleetctl starts a new one)")
    assert isinstance(opened.value.__cause__, sqlite3.DatabaseError)
    # A closed store, where the sqlite3 module raises on its own: test_a_closed_store_says_it_was_used_wrongly


def _damaged_store(state: Path) -> Path:
    """A store with history whose pages after the first are overwritten: the header and schema
    (page 1) stay valid, so it opens, and the first read or write of a table fails."""
    store = SQLiteStore.in_state_dir(state)
    now = datetime.now(timezone.utc)
    snapshots = [TelemetrySnapshot(agent=f"gpu-{i}", timestamp=now, status="ok",
                                   gpus=[GpuSample(index=0, vendor="nvidia", name="x" * 200)]) for i in range(400)]
    record(store, snapshots, HealthPolicy(3, 600))
    store.close()  # the last connection checkpoints the WAL into the file and removes it
    path = store.path
    assert not path.with_name(path.name + "-wal").exists()
    page = 4096
    with open(path, "r+b") as handle:
        size = handle.seek(0, os.SEEK_END)
        assert size > 8 * page
        for offset in range(page, size, page):
            handle.seek(offset)
            handle.write(b"\xa5" * page)
    return path


@pytest.mark.sqlite_only(reason="damages the SQLite file's pages")
def test_damaged_store_is_one_line_for_the_cli_and_stops_serve(own_sandbox: Sandbox, tmp_path: Path) -> None:
    state = tmp_path / "state"
    path = _damaged_store(state)
    config = _config(own_sandbox, tmp_path / "agents.toml")
    common = ("--config", config, "--state-dir", str(state))
    expected = f"the store {path} is damaged: database disk image is malformed (move it away; fleetctl starts a new one)"
    for args in (["heartbeat"], ["jobs", "list"], ["telemetry", "export", "--csv", str(tmp_path / "out.csv")],
                 ["submit", *common, "--", "true"]):
        result = run_cli(*args, *(common if "submit" not in args else ()))
        assert result.returncode == 1, (args, result.stderr)
        line = _one_line(result.stderr)
        assert line.startswith("fleetctl: ") and line.endswith(expected), args
    # serve --no-jobs meets the damage in its first heartbeat's write, serve with jobs in its first
    # look at the queue: both exit 1 with the line, once, instead of logging tracebacks forever.
    for args in (["serve", "--no-jobs"], ["serve"]):
        serve = _popen(*args, *common)
        try:
            serve.wait(timeout=60)
        finally:
            _, stderr = _stop(serve)
        assert serve.returncode == 1, stderr
        assert "Traceback" not in stderr and stderr.count("is damaged") == 1, stderr
        assert stderr.strip().splitlines()[-1].endswith(expected)
    # Moved away, as the line says: fleetctl starts a new store.
    path.rename(path.with_name("damaged.db"))
    assert run_cli("heartbeat", *common).returncode == 0


def _ro_mount_works() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "--mount", "sh", "-c", "mount --bind / /mnt"], capture_output=True)
    return probe.returncode == 0


def _read_only(path: Path) -> list[str]:
    """The command prefix under which ``path`` is read-only. Root ignores file modes, so as root
    the command runs in a private mount namespace (``unshare --mount``, gone when it exits) with a
    read-only bind mount over ``path``; anyone else gets ``chmod 0500``."""
    if os.geteuid() != 0:
        path.chmod(0o500)
        return []
    if not _ro_mount_works():
        pytest.skip("root without mount namespaces: cannot make a directory read-only for root")
    script = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" "$0" && exec "$@"'
    return ["unshare", "--mount", "sh", "-c", script, str(path)]


@pytest.mark.sqlite_only(reason="the SQLite file in a read-only state dir")
@pytest.mark.parametrize("kind", ["existing", "fresh", "missing"])
def test_read_only_state_dir_is_one_clear_line(own_sandbox: Sandbox, tmp_path: Path, kind: str) -> None:
    """A state dir with a store, an empty one, or a missing one under a read-only parent."""
    config = _config(own_sandbox, tmp_path / "agents.toml")
    parent = tmp_path / "ro"
    state = parent / "state"
    if kind != "missing":
        state.mkdir(parents=True)
    else:
        parent.mkdir()
    if kind == "existing":
        assert run_cli("heartbeat", "--config", config, "--state-dir", str(state)).returncode == 0
    prefix = _read_only(parent if kind == "missing" else state)
    try:
        for args in (["heartbeat"], ["jobs", "list"], ["serve"]):
            command = [*prefix, *FLEETCTL, *args, "--config", config, "--state-dir", str(state)]
            started = time.monotonic()
            result = subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60)
            assert result.returncode == 1, (args, result.stderr)
            line = _one_line(result.stderr)
            assert str(state) in line and "--state-dir" in line, (args, line)
            assert ("Read-only file system" in line) if prefix else ("Permission denied" in line), line
            assert time.monotonic() - started < 30  # no waiting out busy timeouts
    finally:
        (parent if kind == "missing" else state).chmod(0o700)
