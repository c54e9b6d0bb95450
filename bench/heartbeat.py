"""Steady-state heartbeat rounds over 100 and 1000 bench hosts: fleetctl against asyncssh and
parallel-ssh (libssh2), all on the same bench fleet in the same run, with the same remote command
(``fleetctl.telemetry.heartbeat.heartbeat_command``) and the same parser (``snapshot_from_result``).

    .venv/bin/pip install -e '.[bench]'            # asyncssh, parallel-ssh (bench only)
    .venv/bin/python bench/heartbeat.py            # 100 and 1000 hosts
    .venv/bin/python bench/heartbeat.py --hosts 100 --rounds 5 --ssh-baseline --json out.json
    .venv/bin/python bench/heartbeat.py --bastion --hosts 300 --rounds 5     # every host behind one bastion

Clients: ``fleetctl`` on its default (fast) path; ``fleetctl-cron``, the next cron run: the same in a
new process on the state dir the ``fleetctl`` run left (its store, and its kept ``ssh -G`` answers, so
its first round execs no ``ssh``); ``fleetctl-stock``, the same with ``FLEETCTL_SSH_FAST=0`` (stock
paramiko: a reading thread per connection), which shows what the fast path buys; ``asyncssh``;
``parallel-ssh``.

``--bastion``: every host is reached through one bastion sshd that keeps OpenSSH's defaults
(``MaxStartups 10:30:100``, ``MaxSessions 10``; ``AllowTcpForwarding yes``) and forwards to the
bench hosts on 127.0.0.1. fleetctl's agents name it in ``[agents.bastion]`` (host key pinned);
asyncssh opens one connection to it and reaches every host with ``tunnel=`` that connection.
parallel-ssh is left out there. The table adds the logins the bastion's sshd accepted from each
client over its whole run (counted in its log): sharing the bastion connection keeps that a small
constant, not the number of hosts.

Hosts are real sshd processes on loopback, each listening on several ports (one sshd can listen on
16), so 1000 hosts are 100 sshd x 10 ports. The GPU tool on the hosts prints a cached nvidia-smi
capture, so the hosts' own cost stays small next to the controller's.

Every client runs in a process of its own, started fresh, so its CPU time (user+system, every
thread, plus any process it ran: fleetctl resolves each host once through ``ssh -G``, in the first
round) and its memory are its own. Per client:

- first round: opening every connection (all handshakes) plus one heartbeat each;
- steady rounds: wall time per round and controller CPU per heartbeat (CPU delta / heartbeats).
  fleetctl is measured three times in the same process, its rounds interleaved: ``Fleet.heartbeat()``
  (SQLite history + health, what ``serve`` does), ``Fleet.heartbeat(record=False)`` (no store), and
  ``Fleet.heartbeat()`` with GPU health switched off (``gpu_health_checks``): the cost of GPU health;
  the peers parse and keep nothing;
- idle CPU over ``--idle`` seconds with every connection open;
- RSS after the rounds and peak RSS.

The optional reference design (``--ssh-baseline``) is one OpenSSH ``ssh`` process per heartbeat over
a sample of hosts; its CPU is that of the ``ssh`` children.
"""

from __future__ import annotations

import argparse
import importlib.metadata
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

from benchfleet import BenchFleet, children_cpu_seconds, cpu_seconds, peak_rss_mib, rss_mib, ssh_baseline  # noqa: E402

from fleetctl.fleet import DEFAULT_MAX_PARALLEL_SSH  # noqa: E402
from fleetctl.telemetry.heartbeat import heartbeat_command  # noqa: E402
from fleetctl.telemetry.snapshot import TelemetrySnapshot  # noqa: E402

CLIENTS = ("fleetctl", "fleetctl-cron", "fleetctl-stock", "asyncssh", "parallel-ssh")
OURS = ("fleetctl", "fleetctl-cron", "fleetctl-stock")
PEERS_MEASURED = ("asyncssh", "parallel-ssh")
BASTION_CLIENTS = ("fleetctl", "fleetctl-cron", "fleetctl-stock", "asyncssh")
# The child's environment: fleetctl-stock is fleetctl with the fast path switched off.
CLIENT_ENV = {"fleetctl": {"FLEETCTL_SSH_FAST": "1"}, "fleetctl-cron": {"FLEETCTL_SSH_FAST": "1"},
              "fleetctl-stock": {"FLEETCTL_SSH_FAST": "0"}}
