"""Jobs through the queue against sandbox hosts: dispatch-to-start latency and jobs per second,
against the reference design (one OpenSSH ``ssh`` command per step) measured in the same run.

    .venv/bin/python bench/jobs.py [--hosts 8] [--jobs 200]
    .venv/bin/python bench/jobs.py --array 1000 [--repeat 5]    # submit --array N on SQLite and PostgreSQL
    .venv/bin/python bench/jobs.py --dispatch 1000 [--hosts 8] [--singles 20]   # dispatch throughput, N queued

``--array N`` times ``fleetctl submit --array N`` alone (the parent and N tasks in one transaction): the
library call ``fleet.submit_sweep(array=N)`` and the whole command in a subprocess (interpreter start
included), on the SQLite store and, where PostgreSQL's server is installed, on a private cluster.

``--dispatch N`` times dispatch alone (claim, mkdir, upload, launch, marked running): the per-job cost of
dispatching an ``--array N`` sweep whose N tasks are all queued at once, against the per-job cost of a
single queued job's dispatch measured in the same run on the same fleet (the median of ``--singles``).
The target is within 1.5x: a tick reads the queue once, not once per task. Wall time and this
process's CPU time, each per job.

fleetctl: submit N jobs, then drive the queue (heartbeat + runner tick) until all are collected.
Latency is from the moment a job is marked ``dispatching`` to the moment its command starts on
the host (the command prints its own start time). Baseline per job: ``ssh mktemp -d``,
``ssh 'cat > job.json'``, ``ssh 'cat > run.sh'``, ``ssh launch``, ``ssh cat result.json``, ``ssh rm -rf``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchfleet import BenchFleet  # noqa: E402

from fleetctl.fleet import Fleet  # noqa: E402
from fleetctl.jobs.api import drive_once  # noqa: E402
from fleetctl.jobs.queue import JobQueue  # noqa: E402
from fleetctl.jobs.runner import JobRunner  # noqa: E402
from fleetctl.telemetry.history import agent_statuses  # noqa: E402


def measure_fleetctl(bench: BenchFleet, count: int) -> dict[str, float]:
    fleet = Fleet(bench.inventory(), state_dir=bench.directory / "state")
    try:
        fleet.heartbeat()
        fleet.heartbeat()  # twice: agents are online and connections open before timing
        jobs = [fleet.submit(["date", "+%s.%N"]) for _ in range(count)]
        started = time.monotonic()
        queue = JobQueue(fleet.hosts.store)
        while any(not r.done for r in queue.list(("queued", "dispatching", "running"))) or \
                len(queue.list(("succeeded",))) < count:
            drive_once(fleet.hosts)
        wall = time.monotonic() - started
        latencies = []
        for job in jobs:
            record = job.record
            assert record.state == "succeeded", record.reason
            began = float(Path(record.result.stdout_path or "").read_text().strip())  # type: ignore[union-attr]
            latencies.append((began - record.dispatched.timestamp()) * 1000)  # type: ignore[union-attr]
        return {"jobs_per_s": count / wall, "latency_ms": statistics.median(latencies),
                "latency_p95_ms": sorted(latencies)[int(len(latencies) * 0.95) - 1]}
    finally:
        fleet.close()


def measure_ssh_baseline(bench: BenchFleet, count: int) -> dict[str, float]:
    _, port, _ = bench.hosts[0]

    def ssh(remote: str, data: bytes | None = None) -> str:
        return subprocess.run(bench.ssh_command(port, remote), input=data, capture_output=True, check=True,
                              timeout=60).stdout.decode().strip()
    latencies = []
    started = time.monotonic()
    for number in range(count):
        dispatched = time.time()
        directory = ssh("mktemp -d /tmp/fleetctl-bench-baseline.XXXXXXXX")
        ssh(f"cat > {directory}/job.json", b'{"id": "%d"}' % number)
        ssh(f"cat > {directory}/run.sh", f"date +%s.%N > {directory}/start; echo 0 > {directory}/result.json".encode())
        ssh(f"setsid sh {directory}/run.sh </dev/null >/dev/null 2>&1 &")
        while True:
            if ssh(f"cat {directory}/result.json 2>/dev/null || true"):
                break
        latencies.append((float(ssh(f"cat {directory}/start")) - dispatched) * 1000)
        ssh(f"rm -rf {directory}")
    wall = time.monotonic() - started
    return {"jobs_per_s": count / wall, "latency_ms": statistics.median(latencies),
            "latency_p95_ms": sorted(latencies)[max(0, int(len(latencies) * 0.95) - 1)]}


def measure_dispatch(bench: BenchFleet, tasks: int, singles: int) -> dict[str, float]:
    """Seconds per job (wall, and this process's CPU) to dispatch: single queued jobs one at a time,
    then an array of ``tasks`` all queued at once, through the runner's own placement and dispatch."""
    fleet = Fleet(bench.inventory(), state_dir=bench.directory / "state-dispatch")
    try:
        fleet.heartbeat()
        fleet.heartbeat()  # twice: agents are online and connections open before timing
        runner = JobRunner(fleet.hosts)
        statuses = agent_statuses(fleet.hosts.store)  # as a tick reads them; no heartbeat runs meanwhile
        walls, cpus = [], []
        for _ in range(singles + 1):  # the first one opens each host's SFTP session: not timed
            fleet.submit(["true"])
            wall, cpu = time.perf_counter(), time.process_time()
            assert len(runner.scheduler.dispatch_queued(statuses)) == 1
            walls.append(time.perf_counter() - wall)
            cpus.append(time.process_time() - cpu)
        started = time.perf_counter()
        fleet.submit_sweep(["true"], array=tasks)
        submitted = time.perf_counter() - started
        wall, cpu, dispatched, ticks = time.perf_counter(), time.process_time(), 0, 0
        while dispatched < tasks:
            done = len(runner.scheduler.dispatch_queued(statuses))
            assert done, "a tick dispatched nothing"
            dispatched, ticks = dispatched + done, ticks + 1
        array_wall, array_cpu = (time.perf_counter() - wall) / tasks, (time.process_time() - cpu) / tasks
        # Every launched job ends before the scratch directory goes (its result.json written).
        deadline = time.monotonic() + 300
        while len(list((bench.directory / "tmp").glob("fleetctl-job-*/result.json"))) < tasks + singles + 1:
            assert time.monotonic() < deadline, "launched jobs did not all finish"
            time.sleep(0.2)
    finally:
        fleet.close()
    return {"single_wall": statistics.median(walls[1:]), "single_cpu": statistics.median(cpus[1:]),
            "array_wall": array_wall, "array_cpu": array_cpu, "ticks": ticks, "submit_s": submitted}


def main_dispatch(hosts: int, tasks: int, singles: int) -> None:
    with tempfile.TemporaryDirectory(prefix="fleetctl-bench-dispatch-") as scratch:
        bench = BenchFleet(Path(scratch), hosts, ports_per_sshd=4).up()
        try:
            row = measure_dispatch(bench, tasks, singles)
        finally:
            bench.down()
    print(f"{hosts} hosts; dispatch of one queued job (median of {singles}) against an --array {tasks} sweep "
          f"all queued (dispatched in {row['ticks']:.0f} tick(s); submitted in {row['submit_s']:.3f} s)")
    print(f"{'per job':34}{'single':>12}{f'array {tasks}':>14}{'ratio':>9}")
    for name, key in (("dispatch, wall (ms)", "wall"), ("dispatch, controller CPU (ms)", "cpu")):
        single, array = row[f"single_{key}"] * 1000, row[f"array_{key}"] * 1000
        print(f"{name:34}{single:12.2f}{array:14.2f}{array / single:8.2f}x")


INVENTORY = '[[agents]]\nname = "bench"\nhostname = "127.0.0.1"\nssh_port = 1\n'  # submit needs an agent, never reaches it


def measure_array_submit(scratch: Path, count: int, repeat: int, store: str | None) -> dict[str, float]:
    """Medians of ``repeat`` submits of an array of ``count`` tasks, each on a fresh state dir."""
    config = scratch / "agents.toml"
    config.write_text(INVENTORY)
    library, command = [], []
    for number in range(repeat):
        state = scratch / f"state-{store is not None}-{number}"
        options = {"store": store} if store else {}
        with Fleet.from_config(config, state_dir=state, **options) as fleet:
            fleet.jobs()  # the store is open and migrated before timing
            started = time.perf_counter()
            sweep = fleet.submit_sweep(["true"], array=count)
            library.append(time.perf_counter() - started)
            assert sweep.record.counts == {"queued": count}
        env = {**os.environ, **({"FLEETCTL_STORE": store} if store else {})}
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "fleetctl", "submit", "--array", str(count), "--config", str(config),
                        "--state-dir", str(state), "--", "true"], check=True, capture_output=True, env=env, timeout=120)
        command.append(time.perf_counter() - started)
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "fleetctl", "--version"], capture_output=True, timeout=60)
    return {"library_s": statistics.median(library), "command_s": statistics.median(command),
            "interpreter_s": time.perf_counter() - started}


