"""``fleetctl doctor`` and ``fleetctl agents trust``: checking and re-trusting the way to a host."""

from __future__ import annotations

import sys

import click

from fleetctl._text import visible
from fleetctl.cli.common import common_options, err, out, print_json, settings
from fleetctl.errors import ConfigError
from fleetctl.fleet import Fleet
from fleetctl.hosts.doctor import doctor
from fleetctl.hosts.trust import TrustOffer, trust
from fleetctl.inventory.config import load_config

EXIT_SOME_FAILED = 3


def _fleet() -> Fleet:
    s = settings()
    return Fleet(load_config(s.config_path), state_dir=s.state_path)


@click.command("doctor")
@click.argument("names", nargs=-1, metavar="[NAME]...")
@click.option("--json", "as_json", is_flag=True, help="Print the checks as JSON.")
@common_options
def doctor_command(names: tuple[str, ...], as_json: bool) -> None:
    """Check every hop to each agent (all by default): ssh_config resolution, TCP, handshake and
    host key, login, forwarding on bastions, then the GPU tool, driver, MIG mode, a temp dir for
    jobs and SFTP on the host. One line per check, with the fix. Exit 0 if all pass, 3 if not."""
    with _fleet() as fleet:
        checks = doctor(fleet.hosts, list(names) or None)
    if as_json:
        print_json([c.to_dict() for c in checks])
    else:
        for check in checks:
            mark = "ok  " if check.ok else "FAIL"
            out.print(f"{mark} {visible(check.agent)}  {check.check}: {visible(check.detail)}", markup=False,
                      highlight=False, soft_wrap=True)
            if check.fix:
                out.print(f"       fix: {visible(check.fix)}", markup=False, highlight=False, soft_wrap=True)
    if not all(c.ok for c in checks):
        raise click.exceptions.Exit(EXIT_SOME_FAILED)


@click.command("trust")
@click.argument("name")
@click.option("--yes", is_flag=True, help="Trust without asking (needed when stdin is not a terminal).")
@common_options
def trust_command(name: str, yes: bool) -> None:
    """Accept NAME's current host key after a legitimate change (rebuilt or re-rented host): shows
    the old and the offered fingerprint, then updates the pin or fleetctl's known_hosts."""

    def confirm(offer: TrustOffer) -> bool:
        seen = offer.offered
        err.print(f"{offer.agent} ({offer.address}) offers {seen.key_type} {seen.fingerprint}", markup=False)
        for old in offer.old or ["(no key known for it yet)"]:
            err.print(f"  known before: {old}", markup=False)
        if yes:
            return True
        if not sys.stdin.isatty():
            raise ConfigError(f"not trusting {offer.agent} without confirmation: stdin is not a terminal",
                              hint="check the fingerprint out of band, then pass --yes")
        return click.confirm("Trust the offered key?", default=False, err=True)

    with _fleet() as fleet:
        result = trust(fleet.hosts, name, confirm)
    if result.where == "already trusted":
        out.print(f"{name}: the offered key is already trusted; nothing changed", markup=False)
    elif result.changed:
        out.print(f"{name}: now trusting {result.offer.offered.fingerprint} ({result.where})", markup=False)
    else:
        out.print(f"{name}: nothing changed", markup=False)
        raise click.exceptions.Exit(1)
