"""Where fleetctl's controller CPU per steady-state heartbeat goes, on a bench fleet.

    .venv/bin/python bench/profile_heartbeat.py --hosts 100 --rounds 20
    .venv/bin/python bench/profile_heartbeat.py --hosts 100 --mode exec      # one exec channel per beat
    .venv/bin/python bench/profile_heartbeat.py --hosts 1000 --rounds 4 --native

Four measurements, each over steady rounds only (the connections are open before any starts):

1. CPU per heartbeat (process CPU time / heartbeats), with the store write and without;
2. SSH packets per heartbeat, by message type, counted on paramiko's Packetizer (a counting pass of
   its own, so the counting costs nothing in 1);
3. microbenchmarks of the pieces that are ours, in this thread alone: parsing one captured answer
   (``snapshot_from_result``), its pydantic models alone, and ``history.record`` of a round;
4. a profile of every thread, sorted into buckets (paramiko packet handling, channel bookkeeping,
   thread wake-ups, our parse, pydantic, SQLite, health...): yappi on the CPU clock by default
   (deterministic; its overhead inflates call-dense Python, so read shares, not milliseconds), or
   py-spy (``--profiler py-spy``, ``--native``, ``--gil``; in this container py-spy counts threads
   blocked in poll()/futex as running, and libc symbols are unreliable, so its shares are not usable
   without ``--gil``, which undersamples).

``--ab kept exec`` compares request paths in one process, rounds interleaved: the kept-open shell
(one write back per beat) and an exec channel per beat.

``--mode exec`` replaces the kept-open shell (``SSHConnection.run_kept``) by an exec channel per beat
(``SSHConnection.run``), in this process only, to compare the two request paths.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import paramiko  # noqa: E402
from benchfleet import BenchFleet, cpu_seconds, rss_mib  # noqa: E402
from paramiko.common import MSG_NAMES  # noqa: E402

from fleetctl.fleet import DEFAULT_MAX_PARALLEL_SSH, Fleet  # noqa: E402
from fleetctl.ssh import connection as ssh_connection  # noqa: E402
from fleetctl.store import SQLiteStore  # noqa: E402
from fleetctl.telemetry.heartbeat import heartbeat_command, snapshot_from_result  # noqa: E402
from fleetctl.telemetry.history import record as record_history  # noqa: E402
from fleetctl.telemetry.parsers import parse_gpu_output  # noqa: E402
from fleetctl.telemetry.snapshot import GpuSample, TelemetrySnapshot  # noqa: E402

# Buckets, tried in order against each frame from the innermost outwards; the first match names
# the sample. (file or function regex, bucket)
BUCKETS: list[tuple[str, str]] = [
    (r"sqlite3|fleetctl/store/|fleetctl/telemetry/history\.py", "SQLite write (history.record, store)"),
    (r"fleetctl/telemetry/health\.py", "health state machine"),
    (r"pydantic|fleetctl/telemetry/snapshot\.py", "pydantic models (TelemetrySnapshot/GpuSample)"),
    (r"/re/_parser\.py|/re/_compiler\.py|/re/__init__\.py", "regex compiled per beat (session.py's end marker)"),
    (r"fleetctl/telemetry/parsers/|fleetctl/telemetry/heartbeat\.py|fleetctl/telemetry/jobdirs\.py|fleetctl/jobs/remote\.py|fleetctl/_text\.py", "our parse"),
    (r"libcrypto|libssl|_rust\.abi3|cryptography/|EVP_|aes|gcm|ghash", "crypto (AES-GCM, native)"),
    (r"paramiko/packet\.py", "paramiko Packetizer (read/send_message, framing)"),
    (r"paramiko/message\.py|paramiko/util\.py|paramiko/common\.py", "paramiko Message encode/decode"),
    (r"paramiko/channel\.py|paramiko/buffered_pipe\.py", "paramiko Channel + buffers"),
    (r"paramiko/transport\.py|fleetctl/ssh/reader\.py", "Transport dispatch (paramiko's handlers, the shared reader)"),
    (r"fleetctl/ssh/lean_sync\.py", "thread wake-ups (Event/Condition/pool)"),
    (r"fleetctl/ssh/", "fleetctl/ssh (run, run_kept, session)"),
    (r"threading\.py|concurrent/futures|queue\.py|futex|pthread_cond|sem_|_thread", "thread wake-ups (Event/Condition/pool)"),
    (r"socket\.py|recv|send|select|poll|epoll", "socket syscalls"),
    (r"fleetctl/hosts/core\.py|fleetctl/fleet\.py", "fleetctl/hosts/core.py (heartbeat_one, round)"),
    (r"datetime|secrets|random|uuid|logging", "stdlib misc (time stamps, nonces, logging)"),
]


_BLOCKED = re.compile(r"^(poll|ppoll|select|epoll_wait|pthread_cond_(timed)?wait|sem_(clock|timed)?wait|"
                      r"__futex|futex|nanosleep|clock_nanosleep|do_futex_wait|__GI___poll) ")


def count_packets(fleet: Fleet, rounds: int) -> dict[str, float]:
    """Packets per heartbeat by direction and message type, from paramiko's Packetizer."""
    counts: collections.Counter[str] = collections.Counter()
    sent, read = paramiko.packet.Packetizer.send_message, paramiko.packet.Packetizer.read_message

    def send_message(self: Any, data: Any) -> Any:
        raw = data.asbytes()
        counts["out " + MSG_NAMES.get(raw[0], str(raw[0]))] += 1
        return sent(self, data)

    def read_message(self: Any) -> Any:
        ptype, msg = read(self)
        counts["in " + MSG_NAMES.get(ptype, str(ptype))] += 1
        return ptype, msg

    paramiko.packet.Packetizer.send_message, paramiko.packet.Packetizer.read_message = send_message, read_message
    try:
        # A connection still read by its own thread is inside an unpatched read_message, waiting: its
        # next packet would go uncounted. One round first, not counted, moves every reader onto ours.
        fleet.heartbeat(record=False)
        counts.clear()
        for _ in range(rounds):
            fleet.heartbeat(record=False)
    finally:
        paramiko.packet.Packetizer.send_message, paramiko.packet.Packetizer.read_message = sent, read
    beats = rounds * len(fleet.inventory.agents)
    return {name: n / beats for name, n in sorted(counts.items(), key=lambda kv: -kv[1])}


