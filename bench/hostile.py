"""The controller's peak RSS for a heartbeat round with hostile hosts, next to a healthy round's,
in the same run over the same sandbox fleet.

    .venv/bin/python bench/hostile.py              # 3 runs of each round
    .venv/bin/python bench/hostile.py --runs 5

The fleet: four healthy hosts (two NVIDIA, two AMD) and, per hostile kind, an NVIDIA and an AMD host
whose tool prints without end, or a million GPU rows. Each round runs in a fresh process (the
controller as cron runs it: one ``Fleet``, the round, history written to SQLite), so its peak RSS
(``VmHWM``) is that round's alone. Before the heartbeat's output limits such a host drove the
controller to 1.2-2.9 GB within seconds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from fleetctl.sandbox import HostSpec, Sandbox
from fleetctl.telemetry.heartbeat import MAX_STDERR, MAX_STDOUT

HEALTHY = ["ok-nv-1", "ok-nv-2", "ok-amd-1", "ok-amd-2"]
ROUNDS = {
    "healthy": HEALTHY,
    "endless": [*HEALTHY, "endless-nv", "endless-amd"],
    "million-row": [*HEALTHY, "million-nv", "million-amd"],
    "endless + million-row": [*HEALTHY, "endless-nv", "endless-amd", "million-nv", "million-amd"],
}
# Run in a child: one round over the named agents, then the process's own peak RSS.
CHILD = """
import json, sys, time
from fleetctl.fleet import Fleet
config, state, *agents = sys.argv[1:]
started = time.monotonic()
with Fleet.from_config(config, state_dir=state) as fleet:
    result = fleet.heartbeat(agents)
seconds = time.monotonic() - started
peak = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"peak_mib": peak / 1024, "round_s": seconds,
                  "statuses": {snap.agent: snap.status for snap in result}}))
"""


def fleet_hosts() -> list[HostSpec]:
    hosts = [HostSpec(name, vendor="amd" if "amd" in name else "nvidia") for name in HEALTHY]
    for mode, prefix in (("endless", "endless"), ("million_rows", "million")):
        hosts += [HostSpec(f"{prefix}-nv", mode=mode), HostSpec(f"{prefix}-amd", vendor="amd", mode=mode)]
    return hosts


def one_round(sandbox: Sandbox, state: Path, agents: list[str]) -> dict[str, object]:
    done = subprocess.run([sys.executable, "-c", CHILD, str(sandbox.inventory_path), str(state), *agents],
                          capture_output=True, text=True, timeout=300, check=False)
    if done.returncode != 0:
        raise SystemExit(f"round failed: {done.stderr.strip()}")
    outcome: dict[str, object] = json.loads(done.stdout)
    return outcome


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="rounds measured per kind (each in a fresh process)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fleetctl-bench-hostile-") as directory:
        sandbox = Sandbox(Path(directory) / "fleet", fleet_hosts(), use_netns=False).up()
        try:
            print(f"heartbeat output limits: stdout {MAX_STDOUT // 1024} KiB, stderr {MAX_STDERR // 1024} KiB; "
                  f"{args.runs} runs per round, each in a fresh process")
            print(f"{'round':<24}{'hosts':>6}{'peak RSS MiB (median / max)':>30}{'round s':>10}  hostile hosts' status")
            for number, (label, agents) in enumerate(ROUNDS.items()):
                runs = [one_round(sandbox, Path(directory) / f"state-{number}-{run}", agents) for run in range(args.runs)]
                peaks = [float(str(r["peak_mib"])) for r in runs]
                seconds = statistics.median(float(str(r["round_s"])) for r in runs)
                statuses = runs[-1]["statuses"]
                assert isinstance(statuses, dict)
                hostile = sorted({status for agent, status in statuses.items() if agent not in HEALTHY})
                healthy_ok = all(statuses[agent] == "ok" for agent in HEALTHY)
                peak = f"{statistics.median(peaks):.0f} / {max(peaks):.0f}"
                print(f"{label:<24}{len(agents):>6}{peak:>30}{seconds:>10.2f}  "
                      f"{', '.join(hostile) or '-'}{'' if healthy_ok else '  (a healthy host failed!)'}")
        finally:
            sandbox.down()


if __name__ == "__main__":
    main()
