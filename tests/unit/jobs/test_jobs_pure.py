"""Placement and the remote scripts, as pure functions."""

from __future__ import annotations

import json
import subprocess
from datetime import datetime, timezone
from pathlib import Path

from fleetctl.inventory.config import Agent
from fleetctl.jobs.model import JobSpec
from fleetctl.jobs.placement import Candidate, never_satisfiable, place, waiting_reason
from fleetctl.jobs.remote import remove_command, wrapper_script
from fleetctl.telemetry.jobdirs import parse_scan_line
from fleetctl.telemetry.snapshot import GpuSample, HostBasics, TelemetrySnapshot


def candidate(name: str, gpus: int, *, used: tuple[int, ...] = (), held: tuple[int, ...] = (), load: float = 0.0,
              labels: dict[str, str] | None = None, online: bool = True, draining: bool = False, jobs: int = 0) -> Candidate:
    samples = [GpuSample(index=i, vendor="nvidia", uuid=f"GPU-{name}-{i}", memory_total_mib=80000,
                         memory_used_mib=40000 if i in used else 0, memory_free_mib=40000 if i in used else 80000)
               for i in range(gpus)]
    snap = TelemetrySnapshot(agent=name, timestamp=datetime.now(timezone.utc), status="ok", gpus=samples,
                             host=HostBasics(load_1m=load))
    return Candidate(Agent(name=name, hostname=name, labels=labels or {}), online, draining, snap, frozenset(held), jobs)


def test_placement_skips_busy_held_offline_and_draining_and_prefers_least_loaded() -> None:
    fleet = [candidate("busy", 2, used=(0,)), candidate("held", 2, held=(1,)), candidate("off", 4, online=False),
             candidate("drained", 4, draining=True), candidate("loaded", 2, load=3.0), candidate("idle", 2, load=0.1)]
    chosen = place(JobSpec(command=["x"], gpus=2), fleet)
    assert chosen is not None and chosen.agent == "idle" and [g.index for g in chosen.gpus] == [0, 1]
    assert place(JobSpec(command=["x"], gpus=2, allow_busy_gpus=True), fleet[:1]).agent == "busy"  # type: ignore[union-attr]
    assert place(JobSpec(command=["x"], gpus=1, min_free_mem_mib=50000), [fleet[0]]).gpus[0].index == 1  # type: ignore[union-attr]


def test_labels_are_globs_and_impossible_jobs_say_why() -> None:
    fleet = [candidate("a", 8, labels={"gpu_type": "a100-80g"}), candidate("h", 2, labels={"gpu_type": "h100"})]
    assert place(JobSpec(command=["x"], gpus=1, labels={"gpu_type": "a100*"}), fleet).agent == "a"  # type: ignore[union-attr]
    assert never_satisfiable(JobSpec(command=["x"], labels={"gpu_type": "v100"}), fleet) == \
        "no agent has labels matching gpu_type=v100"
    assert "the most any matching agent has is 2" in never_satisfiable(  # type: ignore[operator]
        JobSpec(command=["x"], gpus=4, labels={"gpu_type": "h*"}), fleet)
    assert never_satisfiable(JobSpec(command=["x"], agent="nope"), fleet) == "agent 'nope' is not in the inventory"
    assert never_satisfiable(JobSpec(command=["x"], gpus=8), fleet) is None


def test_waiting_reason_names_what_holds_back_each_matching_agent() -> None:
    a100 = {"gpu_type": "a100-80g"}
    fleet = [candidate("gpu-1", 4, used=(0,), held=(1, 2), labels=a100), candidate("gpu-3", 4, draining=True, labels=a100),
             candidate("gpu-4", 8, online=False, labels=a100), candidate("h", 8, labels={"gpu_type": "h100"})]
    spec = JobSpec(command=["x"], gpus=4, labels={"gpu_type": "a100*"})
    assert place(spec, fleet) is None
    assert waiting_reason(spec, fleet) == (
        "waiting for 4 free GPUs on agents matching gpu_type=a100*: gpu-3 has 4 free but is draining; "
        "gpu-4 has 8 free but is not online; gpu-1 has 1 free of 4 (2 held by fleetctl jobs, 1 in use by other processes)")
    assert waiting_reason(JobSpec(command=["x"], agent="gpu-3"), fleet) == "waiting for agent gpu-3: gpu-3 is draining"
    many = [candidate(f"n{i}", 1, online=False) for i in range(6)]
    assert waiting_reason(JobSpec(command=["x"], gpus=2), many).endswith("n3 is not online; and 2 more")
    memory = JobSpec(command=["x"], gpus=1, min_free_mem_mib=50000)
    assert waiting_reason(memory, [candidate("m", 1, used=(0,))]) == \
        "waiting for 1 free GPU: m has 0 free of 1 (1 in use by other processes)"


def test_wrapper_quotes_every_argument_and_writes_the_result(tmp_path: Path) -> None:
    """Run the generated run.sh locally: hostile arguments arrive intact."""
    directory = tmp_path / "fleetctl-job-jabc-a1-node.AbCdEfGh"
    directory.mkdir()
    (directory / "job.json").write_text("{}")
    hostile = ["printf", "%s|", "a b", "$(touch pwned)", "'q'", '"dq"', "`x`", ";rm -rf /"]
    spec = JobSpec(command=hostile, env={"WEIRD": "it's $HOME"})
    (directory / "run.sh").write_text(wrapper_script("jabc", str(directory), spec, {"CUDA_VISIBLE_DEVICES": "GPU-1"}))
    subprocess.run(["sh", str(directory / "run.sh")], check=True, cwd=tmp_path)
    assert (directory / "stdout.log").read_text() == "a b|$(touch pwned)|'q'|\"dq\"|`x`|;rm -rf /|"
    assert not (tmp_path / "pwned").exists() and not (directory / "pwned").exists()
    result = json.loads((directory / "result.json").read_text())
    assert result["exit_code"] == 0 and result["signal"] is None and not result["timed_out"]


def test_scan_lines_and_remove_guard() -> None:
    found = parse_scan_line("done /tmp/fleetctl-job-j0a1b2c3d4e-a2-gpu.node-1.Xy12Ab34")
    assert found is not None and (found.job_id, found.attempt, found.agent, found.state) == ("j0a1b2c3d4e", 2, "gpu.node-1", "done")
    assert parse_scan_line("done /home/user") is None
    try:
        remove_command("/home/user")
    except ValueError as exc:
        assert "not a fleetctl job directory" in str(exc)
    else:
        raise AssertionError("remove_command accepted a non-job path")
