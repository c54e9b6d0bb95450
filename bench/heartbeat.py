"""Steady-state heartbeat rounds over 100 and 1000 sandbox hosts, against the reference design
(the OpenSSH ``ssh`` client run once per heartbeat) measured in the same run.

    .venv/bin/python bench/heartbeat.py            # 100 and 1000 hosts
    .venv/bin/python bench/heartbeat.py --hosts 100 --rounds 5

Hosts are real sshd processes on loopback, each listening on several ports (one sshd can listen on
16), so 1000 hosts are 100 sshd x 10 ports. The GPU tool on the hosts prints a cached nvidia-smi
capture, so the hosts' own cost stays small next to the controller's. Controller CPU is this
process's user+system time (every thread), including parsing and writing history to SQLite.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchfleet import BenchFleet, cpu_seconds, peak_rss_mib, rss_mib, ssh_baseline  # noqa: E402

from fleetctl.fleet import Fleet  # noqa: E402
from fleetctl.heartbeat import heartbeat_command  # noqa: E402


def measure_fleetctl(bench: BenchFleet, rounds: int, idle_s: float, parallel: int) -> dict[str, float]:
    fleet = Fleet(bench.inventory(), state_dir=bench.directory / "state", max_parallel_ssh=parallel)
    try:
        opened = time.monotonic()
        first = fleet.heartbeat()  # opens every connection (handshakes are not steady state)
        connect_s = time.monotonic() - opened
        if first.failed:
            raise SystemExit(f"bench fleet unhealthy: {first.failed[0].agent}: {first.failed[0].error}")
        cpu0, wall0 = cpu_seconds(), time.monotonic()
        for _ in range(rounds):
            result = fleet.heartbeat()
            assert not result.failed, result.failed[0].error
        wall = (time.monotonic() - wall0) / rounds
        cpu = cpu_seconds() - cpu0
        idle0 = cpu_seconds()
        time.sleep(idle_s)
        idle = (cpu_seconds() - idle0) / idle_s
        beats = rounds * len(bench.hosts)
        return {"round_s": wall, "beats_per_s": len(bench.hosts) / wall, "cpu_ms": cpu / beats * 1000,
                "idle_pct": idle * 100, "rss_mib": rss_mib(), "connect_s": connect_s}
    finally:
        fleet.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--rounds", type=int, default=3, help="steady-state rounds measured per size")
    parser.add_argument("--idle", type=float, default=5.0, help="seconds of idle CPU measured with connections open")
    parser.add_argument("--max-parallel-ssh", type=int, default=32)
    parser.add_argument("--baseline-sample", type=int, default=64, help="hosts in the ssh-client baseline round")
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # 1000 connections need more than 1024 fds
    print(f"machine: {os.cpu_count()} cores; python {sys.version.split()[0]}")
    for count in args.hosts:
        with tempfile.TemporaryDirectory(prefix="fleetctl-bench-") as scratch:
            started = time.monotonic()
            bench = BenchFleet(Path(scratch), count).up()
            try:
                print(f"\n== {count} hosts ({len(bench.pids)} sshd x {bench.ports_per_sshd} ports, up in "
                      f"{time.monotonic() - started:.1f} s)")
                command = heartbeat_command(bench.inventory().agents[0])
                base = ssh_baseline(bench, command, min(args.baseline_sample, count))
                ours = measure_fleetctl(bench, args.rounds, args.idle, args.max_parallel_ssh)
            finally:
                bench.down()
        base_round = count / base["beats_per_s"]
        print(f"{'':34}{'fleetctl':>12}{'ssh per beat':>14}{'ratio':>9}")
        print(f"{'round time (s)':34}{ours['round_s']:12.2f}{base_round:14.2f}{base_round / ours['round_s']:8.1f}x")
        print(f"{'heartbeats per second':34}{ours['beats_per_s']:12.0f}{base['beats_per_s']:14.0f}"
              f"{ours['beats_per_s'] / base['beats_per_s']:8.1f}x")
        print(f"{'controller CPU per heartbeat (ms)':34}{ours['cpu_ms']:12.2f}{base['cpu_ms']:14.2f}"
              f"{base['cpu_ms'] / ours['cpu_ms']:8.1f}x")
        print(f"{'idle CPU, connections open (%)':34}{ours['idle_pct']:12.1f}{'-':>14}")
        print(f"{'memory RSS after rounds (MiB)':34}{ours['rss_mib']:12.0f}{'-':>14}")
        print(f"first round incl. {count} handshakes: {ours['connect_s']:.1f} s; "
              f"baseline measured over {base['sample']:.0f} hosts, 32 ssh processes at a time")
    print(f"\npeak RSS of this process: {peak_rss_mib():.0f} MiB")


if __name__ == "__main__":
    main()
