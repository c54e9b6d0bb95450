"""The fence around fleetctl's fast path: which paramiko it trusts, and the switch back to stock.

The fast path is :class:`fleetctl.ssh.loop.Transport` (paramiko's read loop in fleetctl's hands, so
every logged-in connection is read by one shared thread instead of a thread each) with the
per-connection Events and Conditions of :mod:`fleetctl.ssh.lean_sync`, swapped into the objects of
its own connections by :mod:`fleetctl.ssh.lean_swap`. It rests on paramiko internals: the names
in :data:`PRIVATE_NAMES` and a copy of ``Transport.run``. So it runs only on the paramiko releases
listed in :data:`TESTED_RUN_SOURCES`, whose internals ``tests/unit/ssh/test_fastpath_fence.py`` checks
(and fails on when a release changes them); on any other release, or with ``FLEETCTL_SSH_FAST=0``,
connections are plain ``paramiko.Transport`` (a thread each), and one DEBUG line says why.
"""

from __future__ import annotations

import functools
import logging
import os

import paramiko

log = logging.getLogger("fleetctl.ssh")

ENV_SWITCH = "FLEETCTL_SSH_FAST"

# paramiko release -> sha256 of ``inspect.getsource(paramiko.Transport.run)``, the function that
# loop.Transport re-implements in parts. A release whose run() differs gets stock paramiko until
# loop.py is checked against it and its hash added here (the fence test prints the new hash).
TESTED_RUN_SOURCES: dict[str, str] = {
    "5.1.0": "d658434778e57b94729ad510549efbab9108100ea48327a21b0b0c856d4e854e",
}

# Every private paramiko name the fast path reads or writes: (where, name). "where" is a class
# path for names on instances of it (checked on a live instance by the fence test) or a module.
PRIVATE_NAMES: tuple[tuple[str, str], ...] = (
    ("paramiko.transport", "_active_threads"),
    ("paramiko.transport.Transport", "_active_check_timeout"),
    ("paramiko.transport.Transport", "_check_banner"),
    ("paramiko.transport.Transport", "_send_kex_init"),
    ("paramiko.transport.Transport", "_expect_packet"),
    ("paramiko.transport.Transport", "_enforce_strict_kex"),
    ("paramiko.transport.Transport", "_parse_disconnect"),
    ("paramiko.transport.Transport", "_parse_debug"),
    ("paramiko.transport.Transport", "_ensure_authed"),
    ("paramiko.transport.Transport", "_send_message"),
    ("paramiko.transport.Transport", "_send_user_message"),
    ("paramiko.transport.Transport", "_log"),
    ("paramiko.transport.Transport", "_expected_packet"),
    ("paramiko.transport.Transport", "_handler_table"),
    ("paramiko.transport.Transport", "_channel_handler_table"),
    ("paramiko.transport.Transport", "_channels"),
    ("paramiko.transport.Transport", "channels_seen"),
    ("paramiko.transport.Transport", "channel_events"),
    ("paramiko.transport.Transport", "clear_to_send"),
    ("paramiko.transport.Transport", "clear_to_send_lock"),
    ("paramiko.transport.Transport", "server_accept_cv"),
    ("paramiko.transport.Transport", "completion_event"),
    ("paramiko.transport.Transport", "agreed_on_strict_kex"),
    ("paramiko.transport.Transport", "kex_engine"),
    ("paramiko.transport.Transport", "in_kex"),
    ("paramiko.transport.Transport", "saved_exception"),
    ("paramiko.transport.Transport", "handshake_timeout"),
    ("paramiko.transport.Transport", "local_version"),
    ("paramiko.transport.Transport", "_started"),
    ("paramiko.transport.Transport", "lock"),
    ("paramiko.transport.Transport", "auth_handler"),
    ("paramiko.auth_handler.AuthHandler", "_handler_table"),
    ("paramiko.auth_handler.AuthHandler", "auth_event"),
    ("paramiko.channel.Channel", "_unlink"),
    ("paramiko.channel.Channel", "lock"),
    ("paramiko.channel.Channel", "event"),
    ("paramiko.channel.Channel", "status_event"),
    ("paramiko.channel.Channel", "out_buffer_cv"),
    ("paramiko.channel.Channel", "in_buffer"),
    ("paramiko.channel.Channel", "in_stderr_buffer"),
    ("paramiko.buffered_pipe.BufferedPipe", "_lock"),
    ("paramiko.buffered_pipe.BufferedPipe", "_cv"),
    ("paramiko.packet.Packetizer", "_Packetizer__aead_in"),
    ("paramiko.packet.Packetizer", "_Packetizer__etm_in"),
    ("paramiko.packet.Packetizer", "_Packetizer__remainder"),
    ("paramiko.packet.Packetizer", "_Packetizer__timer"),
    ("paramiko.packet.Packetizer", "_Packetizer__write_lock"),
    ("paramiko.packet.Packetizer", "_Packetizer__block_size_in"),
    ("paramiko.packet.Packetizer", "_check_keepalive"),
    ("paramiko.packet", "NeedRekeyException"),
    ("paramiko.ssh_exception", "MessageOrderError"),
)


def requested() -> bool:
    """False when the user switched the fast path off (``FLEETCTL_SSH_FAST=0``)."""
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "no", "false", "off")


@functools.lru_cache(maxsize=1)
def _supported() -> bool:
    version = paramiko.__version__
    if version not in TESTED_RUN_SOURCES:
        log.debug("paramiko %s is not one the fast path was tested on (%s): using stock paramiko",
                  version, ", ".join(TESTED_RUN_SOURCES))
        return False
    return True


def enabled() -> bool:
    """Whether new connections take the fast path (read each time: the switch works at run time)."""
    if not requested():
        log.debug("%s=0: using stock paramiko", ENV_SWITCH)
        return False
    return _supported()


def transport_class() -> type[paramiko.Transport]:
    """The Transport class for a new connection: fleetctl's on the fast path, else paramiko's own."""
    if enabled():
        from fleetctl.ssh.loop import Transport

        return Transport
    return paramiko.Transport  # type: ignore[no-any-return]
