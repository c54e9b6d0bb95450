"""``fleetctl serve``, ``top`` and ``telemetry export``."""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import threading
import time
from contextlib import ExitStack
from datetime import datetime
from types import FrameType

import click
from rich.live import Live

from fleetctl.cli.common import common_options, err, out, settings
from fleetctl.cli.keys import KeyReader, cbreak
from fleetctl.cli.tables import TopData, TopScreen, top_frame
from fleetctl.errors import FleetError, UnknownAgentError
from fleetctl.fleet import Fleet, HeartbeatRound
from fleetctl.inventory.config import load_config
from fleetctl.jobs.driver import Driver, controller_lock
from fleetctl.serve.controller import Controller
from fleetctl.serve.metrics import parse_address, serve_metrics
from fleetctl.settings import ControllerSettings, default_of
from fleetctl.telemetry.frames import csv_text, write_csv
from fleetctl.telemetry.snapshot import TelemetrySnapshot


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()

    def handler(signum: int, _frame: FrameType | None) -> None:
        stop.set()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handler)
    return stop


@click.command("serve")
@click.option("--no-jobs", is_flag=True, help="Only heartbeats: do not place, dispatch or collect jobs.")
@click.option("--metrics", "metrics_at", metavar="HOST:PORT",
              help="Serve Prometheus /metrics (dcgm-exporter names) on HOST:PORT; :PORT or PORT is 127.0.0.1. Off by default.")
@common_options
def serve_command(no_jobs: bool, metrics_at: str | None) -> None:
    """Run the controller: every agent's heartbeat on its interval, history, health, and the job
    queue. Stops cleanly on SIGINT/SIGTERM."""
    metrics_address = parse_address(metrics_at) if metrics_at is not None else None  # a typo fails before anything starts
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    logging.getLogger("paramiko").setLevel(logging.WARNING)  # one "Connected" line per reconnect is noise
    s = settings()
    fleet = Fleet(load_config(s.config_path), state_dir=s.state_path)
    # On the SQLite file one serve drives a state dir (the lock); on a shared store several serve
    # together, the leases in the store deciding who drives which agent.
    shared = fleet.hosts.store.shared
    lock = contextlib.nullcontext(True) if shared else controller_lock(fleet.hosts.state_dir, wait_s=30.0)
    with lock as mine:
        if not mine:
            raise FleetError(f"another fleetctl serve is driving {fleet.hosts.state_dir}",
                             hint="stop it first, or use another --state-dir")
        # The first tick settles the ``dispatching`` jobs of every agent this controller leases.
        controller = Controller(fleet, driver=None if no_jobs else Driver(fleet.hosts))
        metrics = None
        if metrics_address is not None:
            if not metrics_address.loopback:
                err.print(f"fleetctl serve: warning: /metrics on {metrics_address.host} is unauthenticated; "
                          "anyone who can reach it reads the fleet's state", markup=False)
            # A snapshot older than three intervals (a minute at least) is not the present: no GPU values from it.
            longest = max((controller.interval_of(a) for a in fleet.inventory), default=0.0)
            metrics = serve_metrics(metrics_address, fleet.hosts.state_dir, agents=fleet.inventory.names,
                                    max_age_s=max(60.0, 3 * longest), store_url=fleet.hosts.store_url)
            err.print(f"fleetctl serve: metrics on {metrics.url}", markup=False)
        stop = _stop_on_signals()
        where = f"store {fleet.hosts.store.label}, controller {controller.id}" if shared else f"state in {fleet.hosts.state_dir}"
        err.print(f"fleetctl serve: {len(fleet.inventory)} agents, {where}; Ctrl-C to stop", markup=False)
        try:
            controller.run_until(stop)
        finally:
            if metrics is not None:
                metrics.stop()
    err.print(f"fleetctl serve: stopped after {controller.beats} heartbeats", markup=False)


class _Rounds:
    """Heartbeats for ``top`` in a thread of their own, so that keys and the clock are served while
    a host is slow. Each host beats on its own (``Hosts.heartbeat_each``) and shows as soon as it
    answers: a black-holed host never holds the others' rows. ``latest`` is replaced whole."""

    def __init__(self, fleet: Fleet, names: list[str] | None, period: float, stop: threading.Event) -> None:
        self.fleet, self.names, self.period, self.stop = fleet, names, period, stop
        self.latest: TopData | None = None
        self.failure: BaseException | None = None
        self._snapshots: dict[str, TelemetrySnapshot] = {}
        self._changed = threading.Event()
        self.thread = threading.Thread(target=self._run, name="fleetctl-top", daemon=True)
        self._publisher = threading.Thread(target=self._publish, name="fleetctl-top-view", daemon=True)

    def _arrived(self, snapshot: TelemetrySnapshot) -> None:
        self._snapshots[snapshot.agent] = snapshot  # one dict write: safe from the pool's threads
        self._changed.set()

    def _run(self) -> None:
        self._publisher.start()
        try:
            self.fleet.heartbeat_each(self.names, self.period, self.stop, self._arrived)
        except BaseException as exc:  # raised again in the main thread, which reports it
            self.failure = exc
            self.stop.set()

    def _publish(self) -> None:
        # At most a few views a second, however many hosts answer: each reads health from the store.
        order = [a.name for a in self.fleet.inventory.select(self.names)]
        try:
            while not self.stop.is_set():
                if not self._changed.wait(0.25):
                    continue
                self._changed.clear()
                snapshots = [self._snapshots[name] for name in order if name in self._snapshots]
                self.latest = _view(self.fleet, HeartbeatRound(snapshots, 0.0))
                self.stop.wait(0.2)
        except BaseException as exc:
            self.failure = exc
            self.stop.set()