def timed(fn: Any, n: int) -> float:
    """Mean thread-CPU milliseconds per call."""
    fn()
    t0 = time.thread_time()
    for _ in range(n):
        fn()
    return (time.thread_time() - t0) / n * 1000


def micro(fleet: Fleet, scratch: Path) -> dict[str, float]:
    agent = fleet.inventory.agents[0]
    command = heartbeat_command(agent)
    result = fleet.hosts.connection(agent).run(command, timeout=30)
    out: dict[str, float] = {}
    out["snapshot_from_result (whole parse incl. models)"] = timed(lambda: snapshot_from_result(agent, result, 1.0), 2000)
    head = result.stdout.partition("\n\x1efleetctl-rc ")[0].partition("\n")[2]
    out["  parse_gpu_output (csv -> GpuSample list)"] = timed(
        lambda: parse_gpu_output(agent.gpu_query_cmd or "", head, exit_code=0, stderr=""), 2000)
    snap = snapshot_from_result(agent, result, 1.0)
    gpu_fields = [g.model_dump() for g in snap.gpus]
    snap_fields = {k: getattr(snap, k) for k in type(snap).model_fields}
    out["  GpuSample(**fields) x gpus (pydantic)"] = timed(lambda: [GpuSample(**f) for f in gpu_fields], 2000)
    out["  TelemetrySnapshot(**fields) (pydantic, samples prebuilt)"] = timed(lambda: TelemetrySnapshot(**snap_fields), 2000)
    out["  TelemetrySnapshot.model_construct (no validation)"] = timed(lambda: TelemetrySnapshot.model_construct(**snap_fields), 2000)
    round_ = [snapshot_from_result(a, result, 1.0) for a in fleet.inventory.agents]
    store = SQLiteStore.in_state_dir(scratch / "micro-state")
    try:
        n = 20
        out["history.record per heartbeat (one round, one transaction)"] = timed(
            lambda: record_history(store, round_, fleet.health_policy), n) / len(round_)
    finally:
        store.close()
    return out


