"""``fleetctl heartbeat``, ``sandbox`` and ``demo``."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import click

from fleetctl._text import visible
from fleetctl.cli.common import common_options, option_range, out, print_json, settings
from fleetctl.cli.progress import host_progress
from fleetctl.cli.tables import fleet_table
from fleetctl.fleet import Fleet
from fleetctl.hosts.core import DEFAULT_MAX_PARALLEL_SSH
from fleetctl.hosts.registration import register_ssh
from fleetctl.inventory.config import load_config
from fleetctl.sandbox import Sandbox, default_hosts, sandbox_dir
from fleetctl.sandbox.postgres import PostgresCluster, set_inventory_store
from fleetctl.sandbox.sandbox import STATE_FILE
from fleetctl.settings import ControllerSettings
from fleetctl.telemetry.frames import append_csv, csv_target

EXIT_SOME_FAILED = 3
SANDBOX_HOSTS = 3  # `sandbox up` and `demo`: one host of each kind (NVIDIA, AMD, behind the bastion)
# What the demo job does: read its inputs from job.json, write a JSON result.
DEMO_JOB = ('python3 -c \'import json, os; job = json.load(open(os.environ["FLEETCTL_JOB_FILE"])); '
            'json.dump({"greeting": job["payload"]["greeting"], "visible": os.environ.get("CUDA_VISIBLE_DEVICES") '
            'or os.environ.get("HIP_VISIBLE_DEVICES")}, open(os.environ["FLEETCTL_OUTPUT_FILE"], "w"))\'')


@click.command("heartbeat")
@click.option("--agent", "agents", multiple=True, metavar="NAME", help="Only these agents; repeatable.")
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False), metavar="FILE",
              help="Append one row per GPU to FILE (header only when the file is new or empty).")
@click.option("--json", "as_json", is_flag=True, help="Print the snapshots as JSON.")
@click.option("--max-parallel-ssh", type=option_range(ControllerSettings, "max_parallel_ssh"), default=None,
              help=f"Hosts contacted at once [default: {DEFAULT_MAX_PARALLEL_SSH}, or [controller] max_parallel_ssh].")
@common_options
def heartbeat_command(agents: tuple[str, ...], csv_path: str | None, as_json: bool, max_parallel_ssh: int | None) -> None:
    """One heartbeat round now, recorded in history. Exit 0 if every host answered, 3 if some
    failed (their rows say why), 1 on fleetctl's own errors."""
    s = settings()
    if csv_path:
        csv_target(csv_path)  # a missing directory fails now, before the round, not after it
    with Fleet(load_config(s.config_path), state_dir=s.state_path, max_parallel_ssh=max_parallel_ssh) as fleet:
        chosen = list(agents) or None
        with host_progress("heartbeat", len(fleet.inventory.select(chosen))) as progress:
            result = fleet.heartbeat(chosen, on_done=lambda snap: progress.done(snap.agent))
    if csv_path:
        append_csv(csv_path, result.to_dataframe())
    if as_json:
        print_json([snap.model_dump(mode="json") for snap in result])
    else:
        out.print(fleet_table(result))
    if result.failed:
        raise click.exceptions.Exit(EXIT_SOME_FAILED)


@click.group("sandbox")
def sandbox_group() -> None:
    """A local fleet of real sshd processes posing as GPU hosts (for trying fleetctl and for tests)."""


def _sandbox_path(directory: str | None) -> Path:
    return Path(directory) if directory else sandbox_dir(settings().state_path)


