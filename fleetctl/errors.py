"""The one exception tree of fleetctl.

    FleetError
    ├── ConfigError            the inventory or a setting is wrong (names file, agent, field)
    │   └── UnknownAgentError  a name that is not in the inventory
    ├── TransportError         SSH could not deliver: the host never ran the command
    │   ├── UnreachableError   refused, DNS failure, no route, handshake failure
    │   ├── ConnectTimeout     no answer within the connect timeout
    │   ├── AuthError          the key was refused, unreadable or passphrase-locked
    │   ├── HostKeyError       the host offered a key other than the one pinned or known
    │   ├── CommandTimeout     the command did not finish within its deadline
    │   ├── ConnectionLost     the connection dropped while a command was running
    │   │   └── SessionUnavailable  (fleetctl.ssh, internal) no kept shell on this host: one exec per command
    │   └── RemoteFileError    a file on the host could not be read or written over SFTP
    │       └── RemoteFileNotFound
    ├── CommandFailed          the host ran the command and it failed (carries the result)
    ├── ParseError             tool output that could not be understood (carries the raw text)
    │   ├── ToolMissingError   the GPU tool is not installed (exit 127)
    │   ├── DriverError        the tool ran but reports a driver/device failure
    │   ├── NoGpusError        the tool works but found no GPU (a good heartbeat: status no_gpus)
    │   ├── InvalidQueryError  the query names a field the tool does not know
    │   └── OutputTooLarge     the host sent more than the command's output limit
    ├── SandboxError           the local sandbox fleet could not be started or stopped
    │   └── PostgresMissing    (fleetctl.sandbox.postgres) no PostgreSQL server binaries here
    ├── StoreError             the store could not be opened, read or written
    ├── LeaseLost              this controller no longer leases the agent it was about to act on
    └── JobError               a queued job could not be placed, run or collected
        └── CodeError          a job's code directory cannot be sent (unsafe path, too big, snapshot gone)

*Unreachable* (``TransportError``) and *command failed* (``CommandFailed``) are deliberately
separate branches: the first says nothing ran, the second that something ran and failed.
Every message is one line that names the thing and, where there is one, the fix.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fleetctl.ssh.seam import CommandResult


class FleetError(Exception):
    """Root of every error fleetctl raises on purpose."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        self.message = message
        self.hint = hint
        super().__init__(f"{message} ({hint})" if hint else message)


class ConfigError(FleetError):
    """The inventory file or a setting is invalid."""


class UnknownAgentError(ConfigError):
    """A name that is not in the inventory."""


class TransportError(FleetError):
    """SSH could not deliver a command; nothing ran on the host.

    ``hop`` is the ``user@host:port`` of the hop that failed and ``is_bastion`` tells whether that
    hop is a bastion (so a round can report ``bastion_unreachable`` naming the hop).
    """

    def __init__(
        self, message: str, *, hop: str = "", is_bastion: bool = False, hint: str | None = None
    ) -> None:
        self.hop = hop
        self.is_bastion = is_bastion
        super().__init__(message, hint=hint)


class UnreachableError(TransportError):
    """Connection refused, name not resolved, no route, or the SSH handshake failed."""


class ConnectTimeout(TransportError):
    """The host (or a bastion) did not answer within the connect timeout."""


class AuthError(TransportError):
    """The host refused every key offered, or the key could not be used."""


class HostKeyError(TransportError):
    """The host offered a different host key from the pinned or recorded one."""

    def __init__(self, message: str, *, hop: str, expected: str, offered: str,
                 is_bastion: bool = False, hint: str | None = None) -> None:
        self.expected = expected
        self.offered = offered
        super().__init__(message, hop=hop, is_bastion=is_bastion, hint=hint)


class CommandTimeout(TransportError):
    """The command did not finish within its deadline."""


class ConnectionLost(TransportError):
    """The SSH connection dropped while a command was running."""


class RemoteFileError(TransportError):
    """A file on the host could not be read or written (permissions, disk full, SFTP refused)."""


class RemoteFileNotFound(RemoteFileError):
    """The remote path does not exist."""


class CommandFailed(FleetError):
    """The command ran on the host and exited non-zero."""

    def __init__(self, result: CommandResult, message: str | None = None) -> None:
        self.result = result
        last = (result.stderr.strip().splitlines() or [""])[-1]
        super().__init__(
            message or f"`{result.command}` exited {result.exit_code}" + (f": {last}" if last else "")
        )


class ParseError(FleetError):
    """Tool output that fleetctl could not understand; ``raw`` keeps the text."""

    def __init__(self, message: str, raw: str = "", *, hint: str | None = None) -> None:
        self.raw = raw
        super().__init__(message, hint=hint)


class ToolMissingError(ParseError):
    """The GPU query tool is not installed on the host."""


class DriverError(ParseError):
    """The GPU tool ran but reports that the driver or device is not usable."""


class NoGpusError(ParseError):
    """The tool works but found no GPU (``No devices were found``)."""


class InvalidQueryError(ParseError):
    """The query names a field the tool does not know: the gpu_query_cmd needs fixing."""


class OutputTooLarge(ParseError):
    """The host sent more output than the limit for this command; reading stopped there.

    ``result`` holds what was read up to the limit (exit code -1: the command was cut off)."""

    def __init__(self, message: str, result: CommandResult, *, hint: str | None = None) -> None:
        self.result = result
        super().__init__(message, "", hint=hint)


class SandboxError(FleetError):
    """The local sandbox fleet could not be started or stopped."""


class StoreError(FleetError):
    """The store (history, health, job queue) could not be opened, read or written.

    ``transient``: the database server was unreachable, restarting or busy, and the same call may
    succeed later (a serve keeps going); otherwise the store itself is broken and serve stops."""

    def __init__(self, message: str, *, hint: str | None = None, transient: bool = False) -> None:
        super().__init__(message, hint=hint)
        self.transient = transient


class LeaseLost(FleetError):
    """This controller no longer holds the agent's lease (it slept past it, or another took over):
    it must not act on that host; the lease's new holder settles whatever was in flight."""


class JobError(FleetError):
    """A job could not be placed, run or collected."""


class CodeError(JobError):
    """A job's code directory cannot be snapshot or sent: an unsafe path, a snapshot over the limit,
    a snapshot no longer in the state dir, or a host that cannot build the job's tree."""