def bucket_profile(path: Path) -> tuple[collections.Counter[str], collections.Counter[str], int]:
    buckets: collections.Counter[str] = collections.Counter()
    leaves: collections.Counter[str] = collections.Counter()
    total = blocked = 0
    compiled = [(re.compile(p, re.I), name) for p, name in BUCKETS]
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        count = int(n)
        frames = stack.split(";")
        # py-spy's idle detection does not work in every container: a thread blocked in poll() or
        # on a futex is sampled as if running. With --native, those samples end in the wait itself.
        if any(_BLOCKED.search(f) for f in frames[-4:]):
            blocked += count
            continue
        # Handshakes and reconnects are not steady state; none should happen, count them apart.
        if any(("_parse_kex" in f or "auth_handler" in f or "start_client" in f) for f in frames):
            buckets["(handshake: not steady state)"] += count
            total += count
            continue
        name = "other"
        for frame in reversed(frames):
            hit = next((b for rx, b in compiled if rx.search(frame)), None)
            if hit:
                name = hit
                break
        buckets[name] += count
        # the innermost Python frame, for the top list
        leaf = next((f for f in reversed(frames) if ".py:" in f), frames[-1])
        leaves[re.sub(r":\d+\)$", ")", leaf.replace(str(Path(paramiko.__file__).parent.parent) + "/", ""))] += count
        total += count
    buckets["(blocked in poll/futex: excluded from the shares)"] = blocked
    return buckets, leaves, total


# Builtins (C functions) whose cost is a bucket of its own; every other builtin's time goes to the
# Python function that called it (str.split in our parser is our parse).
SPECIAL_BUILTINS: list[tuple[str, str]] = [
    (r"sqlite3|Connection|Cursor", "SQLite write (history.record, store)"),
    (r"AESGCM|encrypt|decrypt|finalize|update_into|cryptography", "crypto (AES-GCM, native)"),
    (r"_socket\.socket|'recv'|'send'|sendall|'settimeout'|select|poll", "socket syscalls"),
    (r"lock|acquire|release|_thread|Condition|Event|SimpleQueue|notify", "thread wake-ups (Event/Condition/pool)"),
    (r"urandom|getrandom", "stdlib misc (time stamps, nonces, logging)"),
]


