"""The one table from an error to the status a host gets for it, used by heartbeats, fan-out, jobs
and ``doctor`` alike: the same failure reads the same everywhere.

Looked up in order, first match wins (a subclass sits above its base). ``bastion_unreachable`` is
any transport failure at a bastion, whatever its kind, except a host-key or login refusal, which
say more. A status here never says a command ran and failed: that is ``failed`` (fan-out) or a
job's exit code, decided from the result, not from an error.
"""

from __future__ import annotations

from typing import Literal

from fleetctl.errors import (
    AuthError,
    CommandTimeout,
    ConfigError,
    ConnectionLost,
    ConnectTimeout,
    DriverError,
    FleetError,
    HostKeyError,
    ParseError,
    ToolMissingError,
    TransportError,
)

ErrorStatus = Literal["host_key_mismatch", "auth_failed", "bastion_unreachable", "timeout", "connection_lost",
                      "unreachable", "config_error", "tool_missing", "driver_error", "parse_error", "error"]

# (error class, status, applies only when the failing hop is a bastion)
STATUS_TABLE: tuple[tuple[type[FleetError], ErrorStatus, bool], ...] = (
    (HostKeyError, "host_key_mismatch", False),
    (AuthError, "auth_failed", False),
    (TransportError, "bastion_unreachable", True),
    (ConnectTimeout, "timeout", False),
    (CommandTimeout, "timeout", False),
    (ConnectionLost, "connection_lost", False),
    (TransportError, "unreachable", False),
    (ConfigError, "config_error", False),  # e.g. a bad ssh_config line: this agent only, named file:line
    (ToolMissingError, "tool_missing", False),
    (DriverError, "driver_error", False),
    (ParseError, "parse_error", False),
    (FleetError, "error", False),
)


def status_of(exc: FleetError) -> ErrorStatus:
    """The status of a host whose attempt ended in ``exc``."""
    at_bastion = isinstance(exc, TransportError) and exc.is_bastion
    for error, status, bastion_only in STATUS_TABLE:
        if isinstance(exc, error) and (at_bastion or not bastion_only):
            return status
    return "error"