# fleetctl-cron is the next cron run: a new process on the state dir the fleetctl run left (its store and
# its kept `ssh -G` answers, fleetctl.ssh.resolve_cache), as a cron heartbeat finds it every minute.
STATE_OF = {"fleetctl-cron": "fleetctl"}
Round = Callable[[], list[TelemetrySnapshot]]


def _raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # 1000 connections need more than 1024 fds


def _check(client: str, snapshots: list[TelemetrySnapshot], count: int, gpus: int) -> None:
    bad = [s for s in snapshots if not s.ok or len(s.gpus) != gpus
           or (s.gpu_health is not None and any(g.state != "ok" for g in s.gpu_health.gpus))]
    if len(snapshots) != count or bad:
        first = bad[0] if bad else None
        raise SystemExit(f"{client}: {len(snapshots)} snapshots, {len(bad)} bad"
                         + (f"; {first.agent}: {first.status} {first.error} {first.gpu_health}" if first else ""))


def client_cpu_seconds() -> float:
    """This process's CPU and that of its finished children (fleetctl's ``ssh -G``, one per host,
    is part of its first round)."""
    return cpu_seconds() + children_cpu_seconds()


def measure(client: str, phases: dict[str, Round], idle: Callable[[float], None], rounds: int, idle_s: float,
            count: int, gpus: int) -> dict[str, Any]:
    """Runs in the client's own process. The first phase opens the connections; steady rounds of
    every phase are interleaved, so load drifting on a shared machine hits each phase alike."""
    first_phase = next(iter(phases.values()))
    cpu0, wall0 = client_cpu_seconds(), time.monotonic()
    _check(client, first_phase(), count, gpus)
    result: dict[str, Any] = {"client": client, "hosts": count, "first_round_s": time.monotonic() - wall0,
                              "first_round_cpu_ms": (client_cpu_seconds() - cpu0) / count * 1000}
    cpu = dict.fromkeys(phases, 0.0)
    walls: dict[str, list[float]] = {name: [] for name in phases}
    for _ in range(rounds):
        for name, round_ in phases.items():
            cpu0, wall0 = client_cpu_seconds(), time.monotonic()
            snapshots = round_()
            walls[name].append(time.monotonic() - wall0)
            cpu[name] += client_cpu_seconds() - cpu0
            _check(client, snapshots, count, gpus)
    for name in phases:
        result[name] = {"round_s": sum(walls[name]) / rounds, "round_min_s": min(walls[name]),
                        "cpu_ms": cpu[name] / (rounds * count) * 1000, "rounds": walls[name]}
    cpu0 = client_cpu_seconds()
    idle(idle_s)
    result["idle_pct"] = (client_cpu_seconds() - cpu0) / idle_s * 100
    result["rss_mib"] = rss_mib()
    result["peak_rss_mib"] = peak_rss_mib()
    return result


def run_fleetctl(bench: BenchFleet, parallel: int, rounds: int, idle_s: float, name: str = "fleetctl",
                 ssh_config: bool = True) -> dict[str, Any]:
    from fleetctl.fleet import Fleet
    from fleetctl.ssh import fastpath

    inventory = bench.inventory()
    if not ssh_config:  # inventory fields only, as the peers (asyncssh's config=[]): no `ssh -G` per host
        for agent in inventory.agents:
            agent.ssh_config = False
    fleet = Fleet(inventory, state_dir=bench.directory / f"state-{STATE_OF.get(name, name)}", max_parallel_ssh=parallel)
    try:
        # The first round (handshakes) records too: it creates the store, as `serve`'s first round does.
        def without_health() -> list[TelemetrySnapshot]:
            # The switch ([controller] gpu_health_checks = false): the beat as it was before GPU health.
            fleet.hosts.gpu_health_checks = False
            try:
                return fleet.heartbeat().snapshots
            finally:
                fleet.hosts.gpu_health_checks = True

        phases: dict[str, Round] = {"store": lambda: fleet.heartbeat().snapshots,
                                    "no_store": lambda: fleet.heartbeat(record=False).snapshots,
                                    "store_no_health": without_health}
        # Which path ran: "fleetctl" falls back to stock on a paramiko the fast path was not tested on.
        return {**measure(name, phases, time.sleep, rounds, idle_s, bench.count, bench.gpus), "fast_path": fastpath.enabled()}
    finally:
        fleet.close()