@sandbox_group.command("up")
@click.option("--hosts", type=click.IntRange(1, 200), default=SANDBOX_HOSTS, show_default=True, help="GPU hosts to start.")
@click.option("--dir", "directory", type=click.Path(file_okay=False), help="Where keys, logs and the inventory go.")
@click.option("--postgres", is_flag=True, help="Also start a private PostgreSQL and make it the inventory's store.")
@common_options
def sandbox_up(hosts: int, directory: str | None, postgres: bool) -> None:
    """Start N sshd hosts (plus a bastion) on loopback and write an inventory for them."""
    sandbox = Sandbox(_sandbox_path(directory), default_hosts(hosts)).up()
    if postgres:
        try:
            cluster = PostgresCluster(sandbox.directory).start()
            set_inventory_store(sandbox.inventory_path, cluster.url)
        except BaseException:
            sandbox.down()  # all or nothing: no sshd left running without the store it was asked with
            raise
        out.print(visible(f"PostgreSQL store up: {cluster.url} (written to the inventory's [controller] store)"))
    isolation = "hosts behind the bastion live in a network namespace" if sandbox.use_netns else \
        "no network namespaces (needs root): bastion hosts are also reachable directly"
    out.print(visible(f"sandbox up in {sandbox.directory}: {len(sandbox.pids)} sshd processes; {isolation}"))
    out.print(visible(f"try: fleetctl --config {sandbox.inventory_path} heartbeat"))


@sandbox_group.command("down")
@click.option("--dir", "directory", type=click.Path(file_okay=False), help="The sandbox to stop.")
@common_options
def sandbox_down(directory: str | None) -> None:
    """Stop every sandbox sshd by PID and remove its network namespaces. Nothing running is fine."""
    path = _sandbox_path(directory)
    cluster = PostgresCluster.load(path)
    if cluster is not None:
        cluster.stop()
        out.print("sandbox down: stopped its PostgreSQL")
    if not (path / STATE_FILE).exists():  # already down (or never up): a no-op, as `rm -f` is
        out.print(visible(f"sandbox down: no sandbox runs in {path}; nothing to stop"))
        return
    sandbox = Sandbox.load(path)
    count = len(sandbox.pids)
    started = time.monotonic()
    sandbox.down()
    out.print(f"sandbox down: stopped {count} sshd processes in {time.monotonic() - started:.1f}s")


@click.command("demo")
@click.option("--hosts", type=click.IntRange(1, 50), default=SANDBOX_HOSTS, show_default=True)
def demo_command(hosts: int) -> None:
    """Try fleetctl with nothing to set up: start a sandbox fleet of simulated GPU hosts, register
    them with register-ssh, run a heartbeat round, run a 2-GPU job on the fleet (it reads a payload
    from $FLEETCTL_JOB_FILE and writes a JSON result, which is pulled back and printed), tear down."""
    with tempfile.TemporaryDirectory(prefix="fleetctl-demo-") as scratch:
        root = Path(scratch)
        sandbox = Sandbox(root / "sandbox", default_hosts(hosts))
        sandbox.up()
        try:
            config, state = root / "ssh-agents.toml", root / "state"
            out.print(f"sandbox: {len(sandbox.hosts)} GPU hosts and {len(sandbox.bastions())} bastion(s) "
                      f"({'network namespaces' if sandbox.use_netns else 'loopback only'})")
            for agent in sandbox.agents():
                bastions = [b.address for b in agent.bastions()]
                registration = register_ssh(agent.address, str(sandbox.client_key), name=agent.name,
                                            bastions=bastions, labels=agent.labels, config=config, state=state)
                via = " via " + " -> ".join(bastions) if bastions else ""
                out.print(f"registered {agent.name} ({agent.address}{via}): {', '.join(registration.tools)}")
            with Fleet(load_config(config), state_dir=state) as fleet:
                fleet.heartbeat()  # first round opens the connections
                result = fleet.heartbeat()
                out.print(fleet_table(result))
                out.print(f"steady-state round over {len(result)} hosts: {result.duration_s * 1000:.0f} ms")
                job = fleet.submit(["sh", "-c", DEMO_JOB], gpus=2, payload={"greeting": "hello"})
                out.print(f"submitted job {job.id}: 2 GPUs, runs detached on the host, result pulled back")
                record = job.wait(timeout=60)
                output = record.result.output if record.result else None
                out.print(f"job {record.id} {record.state} on {record.agent} (GPUs {','.join(record.gpus)}): "
                          f"output {output}", markup=False)
        finally:
            sandbox.down()
            out.print("sandbox stopped")
