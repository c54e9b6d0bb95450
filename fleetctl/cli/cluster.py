"""``fleetctl controllers``: the serve processes sharing this store, and the agents each holds."""

from __future__ import annotations

from typing import Any

import click

from fleetctl.cli.common import common_options, iso_utc, out, print_json, settings
from fleetctl.cli.tables import Column, list_table
from fleetctl.fleet import Fleet
from fleetctl.inventory.config import load_config
from fleetctl.store.leases import ControllerRow, controller_rows, lease_rows


def _state(row: ControllerRow) -> str:
    if row.live:
        return "live"
    return "stopped" if row.stopped is not None else "lost"


def _seconds(value: float) -> str:
    return f"{value:.0f}s" if abs(value) < 120 else f"{value / 60:.0f} min"


RECENT_S = 3600.0  # stopped or lost controllers shown without --all


@click.command("controllers")
@click.option("--all", "show_all", is_flag=True, help="Also controllers gone for more than an hour.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@common_options
def controllers_command(show_all: bool, as_json: bool) -> None:
    """Controllers (serve processes) sharing this store: live, stopped or lost (gone within the hour),
    the agents each leases now and when its lease ends unless renewed."""
    s = settings()
    with Fleet(load_config(s.config_path, missing_ok=True), state_dir=s.state_path) as fleet:
        store = fleet.hosts.store
        now = store.now()
        rows = [r for r in controller_rows(store) if show_all or r.live or now - r.expires < RECENT_S]
        unheld = [agent for agent, holder, _token, expires in lease_rows(store) if holder is None or expires <= now]
    if as_json:
        data: list[dict[str, Any]] = [{
            "id": r.id, "host": r.host, "pid": r.pid, "state": _state(r), "started": iso_utc(r.started),
            "seen": iso_utc(r.seen), "lease_expires": iso_utc(r.expires),
            "stopped": iso_utc(r.stopped) if r.stopped is not None else None, "agents": list(r.agents)} for r in rows]
        print_json({"controllers": data, "unheld_agents": unheld})
        return
    columns = [Column("ID"), Column("HOST", priority=40, flex=2, min_width=6), Column("PID", priority=30),
               Column("STATE"), Column("AGENTS"), Column("SEEN", priority=50), Column("LEASE ENDS", priority=60),
               Column("HOLDS", priority=20, flex=4, min_width=10)]
    out.print(list_table(columns, [
        (r.id, r.host, r.pid, _state(r), len(r.agents), f"{_seconds(now - r.seen)} ago",
         f"in {_seconds(r.expires - now)}" if r.live else "-", ", ".join(r.agents)) for r in rows]))
    if unheld:
        out.print(f"{len(unheld)} agents held by no live controller: {', '.join(unheld[:10])}"
                  + (" ..." if len(unheld) > 10 else ""), markup=False)
