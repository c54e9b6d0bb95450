"""After login one shared reader thread, not a thread per connection, reads every direct connection
(fleetctl/ssh/reader.py). Proven against real sshd: commands, large outputs, SFTP, a rekey, the
server's keepalives, our keepalives, and a peer that dies, all through the reader."""

from __future__ import annotations

import base64
import contextlib
import getpass
import os
import resource
import signal
import socket
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from paramiko.ssh_exception import SSHException

from fleetctl.errors import CommandTimeout, ConnectionLost
from fleetctl.inventory.config import load_config
from fleetctl.inventory.routes import route_for
from fleetctl.sandbox import Sandbox, sshd
from fleetctl.sandbox.sandbox import _free_port
from fleetctl.ssh import connect, fastpath
from fleetctl.ssh.known_hosts import fingerprint
from fleetctl.ssh.loop import MAX_PACKET, Transport
from fleetctl.ssh.reader import shared_reader
from fleetctl.ssh.seam import Hop, Route
from tests.conftest import require_sshd
from tests.waiting import wait_until

pytestmark = [pytest.mark.no_store,
              pytest.mark.skipif(not fastpath.enabled(), reason="the shared reader is the fast path: off on stock paramiko")]


def _wait_for(predicate: object, deadline_s: float = 10.0) -> bool:
    return wait_until(predicate, deadline_s, interval=0.02)  # type: ignore[arg-type]


def test_a_direct_connection_is_read_by_the_shared_reader_after_login(fleet_sandbox: Sandbox) -> None:
    route = route_for(load_config(fleet_sandbox.inventory_path).get("direct-nv"))
    before = threading.active_count()
    connections = [connect(route) for _ in range(8)]
    try:
        transports = [c._transport for c in connections]
        assert _wait_for(lambda: all(t.handed_over and not t.is_alive() for t in transports))
        # Eight logged-in connections, and at most the one reader thread more than before.
        assert threading.active_count() <= before + 1
        for conn in connections:
            assert conn.run_kept("echo kept").stdout == "kept\n"
            big = conn.run("head -c 3000000 /dev/zero | tr '\\0' x")  # many packets, window adjusts
            assert len(big.stdout) == 3_000_000
        remote = connections[0].run("mktemp -d").stdout.strip()
        connections[0].write_bytes(f"{remote}/f", b"x" * 200_000)
        assert connections[0].read_bytes(f"{remote}/f") == b"x" * 200_000
        connections[0].run(f"rm -rf {remote}").check()
        # A rekey's messages come through the reader too. Right after a command the server's close
        # of its channel often lands mid-exchange; paramiko's handler then waits for the exchange
        # only its reading thread can finish (30 s, then the connection dies): held, sent after.
        for attempt in range(5):
            connections[0].run("true")
            transports[0].renegotiate_keys()
            assert connections[0].run(f"echo {attempt}", timeout=10).stdout == f"{attempt}\n"
    finally:
        for conn in connections:
            conn.close()
    assert not any(shared_reader().holds(t) for t in transports)


class _Server:
    """One sshd of the test's own, with extra config lines; stopped by PID."""

    def __init__(self, root: Path, extra: list[str]) -> None:
        root.mkdir()
        self.key = root / "id_ed25519"
        sshd.keygen(self.key, "client")
        host_key = root / "host_ed25519"
        sshd.keygen(host_key, "host")
        (root / "authorized_keys").write_text(self.key.with_suffix(".pub").read_text())
        self.port = _free_port()
        spec = sshd.SshdSpec(name="reader", listen=[("127.0.0.1", self.port)], host_key=host_key,
                             authorized_keys=root / "authorized_keys", path_dirs=[], environment={"HOME": str(root)},
                             extra_config=extra)
        self.pid = sshd.start(spec, root, [])
        blob = base64.b64decode(host_key.with_suffix(".pub").read_text().split()[1])
        self.route = Route((Hop("127.0.0.1", getpass.getuser(), self.port, key_path=str(self.key),
                                fingerprint=fingerprint(blob), identity_agent="none"),), 10.0)


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[list[_Server]]:
    require_sshd()
    started: list[_Server] = []

    def make(extra: list[str]) -> _Server:
        server = _Server(tmp_path / f"sshd{len(started)}", extra)
        started.append(server)
        return server

    yield make  # type: ignore[misc]
    for server in started:
        sshd.stop(server.pid)


