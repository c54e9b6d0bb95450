"""paramiko and socket errors, translated once, from one table (after httpx's
``map_httpcore_exceptions``): the most specific class in the exception's MRO picks the fleetctl
error for the phase the failure happened in, and the original is kept as ``__cause__``. Nothing
here reads an exception's message to decide what it means; a timeout is recognised by the clock.

paramiko's log records of fleetctl's own connections are demoted here: each transport fleetctl opens
logs to :data:`PARAMIKO_LOG_CHANNEL` (paramiko's public ``set_log_channel``), whose records go to
fleetctl's logger at DEBUG and never to the user's terminal (a failed handshake otherwise prints a
traceback from paramiko's thread). paramiko's own loggers, which other code may use, are untouched.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import paramiko

from fleetctl.errors import (
    AuthError,
    ConnectionLost,
    ConnectTimeout,
    RemoteFileError,
    RemoteFileNotFound,
    TransportError,
    UnreachableError,
)

Phase = Literal["connect", "tunnel", "command", "file"]


@dataclass(frozen=True)
class Rule:
    """What a vendor error means in one phase: the fleetctl class, and optionally a message
    template (``{address}``, ``{hostname}``, ``{timeout}``, ``{detail}``) and a hint of its own."""

    error: type[TransportError]
    message: str | None = None
    hint: str | None = None


_NO_ANSWER = Rule(ConnectTimeout, "no answer from {address} within {timeout:g}s",
                  "is the host up and the port open? raise connect_timeout_s for slow links")

# phase -> exception class -> rule. Looked up along the exception's MRO, most specific first.
ERROR_TABLE: dict[Phase, dict[type[BaseException], Rule]] = {
    "connect": {
        socket.gaierror: Rule(UnreachableError, "cannot resolve {hostname}: {detail}", "check the hostname"),
        ConnectionRefusedError: Rule(UnreachableError, "connection refused by {address}", "is sshd running on that port?"),
        TimeoutError: _NO_ANSWER,
        paramiko.AuthenticationException: Rule(AuthError),
        paramiko.SSHException: Rule(UnreachableError),
        EOFError: Rule(UnreachableError),
        OSError: Rule(UnreachableError),
    },
    "tunnel": {
        paramiko.ChannelException: Rule(UnreachableError),
        TimeoutError: _NO_ANSWER,
        paramiko.SSHException: Rule(UnreachableError),
        EOFError: Rule(UnreachableError),
        OSError: Rule(UnreachableError),
    },
    "command": {
        TimeoutError: Rule(ConnectionLost),
        paramiko.SSHException: Rule(ConnectionLost),
        EOFError: Rule(ConnectionLost),
        OSError: Rule(ConnectionLost),
    },
    "file": {
        FileNotFoundError: Rule(RemoteFileNotFound),
        PermissionError: Rule(RemoteFileError, hint="check the file's permissions on the host"),
        paramiko.SFTPError: Rule(RemoteFileError),
        paramiko.SSHException: Rule(ConnectionLost),
        EOFError: Rule(ConnectionLost),
        OSError: Rule(RemoteFileError),
    },
}


def rule_for(exc: BaseException, phase: Phase) -> Rule | None:
    table = ERROR_TABLE[phase]
    for cls in type(exc).__mro__:
        if cls in table:
            return table[cls]
    return None


@contextlib.contextmanager
def translated(phase: Phase, message: str, *, hop: str, is_bastion: bool = False, hint: str | None = None,
               deadline: float | None = None, hostname: str = "", timeout: float = 0.0) -> Iterator[None]:
    """Run the block; a vendor error becomes the fleetctl error its rule names, worded by the
    rule's template or else ``message: detail``. Past ``deadline`` (monotonic) a connect or tunnel
    failure is a timeout, whatever paramiko raised."""
    try:
        yield
    except TransportError:
        raise
    except Exception as exc:
        rule = rule_for(exc, phase)
        if rule is None:
            raise
        if deadline is not None and phase in ("connect", "tunnel") and time.monotonic() >= deadline:
            rule = _NO_ANSWER
        detail = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        fields = {"address": hop, "hostname": hostname or hop, "timeout": timeout, "detail": detail}
        text = rule.message.format(**fields) if rule.message else f"{message}: {detail}"
        raise rule.error(text, hop=hop, is_bastion=is_bastion, hint=rule.hint or hint) from exc


PARAMIKO_LOG_CHANNEL = "fleetctl.ssh.paramiko"


class _DemoteToDebug(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        logging.getLogger("fleetctl.ssh").debug("paramiko: %s", record.getMessage())


def quiet_paramiko() -> None:
    """fleetctl's own log channel for paramiko: every record demoted to DEBUG (idempotent)."""
    logger = logging.getLogger(PARAMIKO_LOG_CHANNEL)
    if not any(isinstance(h, _DemoteToDebug) for h in logger.handlers):
        logger.addHandler(_DemoteToDebug())
    logger.propagate = False
