"""The CLI's manners, as a user meets them (real CLI in a subprocess, real sshd): data is never markup
or control codes, CSVs are safe in a spreadsheet, NO_COLOR, closed and broken stdout, a missing CSV
directory, repeated and fast `sandbox down`, jobs without logs, and one JSON time format."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import select
import subprocess
import sys
import time
from pathlib import Path

from fleetctl.fleet import Fleet
from fleetctl.jobs.api import Job
from fleetctl.sandbox import Sandbox, sshd
from tests.conftest import require_sshd, run_cli
from tests.waiting import wait_for

HOSTILE = "[/][link=http://evil]x[/link]\x1b]0;pwned\x07\x1b]8;;http://evil\x1b\\\x9b31m[blink]"
ISO_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{6})?Z$")


def _assert_plain(result: subprocess.CompletedProcess[str]) -> None:
    """Exit 0, no traceback, and no raw ESC / C1 / BEL anywhere: hostile text arrived made visible."""
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and "MarkupError" not in result.stderr
    for stream in (result.stdout, result.stderr):
        assert not {"\x1b", "\x9b", "\x07"} & set(stream), repr(stream)


def _times(node: object, key: str = "") -> list[tuple[str, object]]:
    """Every value under a time-like key in a JSON document."""
    if isinstance(node, dict):
        return [t for k, v in node.items() for t in _times(v, k)]
    if isinstance(node, list):
        return [t for v in node for t in _times(v, key)]
    timeish = key in ("ts", "timestamp", "submitted", "dispatched", "started", "finished")
    return [(key, node)] if timeish and node is not None else []


def _inventory(sandbox: Sandbox, tmp_path: Path) -> tuple[list[str], Path]:
    state = tmp_path / "state"
    return ["--config", str(sandbox.inventory_path), "--state-dir", str(state)], state


def test_hostile_job_names_and_labels_print_as_text(own_sandbox: Sandbox, tmp_path: Path) -> None:
    where, _ = _inventory(own_sandbox, tmp_path)
    submitted = run_cli("submit", "--name", HOSTILE, "--label", f"x={HOSTILE}", *where, "--", "echo", HOSTILE)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    for args in (["jobs", "list"], ["jobs", "show", job_id], ["jobs", "list", "--json"], ["jobs", "show", job_id, "--json"]):
        result = run_cli(*args, *where)
        _assert_plain(result)
    shown = run_cli("jobs", "show", job_id, *where).stdout
    assert "\\x1b]0;pwned\\x07" in shown and "[/][link=http://evil]" in shown  # shown, made visible
    assert json.loads(run_cli("jobs", "show", job_id, "--json", *where).stdout)["name"] == HOSTILE  # JSON keeps data

    config = tmp_path / "agents.toml"
    registered = run_cli("register-ssh", "--no-connect", "--host", "root@[2001:db8::1]:2222", "--name", "odd",
                         "--label", f"gpu_type={HOSTILE}", "--label", "zone=a", "--config", str(config))
    _assert_plain(registered)
    for args in (["agents", "list"], ["agents", "show", "odd"], ["agents", "list", "--json"]):
        _assert_plain(run_cli(*args, "--config", str(config)))
    shown = run_cli("agents", "show", "odd", "--config", str(config)).stdout
    labels = next(line for line in shown.splitlines() if line.startswith("labels:"))
    assert labels.startswith("labels: gpu_type=[/][link=http://evil]x[/link]\\x1b]0;pwned") and labels.endswith(", zone=a")
    assert "{" not in labels  # k=v, k=v, not a Python dict

    bad = run_cli("agents", "show", HOSTILE, "--config", str(config))
    assert bad.returncode == 1 and len(bad.stderr.strip().splitlines()) == 1
    assert not {"\x1b", "\x9b", "\x07"} & set(bad.stderr)


def test_no_color_turns_off_all_styling_on_a_terminal(tmp_path: Path) -> None:
    config = tmp_path / "agents.toml"
    assert run_cli("register-ssh", "--no-connect", "--host", "root@10.0.0.1", "--config", str(config)).returncode == 0

    def on_a_tty(env: dict[str, str]) -> bytes:
        leader, follower = os.openpty()
        process = subprocess.Popen([sys.executable, "-m", "fleetctl", "agents", "list", "--config", str(config)],
                                   stdin=subprocess.DEVNULL, stdout=follower, stderr=follower,
                                   env={**os.environ, "TERM": "xterm-256color", **env})
        os.close(follower)
        data, deadline = b"", time.monotonic() + 60
        while time.monotonic() < deadline:
            ready, _, _ = select.select([leader], [], [], 1.0)
            try:
                chunk = os.read(leader, 65536) if ready else b""
            except OSError:  # EIO: the child closed the terminal
                break
            if ready and not chunk:
                break
            data += chunk
        os.close(leader)
        assert process.wait(timeout=60) == 0, data
        return data

    assert b"\x1b[" in on_a_tty({"NO_COLOR": ""})  # the header is bold on a terminal: the check is not vacuous
    plain = on_a_tty({"NO_COLOR": "1"})
    assert b"NAME" in plain and b"\x1b" not in plain


def test_broken_pipe_exits_141_and_closed_stdout_exits_1_quietly(tmp_path: Path) -> None:
    config = tmp_path / "agents.toml"
    assert run_cli("register-ssh", "--no-connect", "--host", "root@10.0.0.1", "--config", str(config)).returncode == 0
    argv = [sys.executable, "-m", "fleetctl", "agents", "list", "--config", str(config)]
    for extra in ([], ["--json"]):
        reader, writer = os.pipe()
        os.close(reader)  # the reader is gone before the first write, as after `| head -1` has read its line
        try:
            result = subprocess.run([*argv, *extra], stdout=writer, stderr=subprocess.PIPE, text=True,
                                    stdin=subprocess.DEVNULL, timeout=60)
        finally:
            os.close(writer)
        assert (result.returncode, result.stderr) == (141, "")
    closed = subprocess.run(["sh", "-c", '"$@" >&-', "sh", *argv], capture_output=True, text=True, timeout=60)
    assert closed.returncode == 1 and "Traceback" not in closed.stderr
    assert closed.stderr.strip().splitlines() == ["fleetctl: error: stdout is closed (run it with >/dev/null to discard "
                                                  "the output)"]


def test_csv_cells_are_neutralised_end_to_end(own_sandbox: Sandbox, tmp_path: Path) -> None:
    where, _ = _inventory(own_sandbox, tmp_path)
    own_sandbox.write_host_state("solo", {**own_sandbox.host_state("solo"), "model": "=HYPERLINK(\"http://evil\")"})
    beat_csv, export_csv = tmp_path / "beat.csv", tmp_path / "export.csv"
    assert run_cli("heartbeat", "--csv", str(beat_csv), *where).returncode == 0
    assert run_cli("telemetry", "export", "--csv", str(export_csv), *where).returncode == 0
    to_stdout = run_cli("telemetry", "export", "--csv", "-", *where)
    assert to_stdout.returncode == 0, to_stdout.stderr
    for text in (beat_csv.read_text(), export_csv.read_text(), to_stdout.stdout):
        rows = list(csv.DictReader(io.StringIO(text)))
        assert rows and {r["gpu_name"] for r in rows} == {"'=HYPERLINK(\"http://evil\")"}
        assert all(float(r["memory_total_mib"]) > 0 and not r["timestamp"].startswith("'") for r in rows)

    missing = tmp_path / "nonexistent-dir" / "x.csv"
    for args in (["heartbeat", "--csv", str(missing)], ["telemetry", "export", "--csv", str(missing)]):
        result = run_cli(*args, *where)
        assert result.returncode == 1 and "Traceback" not in result.stderr
        assert result.stderr.strip().splitlines() == [
            f"fleetctl: error: cannot write {missing}: directory {missing.parent} does not exist "
            "(create it first or fix the path)"]
    assert not missing.parent.exists()


def test_jobs_without_logs_json_times_and_the_job_file(own_sandbox: Sandbox, tmp_path: Path) -> None:
    where, state = _inventory(own_sandbox, tmp_path)
    queued = run_cli("submit", *where, "--", "true").stdout.strip()
    logs = run_cli("jobs", "logs", queued, *where)
    assert logs.returncode == 1 and logs.stdout == ""
    assert logs.stderr.strip().splitlines() == [
        f"fleetctl: error: job {queued} has no stdout log: it has not started yet (queued: "
        + logs.stderr.split("(queued: ", 1)[1].strip()]

    impossible = run_cli("submit", "--gpus", "64", *where, "--", "true").stdout.strip()
    assert run_cli("jobs", "wait", impossible, *where).returncode == 3
    logs = run_cli("jobs", "logs", impossible, "--stderr", *where)
    assert logs.returncode == 1 and len(logs.stderr.strip().splitlines()) == 1
    assert f"job {impossible} has no stderr log: it never ran (failed: " in logs.stderr

    payload = tmp_path / "payload.json"
    payload.write_text('{"greeting": "hello"}')
    ran = run_cli("submit", "--name", "peek", "--env", "LR=0.1", "--timeout", "1m", "--payload", str(payload), "--wait",
                  *where, "--", "sh", "-c", 'cat "$FLEETCTL_JOB_FILE"')
    assert ran.returncode == 0, ran.stderr
    job_id = ran.stdout.strip()
    document = json.loads(run_cli("jobs", "logs", job_id, *where).stdout)
    assert document == {"id": job_id, "name": "peek", "command": ["sh", "-c", 'cat "$FLEETCTL_JOB_FILE"'],
                        "env": {"LR": "0.1"}, "payload": {"greeting": "hello"}, "gpus": [], "timeout_s": 60.0,
                        "attempt": 1}  # the layout the README documents

    for args in (["jobs", "show", job_id, "--json"], ["jobs", "list", "--json"], ["heartbeat", "--json"]):
        result = run_cli(*args, *where)
        assert result.returncode == 0, result.stderr
        times = _times(json.loads(result.stdout))
        assert times and all(isinstance(v, str) and ISO_Z.match(v) for _, v in times), times
        assert "+00:00" not in result.stdout
    events = json.loads(run_cli("jobs", "show", job_id, "--json", *where).stdout)["events"]
    assert [e["event"] for e in events][0] == "submitted" and all(ISO_Z.match(e["ts"]) for e in events)

    with Fleet.from_config(own_sandbox.inventory_path, state_dir=state) as fleet:
        assert repr(fleet.job(job_id)) == f"<Job {job_id} succeeded on solo, 0 GPUs>"
        assert repr(fleet.job(job_id).record) == f"<JobRecord {job_id} 'peek' succeeded on solo>"
        assert repr(Job(fleet.hosts, "jnosuchjob")) == "<Job jnosuchjob>"  # a repr never raises

    bad_env = run_cli("submit", "--env", "gpu_type", *where, "--", "true")
    assert bad_env.returncode == 1 and "write --env NAME=value" in bad_env.stderr


def test_demo_help_mentions_the_job() -> None:
    helped = run_cli("demo", "--help")
    assert helped.returncode == 0 and "2-GPU job" in " ".join(helped.stdout.split())


def test_sandbox_down_is_fast_leaves_no_sshd_and_a_second_time_is_a_no_op(tmp_path: Path) -> None:
    require_sshd()
    directory = tmp_path / "sandbox"
    up = run_cli("sandbox", "up", "--hosts", "20", "--dir", str(directory), timeout=300)
    assert up.returncode == 0, up.stderr
    pids = [int(p) for p in json.loads((directory / "sandbox.json").read_text())["pids"].values()]
    assert len(pids) >= 20 and all(sshd.running(pid) for pid in pids)
    started = time.monotonic()
    down = run_cli("sandbox", "down", "--dir", str(directory))
    took = time.monotonic() - started
    assert down.returncode == 0, down.stderr
    # Not a timing assertion (shared CI machines): the figure is printed for the record.
    print(f"sandbox down of {len(pids)} sshd processes: {took:.2f}s wall (CLI start included); {down.stdout.strip()}")
    assert [pid for pid in pids if sshd.running(pid)] == []
    again = run_cli("sandbox", "down", "--dir", str(directory))
    assert again.returncode == 0 and again.stdout.strip() == f"sandbox down: no sandbox runs in {directory}; nothing to stop"


def test_a_zombie_counts_as_stopped() -> None:
    # A parent forks a child that exits at once, then becomes `sleep`, which never reaps it: a zombie
    # whose parent is not us, as an sshd is after `sandbox up` has exited. (Python, not `sh -c
    # "true & exec sleep"`: a shell may reap its job before the exec, and then there is no zombie.)
    code = ("import os, sys\npid = os.fork()\nif pid == 0:\n    os._exit(0)\n"
            "print(pid, flush=True)\nos.execv('/bin/sleep', ['sleep', '60'])\n")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        zombie = int(parent.stdout.readline())
        wait_for("the child to be a zombie", lambda: Path(f"/proc/{zombie}/stat").read_text().split(") ")[1][0] == "Z", 30)
        os.kill(zombie, 0)  # a zombie passes the existence check, which is why stop() waited the full grace
        assert not sshd.running(zombie)
        assert sshd.running(parent.pid)
    finally:
        parent.kill()
        parent.wait()
    assert not sshd.running(parent.pid)


def test_sandbox_down_without_a_sandbox_is_a_note(tmp_path: Path) -> None:
    result = run_cli("sandbox", "down", "--dir", str(tmp_path / "never"))
    assert result.returncode == 0 and "nothing to stop" in result.stdout and not (tmp_path / "never").exists()
