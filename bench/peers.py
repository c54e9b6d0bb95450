"""The peers bench/heartbeat.py measures fleetctl against, on the same bench fleet: asyncssh and
parallel-ssh (libssh2), each with one connection per host kept open between rounds, running
fleetctl's own heartbeat command once per beat and parsing its output with fleetctl's own parser
(``snapshot_from_result``), so every client gets the same bytes and does the same parsing work.

Both are benchmark-only dependencies (``pip install -e '.[bench]'``). Neither is imported by
fleetctl. Each runner is called in a process of its own (see bench/heartbeat.py), so its CPU time
and memory are its own.

Behind a bastion (``BenchFleet(bastion=True)``), asyncssh logs in to the bastion once and reaches
every host over that one connection (``tunnel=``), as fleetctl shares its link to the bastion.

Concurrency: each peer runs at most ``parallel`` heartbeats (and handshakes) at a time, the same
cap fleetctl's pool has (``max_parallel_ssh``), so round times compare like with like.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

from benchfleet import BenchFleet

from fleetctl.inventory.config import Agent
from fleetctl.ssh.seam import CommandResult
from fleetctl.telemetry.heartbeat import heartbeat_command, snapshot_from_result
from fleetctl.telemetry.snapshot import TelemetrySnapshot

Measure = Callable[[Callable[[], list[TelemetrySnapshot]], Callable[[float], None]], dict[str, Any]]


def _parse(agent: Agent, command: str, exit_code: int, stdout: str, stderr: str, started: float) -> TelemetrySnapshot:
    elapsed = time.monotonic() - started
    return snapshot_from_result(agent, CommandResult(command, exit_code, stdout, stderr, elapsed), elapsed * 1000)


def run_asyncssh(bench: BenchFleet, parallel: int, measure: Measure) -> dict[str, Any]:
    import asyncio

    import asyncssh

    agents = bench.inventory().agents
    command = heartbeat_command(agents[0])
    user = agents[0].ssh_user
    # asyncssh checks host keys against the bench fleet's known_hosts file ([127.0.0.1]:port lines),
    # as fleetctl checks the pinned fingerprints: both do the verification work. Read once: given a
    # path, asyncssh would parse the whole 1000-line file again on every connect.
    known_hosts = asyncssh.read_known_hosts(str(bench.known_hosts_file()))
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    gate = asyncio.Semaphore(parallel)
    conns: dict[str, asyncssh.SSHClientConnection] = {}
    bastion_lock = asyncio.Lock()
    bastions: list[asyncssh.SSHClientConnection] = []  # the one shared connection, once open

    async def tunnel() -> asyncssh.SSHClientConnection | None:
        if bench.bastion_port is None:
            return None
        async with bastion_lock:  # the first host opens it, in the first (measured) round
            if not bastions:
                bastions.append(await asyncssh.connect(
                    "127.0.0.1", port=bench.bastion_port, username=user, client_keys=[str(bench.client_key)],
                    known_hosts=known_hosts, agent_path=None, config=[], connect_timeout=agents[0].connect_timeout_s))
            return bastions[0]

    async def connect(agent: Agent) -> asyncssh.SSHClientConnection:
        # config=[]: no ~/.ssh/config; agent_path=None: only the bench key is offered.
        return await asyncssh.connect(agent.hostname, port=agent.ssh_port, username=user, tunnel=await tunnel(),
                                      client_keys=[str(bench.client_key)], known_hosts=known_hosts,
                                      agent_path=None, config=[], connect_timeout=agent.connect_timeout_s)

    async def beat(agent: Agent) -> TelemetrySnapshot:
        async with gate:
            started = time.monotonic()
            conn = conns.get(agent.name)
            if conn is None:
                conn = conns[agent.name] = await connect(agent)
            result = await conn.run(command, check=False, timeout=agent.command_timeout_s)
            exit_code = result.exit_status if result.exit_status is not None else -1
            return _parse(agent, command, exit_code, str(result.stdout or ""), str(result.stderr or ""), started)

    async def round_() -> list[TelemetrySnapshot]:
        return list(await asyncio.gather(*(beat(a) for a in agents)))

    def idle(seconds: float) -> None:
        loop.run_until_complete(asyncio.sleep(seconds))

    try:
        return measure(lambda: loop.run_until_complete(round_()), idle)
    finally:
        async def close() -> None:
            for conn in conns.values():
                conn.close()
            await asyncio.gather(*(c.wait_closed() for c in conns.values()), return_exceptions=True)
            for bastion in bastions:
                bastion.close()
                await bastion.wait_closed()
        loop.run_until_complete(close())
        loop.close()


def run_parallel_ssh(bench: BenchFleet, parallel: int, measure: Measure) -> dict[str, Any]:
    import gevent
    from pssh.clients import ParallelSSHClient
    from pssh.config import HostConfig

    agents = bench.inventory().agents
    command = heartbeat_command(agents[0])
    # parallel-ssh's native (libssh2) client does no host key verification at all: it has no
    # known_hosts option. This bench accepts that for the peer only; fleetctl verifies every key.
    client = ParallelSSHClient(
        [a.hostname or "127.0.0.1" for a in agents], user=agents[0].ssh_user, pkey=str(bench.client_key),
        host_config=[HostConfig(port=a.ssh_port) for a in agents], pool_size=parallel, num_retries=1,
        timeout=agents[0].command_timeout_s, allow_agent=False, identity_auth=False)

    def round_() -> list[TelemetrySnapshot]:
        started = time.monotonic()
        # Opens (first round) or reuses each host's connection, a new channel per command.
        output = client.run_command(command, stop_on_errors=True)
        raw: list[tuple[str, str]] = []
        for host_out in output:  # the raw bytes each host sent, not parallel-ssh's line splitting
            out = b"".join(host_out.buffers.stdout.rw_buffer).decode("utf-8", "replace")
            err = b"".join(host_out.buffers.stderr.rw_buffer).decode("utf-8", "replace")
            raw.append((out, err))
        client.join(output)
        snapshots = []
        for agent, host_out, (out, err) in zip(agents, output, raw, strict=True):
            exit_code = host_out.exit_code if host_out.exit_code is not None else -1
            snapshots.append(_parse(agent, command, exit_code, out, err, started))
        return snapshots

    try:
        return measure(round_, gevent.sleep)
    finally:
        for host_client in list(client._host_clients.values()):  # no public close-all in 2.x
            with contextlib.suppress(Exception):  # closing at exit: gone is gone
                host_client.disconnect()


PEERS: dict[str, Callable[[BenchFleet, int, Measure], dict[str, Any]]] = {
    "asyncssh": run_asyncssh,
    "parallel-ssh": run_parallel_ssh,
}
