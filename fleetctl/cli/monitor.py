"""``fleetctl serve``, ``top`` and ``telemetry export``."""

from __future__ import annotations

import logging
import signal
import sys
import threading
from types import FrameType

import click
from rich.live import Live

from fleetctl.cli.common import common_options, err, out, settings
from fleetctl.cli.tables import top_table
from fleetctl.config import load_config
from fleetctl.controller import Controller
from fleetctl.errors import FleetError, UnknownAgentError
from fleetctl.fleet import Fleet
from fleetctl.frames import write_csv
from fleetctl.jobs.api import controller_lock
from fleetctl.jobs.runner import JobRunner


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()

    def handler(signum: int, _frame: FrameType | None) -> None:
        stop.set()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handler)
    return stop


@click.command("serve")
@click.option("--no-jobs", is_flag=True, help="Only heartbeats: do not place, dispatch or collect jobs.")
@common_options
def serve_command(no_jobs: bool) -> None:
    """Run the controller: every agent's heartbeat on its interval, history, health, and the job
    queue. Stops cleanly on SIGINT/SIGTERM."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    logging.getLogger("paramiko").setLevel(logging.WARNING)  # one "Connected" line per reconnect is noise
    s = settings()
    fleet = Fleet(load_config(s.config_path), state_dir=s.state_path)
    with controller_lock(fleet.state_dir, wait_s=30.0) as mine:
        if not mine:
            raise FleetError(f"another fleetctl serve is driving {fleet.state_dir}",
                             hint="stop it first, or use another --state-dir")
        tick = None
        if not no_jobs:
            runner = JobRunner(fleet)
            runner.reconcile()
            tick = runner.tick
        controller = Controller(fleet, tick=tick)
        stop = _stop_on_signals()
        err.print(f"fleetctl serve: {len(fleet.inventory)} agents, state in {fleet.state_dir}; Ctrl-C to stop", markup=False)
        controller.run_until(stop)
    err.print(f"fleetctl serve: stopped after {controller.beats} heartbeats", markup=False)


@click.command("top")
@click.option("--agent", "agents", multiple=True, metavar="NAME", help="Only these agents; repeatable.")
@click.option("--interval", type=click.FloatRange(0.2, 3600), default=None,
              help="Seconds between refreshes [default: [controller] heartbeat_interval_s, 5].")
@click.option("--once", is_flag=True, help="One round, print, exit (for scripts and logs).")
@common_options
def top_command(agents: tuple[str, ...], interval: float | None, once: bool) -> None:
    """A live view of the fleet: one line per GPU with memory bar, utilization, temperature, power."""
    s = settings()
    stop = _stop_on_signals()
    with Fleet(load_config(s.config_path), state_dir=s.state_path) as fleet:
        period = interval or fleet.settings.heartbeat_interval_s
        names = list(agents) or None
        if once or not out.is_terminal:
            # Not a terminal (a pipe, a log): print one frame per round instead of redrawing.
            while True:
                out.print(top_table(fleet.heartbeat(names), fleet.health()))
                if once or stop.wait(period):
                    return
        with Live(top_table(fleet.heartbeat(names), fleet.health()), console=out, auto_refresh=False,
                  screen=False) as live:
            while not stop.wait(period):
                live.update(top_table(fleet.heartbeat(names), fleet.health()), refresh=True)


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
        known = set(fleet.inventory.names()) | set(fleet.store_agents())
        for name in agents:
            if name not in known:
                raise UnknownAgentError(f"no agent named {name!r} in {fleet.inventory.path} or in history",
                                        hint="see `fleetctl agents list`")
        frame = fleet.history(since, list(agents) or None)
    if csv_path == "-":
        frame.to_csv(sys.stdout, index=False)
        return
    write_csv(csv_path, frame)
    out.print(f"exported {len(frame)} rows to {csv_path}")