def profile_yappi(fleet: Fleet, args: argparse.Namespace) -> None:
    import yappi

    compiled = [(re.compile(p, re.I), name) for p, name in BUCKETS]
    special = [(re.compile(p), name) for p, name in SPECIAL_BUILTINS]

    def bucket_of(stat: Any) -> str:
        where = f"{stat.module} {stat.name}"
        return next((b for rx, b in compiled if rx.search(where)), "other")

    yappi.set_clock_type("cpu")
    yappi.clear_stats()
    cpu0 = cpu_seconds()
    yappi.start(builtins=True, profile_threads=True)
    try:
        for _ in range(args.rounds):
            fleet.heartbeat()  # with the store, as serve does
    finally:
        yappi.stop()
    cpu = cpu_seconds() - cpu0
    beats = args.rounds * args.hosts
    buckets: collections.Counter[str] = collections.Counter()
    functions: collections.Counter[str] = collections.Counter()
    stats = yappi.get_func_stats()
    for stat in stats:
        if stat.builtin:
            continue
        name = bucket_of(stat)
        own = stat.tsub
        for child in stat.children:
            if not child.builtin:
                continue
            label = f"{child.module} {child.name}"
            hit = next((b for rx, b in special if rx.search(label)), None)
            if hit:
                buckets[hit] += child.ttot
                functions[f"[builtin] {child.name}"] += child.ttot
            else:
                own += child.ttot
        buckets[name] += own
        short = re.sub(r".*/(site-packages|python3\.\d+|main)/", "", stat.module)
        functions[f"{stat.name} ({short})"] += own
    total = sum(buckets.values())
    print(f"\nyappi (CPU clock, every thread, builtins folded into their caller unless named), {args.rounds} rounds "
          f"with the store: CPU per heartbeat under the profiler {cpu / beats * 1000:.3f} ms, profiled {total / beats * 1000:.3f} ms")
    for name, t in buckets.most_common():
        print(f"  {name:60}{t / total * 100:6.1f} %")
    print("\n  functions by own CPU (with the builtins they call), top 30:")
    for name, t in functions.most_common(30):
        print(f"  {t / total * 100:6.1f} %  {name}")
    yappi.clear_stats()


def set_mode(mode: str) -> None:

    ssh_connection.SSHConnection.run_kept = _ORIGINAL["run_kept"] if mode != "exec" else ssh_connection.SSHConnection.run  # type: ignore[method-assign]


_ORIGINAL: dict[str, Any] = {}