def _view(fleet: Fleet, round_: HeartbeatRound) -> TopData:
    health = fleet.health()
    return TopData(round_, dict(zip(health["agent"], health["health"], strict=True)),
                   frozenset(a for a, d in zip(health["agent"], health["draining"], strict=True) if d),
                   datetime.now())


def _take_round(fleet: Fleet, names: list[str] | None) -> TopData:
    return _view(fleet, fleet.heartbeat(names))


def _live_top(fleet: Fleet, names: list[str] | None, period: float, stop: threading.Event) -> None:
    """The full-screen view: redrawn on every key, every new round and every second (the clock)."""
    rounds = _Rounds(fleet, names, period, stop)
    screen = TopScreen()
    keys = KeyReader(sys.stdin.fileno()) if sys.stdin.isatty() else None
    try:
        with ExitStack() as stack:
            if keys is not None:
                stack.enter_context(cbreak(keys.fd))
            live = stack.enter_context(Live(screen, console=out, screen=True, auto_refresh=False,
                                            redirect_stdout=False, redirect_stderr=False))
            rounds.thread.start()
            drawn: tuple[object, ...] = ()
            while not stop.is_set():
                screen.data, screen.now = rounds.latest, datetime.now()
                # Drawn again only when something shows a change: a slow link is not flooded.
                if drawn != (state := (id(screen.data), screen.now.second, screen.offset, out.size)):
                    live.refresh()
                    drawn = state
                # Wake at the next second for the clock, and often enough to see a Ctrl-C (whose
                # handler only sets `stop`, and select() goes on waiting after a signal).
                wait = min(0.25, 1.0 - time.time() % 1.0)
                pressed = keys.read(wait) if keys is not None else None
                if pressed is None:
                    stop.wait(wait)
                    continue
                for key in pressed:
                    if key in QUIT_KEYS:
                        stop.set()
                    screen.scroll(key)
    finally:
        stop.set()
        # In-flight commands fail at once, so the round thread ends before the fleet closes under it.
        fleet.hosts.close_connections()
        if rounds.thread.is_alive():
            rounds.thread.join(timeout=10)
    if rounds.failure is not None:
        raise rounds.failure


QUIT_KEYS = ("q", "Q", "esc", "\x03", "\x04")  # Ctrl-C and Ctrl-D too, should a terminal pass them as keys


@click.command("top")
@click.option("--agent", "agents", multiple=True, metavar="NAME", help="Only these agents; repeatable.")
@click.option("--interval", type=click.FloatRange(0.2, 3600), default=None,
              help=f"Seconds between refreshes [default: [controller] heartbeat_interval_s, {default_of(ControllerSettings, 'heartbeat_interval_s'):g}].")
@click.option("--once", is_flag=True, help="One round, print, exit (for scripts and logs).")
@common_options
def top_command(agents: tuple[str, ...], interval: float | None, once: bool) -> None:
    """A live view of the fleet: one line per GPU with memory, utilization, temperature, power; failed
    and offline hosts first. Keys: q or Esc quits, j/k or arrows scroll, space/b or PgDn/PgUp page."""
    s = settings()
    stop = _stop_on_signals()
    with Fleet(load_config(s.config_path), state_dir=s.state_path) as fleet:
        period = interval or fleet.settings.heartbeat_interval_s
        names = list(agents) or None
        if once or not out.is_terminal:
            # Not a terminal (a pipe, a log): print one frame per round instead of redrawing.
            while True:
                out.print(top_frame(_take_round(fleet, names), datetime.now()))
                if once or stop.wait(period):
                    return
        _live_top(fleet, names, period, stop)


@click.group("telemetry")
def telemetry_group() -> None:
    """Recorded heartbeat history."""


@telemetry_group.command("export")
@click.option("--csv", "csv_path", required=True, type=click.Path(dir_okay=False, allow_dash=True), metavar="FILE",
              help="Write rows to FILE ('-' for stdout); replaced atomically.")
@click.option("--since", metavar="WHEN", help="1h, 30m, 2d, or an ISO time such as 2026-11-01T00:00 (UTC).")
@click.option("--agent", "agents", multiple=True, metavar="NAME", help="Only these agents; repeatable.")
@common_options
def export_command(csv_path: str, since: str | None, agents: tuple[str, ...]) -> None:
    """Export history in the heartbeat CSV schema (one row per GPU per heartbeat)."""
    s = settings()
    with Fleet(load_config(s.config_path, missing_ok=True), state_dir=s.state_path) as fleet:
        known = set(fleet.inventory.names()) | set(fleet.hosts.store_agents())
        for name in agents:
            if name not in known:
                raise UnknownAgentError(f"no agent named {name!r} in {fleet.inventory.path} or in history",
                                        hint="see `fleetctl agents list`")
        frame = fleet.history(since, list(agents) or None)
    if csv_path == "-":
        sys.stdout.write(csv_text(frame))
        return
    write_csv(csv_path, frame)
    out.print(f"exported {len(frame)} rows to {csv_path}")