def main_array(count: int, repeat: int) -> None:
    from fleetctl.sandbox.postgres import PostgresCluster, bindir

    with tempfile.TemporaryDirectory(prefix="fleetctl-bench-array-") as scratch:
        rows = [("SQLite", measure_array_submit(Path(scratch), count, repeat, None))]
        if bindir() is not None:
            cluster = PostgresCluster(Path(scratch) / "pg").start()
            try:
                rows.append(("PostgreSQL", measure_array_submit(Path(scratch), count, repeat, cluster.create_database("bench"))))
            finally:
                cluster.stop()
    print(f"submit --array {count}, median of {repeat}")
    print(f"{'store':12}{'submit_sweep (s)':>18}{'fleetctl submit (s)':>21}{'of which `fleetctl --version` (s)':>35}")
    for name, row in rows:
        print(f"{name:12}{row['library_s']:18.3f}{row['command_s']:21.3f}{row['interpreter_s']:35.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=8)
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--baseline-jobs", type=int, default=20)
    parser.add_argument("--array", type=int, help="time `submit --array N` alone, on SQLite and PostgreSQL")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--dispatch", type=int, metavar="N",
                        help="dispatch throughput: an --array N sweep all queued against single-job dispatches")
    parser.add_argument("--singles", type=int, default=20, help="single-job dispatches timed with --dispatch")
    args = parser.parse_args()
    if args.array:
        main_array(args.array, args.repeat)
        return
    if args.dispatch:
        main_dispatch(args.hosts, args.dispatch, args.singles)
        return
    with tempfile.TemporaryDirectory(prefix="fleetctl-bench-jobs-") as scratch:
        bench = BenchFleet(Path(scratch), args.hosts, ports_per_sshd=4).up()
        try:
            base = measure_ssh_baseline(bench, args.baseline_jobs)
            ours = measure_fleetctl(bench, args.jobs)
        finally:
            bench.down()
    print(f"{args.hosts} hosts; fleetctl {args.jobs} jobs, baseline {args.baseline_jobs} jobs (sequential ssh steps)")
    print(f"{'':34}{'fleetctl':>12}{'ssh per step':>14}{'ratio':>9}")
    print(f"{'dispatch-to-start, median (ms)':34}{ours['latency_ms']:12.1f}{base['latency_ms']:14.1f}"
          f"{base['latency_ms'] / ours['latency_ms']:8.1f}x")
    print(f"{'dispatch-to-start, p95 (ms)':34}{ours['latency_p95_ms']:12.1f}{base['latency_p95_ms']:14.1f}")
    print(f"{'jobs per second through the queue':34}{ours['jobs_per_s']:12.1f}{base['jobs_per_s']:14.1f}"
          f"{ours['jobs_per_s'] / base['jobs_per_s']:8.1f}x")


if __name__ == "__main__":
    main()