def ab(fleet: Fleet, modes: list[str], rounds: int) -> None:
    """Request paths compared in one process, rounds interleaved (noise on a shared box hits all)."""
    from fleetctl.ssh import session

    _ORIGINAL.update(run_kept=ssh_connection.SSHConnection.run_kept, _run=session.ShellSession._run)
    cpu = dict.fromkeys(modes, 0.0)
    packets = {}
    try:
        for mode in modes:
            set_mode(mode)
            assert not fleet.heartbeat(record=False).failed  # opens this mode's shells
            packets[mode] = count_packets(fleet, 2)
        for _ in range(rounds):
            for mode in modes:
                set_mode(mode)
                cpu0 = cpu_seconds()
                result = fleet.heartbeat(record=False)
                cpu[mode] += cpu_seconds() - cpu0
                assert not result.failed, result.failed[0].error
    finally:
        set_mode("kept")
    beats = rounds * len(fleet.inventory.agents)
    print(f"\nA/B, no store, {rounds} interleaved rounds each:")
    for mode in modes:
        detail = ", ".join(f"{k} {v:.2f}" for k, v in packets[mode].items())
        print(f"  {mode:8} CPU per heartbeat {cpu[mode] / beats * 1000:.3f} ms; packets per heartbeat "
              f"{sum(packets[mode].values()):.2f} ({detail})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=20, help="steady rounds measured (and profiled)")
    parser.add_argument("--mode", choices=["kept", "exec"], default="kept")
    parser.add_argument("--ab", nargs="*", choices=["kept", "exec"],
                        help="compare request paths in one process, rounds interleaved")
    parser.add_argument("--max-parallel-ssh", type=int, default=DEFAULT_MAX_PARALLEL_SSH)
    parser.add_argument("--native", action="store_true", help="py-spy --native: C frames too (crypto, sqlite, syscalls)")
    parser.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    parser.add_argument("--profiler", choices=["yappi", "py-spy", "none"], default="yappi",
                        help="yappi: deterministic, CPU clock, every thread (default); py-spy: sampling")
    parser.add_argument("--gil", action="store_true", help="py-spy --gil: only the thread holding the GIL")
    parser.add_argument("--out", type=Path, default=None, help="keep the raw py-spy stacks here")
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.mode == "exec":
        ssh_connection.SSHConnection.run_kept = ssh_connection.SSHConnection.run  # type: ignore[method-assign]
    print(f"load {os.getloadavg()[0]:.2f}; {args.hosts} hosts; mode {args.mode}")
    with tempfile.TemporaryDirectory(prefix="fleetctl-prof-") as scratch_dir:
        scratch = Path(scratch_dir)
        bench = BenchFleet(scratch, args.hosts).up()
        try:
            fleet = Fleet(bench.inventory(), state_dir=scratch / "state", max_parallel_ssh=args.max_parallel_ssh)
            try:
                first = fleet.heartbeat()
                assert not first.failed, first.failed[0].error
                beats = args.rounds * args.hosts
                for record in (True, False):
                    cpu0, wall0 = cpu_seconds(), time.monotonic()
                    for _ in range(args.rounds):
                        assert not fleet.heartbeat(record=record).failed
                    usage = resource.getrusage(resource.RUSAGE_SELF)
                    print(f"CPU per heartbeat, {'store' if record else 'no store'}: "
                          f"{(cpu_seconds() - cpu0) / beats * 1000:.3f} ms; round {(time.monotonic() - wall0) / args.rounds:.2f} s"
                          f" (process so far: user {usage.ru_utime:.1f} s, system {usage.ru_stime:.1f} s)")
                print(f"RSS {rss_mib():.0f} MiB; threads {len(os.listdir('/proc/self/task'))}")
                print("\nSSH packets per heartbeat (paramiko Packetizer):")
                packets = count_packets(fleet, max(1, min(args.rounds, 3)))
                print(f"  total {sum(packets.values()):.2f}: " + ", ".join(f"{k} {v:.2f}" for k, v in packets.items()))
                print("\nmicrobenchmarks, thread CPU ms per heartbeat:")
                for name, ms in micro(fleet, scratch).items():
                    print(f"  {name:64}{ms:8.3f}")
                if args.ab:
                    ab(fleet, args.ab, args.rounds)
                if args.profiler == "yappi":
                    profile_yappi(fleet, args)
                elif args.profiler == "py-spy":
                    profile(fleet, args, scratch)
            finally:
                fleet.close()
        finally:
            bench.down()


def profile(fleet: Fleet, args: argparse.Namespace, scratch: Path) -> None:
    raw = args.out or scratch / "pyspy.txt"
    spy = Path(sys.executable).with_name("py-spy")
    argv = [str(spy), "record", "--pid", str(os.getpid()), "-r", str(args.rate), "-f", "raw", "-o", str(raw)]
    if args.native:
        argv.append("--native")
    if args.gil:
        argv.append("--gil")
    sampler = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1.5)  # attach
        if sampler.poll() is not None:
            print(f"\npy-spy could not attach: {sampler.stderr.read() if sampler.stderr else ''}")
            return
        cpu0 = cpu_seconds()
        for _ in range(args.rounds):
            fleet.heartbeat()  # with the store, as serve does
        cpu = cpu_seconds() - cpu0
    finally:
        if sampler.poll() is None:
            sampler.send_signal(signal.SIGINT)
        try:
            sampler.wait(60)
        except subprocess.TimeoutExpired:
            sampler.kill()
            sampler.wait()
    buckets, leaves, total = bucket_profile(raw)
    beats = args.rounds * args.hosts
    print(f"\npy-spy ({'native' if args.native else 'python'} frames), {total} samples over {args.rounds} rounds "
          f"with the store; CPU per heartbeat while sampled {cpu / beats * 1000:.3f} ms")
    blocked = buckets["(blocked in poll/futex: excluded from the shares)"]
    print(f"  on-CPU samples {total} ({total / args.rate:.1f} s of CPU at {args.rate}/s) of {total + blocked}")
    for name, n in buckets.most_common():
        if not name.startswith("(blocked"):
            print(f"  {name:60}{n / total * 100:6.1f} %   {n / total * cpu / beats * 1000:6.3f} ms/beat")
    print("\n  innermost Python frames, top 25:")
    for name, n in leaves.most_common(25):
        print(f"  {n / total * 100:6.1f} %  {name}")


if __name__ == "__main__":
    main()
