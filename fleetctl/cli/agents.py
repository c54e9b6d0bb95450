"""``fleetctl register-ssh`` and ``fleetctl agents ...``: the inventory from the terminal."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

import click

from fleetctl._durations import utc
from fleetctl._text import one_line, visible
from fleetctl.cli.common import common_options, err, out, parse_labels, print_json, settings
from fleetctl.cli.progress import host_progress, host_status
from fleetctl.cli.tables import Column, list_table
from fleetctl.errors import FleetError
from fleetctl.fleet import Fleet
from fleetctl.hosts.registration import register_ssh
from fleetctl.inventory.config import Agent, edit_inventory, load_config
from fleetctl.inventory.routes import HopView
from fleetctl.settings import default_of
from fleetctl.ssh.addresses import read_worker_file
from fleetctl.telemetry.health import Health
from fleetctl.telemetry.history import AgentStatus, agent_statuses
from fleetctl.telemetry.quarantine import clear as clear_quarantine


def _via(agent: Agent) -> str:
    return " -> ".join(b.address for b in agent.bastions()) or "direct"


def _tool(agent: Agent) -> str:
    return agent.gpu_query_cmd.split()[0] if agent.gpu_query_cmd else "auto"


def labels_text(labels: dict[str, str]) -> str:
    """``k=v, k=v``: labels as they are typed, not as a Python dict."""
    return ", ".join(f"{key}={value}" for key, value in labels.items())


@click.command("register-ssh")
@click.option("--host", required=True, metavar="USER@HOST[:PORT]", help="The GPU host; IPv6 as [addr]:port.")
@click.option("--key", type=click.Path(dir_okay=False), help="Private key for the host (default: ssh-agent, ~/.ssh/id_*).")
@click.option("--name", help="Agent name (default: derived from the host).")
@click.option("--bastion", "bastions", multiple=True, metavar="USER@HOST[:PORT]",
              help="Jump host; repeat for a chain, the first nearest this machine.")
@click.option("--bastion-key", type=click.Path(dir_okay=False), help="Key for the bastions (default: --key).")
@click.option("--label", "labels", multiple=True, metavar="KEY=VALUE", help="Label for placement; repeatable.")
@click.option("--gpu-query-cmd", help="GPU query to run (default: detected nvidia-smi / rocm-smi / amd-smi).")
@click.option("--connect-timeout", type=float, help=f"Seconds to wait for each hop (default {default_of(Agent, 'connect_timeout_s'):g}).")
@click.option("--no-connect", is_flag=True, help="Write the entry without logging in (no pins, no detection).")
@click.option("--insecure-accept-any-host-key", is_flag=True, help="Skip host-key checks. Dangerous; testing only.")
@click.option("--json", "as_json", is_flag=True, help="Print the saved entry as JSON.")
@common_options
def register_ssh_command(host: str, key: str | None, name: str | None, bastions: tuple[str, ...],
                         bastion_key: str | None, labels: tuple[str, ...], gpu_query_cmd: str | None,
                         connect_timeout: float | None, no_connect: bool, insecure_accept_any_host_key: bool,
                         as_json: bool) -> None:
    """Log in to a host once, pin its host key, detect its GPU tool, and add it to the inventory.

    \b
    Example:
      fleetctl register-ssh --host root@10.0.0.5 --key ~/.ssh/id_ed25519 \\
          --bastion root@bastion.example.com --label gpu_type=a100
    """
    s = settings()
    via = f" via {len(bastions)} bastion{'s' if len(bastions) > 1 else ''}" if bastions else ""
    with host_status(visible(f"registering {host}{via}")) if not no_connect else contextlib.nullcontext():
        result = register_ssh(host, key, name=name, bastions=list(bastions), bastion_key=bastion_key,
                              labels=parse_labels(labels), gpu_query_cmd=gpu_query_cmd, connect_now=not no_connect,
                              config=s.config_path, state=s.state_path,
                              accept_any_host_key=insecure_accept_any_host_key, connect_timeout_s=connect_timeout)
    if as_json:
        print_json(result.agent.model_dump(exclude_none=True))
        return
    verb = "updated" if result.replaced else "added"
    if not result.connected:
        out.print(visible(f"{verb} {result.agent.name} ({result.agent.address}) without connecting; "
                          f"host keys will be recorded on first contact"))
        return
    tool = ", ".join(result.tools) or "no GPU tool found"
    out.print(visible(f"{verb} {result.agent.name}: {result.agent.address} via {_via(result.agent)}; "
                      f"host key {result.agent.host_key_fingerprint}; {tool}"))


@click.group("agents")
def agents_group() -> None:
    """List, show, import and remove inventory entries."""


def _age(epoch: float | None) -> str:
    """``12s``, ``5m``, ``3h``, ``2d``: how long ago, for a table cell."""
    if epoch is None:
        return ""
    seconds = max(0.0, time.time() - epoch)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def _statuses(fleet: Fleet) -> dict[str, AgentStatus]:
    """What the store knows of each agent; a store that cannot be read costs only these columns."""
    try:
        return agent_statuses(fleet.hosts.store)
    except FleetError as exc:
        err.print(visible(f"fleetctl: note: health not shown: {one_line(exc)}"))
        return {}


def _route_summary(fleet: Fleet, agent: Agent) -> str:
    try:
        return fleet.hosts.route(agent.name).describe()
    except FleetError as exc:
        return f"cannot resolve: {one_line(exc.message, limit=120)}"


def _status_json(status: AgentStatus | None) -> dict[str, Any]:
    health = status.health if status else Health()
    snapshot = status.snapshot if status else None
    report = snapshot.gpu_health if snapshot is not None and snapshot.ok else None
    return {"health": health.state, "health_since": utc(health.since), "misses": health.misses,
            "last_heartbeat": utc(health.last_seen), "last_ok": utc(health.last_ok),
            "draining": bool(status and status.draining),
            "status": snapshot.status if snapshot else None,
            "gpu_health": [{"index": g.index, "state": g.state, "reasons": g.reasons, "quarantined": utc(g.quarantined),
                            "quarantine_reason": g.quarantine_reason} for g in report.gpus] if report else None,
            "gpu_host": report.host_reasons if report else None,  # a hung tool, a GPU missing by the count...
            "kernel_log": report.journal_problem if report and report.journal_problem else ("readable" if report else None)}


def gpu_health_summary(status: AgentStatus | None) -> str:
    """``4 ok``, ``1 failed, 3 ok``; ``unknown`` when the last beat could not tell (never shown as healthy)."""
    snapshot = status.snapshot if status else None
    if snapshot is None or not snapshot.ok or snapshot.gpu_health is None or not snapshot.gpu_health.gpus:
        return "unknown" if snapshot is not None and snapshot.gpus else ""
    counts: dict[str, int] = {}
    for gpu in snapshot.gpu_health.gpus:
        counts[gpu.state] = counts.get(gpu.state, 0) + 1
    return ", ".join(f"{counts[s]} {s}" for s in ("failed", "unknown", "degraded", "ok") if s in counts)


@agents_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@common_options
def list_agents(as_json: bool) -> None:
    """Every agent in the inventory: route, health (since when), drain state, last heartbeat."""
    s = settings()
    with Fleet(load_config(s.config_path), state_dir=s.state_path) as fleet:
        statuses = _statuses(fleet)
        agents = list(fleet.inventory)
        routes = fleet.hosts.map_agents(lambda a: _route_summary(fleet, a), agents)  # ssh -G runs in parallel
        inventory_path = fleet.inventory.path
    if as_json:
        print_json([{**a.model_dump(exclude_none=True), "route": route, **_status_json(statuses.get(a.name))}
                    for a, route in zip(agents, routes, strict=True)])
        return
    rows = []
    for agent, route in zip(agents, routes, strict=True):
        status = statuses.get(agent.name)
        health = status.health if status else Health()
        since = f" {_age(health.since)}" if health.since else ""
        rows.append((agent.name, route, health.state + since,
                     f"{_age(health.last_seen)} ago" if health.last_seen else "never",
                     "draining" if status and status.draining else "", gpu_health_summary(status), _tool(agent),
                     labels_text(agent.labels), "yes" if agent.host_key_fingerprint else "no"))
    columns = [Column("NAME", flex=2, min_width=8), Column("ROUTE", priority=60, flex=1, min_width=16), Column("HEALTH"),
               Column("LAST BEAT", priority=50), Column("DRAIN", hide_empty=True),
               Column("GPUS", priority=55, hide_empty=True), Column("GPU TOOL", priority=20),
               Column("LABELS", priority=30, flex=3, min_width=8), Column("PINNED", priority=10)]
    out.print(list_table(columns, rows))
    if not agents:
        err.print(visible(f"no agents in {inventory_path}; add one with `fleetctl register-ssh`"))


@agents_group.command("show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@common_options
def show_agent(name: str, as_json: bool) -> None:
    """One agent: its entry, health, and its resolved route, each hop with where every value came
    from (the inventory, an ssh_config FILE:LINE, or OpenSSH's default)."""
    s = settings()
    with Fleet(load_config(s.config_path), state_dir=s.state_path) as fleet:
        agent = fleet.inventory.get(name)
        status = _statuses(fleet).get(name)
        try:
            route: list[HopView] | str = fleet.hosts.describe_route(name)
        except FleetError as exc:
            route = one_line(exc)
    data: dict[str, Any] = agent.model_dump(exclude_none=True)
    if as_json:
        print_json({**data, **_status_json(status), "route": route if isinstance(route, str) else [h.to_dict() for h in route]})
        return
    for key, value in data.items():
        if key != "bastion":
            out.print(f"{key}: {one_line(labels_text(value) if isinstance(value, dict) else value, limit=2000)}")
    health = _status_json(status)
    since = f" for {_age(status.health.since)}" if status and status.health.since else ""
    last = f"{_age(status.health.last_seen)} ago" if status and status.health.last_seen else "never"
    out.print(visible(f"health: {health['health']}{since}; last heartbeat {last}"
                      f"{'; draining' if health['draining'] else ''}"))
    _print_gpu_health(status)
    if isinstance(route, str):
        out.print(visible(f"route: cannot resolve: {route}"))
        return
    for index, hop in enumerate(route, start=1):
        _print_hop(index, hop)


def _print_gpu_health(status: AgentStatus | None) -> None:
    summary = gpu_health_summary(status)
    if not summary:
        return
    out.print(visible(f"gpu health: {summary}"))
    snapshot = status.snapshot if status else None
    report = snapshot.gpu_health if snapshot is not None and snapshot.ok else None
    for gpu in report.gpus if report else []:
        if gpu.state == "ok" and gpu.quarantined is None:
            continue
        held = f" (quarantined {_age(gpu.quarantined)} ago; `fleetctl agents clear-gpu` returns it)" if gpu.quarantined else ""
        out.print(visible(f"  GPU {gpu.index} {gpu.state}{held}: {'; '.join(r.split(': ', 1)[-1] for r in gpu.reasons) or '-'}"))
    for reason in report.host_reasons if report else []:
        if not (report and report.journal_problem and "kernel log" in reason):  # said on its own line below
            out.print(visible(f"  {one_line(reason, limit=300)}"))
    if report and report.journal_problem:
        out.print(visible(f"  kernel log: {one_line(report.journal_problem, limit=300)}"))


@agents_group.command("clear-gpu")
@click.argument("name")
@click.argument("index", type=click.IntRange(0, 1023))
@common_options
def clear_gpu(name: str, index: int) -> None:
    """Return a quarantined GPU to service (recorded as a GPU event). A GPU still failing is
    quarantined again by the next heartbeat."""
    s = settings()
    with Fleet(load_config(s.config_path), state_dir=s.state_path) as fleet:
        fleet.inventory.get(name)
        with fleet.hosts.store.transaction() as db:
            was = clear_quarantine(db, name, index)
    if was is None:
        err.print(visible(f"fleetctl: {name} GPU {index} is not quarantined"))
        raise click.exceptions.Exit(1)
    out.print(visible(f"{name} GPU {index} returned to service (was quarantined: {was})"))


def _print_hop(index: int, hop: HopView) -> None:
    def src(field: str) -> str:
        return f" [{hop.source(field)}]"
    out.print(visible(f"hop {index} ({hop.role}): {hop.user}@{hop.host}:{hop.port}  (resolved by {hop.resolver})"))
    out.print(visible(f"  host {hop.host}{src('hostname')}; user {hop.user}{src('user')}; port {hop.port}{src('port')}"))
    only = "; IdentitiesOnly" if hop.identities_only else ""
    out.print(visible(f"  keys {', '.join(hop.identities) or '(agent only)'}{src('identity_files')}{only}"))
    if hop.certificates:
        out.print(visible(f"  certificates {', '.join(hop.certificates)}{src('certificate_files')}"))
    if hop.proxy_command:
        out.print(visible(f"  proxy command {hop.proxy_command}{src('proxy_command')}"))
    out.print(visible(f"  host key: {hop.host_key}"))


@agents_group.command("remove")
@click.argument("name")
@common_options
def remove_agent(name: str) -> None:
    """Delete an agent from the inventory (other entries are kept as they are)."""
    with edit_inventory(settings().config_path) as inventory:
        removed = inventory.remove(name)
    out.print(visible(f"removed {removed.name} ({removed.address})"))


@agents_group.command("import")
@click.argument("worker_file", type=click.Path(dir_okay=False, exists=True))
@click.option("--key", type=click.Path(dir_okay=False), required=True, help="Private key for every host.")
@click.option("--bastion", "bastions", multiple=True, metavar="USER@HOST[:PORT]", help="Jump host(s) for all.")
@click.option("--label", "labels", multiple=True, metavar="KEY=VALUE", help="Label for every host.")
@click.option("--no-connect", is_flag=True, help="Write entries without logging in.")
@common_options
def import_agents(worker_file: str, key: str, bastions: tuple[str, ...], labels: tuple[str, ...],
                  no_connect: bool) -> None:
    """Register every host of a worker file: one ``[user@]host[:port]`` per line, ``#`` comments.

    Hosts that fail are reported and skipped; the others are still registered (exit 1 if any failed).
    """
    s = settings()
    workers = read_worker_file(Path(worker_file))
    failed = 0
    with host_progress("import", len(workers) if not no_connect else 0) as progress:
        for worker in workers:
            progress.working(visible(str(worker.address)))
            try:
                result = register_ssh(str(worker.address), key, bastions=list(bastions), labels=parse_labels(labels),
                                      connect_now=not no_connect, config=s.config_path, state=s.state_path)
                progress.print(visible(f"{'updated' if result.replaced else 'added'} {result.agent.name} ({result.agent.address})"))
            except FleetError as exc:
                failed += 1
                progress.print(f"{visible(worker_file)}:{worker.line_number}: {visible(worker.address)}: {one_line(exc, limit=2000)}",
                               error=True)
            progress.done()
    if failed:
        raise click.exceptions.Exit(1)