def child(args: argparse.Namespace) -> None:
    _raise_nofile()
    bench = BenchFleet.attach(Path(args.spec))
    if args.child in OURS:
        result = run_fleetctl(bench, args.max_parallel_ssh, args.rounds, args.idle, args.child, not args.no_ssh_config)
    else:
        from peers import PEERS

        result = PEERS[args.child](bench, args.max_parallel_ssh, lambda phases_round, idle: measure(
            args.child, {"no_store": phases_round}, idle, args.rounds, args.idle, bench.count, bench.gpus))
    print(json.dumps(result))


def run_child(client: str, spec: Path, args: argparse.Namespace) -> dict[str, Any]:
    argv = [sys.executable, str(Path(__file__).resolve()), "--child", client, "--spec", str(spec),
            "--rounds", str(args.rounds), "--idle", str(args.idle), "--max-parallel-ssh", str(args.max_parallel_ssh),
            *(["--no-ssh-config"] if args.no_ssh_config else [])]
    env = {**os.environ, **CLIENT_ENV.get(client, {})}
    done = subprocess.run(argv, stdout=subprocess.PIPE, text=True, timeout=args.child_timeout, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{client} failed (exit {done.returncode}); its stderr is above")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _ratio(ours: float | None, theirs: float | None) -> str:
    return f"{ours / theirs:.2f}x" if ours is not None and theirs else "-"


def print_table(count: int, results: dict[str, dict[str, Any]], base: dict[str, float] | None) -> None:
    columns = list(results)
    # Ratio columns: each of our clients against each peer (fleetctl / asyncssh, stock / asyncssh...).
    pairs = [(o, p) for o in OURS if o in results for p in PEERS_MEASURED if p in results]
    short = {"fleetctl": "fleetctl", "fleetctl-cron": "cron", "fleetctl-stock": "stock"}
    head = f"{'':36}" + "".join(f"{c:>17}" for c in columns)
    if base:
        head += f"{'ssh per beat':>14}"
    head += "".join(f"{short[o] + ' / ' + p:>24}" for o, p in pairs)
    print(head)

    def row(label: str, values: dict[str, float | None], fmt: str, base_value: float | None = None,
            ratios: bool = True) -> None:
        line = f"{label:36}" + "".join(f"{values[c]:>17{fmt[2:]}}" if values.get(c) is not None else f"{'-':>17}" for c in columns)
        if base:
            line += f"{base_value:{fmt}}" if base_value is not None else f"{'-':>14}"
        if ratios:
            line += "".join(f"{_ratio(values.get(o), values.get(p)):>24}" for o, p in pairs)
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
    if any("store_no_health" in r for r in results.values()):
        row("CPU per beat, store, no GPU health", pick("store_no_health", "cpu_ms"), "14.3f", ratios=False)
        for client, r in results.items():
            if "store_no_health" in r:
                extra = r["store"]["cpu_ms"] / r["store_no_health"]["cpu_ms"] - 1
                print(f"{client}: GPU health costs {extra * 100:+.1f}% controller CPU per beat (store, same run)")
    row("round time, store (s)", pick("store", "round_s"), "14.2f", base_round)
    row("round time, no store (s)", pick("no_store", "round_s"), "14.2f", base_round)
    if any("store_no_health" in r for r in results.values()):
        # The peers send the beat without the GPU health part: this row is the like-for-like round.
        row("round time, store, no GPU health (s)", pick("store_no_health", "round_s"), "14.2f")
    row(f"first round, {count} handshakes (s)", pick(None, "first_round_s"), "14.2f")
    row("first round CPU per host (ms)", pick(None, "first_round_cpu_ms"), "14.2f")
    row("idle CPU, connections open (%)", pick(None, "idle_pct"), "14.2f")
    row("RSS after rounds (MiB)", pick(None, "rss_mib"), "14.0f")
    row("peak RSS (MiB)", pick(None, "peak_rss_mib"), "14.0f")
    if any("bastion_logins" in r for r in results.values()):
        row("logins accepted by the bastion", pick(None, "bastion_logins"), "14.0f", ratios=False)
    print("ratios are ours / peer: below 1.00x fleetctl is lower (cheaper, faster, smaller); 'stock' is fleetctl"
          " with FLEETCTL_SSH_FAST=0. Peers write no store: both fleetctl rows compare with the same peer figure.")
    if base:
        print(f"ssh per beat: one OpenSSH client per heartbeat over {base['sample']:.0f} hosts, 32 at a time")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--rounds", type=int, default=3, help="steady-state rounds measured per client and size")
    parser.add_argument("--idle", type=float, default=5.0, help="seconds of idle CPU measured with connections open")
    parser.add_argument("--max-parallel-ssh", type=int, default=DEFAULT_MAX_PARALLEL_SSH,
                        help="heartbeats in flight at once, for fleetctl's pool and the peers alike")
    parser.add_argument("--clients", nargs="+", choices=CLIENTS,
                        help=f"default: {' '.join(CLIENTS)}; with --bastion: {' '.join(BASTION_CLIENTS)}")
    parser.add_argument("--bastion", action="store_true",
                        help="reach every host through one bastion sshd at OpenSSH's default MaxStartups/MaxSessions")
    parser.add_argument("--no-ssh-config", action="store_true",
                        help="fleetctl ignores ssh_config (agents' ssh_config = false) as the peers do: no `ssh -G` per host")
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
    if args.clients is None:
        args.clients = list(BASTION_CLIENTS if args.bastion else CLIENTS)
    if args.bastion and (set(args.clients) - set(BASTION_CLIENTS) or args.ssh_baseline):
        parser.error(f"--bastion measures {', '.join(BASTION_CLIENTS)} only (no parallel-ssh, no --ssh-baseline)")
    _raise_nofile()
    # A SIGTERM (a CI timeout, `kill`) unwinds like Ctrl-C, so the bench fleet's sshd are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    versions = "; ".join(f"{name} {_version(name)}" for name in ("paramiko", "asyncssh", "parallel-ssh"))
    print(f"machine: {os.cpu_count()} cores; python {sys.version.split()[0]}; {versions}; load {os.getloadavg()[0]:.2f}")
    everything: list[dict[str, Any]] = []
    for count in args.hosts:
        with tempfile.TemporaryDirectory(prefix="fleetctl-bench-") as scratch:
            started = time.monotonic()
            bench = BenchFleet(Path(scratch), count, bastion=args.bastion).up()
            try:
                hosts_sshd = len(bench.pids) - bench.bastion
                where = ", all behind one bastion sshd (OpenSSH's default MaxStartups/MaxSessions)" if bench.bastion else ""
                where += "; fleetctl without ssh_config" if args.no_ssh_config else ""
                print(f"\n== {count} hosts ({hosts_sshd} sshd x {bench.ports_per_sshd} ports{where}, up in "
                      f"{time.monotonic() - started:.1f} s), {args.rounds} rounds each", flush=True)
                spec = bench.save(Path(scratch) / "bench.json")
                results: dict[str, dict[str, Any]] = {}
                for client in args.clients:
                    logins_before = bench.bastion_logins()
                    results[client] = run_child(client, spec, args)
                    if bench.bastion:  # clients run one after another: the log's new lines are this client's
                        results[client]["bastion_logins"] = bench.bastion_logins() - logins_before
                    fast = results[client].get("fast_path")
                    path = "" if fast is None else ", fast path" if fast else ", stock paramiko"
                    print(f"  {client}: done{path} (load {os.getloadavg()[0]:.2f})", flush=True)
                base = None
                if args.ssh_baseline:
                    command = heartbeat_command(bench.inventory().agents[0])
                    base = ssh_baseline(bench, command, min(args.baseline_sample, count))
            finally:
                bench.down()
        print_table(count, results, base)
        everything.append({"hosts": count, "bastion": args.bastion, "results": results, "ssh_baseline": base})
    if args.json:
        args.json.write_text(json.dumps(everything, indent=1))


if __name__ == "__main__":
    main()
