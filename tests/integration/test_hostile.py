"""Hostile hosts against real sshd: escapes and markup in names and errors, NUL bytes, invalid
UTF-8, a 10 MB name, a million rows and endless output, next to healthy hosts. Every host gets a
status, the healthy rows stay right, and the controller's memory stays bounded."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from fleetctl.fleet import Fleet
from fleetctl.sandbox import HostSpec, Sandbox
from fleetctl.sandbox.gpusim import HOSTILE_TEXT
from fleetctl.telemetry import heartbeat
from fleetctl.telemetry.parsers import parse_gpu_output
from tests.conftest import require_sshd

# The round's controller (a `fleetctl heartbeat` process, pandas and paramiko loaded) peaks near
# 100 MiB; reading the endless and million-row hosts to their end took 1.2-2.9 GB before the limits.
PEAK_RSS_BOUND_MIB = 300
HEALTHY = {"ok-nv": ("NVIDIA H100 80GB HBM3", 81559.0), "ok-amd": ("Arcturus GL-XL [Instinct MI100]", 32752.0)}
# Host name -> (vendor, mode). The AMD ones take the JSON path of the parsers.
HOSTILE = {
    "names-nv": ("nvidia", "hostile_names"), "names-amd": ("amd", "hostile_names"),
    "error-nv": ("nvidia", "hostile_error"), "error-amd": ("amd", "hostile_error"),
    "nul-nv": ("nvidia", "nul_bytes"), "utf8-nv": ("nvidia", "invalid_utf8"), "utf8-amd": ("amd", "invalid_utf8"),
    "huge-name-nv": ("nvidia", "huge_name"), "million-nv": ("nvidia", "million_rows"),
    "million-amd": ("amd", "million_rows"), "endless-nv": ("nvidia", "endless"), "endless-amd": ("amd", "endless"),
}
TOO_LARGE = {"huge-name-nv", "million-nv", "million-amd", "endless-nv", "endless-amd"}


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    require_sshd()
    hosts = [HostSpec("ok-nv"), HostSpec("ok-amd", vendor="amd")]
    hosts += [HostSpec(name, vendor=vendor, mode=mode) for name, (vendor, mode) in HOSTILE.items()]
    sandbox = Sandbox(tmp_path_factory.mktemp("hostile"), hosts, use_netns=False)
    sandbox.up()
    yield sandbox
    sandbox.down()


def _healthy_rows_right(frame: pd.DataFrame) -> None:
    for agent, (name, memory) in HEALTHY.items():
        rows = frame[frame["agent"] == agent]
        assert len(rows) == 2 and set(rows["status"]) == {"ok"}, rows
        assert set(rows["gpu_name"]) == {name} and set(rows["memory_total_mib"]) == {memory}
        assert list(rows["gpu_index"]) == [0, 1]


def test_hostile_hosts_get_a_status_and_healthy_rows_stay_right(hostile: Sandbox, tmp_path: Path) -> None:
    with Fleet.from_config(hostile.inventory_path, state_dir=tmp_path / "state") as fleet:
        result = fleet.heartbeat()
        by_agent = {snap.agent: snap for snap in result}
        assert set(by_agent) == set(HEALTHY) | set(HOSTILE)
        _healthy_rows_right(result.to_dataframe())
        for name in TOO_LARGE:
            assert by_agent[name].status == "parse_error"
            assert f"larger than {heartbeat.MAX_STDOUT} bytes" in (by_agent[name].error or "")
        assert {by_agent["error-nv"].status, by_agent["error-amd"].status} == {"driver_error"}
        # Names are data: kept as the host sent them (the CLI shows them escaped), except what no
        # UTF-8 encoder takes, which becomes U+FFFD on both the CSV and the JSON path.
        assert {g.name for g in by_agent["names-nv"].gpus} == {HOSTILE_TEXT}
        assert {g.name for g in by_agent["names-amd"].gpus} == {HOSTILE_TEXT}
        assert {g.name for g in by_agent["nul-nv"].gpus} == {"NVIDIA\x00H100\x00 80GB"}
        for name in ("utf8-nv", "utf8-amd"):
            assert by_agent[name].status == "ok" and all("\ufffd" in (g.name or "") for g in by_agent[name].gpus)
        # What was recorded reads back: every host has history, the healthy rows unchanged.
        recorded = fleet.history()
        assert set(recorded["agent"]) == set(by_agent)
        _healthy_rows_right(recorded)


def test_one_hosts_unexpected_exception_is_its_own_snapshot(hostile: Sandbox, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    """A parser bug that only one host's output triggers: that host is parse_error, logged with its
    traceback at DEBUG; the round and every other host go on."""
    def buggy(command: str, text: str, **kwargs: object) -> object:
        if "[link=http://x]" in text:
            raise IndexError("list index out of range")
        return parse_gpu_output(command, text, **kwargs)  # type: ignore[arg-type]
    monkeypatch.setattr(heartbeat, "parse_gpu_output", buggy)
    caplog.set_level(logging.DEBUG, logger="fleetctl")
    with Fleet.from_config(hostile.inventory_path, state_dir=tmp_path / "state") as fleet:
        result = fleet.heartbeat(["ok-nv", "ok-amd", "names-nv", "names-amd", "endless-nv"])
    by_agent = {snap.agent: snap for snap in result}
    for name in ("names-nv", "names-amd"):
        assert by_agent[name].status == "parse_error"
        assert by_agent[name].error == f"unexpected IndexError while reading the heartbeat of {name}: list index out of range"
    _healthy_rows_right(result.to_dataframe())
    debug = [r for r in caplog.records if r.name == "fleetctl" and r.levelno == logging.DEBUG and r.exc_info]
    assert {r.getMessage() for r in debug} == {f"heartbeat of {n} failed unexpectedly" for n in ("names-nv", "names-amd")}


def _run_measured(*args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    """``fleetctl ARGS`` under a wrapper whose only child it is, so RUSAGE_CHILDREN's ru_maxrss is
    that process's peak RSS (KiB on Linux). Returns the result and the peak in MiB."""
    wrapper = ("import resource, subprocess, sys; done = subprocess.run(sys.argv[1:], stdin=subprocess.DEVNULL); "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(done.returncode)")
    done = subprocess.run([sys.executable, "-c", wrapper, sys.executable, "-m", "fleetctl", *args],
                          capture_output=True, text=True, timeout=120)
    *stderr, peak = done.stderr.rstrip("\n").split("\n")
    done.stderr = "\n".join(stderr)
    return done, int(peak) / 1024


def test_cli_csv_has_every_hosts_rows_and_peak_rss_is_bounded(hostile: Sandbox, tmp_path: Path) -> None:
    out = tmp_path / "round.csv"
    done, peak_mib = _run_measured("heartbeat", "--csv", str(out), "--json", "--config", str(hostile.inventory_path),
                                   "--state-dir", str(tmp_path / "state"))
    assert done.returncode == 3, done.stderr  # some hosts failed: their rows say why
    assert "Traceback" not in done.stderr and "internal error" not in done.stderr
    assert peak_mib < PEAK_RSS_BOUND_MIB, f"controller peak RSS {peak_mib:.0f} MiB"
    frame = pd.read_csv(out, keep_default_na=False, na_values=[""])
    assert set(frame["agent"]) == set(HEALTHY) | set(HOSTILE)
    _healthy_rows_right(frame)
    assert set(frame[frame["agent"].isin(TOO_LARGE)]["status"]) == {"parse_error"}
    snapshots = {snap["agent"]: snap for snap in json.loads(done.stdout)}
    assert set(snapshots) == set(frame["agent"])


def test_cli_table_survives_markup_and_escapes_in_names(hostile: Sandbox, tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "fleetctl", "heartbeat", "--agent", "names-nv", "--agent", "names-amd",
                           "--agent", "error-nv", "--agent", "nul-nv", "--agent", "ok-nv",
                           "--config", str(hostile.inventory_path), "--state-dir", str(tmp_path / "state")],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60)
    assert "Traceback" not in done.stderr and "internal error" not in done.stderr, done.stderr
    assert done.returncode == 3, done.stderr  # error-nv's driver failed
    assert "ok-nv" in done.stdout and "names-amd" in done.stdout
    # Shown as text (\x1b), never sent raw to the terminal; markup shown, not applied.
    assert not any(code in done.stdout for code in ("\x1b", "\x9b", "\x07", "\x00")), done.stdout
    assert "\\x1b]0;owned" in done.stdout and "[link=http://x]" in done.stdout

