"""``fleetctl register-ssh`` and ``fleetctl agents ...``: the inventory from the terminal."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from rich.table import Table

from fleetctl.addresses import read_worker_file
from fleetctl.cli.common import common_options, err, out, parse_labels, print_json, settings
from fleetctl.cli.tables import cell
from fleetctl.config import Agent, edit_inventory, load_config
from fleetctl.errors import FleetError
from fleetctl.registration import register_ssh
from fleetctl.text import one_line, visible


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
@click.option("--connect-timeout", type=float, help="Seconds to wait for each hop (default 10).")
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


@agents_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@common_options
def list_agents(as_json: bool) -> None:
    """Every agent in the inventory."""
    inventory = load_config(settings().config_path)
    if as_json:
        print_json([a.model_dump(exclude_none=True) for a in inventory])
        return
    table = Table("NAME", "ADDRESS", "VIA", "GPU TOOL", "LABELS", "PINNED", box=None, pad_edge=False)
    for agent in inventory:
        table.add_row(*(cell(value) for value in (agent.name, agent.address, _via(agent), _tool(agent),
                                                   labels_text(agent.labels),
                                                   "yes" if agent.host_key_fingerprint else "no")))
    out.print(table)
    if not len(inventory):
        err.print(visible(f"no agents in {inventory.path}; add one with `fleetctl register-ssh`"))


@agents_group.command("show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@common_options
def show_agent(name: str, as_json: bool) -> None:
    """One agent's full entry."""
    agent = load_config(settings().config_path).get(name)
    data: dict[str, Any] = agent.model_dump(exclude_none=True)
    if as_json:
        print_json(data)
        return
    for key, value in data.items():
        if key != "bastion":
            out.print(f"{key}: {one_line(labels_text(value) if isinstance(value, dict) else value, limit=2000)}")
    for depth, bastion in enumerate(agent.bastions(), start=1):
        pin = bastion.host_key_fingerprint or "not pinned"
        out.print(visible(f"bastion {depth}: {bastion.address} ({pin})"))


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
    for worker in workers:
        try:
            result = register_ssh(str(worker.address), key, bastions=list(bastions), labels=parse_labels(labels),
                                  connect_now=not no_connect, config=s.config_path, state=s.state_path)
            out.print(visible(f"{'updated' if result.replaced else 'added'} {result.agent.name} ({result.agent.address})"))
        except FleetError as exc:
            failed += 1
            err.print(f"{visible(worker_file)}:{worker.line_number}: {visible(worker.address)}: {one_line(exc, limit=2000)}")
    if failed:
        raise click.exceptions.Exit(1)
