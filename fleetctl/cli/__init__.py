"""The ``fleetctl`` command line. Errors are one line on stderr; exit 1 (error), 2 (usage), 141 when
the reader of stdout went away (``| head -1``, as cat does), 1 when stdout is closed (``>&-``)."""

from __future__ import annotations

import io
import os
import select
import sys
import traceback
from typing import NoReturn

import click

from fleetctl import __version__
from fleetctl._text import one_line, visible
from fleetctl.cli.agents import agents_group, register_ssh_command
from fleetctl.cli.cluster import controllers_command
from fleetctl.cli.common import Settings, common_options, err, out
from fleetctl.cli.fleet import demo_command, heartbeat_command, sandbox_group
from fleetctl.cli.jobs import drain_command, jobs_group, submit_command, undrain_command
from fleetctl.cli.monitor import serve_command, telemetry_group, top_command
from fleetctl.cli.preflight import doctor_command, trust_command
from fleetctl.cli.run import run_command
from fleetctl.cli.settings import config_group
from fleetctl.errors import FleetError


class _StdoutGone(Exception):
    """A write to stdout found its reader gone. Raised past click, which would exit 1 on EPIPE."""


class _Group(click.Group):
    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except BrokenPipeError as exc:
            raise _StdoutGone from exc


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
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
agents_group.add_command(trust_command)
cli.add_command(doctor_command)
cli.add_command(serve_command)
cli.add_command(controllers_command)
cli.add_command(top_command)
cli.add_command(telemetry_group)
cli.add_command(sandbox_group)
cli.add_command(demo_command)
cli.add_command(run_command)
cli.add_command(config_group)


EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: what a shell reports for `cat big | head -1`


def _stdout_reader_gone() -> bool:
    """True when stdout is a pipe whose reader has closed it (poll reports an error on our end)."""
    try:
        poller = select.poll()
        poller.register(sys.__stdout__.fileno() if sys.__stdout__ else 1, 0)
        return any(events & (select.POLLERR | select.POLLHUP) for _fd, events in poller.poll(0))
    except (OSError, ValueError):
        return False


def _quiet_broken_pipe() -> NoReturn:
    # Point stdout at /dev/null so the interpreter's last flush of buffered output cannot raise
    # again ("Exception ignored ... BrokenPipeError") on the way out.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)
    sys.exit(EXIT_BROKEN_PIPE)


def main() -> None:
    if sys.stdout is None:
        # Python leaves sys.stdout None when fd 1 is closed; output would vanish (and a file opened
        # later could take fd 1), so say so before doing anything.
        err.print("fleetctl: error: stdout is closed (run it with >/dev/null to discard the output)")
        sys.exit(1)
    try:
        # Without standalone mode click returns (not raises) the code of click.exceptions.Exit.
        code = cli.main(standalone_mode=False, prog_name="fleetctl")
    except FleetError as exc:
        err.print(f"fleetctl: error: {one_line(exc, limit=2000)}")
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        # Usage errors quote what was typed (an unknown command, a bad value): shown as data.
        shown = io.StringIO()
        exc.show(file=shown)
        err.print("\n".join(visible(line) for line in shown.getvalue().splitlines()))
        sys.exit(exc.exit_code)
    except click.Abort:
        err.print("fleetctl: aborted")
        sys.exit(130)
    except KeyboardInterrupt:
        sys.exit(130)
    except (_StdoutGone, BrokenPipeError) as exc:
        if _stdout_reader_gone() or out.quiet:
            _quiet_broken_pipe()
        _internal_error(exc.__cause__ or exc)  # a pipe other than stdout (a bug): say so
    except Exception as exc:  # the promise is: never a traceback unless asked for
        _internal_error(exc)
    _flush_stdout()
    sys.exit(code if isinstance(code, int) else 0)


def _flush_stdout() -> None:
    """Output buffered by print/click is written here, where a vanished reader is still ours to handle."""
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        _quiet_broken_pipe()
    except OSError as exc:
        err.print(f"fleetctl: error: cannot write to stdout: {exc.strerror or exc}")
        sys.exit(1)


def _internal_error(exc: BaseException) -> NoReturn:
    if os.environ.get("FLEETCTL_DEBUG"):
        traceback.print_exc()
    err.print(f"fleetctl: internal error: {type(exc).__name__}: {one_line(exc, limit=2000)} "
              "(set FLEETCTL_DEBUG=1 for the traceback and please report it)")
    sys.exit(1)
