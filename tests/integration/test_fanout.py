"""Ad-hoc fan-out (``fleet.run``, ``fleetctl run``) against real sshd: direct hosts, hosts behind one
and two bastions, a refused host, a failing command, hostile arguments and the output limit."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleetctl.errors import ConfigError, UnknownAgentError
from fleetctl.fleet import Fleet
from fleetctl.hosts.fanout import FanoutResult
from fleetctl.inventory.config import load_config
from fleetctl.sandbox import Sandbox
from tests.conftest import run_cli

# Every host of the shared sandbox except the black-holed one (its connect timeout would only add seconds).
HOSTS = ["direct-nv", "direct-amd", "lan-nv", "deep-nv", "broken-driver", "no-tool", "refused"]
REACHABLE = [h for h in HOSTS if h != "refused"]


@pytest.fixture
def fleet(fleet_sandbox: Sandbox, tmp_path: Path) -> Iterator[Fleet]:
    with Fleet(load_config(fleet_sandbox.inventory_path), state_dir=tmp_path / "state") as fleet:
        yield fleet


def test_every_host_reports_and_failures_do_not_stop_the_rest(fleet: Fleet) -> None:
    script = 'echo "$FLEETCTL_SANDBOX_HOST"; if [ "$FLEETCTL_SANDBOX_HOST" = lan-nv ]; then echo bad >&2; exit 7; fi'
    result = fleet.run(["sh", "-c", script], agents=HOSTS)
    assert list(result) == HOSTS  # inventory order, every host present
    for name in REACHABLE:
        assert result[name].stdout == f"{name}\n"
    assert {r.agent for r in result.ok} == set(REACHABLE) - {"lan-nv"}
    assert {r.agent for r in result.failed} == {"lan-nv", "refused"}
    failing = result["lan-nv"]  # behind the bastion: ran, and failed
    assert (failing.status, failing.exit_code, failing.stderr, failing.error) == ("failed", 7, "bad\n", None)
    refused = result["refused"]  # never ran: no exit code, one line saying why
    assert refused.status == "unreachable" and refused.exit_code is None
    assert refused.error and "refused" in refused.error and "\n" not in refused.error
    assert result["deep-nv"].ok  # two bastions away


def test_hostile_arguments_reach_the_host_verbatim(fleet: Fleet, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    words = [f"$(touch {marker})", f"`touch {marker}`", "it's \"quoted\"", "two\nlines", "; touch x #", "*", "", "ü \\ $HOME"]
    result = fleet.run(["printf", "%s|", *words], agents=["direct-nv", "deep-nv"])
    for host in result.values():
        assert host.ok, host
        assert host.stdout == "".join(f"{w}|" for w in words)
    assert not marker.exists()


def test_a_string_runs_through_sh(fleet: Fleet) -> None:
    result = fleet.run("echo $((40 + 2)) | tr 4 x", agents="lan-nv")
    assert result["lan-nv"].stdout == "x2\n"
    assert result.argv == ["sh", "-c", "echo $((40 + 2)) | tr 4 x"]


def test_output_limit_reports_truncated_and_keeps_the_connection(fleet: Fleet) -> None:
    noisy = ["sh", "-c", "head -c 300000 /dev/zero | tr '\\0' a"]
    result = fleet.run(noisy, agents=["direct-nv", "lan-nv"], max_stdout=1000)
    for host in result.values():
        assert host.status == "truncated" and host.exit_code is None
        assert host.stdout == "a" * 1000
        assert host.error and "larger than 1000 bytes" in host.error
    again = fleet.run(["true"], agents=["direct-nv", "lan-nv"])
    assert len(again.ok) == 2


def test_timeout_is_per_host_and_reported(fleet: Fleet) -> None:
    result = fleet.run(["sh", "-c", 'if [ "$FLEETCTL_SANDBOX_HOST" = direct-nv ]; then sleep 30; fi; echo done'],
                       agents=["direct-nv", "direct-amd"], timeout=1.0)
    assert result["direct-nv"].status == "timeout" and result["direct-nv"].exit_code is None
    assert result["direct-amd"].ok and result["direct-amd"].stdout == "done\n"
    assert result.duration_s < 10


def test_labels_are_globs(fleet: Fleet) -> None:
    assert list(fleet.run(["true"], labels={"vendor": "amd"})) == ["direct-amd"]
    picked = fleet.run(["true"], agents=["direct-nv", "direct-amd", "lan-nv"], labels={"vendor": "nv*"})
    assert list(picked) == ["direct-nv", "lan-nv"]
    assert len(fleet.run(["true"], labels={"vendor": "intel"})) == 0


def test_mistakes_are_raised_not_reported(fleet: Fleet) -> None:
    with pytest.raises(UnknownAgentError, match="did you mean 'direct-nv'"):
        fleet.run(["true"], agents=["direct-nx"])
    with pytest.raises(ConfigError):
        fleet.run([])
    with pytest.raises(ConfigError):
        fleet.run(["true"], timeout=0)


def test_result_as_data(fleet: Fleet) -> None:
    result = fleet.run(["printf", "<script>x</script>\\n"], agents=["direct-nv", "refused"])
    frame = result.to_dataframe()
    assert list(frame.columns) == ["agent", "status", "exit_code", "duration_s", "stdout", "stderr", "error"]
    assert frame.set_index("agent").loc["direct-nv", "exit_code"] == 0
    assert str(frame["exit_code"].dtype) == "Int64"
    page = result._repr_html_()
    assert "&lt;script&gt;" in page and "<script>" not in page
    assert repr(result).startswith("<FanoutResult `printf '<script>") and "1 ok, 1 failed" in repr(result)
    assert isinstance(result, FanoutResult) and dict(result)["direct-nv"].ok
    assert "lan-nv" in fleet._repr_html_() and "via" in fleet._repr_html_()


def test_cli_blocks_exit_codes_and_visible_control_characters(fleet_sandbox: Sandbox) -> None:
    config = str(fleet_sandbox.inventory_path)
    done = run_cli("run", "--config", config, "--agent", "direct-nv", "--agent", "deep-nv", "--", "nvidia-smi", "-L")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("==> direct-nv: exit 0 (") and lines[1].startswith("GPU 0: NVIDIA H100")
    assert any(line.startswith("==> deep-nv: exit 0 (") for line in lines)

    mixed = run_cli("run", "--config", config, "--agent", "lan-nv", "--agent", "refused", "--timeout", "20s",
                    "printf", "\x1b]0;title\x07[red]x[/red]\\n")
    assert mixed.returncode == 3, mixed.stderr
    assert "\x1b" not in mixed.stdout and "\\x1b]0;title\\x07[red]x[/red]" in mixed.stdout
    refused = [line for line in mixed.stdout.splitlines() if line.startswith("==> refused: unreachable: ")]
    assert len(refused) == 1 and "refused" in refused[0][len("==> refused"):]


def test_cli_json_and_usage_errors(fleet_sandbox: Sandbox) -> None:
    config = str(fleet_sandbox.inventory_path)
    result = run_cli("run", "--config", config, "--label", "vendor=am?", "--json", "--", "sh", "-c", "echo hi; exit 4")
    assert result.returncode == 3
    (host,) = json.loads(result.stdout)
    assert (host["agent"], host["status"], host["exit_code"], host["stdout"]) == ("direct-amd", "failed", 4, "hi\n")

    limited = run_cli("run", "--config", config, "--agent", "direct-nv", "--max-output", "10", "--json", "--",
                      "sh", "-c", "seq 1 1000")
    (host,) = json.loads(limited.stdout)
    assert limited.returncode == 3 and host["status"] == "truncated" and host["stdout"] == "1\n2\n3\n4\n5\n"

    nobody = run_cli("run", "--config", config, "--label", "vendor=intel", "--", "true")
    assert nobody.returncode == 1 and len(nobody.stderr.strip().splitlines()) == 1
    assert "no agent has labels matching vendor=intel" in nobody.stderr
    bad = run_cli("run", "--config", config, "--timeout", "soon", "--", "true")
    assert bad.returncode == 2 and "not a positive duration" in bad.stderr
