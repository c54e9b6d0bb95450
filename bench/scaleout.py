"""Several controllers on one PostgreSQL store against one SQLite controller: heartbeats/s, jobs/s and
the time until a SIGKILLed controller's agents beat again, all on the same bench fleet in the same run.

    .venv/bin/python bench/scaleout.py                    # 50 hosts, heartbeat_interval_s 1, lease_s 5
    .venv/bin/python bench/scaleout.py --interval 0.2     # tight: can one controller keep up?
    .venv/bin/python bench/scaleout.py --quick            # smoke run, well under two minutes

Configurations, each on a fresh store (a new SQLite state dir, or a new database of one private
PostgreSQL cluster) and each ``serve`` a real process with a state dir of its own:

- SQLite x1: one ``fleetctl serve``, no store URL (the default; the baseline of every ratio);
- PG x1, x2, x3: one, two, three ``fleetctl serve --store postgresql://...`` on the same database.

Per configuration:

- heartbeats/s: once every agent is leased by the configuration's controllers and has beaten since,
  the telemetry rows (distinct agent and timestamp) stamped in a ``--window`` of steady state, divided
  by its length. The target is hosts / heartbeat_interval_s: a figure below it is a fleet the
  controllers do not keep up with. Controller CPU per beat: the serve processes' user+system time
  (``/proc/PID/stat``, children included) over the window, divided by its beats; for PostgreSQL also
  the server's (postmaster and backends), the store's own cost, which SQLite pays inside serve;
- jobs/s: ``--jobs`` jobs (``true``) submitted at once through ``Fleet.submit``; the count over the
  span from the first submit to the last ``finished`` the store records;
- heartbeats back after a SIGKILL: one controller killed (the one holding most agents); the time until
  every agent it held has a telemetry row stamped after the kill. With 2 or 3 controllers the
  survivors take its agents over (expect at most lease_s + lease_s/3 + one interval, plus the
  handshakes); with one controller nothing can, so it is started again at once (as systemd's
  ``Restart=always`` would), and the figure is that restart's gap.

The bench hosts' sshd run on the same cores as the controllers and PostgreSQL: on a small machine
the fleet, not the controllers, may be what saturates. Each configuration's serve logs are scanned
afterwards: warnings other than an agent coming online are printed under the table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchfleet import BenchFleet  # noqa: E402

from fleetctl.fleet import Fleet  # noqa: E402
from fleetctl.inventory.config import load_config  # noqa: E402
from fleetctl.sandbox.postgres import PostgresCluster, bindir  # noqa: E402
from fleetctl.store import Store, open_store  # noqa: E402
from fleetctl.store.leases import controller_rows  # noqa: E402

TICK_S = os.sysconf("SC_CLK_TCK")
DONE_STATES = ("succeeded", "failed", "cancelled", "lost", "timed_out")
# An agent coming online is every serve's first news about it: not worth printing.
ROUTINE = re.compile(r"( WARNING \S+ \S+ -> online$)|( INFO )")


# -- processes -------------------------------------------------------------------------------
def proc_cpu_s(pid: int) -> float:
    """User+system seconds of ``pid`` and its reaped children (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return sum(int(v) for v in fields[11:15]) / TICK_S  # utime stime cutime cstime


def process_tree_cpu_s(root: int) -> float:
    """A postmaster's CPU with its live children's (a backend that exited is in its cutime)."""
    total = proc_cpu_s(root)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == root:
                total += sum(int(v) for v in fields[11:13]) / TICK_S
    return total


@dataclass
class Serve:
    number: int
    state_dir: Path
    log: Path
    process: subprocess.Popen[bytes]

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        if self.alive():
            self.process.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(10)

    def stop(self, grace_s: float = 20.0) -> None:
        """SIGTERM (serve stops cleanly and gives its leases back), SIGKILL after ``grace_s``."""
        if self.alive():
            self.process.terminate()
            try:
                self.process.wait(grace_s)
            except subprocess.TimeoutExpired:
                print(f"  serve {self.number} (pid {self.pid}) ignored SIGTERM for {grace_s:.0f} s: killed", flush=True)
        self.kill()


@dataclass
class Config:
    label: str
    controllers: int
    url: str | None  # None: the SQLite file in the first serve's state dir
    directory: Path
    serves: list[Serve] = field(default_factory=list)
    started: int = 0

    def start_serve(self, inventory: Path) -> Serve:
        self.started += 1
        state_dir = self.directory / (f"state-{self.started}" if self.url else "state")  # SQLite: the one store
        log = self.directory / f"serve-{self.started}.log"
        argv = [sys.executable, "-m", "fleetctl", "--config", str(inventory), "--state-dir", str(state_dir)]
        if self.url:
            argv += ["--store", self.url]
        env = {k: v for k, v in os.environ.items() if k not in ("FLEETCTL_STORE", "FLEETCTL_STATE_DIR")}
        with open(log, "ab") as sink:
            process = subprocess.Popen([*argv, "serve"], stdin=subprocess.DEVNULL, stdout=sink, stderr=sink, env=env)
        serve = Serve(self.started, state_dir, log, process)
        self.serves.append(serve)
        return serve

    def open_store(self) -> Store:
        return open_store(self.url, self.directory / "state" if self.url is None else self.directory / "reader")

    def stop_all(self) -> None:
        for serve in self.serves:
            if serve.alive():
                serve.process.terminate()  # all at once: their leases go back together
        for serve in self.serves:
            serve.stop()


# -- measurements ----------------------------------------------------------------------------
def wait_settled(config: Config, store: Store, agents: list[str], timeout_s: float) -> float:
    """Until every agent is leased by one of ``config``'s live serves, each holding a share, and has a
    telemetry row stamped after that; returns when (epoch seconds)."""
    deadline = time.monotonic() + timeout_s
    pids = {s.pid for s in config.serves if s.alive()}
    settled_at: float | None = None
    while time.monotonic() < deadline:
        for serve in config.serves:
            if serve.pid in pids and not serve.alive():
                raise SystemExit(f"{config.label}: serve {serve.number} exited ({serve.process.returncode}); "
                                 f"its log:\n{serve.log.read_text(errors='replace')[-3000:]}")
        with contextlib.suppress(Exception):  # the store may not have its tables yet
            rows = [r for r in controller_rows(store) if r.live and r.pid in pids]
            held = sorted(a for r in rows for a in r.agents)
            if len(rows) == len(pids) and all(r.agents for r in rows) and held == sorted(agents):
                settled_at = settled_at or time.time()
                beaten = store.query("SELECT COUNT(DISTINCT agent) FROM telemetry WHERE ts > ?", (settled_at,))[0][0]
                if beaten == len(agents):
                    return time.time()
            else:
                settled_at = None
        time.sleep(0.2)
    raise SystemExit(f"{config.label}: the controllers did not settle on the fleet in {timeout_s:.0f} s")


def shares(config: Config, store: Store) -> list[int]:
    pids = {s.pid for s in config.serves if s.alive()}
    return sorted((len(r.agents) for r in controller_rows(store) if r.live and r.pid in pids), reverse=True)


def measure_beats(config: Config, store: Store, window_s: float, interval_s: float, pg_pid: int | None) -> dict[str, Any]:
    pids = [s.pid for s in config.serves if s.alive()]
    cpu0, pg0, t0 = sum(proc_cpu_s(p) for p in pids), process_tree_cpu_s(pg_pid) if pg_pid else 0.0, time.time()
    time.sleep(window_s)
    cpu1, pg1, t1 = sum(proc_cpu_s(p) for p in pids), process_tree_cpu_s(pg_pid) if pg_pid else 0.0, time.time()
    time.sleep(min(3.0, 0.5 + 2 * interval_s))  # the last beats of the window are flushed every 0.5 s
    rows = store.query("SELECT agent, status, controller, COUNT(*) FROM (SELECT DISTINCT agent, ts, status, controller "
                       "FROM telemetry WHERE ts >= ? AND ts < ?) beats GROUP BY agent, status, controller", (t0, t1))
    beats = sum(r[3] for r in rows)
    failed = sum(r[3] for r in rows if r[1] != "ok")
    writers: Counter[str] = Counter()
    per_agent: Counter[str] = Counter()
    for r in rows:
        writers[r[2] or "-"] += r[3]
        per_agent[r[0]] += r[3]
    span = t1 - t0
    return {"beats": beats, "beats_per_s": beats / span, "failed": failed, "window_s": span,
            "cpu_ms": (cpu1 - cpu0) / beats * 1000 if beats else float("nan"),
            "cpu_pct": (cpu1 - cpu0) / span * 100,
            "pg_cpu_ms": (pg1 - pg0) / beats * 1000 if beats and pg_pid else None,
            "writers": sorted(writers.values(), reverse=True),
            "slowest_agent_beats": min(per_agent.values(), default=0), "agents_beaten": len(per_agent)}


def measure_jobs(fleet: Fleet, store: Store, count: int, timeout_s: float) -> dict[str, Any]:
    for number in range(count):
        fleet.submit("true", name=f"scaleout-{number}")
    submitted = time.monotonic()
    deadline = time.monotonic() + timeout_s
    marks = ",".join("?" * len(DONE_STATES))
    while True:
        done = store.query(f"SELECT COUNT(*) FROM jobs WHERE state IN ({marks})", DONE_STATES)[0][0]
        if done >= count or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    first, last, ended = store.query(f"SELECT MIN(submitted), MAX(finished), COUNT(finished) FROM jobs "
                                     f"WHERE state IN ({marks})", DONE_STATES)[0]
    states: dict[str, int] = {r[0]: r[1] for r in store.query("SELECT state, COUNT(*) FROM jobs GROUP BY state")}
    # Why the jobs not done are where they are (the queue's own words, ids blanked): for a run that timed out.
    waiting: Counter[str] = Counter()
    for state, reason in store.query(f"SELECT state, reason FROM jobs WHERE state NOT IN ({marks})", DONE_STATES):
        waiting[f"{state}: {_blank_ids(reason or '-')}"] += 1
    span = (last - first) if ended else float("nan")
    return {"jobs": count, "done": ended, "succeeded": states.get("succeeded", 0), "states": states,
            "jobs_per_s": ended / span if ended and span > 0 else float("nan"), "span_s": span,
            "timed_out": ended < count, "wait_s": time.monotonic() - submitted, "not_done": dict(waiting.most_common(5))}


def measure_recovery(config: Config, store: Store, inventory: Path, agents: list[str], timeout_s: float) -> dict[str, Any]:
    """SIGKILL the serve holding most agents; with survivors, they take over; alone, it is restarted
    at once. Until each agent it held has a telemetry row stamped after the kill."""
    live = [s for s in config.serves if s.alive()]
    by_pid = {r.pid: r for r in controller_rows(store) if r.live}
    victim = max(live, key=lambda s: len(by_pid[s.pid].agents) if s.pid in by_pid else 0)
    held = list(by_pid[victim.pid].agents)
    os.kill(victim.pid, signal.SIGKILL)
    killed = time.time()
    victim.kill()  # reaped
    restarted = None
    if len(live) == 1:
        config.start_serve(inventory)
        restarted = "restarted"
    deadline = time.monotonic() + timeout_s
    marks = ",".join("?" * len(held))
    first: dict[str, float] = {}
    while time.monotonic() < deadline:
        first = {r[0]: r[1] for r in store.query(f"SELECT agent, MIN(ts) FROM telemetry WHERE ts > ? AND agent IN ({marks}) "
                                                 "GROUP BY agent", (killed, *held))}
        if len(first) == len(held):
            break
        time.sleep(0.2)
    back = max(first.values()) - killed if len(first) == len(held) else float("nan")
    return {"held": len(held), "back_s": back, "back_count": len(first), "how": restarted or "taken over",
            "median_s": sorted(first.values())[len(first) // 2] - killed if first else float("nan")}


def _blank_ids(text: str) -> str:
    """Controller, job and agent ids (and temp names) as ``…``, so that messages of one kind count as one."""
    return re.sub(r"\b(c[0-9a-f]{8}|j[0-9a-f]{10}|h\d{4}|[0-9a-f]{12,})\b|(?<=\.)[A-Za-z0-9]{8}\b", "…", text)


def scan_logs(config: Config) -> list[str]:
    """Warnings and errors of the configuration's serves, other than agents coming online."""
    seen: Counter[str] = Counter()
    for serve in config.serves:
        with contextlib.suppress(OSError):
            for line in serve.log.read_text(errors="replace").splitlines():
                if not line.strip() or ROUTINE.search(line) or line.startswith("fleetctl serve: "):
                    continue
                text = re.sub(r"^\S+ \S+ ", "", line)  # the timestamp
                text = _blank_ids(text)  # one line per kind of message
                seen[f"serve {serve.number}: {text}"] += 1
    return [f"{n}x {text}" if n > 1 else text for text, n in seen.most_common(8)]


# -- one configuration -----------------------------------------------------------------------
def run_config(config: Config, inventory: Path, agents: list[str], args: argparse.Namespace,
               pg_pid: int | None) -> dict[str, Any]:
    config.directory.mkdir()
    result: dict[str, Any] = {"label": config.label, "controllers": config.controllers}
    store: Store | None = None
    fleet: Fleet | None = None
    try:
        started = time.monotonic()
        for _ in range(config.controllers):
            config.start_serve(inventory)
        store = config.open_store()
        wait_settled(config, store, agents, args.settle_timeout)
        result["settle_s"] = time.monotonic() - started
        result["shares"] = shares(config, store)
        result["heartbeats"] = measure_beats(config, store, args.window, args.interval, pg_pid)
        fleet = Fleet(load_config(inventory), state_dir=config.directory / "state" if config.url is None
                      else config.directory / "submitter", store=config.url)
        result["jobs"] = measure_jobs(fleet, store, args.jobs, args.jobs_timeout)
        fleet.close()
        fleet = None
        recovery_timeout = 3 * args.lease + 3 * args.interval + 60
        result["recovery"] = measure_recovery(config, store, inventory, agents, recovery_timeout)
    finally:
        if fleet is not None:
            fleet.close()
        if store is not None:
            store.close()
        config.stop_all()
        result["log"] = scan_logs(config)
    return result


# -- output ----------------------------------------------------------------------------------
def _fmt(value: float | None, spec: str) -> str:
    if value is None or value != value:  # None or NaN
        return "-"
    return format(value, spec)


def print_table(results: list[dict[str, Any]], args: argparse.Namespace, hosts: int) -> None:
    base = results[0]
    width = 20
    print(f"\n{hosts} hosts, heartbeat_interval_s {args.interval:g}, lease_s {args.lease:g}, window {args.window:g} s, "
          f"{args.jobs} jobs; ratios vs {base['label']} (same fleet, same run)")
    print(f"{'':40}" + "".join(f"{r['label']:>{width}}" for r in results))

    def row(label: str, pick: Any, spec: str, ratio: bool = True) -> None:
        cells = []
        base_value = pick(base)
        for r in results:
            value = pick(r)
            text = _fmt(value, spec)
            if ratio and r is not base and value is not None and base_value and value == value and base_value == base_value:
                text += f" ({value / base_value:.2f}x)"
            cells.append(f"{text:>{width}}")
        print(f"{label:40}" + "".join(cells))

    target = hosts / args.interval
    row(f"heartbeats/s (target {target:.1f})", lambda r: r.get("heartbeats", {}).get("beats_per_s"), ".1f")
    row("  failed beats in window", lambda r: r.get("heartbeats", {}).get("failed"), "d", ratio=False)
    row("controller CPU per beat (ms)", lambda r: r.get("heartbeats", {}).get("cpu_ms"), ".2f")
    row("controller CPU, all serves (% core)", lambda r: r.get("heartbeats", {}).get("cpu_pct"), ".0f")
    row("PostgreSQL CPU per beat (ms)", lambda r: r.get("heartbeats", {}).get("pg_cpu_ms"), ".2f", ratio=False)
    row("jobs/s", lambda r: r.get("jobs", {}).get("jobs_per_s"), ".1f")
    row("  jobs succeeded", lambda r: r.get("jobs", {}).get("succeeded"), "d", ratio=False)
    row("heartbeats back after SIGKILL (s)", lambda r: r.get("recovery", {}).get("back_s"), ".1f")
    row("  median agent back after (s)", lambda r: r.get("recovery", {}).get("median_s"), ".1f")
    print(f"{'agents per controller':40}" + "".join(f"{'/'.join(map(str, r.get('shares', []))) or '-':>{width}}" for r in results))
    print(f"{'start to settled (s)':40}" + "".join(f"{_fmt(r.get('settle_s'), '.1f'):>{width}}" for r in results))
    print(f"SIGKILL: {base['label']} and PG x1 are restarted at once (nothing else can take over); with 2-3 controllers "
          f"the survivors take over (bound: lease_s + lease_s/3 + interval = {args.lease * 4 / 3 + args.interval:.1f} s, "
          "plus handshakes).")
    for r in results:
        for problem in r.get("problems", []):
            print(f"{r['label']}: {problem}")
        if r.get("log"):
            print(f"{r['label']} serve logs (warnings/errors other than agents coming online):")
            for line in r["log"]:
                print(f"  {line[:220]}")


# -- main ------------------------------------------------------------------------------------
def write_inventory(bench: BenchFleet, path: Path, args: argparse.Namespace) -> Path:
    controller = {"heartbeat_interval_s": args.interval, "lease_s": args.lease, "max_parallel_ssh": args.max_parallel_ssh}
    blocks = [tomli_w.dumps({"controller": controller})]
    blocks += ["[[agents]]\n" + tomli_w.dumps(agent.to_toml()) for agent in bench.inventory()]
    path.write_text("\n".join(blocks))
    load_config(path)  # fails here, not in four serve logs
    return path


def problems_of(result: dict[str, Any], hosts: int, args: argparse.Namespace) -> list[str]:
    found = []
    beats = result.get("heartbeats", {})
    if beats and beats["beats_per_s"] < 0.9 * hosts / args.interval:
        found.append(f"heartbeats/s {beats['beats_per_s']:.1f} is under 90 % of the target {hosts / args.interval:.1f}: "
                     "not keeping up")
    if beats and beats["agents_beaten"] < hosts:
        found.append(f"only {beats['agents_beaten']} of {hosts} agents beat in the window")
    jobs = result.get("jobs", {})
    if jobs and (jobs["timed_out"] or jobs["succeeded"] != jobs["jobs"]):
        found.append(f"jobs: {jobs['states']} after {jobs['wait_s']:.0f} s; not done: {jobs['not_done']}")
    recovery = result.get("recovery", {})
    if recovery and recovery["back_count"] != recovery["held"]:
        found.append(f"after the SIGKILL only {recovery['back_count']} of {recovery['held']} agents beat again")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=50)
    parser.add_argument("--interval", type=float, default=1.0, help="heartbeat_interval_s of every agent")
    parser.add_argument("--lease", type=float, default=5.0, help="lease_s (fleetctl's default is 15)")
    parser.add_argument("--window", type=float, default=10.0, help="seconds of steady state counted per configuration")
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--jobs-timeout", type=float, default=300.0)
    parser.add_argument("--settle-timeout", type=float, default=120.0)
    parser.add_argument("--controllers", type=int, default=3, help="PostgreSQL configurations with 1 up to this many serves")
    parser.add_argument("--only", nargs="+", metavar="LABEL", help="only these configurations, e.g. 'PG x3' (ratios need 'SQLite x1')")
    parser.add_argument("--max-parallel-ssh", type=int, default=32)
    parser.add_argument("--quick", action="store_true", help="10 hosts, 40 jobs, lease_s 3, 4 s windows: a smoke run")
    parser.add_argument("--keep", action="store_true", help="keep the scratch dir (serve logs) and say where")
    parser.add_argument("--json", type=Path, help="write every figure here too")
    args = parser.parse_args()
    if args.quick:
        args.hosts, args.jobs, args.lease, args.window, args.jobs_timeout = 10, 40, 3.0, 4.0, 90.0
    if bindir() is None:
        raise SystemExit("PostgreSQL's server (initdb, pg_ctl) is not installed: scripts/bootstrap.sh --with-postgres")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwinds like Ctrl-C: everything below is stopped
    print(f"machine: {os.cpu_count()} cores; python {sys.version.split()[0]}; load {os.getloadavg()[0]:.2f}", flush=True)
    scratch = Path(tempfile.mkdtemp(prefix="fleetctl-bench-scaleout-"))
    bench: BenchFleet | None = None
    cluster: PostgresCluster | None = None
    results: list[dict[str, Any]] = []
    try:
        began = time.monotonic()
        (scratch / "fleet").mkdir()
        bench = BenchFleet(scratch / "fleet", args.hosts).up()
        cluster = PostgresCluster(scratch / "pg").start()
        inventory = write_inventory(bench, scratch / "ssh-agents.toml", args)
        agents = [name for name, _, _ in bench.hosts]
        print(f"{args.hosts} hosts ({len(bench.pids)} sshd x {bench.ports_per_sshd} ports) and PostgreSQL up in "
              f"{time.monotonic() - began:.1f} s", flush=True)
        configs = [Config("SQLite x1", 1, None, scratch / "sqlite-1")]
        for n in range(1, args.controllers + 1):
            configs.append(Config(f"PG x{n}", n, cluster.create_database(f"scaleout_{n}"), scratch / f"pg-{n}"))
        if args.only:
            configs = [c for c in configs if c.label in args.only]
        for config in configs:
            began = time.monotonic()
            result = run_config(config, inventory, agents, args, cluster.pid if config.url else None)
            result["problems"] = problems_of(result, args.hosts, args)
            results.append(result)
            beats, jobs, back = result["heartbeats"], result["jobs"], result["recovery"]
            print(f"  {config.label}: {beats['beats_per_s']:.1f} beats/s, {jobs['jobs_per_s']:.1f} jobs/s, back after "
                  f"SIGKILL in {back['back_s']:.1f} s ({back['how']}); {time.monotonic() - began:.0f} s, "
                  f"load {os.getloadavg()[0]:.2f}", flush=True)
    finally:
        if cluster is not None:
            cluster.stop()
        if bench is not None:
            bench.down()
        if args.keep:
            print(f"scratch kept: {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    print_table(results, args, args.hosts)
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results}, indent=1))


if __name__ == "__main__":
    main()
