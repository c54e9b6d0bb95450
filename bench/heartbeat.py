"""Steady-state heartbeat rounds over 100 and 1000 bench hosts: fleetctl against asyncssh and
parallel-ssh (libssh2), all on the same bench fleet in the same run, with the same remote command
(``fleetctl.heartbeat.heartbeat_command``) and the same parser (``snapshot_from_result``).

    .venv/bin/pip install -e '.[bench]'            # asyncssh, parallel-ssh (bench only)
    .venv/bin/python bench/heartbeat.py            # 100 and 1000 hosts
    .venv/bin/python bench/heartbeat.py --hosts 100 --rounds 5 --ssh-baseline --json out.json

Hosts are real sshd processes on loopback, each listening on several ports (one sshd can listen on
16), so 1000 hosts are 100 sshd x 10 ports. The GPU tool on the hosts prints a cached nvidia-smi
capture, so the hosts' own cost stays small next to the controller's.

Every client runs in a process of its own, started fresh, so its CPU time (user+system, every
thread) and its memory are its own. Per client:

- first round: opening every connection (all handshakes) plus one heartbeat each;
- steady rounds: wall time per round and controller CPU per heartbeat (CPU delta / heartbeats).
  fleetctl is measured twice in the same process, its rounds interleaved: ``Fleet.heartbeat()``
  (SQLite history + health, what ``serve`` does) and ``Fleet.heartbeat(record=False)`` (no store);
  the peers parse and keep nothing;
- idle CPU over ``--idle`` seconds with every connection open;
- RSS after the rounds and peak RSS.

The optional reference design (``--ssh-baseline``) is one OpenSSH ``ssh`` process per heartbeat over
a sample of hosts; its CPU is that of the ``ssh`` children.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchfleet import BenchFleet, cpu_seconds, peak_rss_mib, rss_mib, ssh_baseline  # noqa: E402

from fleetctl.fleet import DEFAULT_MAX_PARALLEL_SSH  # noqa: E402
from fleetctl.heartbeat import heartbeat_command  # noqa: E402
from fleetctl.telemetry import TelemetrySnapshot  # noqa: E402

CLIENTS = ("fleetctl", "asyncssh", "parallel-ssh")
# Not measured unless named in --clients: fleetctl with the one-write kept-shell prototype of
# bench/profile_heartbeat.py patched in (this process only), to show what that change would buy.
Round = Callable[[], list[TelemetrySnapshot]]


def _raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # 1000 connections need more than 1024 fds


def _check(client: str, snapshots: list[TelemetrySnapshot], count: int, gpus: int) -> None:
    bad = [s for s in snapshots if not s.ok or len(s.gpus) != gpus]
    if len(snapshots) != count or bad:
        first = bad[0] if bad else None
        raise SystemExit(f"{client}: {len(snapshots)} snapshots, {len(bad)} bad"
                         + (f"; {first.agent}: {first.status} {first.error}" if first else ""))


def measure(client: str, phases: dict[str, Round], idle: Callable[[float], None], rounds: int, idle_s: float,
            count: int, gpus: int) -> dict[str, Any]:
    """Runs in the client's own process. The first phase opens the connections; steady rounds of
    every phase are interleaved, so load drifting on a shared machine hits each phase alike."""
    first_phase = next(iter(phases.values()))
    cpu0, wall0 = cpu_seconds(), time.monotonic()
    _check(client, first_phase(), count, gpus)
    result: dict[str, Any] = {"client": client, "hosts": count, "first_round_s": time.monotonic() - wall0,
                              "first_round_cpu_ms": (cpu_seconds() - cpu0) / count * 1000}
    cpu = dict.fromkeys(phases, 0.0)
    walls: dict[str, list[float]] = {name: [] for name in phases}
    for _ in range(rounds):
        for name, round_ in phases.items():
            cpu0, wall0 = cpu_seconds(), time.monotonic()
            snapshots = round_()
            walls[name].append(time.monotonic() - wall0)
            cpu[name] += cpu_seconds() - cpu0
            _check(client, snapshots, count, gpus)
    for name in phases:
        result[name] = {"round_s": sum(walls[name]) / rounds, "round_min_s": min(walls[name]),
                        "cpu_ms": cpu[name] / (rounds * count) * 1000, "rounds": walls[name]}
    cpu0 = cpu_seconds()
    idle(idle_s)
    result["idle_pct"] = (cpu_seconds() - cpu0) / idle_s * 100
    result["rss_mib"] = rss_mib()
    result["peak_rss_mib"] = peak_rss_mib()
    return result


def run_fleetctl(bench: BenchFleet, parallel: int, rounds: int, idle_s: float, name: str = "fleetctl") -> dict[str, Any]:
    from fleetctl.fleet import Fleet

    fleet = Fleet(bench.inventory(), state_dir=bench.directory / "state-fleetctl", max_parallel_ssh=parallel)
    try:
        # The first round (handshakes) records too: it creates the store, as `serve`'s first round does.
        phases: dict[str, Round] = {"store": lambda: fleet.heartbeat().snapshots,
                                    "no_store": lambda: fleet.heartbeat(record=False).snapshots}
        return measure(name, phases, time.sleep, rounds, idle_s, bench.count, bench.gpus)
    finally:
        fleet.close()


def child(args: argparse.Namespace) -> None:
    _raise_nofile()
    bench = BenchFleet.attach(Path(args.spec))
    if args.child.startswith("fleetctl"):
        result = run_fleetctl(bench, args.max_parallel_ssh, args.rounds, args.idle, args.child)
    else:
        from peers import PEERS

        result = PEERS[args.child](bench, args.max_parallel_ssh, lambda phases_round, idle: measure(
            args.child, {"no_store": phases_round}, idle, args.rounds, args.idle, bench.count, bench.gpus))
    print(json.dumps(result))


def run_child(client: str, spec: Path, args: argparse.Namespace) -> dict[str, Any]:
    argv = [sys.executable, str(Path(__file__).resolve()), "--child", client, "--spec", str(spec),
            "--rounds", str(args.rounds), "--idle", str(args.idle), "--max-parallel-ssh", str(args.max_parallel_ssh)]
    done = subprocess.run(argv, stdout=subprocess.PIPE, text=True, timeout=args.child_timeout)
    if done.returncode != 0:
        raise SystemExit(f"{client} failed (exit {done.returncode}); its stderr is above")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def _ratio(ours: float, theirs: float) -> str:
    return f"{ours / theirs:.2f}x" if theirs else "-"


def print_table(count: int, results: dict[str, dict[str, Any]], base: dict[str, float] | None) -> None:
    peers = [c for c in results if c != "fleetctl"]  # a prototype column is compared like a peer
    ours = results.get("fleetctl")
    columns = ["fleetctl", *peers]
    head = f"{'':36}" + "".join(f"{c:>17}" for c in columns)
    if base:
        head += f"{'ssh per beat':>14}"
    if ours:
        head += "".join(f"{'vs ' + p:>20}" for p in peers)
    print(head)

    def row(label: str, values: dict[str, float | None], fmt: str, base_value: float | None = None) -> None:
        line = f"{label:36}" + "".join(f"{values[c]:>17{fmt[2:]}}" if values.get(c) is not None else f"{'-':>17}" for c in columns)
        if base:
            line += f"{base_value:{fmt}}" if base_value is not None else f"{'-':>14}"
        if ours and values.get("fleetctl") is not None:
            line += "".join(f"{_ratio(values['fleetctl'], values[p]):>20}" if values.get(p) else f"{'-':>20}"
                            for p in peers)
        print(line)

    def pick(phase: str | None, key: str) -> dict[str, float | None]:
        out: dict[str, float | None] = {}
        for client, r in results.items():
            source = r.get(phase, r.get("no_store")) if phase else r
            out[client] = source.get(key) if isinstance(source, dict) else None
        return out

    base_round = count / base["beats_per_s"] if base else None
    row("CPU per heartbeat, store (ms)", pick("store", "cpu_ms"), "14.3f", base["cpu_ms"] if base else None)
    row("CPU per heartbeat, no store (ms)", pick("no_store", "cpu_ms"), "14.3f", base["cpu_ms"] if base else None)
    row("round time, store (s)", pick("store", "round_s"), "14.2f", base_round)
    row("round time, no store (s)", pick("no_store", "round_s"), "14.2f", base_round)
    row(f"first round, {count} handshakes (s)", pick(None, "first_round_s"), "14.2f")
    row("first round CPU per host (ms)", pick(None, "first_round_cpu_ms"), "14.2f")
    row("idle CPU, connections open (%)", pick(None, "idle_pct"), "14.2f")
    row("RSS after rounds (MiB)", pick(None, "rss_mib"), "14.0f")
    row("peak RSS (MiB)", pick(None, "peak_rss_mib"), "14.0f")
    print("ratios are fleetctl / peer: below 1.00x fleetctl is lower (cheaper, faster, smaller)."
          " Peers write no store: both fleetctl rows compare with the same peer figure.")
    if base:
        print(f"ssh per beat: one OpenSSH client per heartbeat over {base['sample']:.0f} hosts, 32 at a time")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--rounds", type=int, default=3, help="steady-state rounds measured per client and size")
    parser.add_argument("--idle", type=float, default=5.0, help="seconds of idle CPU measured with connections open")
    parser.add_argument("--max-parallel-ssh", type=int, default=DEFAULT_MAX_PARALLEL_SSH,
                        help="heartbeats in flight at once, for fleetctl's pool and the peers alike")
    parser.add_argument("--clients", nargs="+", choices=CLIENTS, default=list(CLIENTS))
    parser.add_argument("--ssh-baseline", action="store_true", help="also measure one `ssh` process per heartbeat")
    parser.add_argument("--baseline-sample", type=int, default=64, help="hosts in the ssh-client baseline round")
    parser.add_argument("--child-timeout", type=float, default=1800.0)
    parser.add_argument("--json", type=Path, help="write every figure here too")
    parser.add_argument("--child", choices=CLIENTS, help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    _raise_nofile()
    # A SIGTERM (a CI timeout, `kill`) unwinds like Ctrl-C, so the bench fleet's sshd are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    print(f"machine: {os.cpu_count()} cores; python {sys.version.split()[0]}; load {os.getloadavg()[0]:.2f}")
    everything: list[dict[str, Any]] = []
    for count in args.hosts:
        with tempfile.TemporaryDirectory(prefix="fleetctl-bench-") as scratch:
            started = time.monotonic()
            bench = BenchFleet(Path(scratch), count).up()
            try:
                print(f"\n== {count} hosts ({len(bench.pids)} sshd x {bench.ports_per_sshd} ports, up in "
                      f"{time.monotonic() - started:.1f} s), {args.rounds} rounds each", flush=True)
                spec = bench.save(Path(scratch) / "bench.json")
                results: dict[str, dict[str, Any]] = {}
                for client in args.clients:
                    results[client] = run_child(client, spec, args)
                    print(f"  {client}: done (load {os.getloadavg()[0]:.2f})", flush=True)
                base = None
                if args.ssh_baseline:
                    command = heartbeat_command(bench.inventory().agents[0])
                    base = ssh_baseline(bench, command, min(args.baseline_sample, count))
            finally:
                bench.down()
        print_table(count, results, base)
        everything.append({"hosts": count, "results": results, "ssh_baseline": base})
    if args.json:
        args.json.write_text(json.dumps(everything, indent=1))


if __name__ == "__main__":
    main()