def test_the_reader_answers_the_servers_keepalives(server_factory: object) -> None:
    # sshd sends a keepalive request after each idle second and drops a client that leaves one
    # unanswered: two of them answered, by the reader, and the connection still works.
    server = server_factory(["ClientAliveInterval 1", "ClientAliveCountMax 1"])  # type: ignore[operator]
    with connect(server.route) as conn:
        transport = conn._transport
        assert _wait_for(lambda: transport.handed_over)
        requests: list[int] = []
        dispatch = transport._dispatch

        def counting(ptype: int, message: object) -> None:
            if ptype == 80:  # SSH_MSG_GLOBAL_REQUEST
                requests.append(ptype)
            dispatch(ptype, message)

        transport._dispatch = counting
        assert _wait_for(lambda: len(requests) >= 2, 10.0), "sshd sent no keepalives"
        assert transport.is_active()
        assert conn.run("echo alive").stdout == "alive\n"


def test_the_reader_sends_our_keepalives(server_factory: object) -> None:
    server = server_factory([])  # type: ignore[operator]
    with connect(server.route) as conn:
        transport = conn._transport
        assert _wait_for(lambda: transport.handed_over)
        sent: list[str] = []
        real = transport.global_request
        transport.global_request = lambda kind, *a, **k: (sent.append(kind), real(kind, *a, **k))[1]
        transport.set_keepalive(1)
        assert _wait_for(lambda: len(sent) >= 2, 6.0), sent
        assert conn.run("echo alive").stdout == "alive\n"


def test_a_peer_that_dies_ends_its_connection_in_the_reader(server_factory: object) -> None:
    server = server_factory([])  # type: ignore[operator]
    conn = connect(server.route)
    try:
        transport = conn._transport
        assert _wait_for(lambda: transport.handed_over)
        # The session's own sshd process: the child of the listener serving this connection.
        children = subprocess.run(["pgrep", "-P", str(server.pid)], capture_output=True, text=True).stdout.split()
        assert children
        for pid in children:
            os.kill(int(pid), signal.SIGKILL)
        assert _wait_for(lambda: not transport.is_active())
        assert not shared_reader().holds(transport)
        with pytest.raises(ConnectionLost):
            conn.run("true")
    finally:
        conn.close()


class _StallingRelay:
    """A TCP relay in front of an sshd that, once told to, passes the server's next bytes only up to
    the middle of a packet and then holds the rest: a host stuck mid-packet."""

    def __init__(self, target_port: int) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.target_port = target_port
        self.stall = threading.Event()
        self.stalled = threading.Event()
        self.sockets: list[socket.socket] = [self.listener]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            client, _ = self.listener.accept()
            server = socket.create_connection(("127.0.0.1", self.target_port))
            self.sockets += [client, server]
            threading.Thread(target=self._pump, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, True), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, from_server: bool) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                if from_server and self.stall.is_set():
                    sink.sendall(data[:5])  # a length and one byte: never a whole packet
                    self.stalled.set()
                    return
                sink.sendall(data)

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()


def test_a_host_stuck_mid_packet_stalls_only_itself(server_factory: object) -> None:
    server = server_factory([])  # type: ignore[operator]
    relay = _StallingRelay(server.port)
    hop = server.route.hops[0]
    stuck_route = Route((replace(hop, port=relay.port),), 10.0)
    try:
        with connect(stuck_route) as stuck, connect(server.route) as healthy:
            assert _wait_for(lambda: stuck._transport.handed_over and healthy._transport.handed_over)
            assert stuck.run_kept("echo before").stdout == "before\n"
            relay.stall.set()
            failures: list[BaseException] = []

            def run_stuck() -> None:
                try:
                    stuck.run_kept("echo never", timeout=3)
                except BaseException as exc:  # noqa: BLE001 - the test reads it below
                    failures.append(exc)

            waiting = threading.Thread(target=run_stuck)
            waiting.start()
            assert relay.stalled.wait(10)
            # The reader holds the stuck host's half packet and goes on reading the others.
            for attempt in range(5):
                assert healthy.run_kept(f"echo {attempt}", timeout=5).stdout == f"{attempt}\n"
            waiting.join(10)
            assert len(failures) == 1 and isinstance(failures[0], CommandTimeout)
    finally:
        relay.close()


