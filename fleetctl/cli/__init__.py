"""The ``fleetctl`` command line. Errors are one line on stderr; exit 1 (error), 2 (usage)."""

from __future__ import annotations

import os
import sys
import traceback

import click

from fleetctl import __version__
from fleetctl.cli.agents import agents_group, register_ssh_command
from fleetctl.cli.common import Settings, common_options, err
from fleetctl.cli.fleet import demo_command, heartbeat_command, sandbox_group
from fleetctl.cli.jobs import drain_command, jobs_group, submit_command, undrain_command
from fleetctl.cli.monitor import serve_command, telemetry_group, top_command
from fleetctl.errors import FleetError


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="fleetctl")
@common_options
@click.pass_context
def cli(ctx: click.Context) -> None:
    """Agentless control of a GPU fleet over plain SSH."""
    ctx.ensure_object(Settings)


cli.add_command(register_ssh_command)
cli.add_command(agents_group)
cli.add_command(heartbeat_command)
cli.add_command(submit_command)
cli.add_command(jobs_group)
agents_group.add_command(drain_command)
agents_group.add_command(undrain_command)
cli.add_command(serve_command)
cli.add_command(top_command)
cli.add_command(telemetry_group)
cli.add_command(sandbox_group)
cli.add_command(demo_command)


def main() -> None:
    try:
        # Without standalone mode click returns (not raises) the code of click.exceptions.Exit.
        code = cli.main(standalone_mode=False, prog_name="fleetctl")
    except FleetError as exc:
        err.print(f"fleetctl: error: {exc}", markup=False)
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.Abort:
        err.print("fleetctl: aborted", markup=False)
        sys.exit(130)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:  # the promise is: never a traceback unless asked for
        if os.environ.get("FLEETCTL_DEBUG"):
            traceback.print_exc()
        err.print(f"fleetctl: internal error: {type(exc).__name__}: {exc} "
                  "(set FLEETCTL_DEBUG=1 for the traceback and please report it)", markup=False)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)
