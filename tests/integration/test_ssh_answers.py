"""`ssh -G`'s answers kept between processes (fleetctl.ssh.resolve_cache), against the real OpenSSH
client: a fresh resolver (a new cron process) asks ssh nothing when no input changed, gets what ssh
would say, and asks again as soon as a config file, an included file, a new file under an Include
glob or a variable the config names changes. Answers that depend on the moment are never kept."""

from __future__ import annotations

import shutil
import stat
from pathlib import Path

import pytest

from fleetctl.ssh import resolve
from fleetctl.ssh.resolve import SshConfigResolver
from fleetctl.ssh.resolve_cache import ANSWERS_DIR

pytestmark = [pytest.mark.skipif(not shutil.which("ssh"), reason="needs OpenSSH's client"), pytest.mark.no_store]

HOSTS = ("lab", "gpu1", "other")


class Counting:
    """A wrapper around the real ``ssh`` that counts its runs."""

    def __init__(self, tmp_path: Path) -> None:
        self.log = tmp_path / "ssh-runs"
        self.binary = tmp_path / "ssh"
        self.binary.write_text(f'#!/bin/sh\necho run >> "{self.log}"\nexec {shutil.which("ssh")} "$@"\n')
        self.binary.chmod(0o755)

    @property
    def runs(self) -> int:
        return len(self.log.read_text().splitlines()) if self.log.exists() else 0


@pytest.fixture
def setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Counting, Path]:
    monkeypatch.setenv("KEYDIR", "/keys/one")
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "conf.d" / "10-lab.conf").write_text("Host lab\n  HostName lab.example\n  Port 2200\n")
    config = tmp_path / "config"
    config.write_text(f"Include {tmp_path}/conf.d/*.conf\nHost gpu*\n  User gpuuser\n  IdentityFile ${{KEYDIR}}/id\n")
    return config, Counting(tmp_path), tmp_path / "state" / ANSWERS_DIR


def _resolve_all(config: Path, ssh: Counting, answers: Path) -> list[object]:
    """What a new process resolves: nothing remembered in memory (not even OpenSSH's default algorithms)."""
    resolve._BASELINE.clear()
    resolver = SshConfigResolver(config, ssh_binary=str(ssh.binary), answers_dir=answers)
    return [resolver.resolve(host) for host in HOSTS]


ASKED_COLD = len(HOSTS) + 1  # each host, and once OpenSSH's defaults (-F none)


def test_a_second_process_asks_ssh_nothing_and_gets_the_same_answers(setup: tuple[Path, Counting, Path]) -> None:
    config, ssh, answers = setup
    first = _resolve_all(config, ssh, answers)
    assert ssh.runs == ASKED_COLD
    assert stat.S_IMODE(answers.stat().st_mode) == 0o700
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in answers.iterdir())
    again = _resolve_all(config, ssh, answers)
    assert ssh.runs == ASKED_COLD  # nothing asked
    assert again == first
    asked = [SshConfigResolver(config, ssh_binary=str(ssh.binary)).resolve(host) for host in HOSTS]
    assert asked == first  # what ssh -G says today
    assert (first[0].hostname, first[0].port, first[1].identity_files[-1]) == ("lab.example", 2200, "${KEYDIR}/id")  # type: ignore[attr-defined]


@pytest.mark.parametrize("change", ["the config", "an included file", "a new file under the glob", "a variable it names"])
def test_any_changed_input_is_asked_again(setup: tuple[Path, Counting, Path], change: str,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    config, ssh, answers = setup
    _resolve_all(config, ssh, answers)
    if change == "the config":
        config.write_text(config.read_text().replace("gpuuser", "newuser"))
    elif change == "an included file":
        (config.parent / "conf.d" / "10-lab.conf").write_text("Host lab\n  HostName lab2.example\n")
    elif change == "a new file under the glob":
        (config.parent / "conf.d" / "05-first.conf").write_text("Host lab\n  Port 2300\n")
    else:
        monkeypatch.setenv("KEYDIR", "/keys/two")
    after = _resolve_all(config, ssh, answers)
    assert ssh.runs == ASKED_COLD + len(HOSTS)  # the hosts again; OpenSSH's defaults did not change
    fresh = [SshConfigResolver(config, ssh_binary=str(ssh.binary)).resolve(host) for host in HOSTS]
    assert after == fresh


def test_answers_that_depend_on_the_moment_are_never_kept(setup: tuple[Path, Counting, Path]) -> None:
    config, ssh, answers = setup
    config.write_text(config.read_text() + 'Match exec "true"\n  ConnectTimeout 7\n')
    _resolve_all(config, ssh, answers)
    _resolve_all(config, ssh, answers)
    assert ssh.runs == ASKED_COLD + len(HOSTS)  # the hosts every time (OpenSSH's defaults, -F none, are kept)
    assert len(list(answers.iterdir())) == 1


def test_a_damaged_or_unwritable_store_of_answers_only_costs_asking(setup: tuple[Path, Counting, Path]) -> None:
    config, ssh, answers = setup
    first = _resolve_all(config, ssh, answers)
    for entry in answers.iterdir():
        entry.write_text("{not json")
    assert _resolve_all(config, ssh, answers) == first
    assert ssh.runs == 2 * ASKED_COLD
    assert _resolve_all(config, ssh, answers) == first  # rewritten whole
    assert ssh.runs == 2 * ASKED_COLD
    blocked = answers.parent / "blocked"
    blocked.write_text("a file where a folder should be")
    assert _resolve_all(config, ssh, blocked / ANSWERS_DIR) == first  # no folder can be made there: asked, not kept