def test_a_malformed_packet_length_ends_the_connection() -> None:
    ours, theirs = socket.socketpair()
    try:
        transport = Transport(ours)  # never started: only its framing is tested
        transport.packetizer._Packetizer__aead_in = True
        transport.packetizer._Packetizer__block_size_in = 16
        # Over OpenSSH's limit; too short (paramiko would read into the next packet); not whole blocks.
        for length in (MAX_PACKET + 16, 0, 20):
            transport._inbox[:] = length.to_bytes(4, "big") + b"\0" * 16
            with pytest.raises(SSHException, match="malformed packet length"):
                transport._packet_size()
        transport._inbox[:] = (1008).to_bytes(4, "big")
        assert transport._packet_size() == 4 + 1008 + transport.packetizer.get_mac_size_in()
    finally:
        ours.close()
        theirs.close()


def test_a_connection_whose_answers_would_wait_gets_its_own_thread_back(server_factory: object) -> None:
    # Another thread stuck mid-send on one connection (as when its host stops reading): the reader
    # must not wait behind it to answer that host, or every host waits. It hands that connection a
    # thread of its own and goes on with the others.
    server = server_factory([])  # type: ignore[operator]
    with connect(server.route) as stuck, connect(server.route) as healthy:
        transport = stuck._transport
        assert _wait_for(lambda: transport.handed_over and healthy._transport.handed_over)
        results: list[object] = []
        waiting = threading.Thread(target=lambda: results.append(stuck.run("sleep 0.5; echo late", timeout=20)))
        waiting.start()
        write_lock = transport.packetizer._Packetizer__write_lock
        assert _wait_for(lambda: transport._channels.values())  # its exec went out
        with write_lock:  # from here on every send on the stuck connection waits
            # The reply (output, exit status, the server's close) needs an answer: the reader gives
            # the connection its own thread rather than wait; the healthy one keeps working.
            assert _wait_for(lambda: not transport.handed_over, 10.0)
            for attempt in range(3):
                assert healthy.run_kept(f"echo {attempt}", timeout=5).stdout == f"{attempt}\n"
        waiting.join(20)
        assert [r.stdout for r in results] == ["late\n"]  # type: ignore[attr-defined]
        assert stuck.run("echo own thread").stdout == "own thread\n"
        assert not transport.handed_over and transport.is_active()


def test_a_forked_child_starts_cleanly_with_connections_handed_over(fleet_sandbox: Sandbox) -> None:
    route = route_for(load_config(fleet_sandbox.inventory_path).get("direct-nv"))
    with connect(route) as conn:
        assert _wait_for(lambda: conn._transport.handed_over)
        pid = os.fork()
        if pid == 0:  # the child: threading's after-fork hooks ran over our transports' Events
            code = 1
            try:
                thread = threading.Thread(target=lambda: None)
                thread.start()
                thread.join()
                code = 0 if shared_reader().ident != 0 else 1  # a reader of the child's own
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert conn.run("echo parent").stdout == "parent\n"


def test_descriptors_past_1024_are_read_like_any_other(fleet_sandbox: Sandbox) -> None:
    # A fleet of a thousand hosts has sockets numbered past select()'s 1024 limit.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.skip(f"the hard limit on open files is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1200) if soft != resource.RLIM_INFINITY else soft, hard))
    fillers: list[int] = []
    try:
        while not fillers or fillers[-1] < 1030:
            fillers.append(os.open(os.devnull, os.O_RDONLY))
        route = route_for(load_config(fleet_sandbox.inventory_path).get("direct-nv"))
        with connect(route) as conn:
            transport = conn._transport
            assert _wait_for(lambda: transport.handed_over)
            assert transport.reader_fd > 1024
            for attempt in range(3):
                assert conn.run_kept(f"echo {attempt}").stdout == f"{attempt}\n"
            assert transport.handed_over
    finally:
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
