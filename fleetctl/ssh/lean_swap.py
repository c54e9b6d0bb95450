"""Lean Events and Conditions in the paramiko objects fleetctl creates and keeps, one instance at a time.

Why: a kept connection holds about a dozen ``threading.Event``/``Condition`` objects (some 1.2 KiB
each: an instance dict with five bound methods copied in, a deque) on its Transport, its kept shell's
Channel and that channel's two buffers; behind a bastion, the ``direct-tcpip`` channel on the
bastion's connection holds five more. Across a fleet they weigh more than anything else a connection
keeps. :mod:`fleetctl.ssh.lean_sync` runs CPython's own algorithm in a fraction of the memory.

Only the objects of connections made on the fast path (a :class:`fleetctl.ssh.loop.Transport` and
the channels fleetctl opens on one) are touched, attribute by attribute: paramiko's modules and
classes stay as they are, and a user's own paramiko objects keep ``threading``'s.

When a swap is safe: a thread waiting on the old object would never hear from the new one, and a
``set()`` landing between reading an Event's flag and replacing it would be lost. So each swap runs
at a moment nobody waits on that object, and copies an Event's flag under the lock every one of its
setters at that moment holds:

- a Transport's, in its ``__init__``, before its thread starts;
- the ones its login left set (``completion_event``, the auth handler's ``auth_event``) once
  authentication returned: nobody waits on them after, and their later ``set()`` calls (a rekey, a
  close) change nothing on an Event already set;
- a channel's, right after ``open_session``/``open_channel`` returned and before the channel is
  used (no request sent, so no waiter; no exit status can come): under ``channel.lock``, which
  ``_set_closed`` (the only setter then) holds; each buffer's Condition under the buffer's lock,
  which ``feed`` and ``close`` hold to notify.
"""

from __future__ import annotations

import threading
from typing import Any

import paramiko

from fleetctl.ssh import lean_sync


def _lean_event(old: Any) -> lean_sync.Event:
    event = lean_sync.Event()
    if old.is_set():
        event.set()
    return event


def _on_fast_path(transport: object) -> bool:
    from fleetctl.ssh.loop import Transport  # loop imports this module

    return isinstance(transport, Transport)


def lean_transport(transport: paramiko.Transport) -> None:
    """Right after paramiko's ``Transport.__init__``, before the transport's thread starts."""
    transport.clear_to_send = _lean_event(transport.clear_to_send)
    transport.server_accept_cv = lean_sync.Condition(transport.lock)


def lean_after_login(transport: paramiko.Transport) -> None:
    """Once authentication returned: the set Events the handshake and login leave behind."""
    if not _on_fast_path(transport):
        return
    if isinstance(transport.completion_event, threading.Event):
        transport.completion_event = _lean_event(transport.completion_event)
    auth = transport.auth_handler
    if auth is not None and isinstance(auth.auth_event, threading.Event):
        auth.auth_event = _lean_event(auth.auth_event)


def lean_channel(channel: paramiko.Channel) -> None:
    """Right after the channel opened, before any request or read on it (see the module docstring)."""
    if not _on_fast_path(channel.get_transport()):
        return
    with channel.lock:
        channel.event = _lean_event(channel.event)
        channel.status_event = _lean_event(channel.status_event)
        channel.out_buffer_cv = lean_sync.Condition(channel.lock)
    for buffer in (channel.in_buffer, channel.in_stderr_buffer):
        with buffer._lock:
            buffer._cv = lean_sync.Condition(buffer._lock)
