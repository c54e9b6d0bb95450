"""``fleetctl run``: one command on many hosts, per-host blocks or JSON."""

from __future__ import annotations

import click

from fleetctl._durations import seconds_of
from fleetctl._text import one_line, visible
from fleetctl.cli.common import common_options, err, parse_labels, print_json, settings
from fleetctl.errors import ConfigError
from fleetctl.fleet import Fleet
from fleetctl.hosts.fanout import DEFAULT_TIMEOUT_S, MAX_STDOUT, FanoutResult, HostResult, select
from fleetctl.inventory.config import load_config

EXIT_SOME_FAILED = 3


def _timeout(_ctx: click.Context, _param: click.Parameter, value: str) -> float:
    seconds = seconds_of(value)
    if not seconds:
        raise click.BadParameter(f"{value!r} is not a positive duration such as 30s, 5m or 1h")
    return seconds


# Options end at the first word of COMMAND (`fleetctl run nvidia-smi -L` works); `--` makes it explicit.
@click.command("run", context_settings={"allow_interspersed_args": False})
@click.option("--agent", "agents", multiple=True, metavar="NAME", help="Only these agents; repeatable.")
@click.option("--label", "labels", multiple=True, metavar="KEY=GLOB", help="Agent label to match (gpu_type=a100*); repeatable.")
@click.option("--timeout", default=f"{DEFAULT_TIMEOUT_S:g}s", show_default=True, callback=_timeout, metavar="DURATION",
              help="Per host, after connecting.")
@click.option("--max-output", type=click.IntRange(1), default=MAX_STDOUT, show_default=True, metavar="BYTES",
              help="Per host and stream; past it reading stops and the host is reported truncated.")
@click.option("--json", "as_json", is_flag=True, help="Print every host's outcome as JSON.")
@common_options
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def run_command(agents: tuple[str, ...], labels: tuple[str, ...], timeout: float, max_output: int, as_json: bool,
                command: tuple[str, ...]) -> None:
    """Run COMMAND on every chosen host at once (put it after --). Each word reaches the host
    exactly as given (shell-quoted); for pipes or globs run `sh -c '...'`. Exit 0 if it exited 0
    everywhere, 3 otherwise, 1 on fleetctl's own errors."""
    s = settings()
    patterns = parse_labels(labels)
    with Fleet(load_config(s.config_path), state_dir=s.state_path) as fleet:
        if not select(fleet.hosts, list(agents) or None, patterns):
            wanted = ", ".join(f"{k}={v}" for k, v in patterns.items())
            what = f"no agent has labels matching {wanted}" if wanted else f"no agents in {fleet.inventory.path}"
            raise ConfigError(what, hint="see `fleetctl agents list`")
        result = fleet.run(list(command), agents=list(agents) or None, labels=patterns, timeout=timeout,
                           max_stdout=max_output, max_stderr=max_output)
    if as_json:
        print_json([r.to_dict() for r in result.values()])
    else:
        _print_blocks(result)
    if result.failed:
        raise click.exceptions.Exit(EXIT_SOME_FAILED)


def _header(r: HostResult) -> str:
    if r.exit_code is not None:
        return f"==> {r.agent}: exit {r.exit_code} ({r.duration_s:.2f}s) <=="
    return f"==> {r.agent}: {r.status}: {one_line(r.error or '')} <=="


def _lines(text: str) -> list[str]:
    # Split at newlines only: every other control character is shown as an escape by visible().
    return text.removesuffix("\n").split("\n") if text else []


def _print_blocks(result: FanoutResult) -> None:
    for r in result.values():
        click.echo(visible(_header(r).replace("\n", " ")))
        for line in _lines(r.stdout):
            click.echo(visible(line))
        if r.stderr:
            click.echo("--- stderr")
            for line in _lines(r.stderr):
                click.echo(visible(line))
    err.print(f"{len(result)} hosts: {len(result.ok)} exited 0, {len(result.failed)} did not "
              f"({result.duration_s:.2f}s)", markup=False)
