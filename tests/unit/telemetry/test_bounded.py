"""A GPU tool bounded on the host (fleetctl.telemetry.bounded): the heartbeat's shell, run by the local ``sh``
against stub tools, with coreutils ``timeout`` on the PATH and without it."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from fleetctl.inventory.config import Agent
from fleetctl.ssh.seam import CommandResult
from fleetctl.telemetry.bounded import HUNG_EXIT, bounded_function, tool_timeout_s
from fleetctl.telemetry.health_beat import HostMemory, health_script
from fleetctl.telemetry.heartbeat import heartbeat_command, snapshot_from_result

HANGS = "#!/bin/sh\nexec sleep 60\n"


def _path(tmp_path: Path, *, with_timeout: bool, tools: dict[str, str]) -> str:
    """A PATH of the basic commands the script uses, with or without ``timeout``, and the stub tools."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("sh", "sleep", "cat", "grep", "tail", "printf", "kill", *(["timeout"] if with_timeout else [])):
        found = shutil.which(name)
        if found:
            (bin_dir / name).symlink_to(found)
    for name, text in tools.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return str(bin_dir)


def _sh(script: str, path: str) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    done = subprocess.run(["/bin/sh", "-c", script], env={"PATH": path, "HOME": os.environ.get("HOME", "/")},
                          capture_output=True, text=True, timeout=30, check=False)
    return done, time.monotonic() - started


def test_the_tool_share_of_the_command_timeout() -> None:
    assert tool_timeout_s(30) == 8 and tool_timeout_s(10) == 3 and tool_timeout_s(1) == 2


@pytest.mark.parametrize("with_timeout", [True, False], ids=["coreutils-timeout", "sh-watchdog"])
def test_a_hung_tool_exits_124_in_its_time_and_a_quick_one_keeps_its_answer(tmp_path: Path, with_timeout: bool) -> None:
    if with_timeout and not shutil.which("timeout"):
        pytest.skip("no timeout on this machine")
    path = _path(tmp_path, with_timeout=with_timeout, tools={"hangs": HANGS, "quick": "#!/bin/sh\necho answer; exit 3\n"})
    done, took = _sh(f'{bounded_function(1)}\nx=$(fleetctl_bounded hangs; echo "rc=$?"); echo "$x"; '
                     'fleetctl_bounded quick; echo "rc=$?"', path)
    assert done.stdout.split() == [f"rc={HUNG_EXIT}", "answer", "rc=3"], done
    assert took < 30 and "Terminated" not in done.stderr, (took, done.stderr)  # stopped at 1 s, not after its 60


def test_a_heartbeat_whose_nvidia_smi_hangs_answers_in_time_with_its_gpus_unknown(tmp_path: Path) -> None:
    agent = Agent(name="hangs", hostname="hangs.example", command_timeout_s=4.0)  # 2 s for the tool
    memory = HostMemory(fields=("index", "pci.bus_id", "uuid", "driver_version"), buses={"0000:01:00": 0, "0000:02:00": 1},
                        tool="nvidia-smi")
    calls = tmp_path / "calls"
    path = _path(tmp_path, with_timeout=bool(shutil.which("timeout")),
                 tools={"nvidia-smi": f'#!/bin/sh\necho "$*" >> {calls}\nexec sleep 60\n'})
    done, took = _sh(heartbeat_command(agent, health_script(memory)), path)
    assert len(calls.read_text().splitlines()) == 1  # one hang only: the health part does not ask the hung tool again
    snap = snapshot_from_result(agent, CommandResult("", done.returncode, done.stdout, done.stderr), took * 1000,
                                memory=memory)
    assert snap.status == "ok" and snap.gpus == [] and snap.error == "nvidia-smi did not answer within 2 s: its GPUs are unknown"
    assert snap.gpu_health is not None and [(g.index, g.state) for g in snap.gpu_health.gpus] == [(0, "unknown"), (1, "unknown")]
    assert snap.gpu_health.host_reasons[0] == "host: GPU tool did not answer (nvidia-smi)"
    assert not snap.gpu_health.gpus[1].missing and snap.gpu_health.buses == memory.buses  # hung, not gone
