"""A kept-open shell on the host that runs each heartbeat's script on request.

An exec channel costs about fifteen SSH packets per command (open, confirm, exec, success, data,
EOF, exit-status, close twice, window adjusts), each decoded in Python and each waking a thread.
The kept shell costs two: the request goes out as one data packet, and the host gathers the
command's stdout, exit code and stderr in a private directory and sends them back in ONE write
(a shell that let every ``printf`` of the script through would still cost a packet each).

Bounds hold on the host, before anything crosses the network: stdout passes through
``head -c`` (a flooding tool gets SIGPIPE), stderr is cut by ``ulimit -f``. The reply is framed by
markers carrying a random nonce, so no tool output can forge them, and the command's stdin is
/dev/null, so no tool can swallow the next request. It ends exactly as an exec would: past its
deadline CommandTimeout (the shell is closed; the next run opens a new one), past the output limit
OutputTooLarge, a dropped connection ConnectionLost.
"""

from __future__ import annotations

import contextlib
import secrets
import threading
import time

import paramiko

from fleetctl.errors import CommandTimeout, ConnectionLost, OutputTooLarge
from fleetctl.ssh import lean_swap, lean_sync
from fleetctl.ssh.errors import translated
from fleetctl.ssh.seam import CommandResult

_READ_CHUNK = 1 << 16
_BLOCK = 512  # ulimit -f counts 512-byte blocks

# Run once per shell: a private directory for each reply's parts, removed when the shell exits.
_SETUP = ('T=$(umask 077; mktemp -d "${TMPDIR:-/tmp}/fleetctl-sh.XXXXXXXX") || exit 97\n'
          "trap 'rm -rf \"$T\"' EXIT HUP TERM\n")


class SessionUnavailable(ConnectionLost):
    """The host cannot keep a shell for fleetctl (no writable temp dir): use one exec per command."""


class ShellSession:
    def __init__(self, transport: paramiko.Transport, address: str, timeout: float) -> None:
        self.address = address
        with translated("command", f"cannot open a session on {address}", hop=address):
            self.channel = transport.open_session(timeout=timeout)
            lean_swap.lean_channel(self.channel)  # before exec_command: nobody waits on it yet
            # `exec sh`: the login shell sets the environment up once, as for an exec, then steps aside.
            self.channel.exec_command("exec sh")
            self.channel.sendall(_SETUP.encode())
        self._readable = lean_sync.Event()  # held as long as the shell: the lean one
        self.channel.in_buffer.set_event(self._readable)
        self.channel.in_stderr_buffer.set_event(self._readable)
        self._lock = threading.Lock()

    @property
    def usable(self) -> bool:
        return not (self.channel.closed or self.channel.eof_received or self.channel.exit_status_ready())

    def close(self) -> None:
        with contextlib.suppress(Exception):  # over a dead link paramiko's close message raises; closed is closed
            self.channel.close()

    def run(self, command: str, *, timeout: float, max_stdout: int, max_stderr: int) -> CommandResult:
        with self._lock:
            return self._run(command, timeout, max_stdout, max_stderr)

    def _request(self, command: str, nonce: str, max_stdout: int, max_stderr: int) -> bytes:
        # stdout: the command's, then "\x1e<nonce>rc <status>\n", through head -c one byte past the
        # cap (so too much is visible); then the stderr marker, stderr, and the end marker. A
        # subshell runs the command, so `exit` or `cd` in it cannot end or change the kept shell; the
        # newline before `)` keeps a trailing comment in the command from swallowing it.
        blocks = max(1, (max_stderr + _BLOCK) // _BLOCK)
        return (f"{{ ( ulimit -f {blocks} 2>/dev/null; {command}\n) </dev/null 2>\"$T/e\"; "
                f"printf '\\036{nonce}rc %s\\n' \"$?\"; }} | head -c {max_stdout + 64} >\"$T/o\"\n"
                f"{{ cat \"$T/o\"; printf '\\036{nonce}err\\n'; head -c {max_stderr + 1} \"$T/e\"; "
                f"printf '\\036{nonce}end\\n'; }} >\"$T/a\" 2>/dev/null; cat \"$T/a\"\n").encode()

    def _run(self, command: str, timeout: float, max_stdout: int, max_stderr: int) -> CommandResult:
        started = time.monotonic()
        deadline = started + timeout
        nonce = secrets.token_hex(8)
        end = f"\x1e{nonce}end\n".encode()
        with translated("command", f"connection to {self.address} lost while sending a command", hop=self.address):
            self.channel.sendall(self._request(command, nonce, max_stdout, max_stderr))
        reply = bytearray()
        while not reply.endswith(end):
            while self.channel.recv_ready():
                reply += self.channel.recv(_READ_CHUNK)
            while self.channel.recv_stderr_ready():  # the kept shell's own complaints, if any
                self.channel.recv_stderr(_READ_CHUNK)
            if reply.endswith(end):
                break
            if len(reply) > max_stdout + max_stderr + 512:  # the host's own caps failed: stop reading
                self.close()
                raise self._too_large(command, "stdout", max_stdout, bytes(reply[:max_stdout]), b"", started)
            if self.channel.closed or self.channel.eof_received:
                if not (self.channel.recv_ready() or self.channel.recv_stderr_ready()):
                    self.close()
                    if self.channel.exit_status_ready() and self.channel.recv_exit_status() == 97:
                        raise SessionUnavailable(f"{self.address} has no writable temp dir for a kept shell",
                                                 hop=self.address)
                    raise ConnectionLost(f"connection to {self.address} lost while running `{command[:60]}`",
                                         hop=self.address, hint="the host or network went away; retry")
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.close()
                raise CommandTimeout(f"`{command[:60]}` on {self.address} did not finish within {timeout:g}s",
                                     hop=self.address, hint="raise command_timeout_s or check the host")
            # Reads clear the event when a buffer empties: look again before sleeping on it.
            if not (self.channel.recv_ready() or self.channel.recv_stderr_ready()):
                self._readable.wait(min(remaining, 1.0))
                self._readable.clear()
        return self._parse(command, bytes(reply), nonce, max_stdout, max_stderr, started)

    def _parse(self, command: str, reply: bytes, nonce: str, max_stdout: int, max_stderr: int,
               started: float) -> CommandResult:
        err_mark = f"\x1e{nonce}err\n".encode()
        at = reply.rfind(err_mark)
        stdout_part, stderr_part = reply[:at], reply[at + len(err_mark): -len(f"\x1e{nonce}end\n")]
        rc_mark = f"\x1e{nonce}rc ".encode()
        rc_at = stdout_part.rfind(rc_mark)
        if rc_at < 0:  # head -c cut the status off: the command printed more than the cap
            self.close()  # its shell may still be feeding a pipe nobody reads
            raise self._too_large(command, "stdout", max_stdout, stdout_part[:max_stdout], stderr_part, started)
        stdout = stdout_part[:rc_at]
        if len(stdout) > max_stdout:
            raise self._too_large(command, "stdout", max_stdout, stdout[:max_stdout], stderr_part, started)
        if len(stderr_part) > max_stderr:
            raise self._too_large(command, "stderr", max_stderr, stdout, stderr_part[:max_stderr], started)
        exit_code = int(stdout_part[rc_at + len(rc_mark):].strip() or b"-1")
        return CommandResult(command, exit_code, stdout.decode("utf-8", "replace"), stderr_part.decode("utf-8", "replace"),
                             time.monotonic() - started)

    def _too_large(self, command: str, which: str, cap: int, stdout: bytes, stderr: bytes,
                   started: float) -> OutputTooLarge:
        partial = CommandResult(command, -1, stdout.decode("utf-8", "replace"), stderr.decode("utf-8", "replace"),
                                time.monotonic() - started)
        return OutputTooLarge(f"{self.address} sent {which} larger than {cap} bytes; reading stopped", partial,
                              hint="the command's output is bounded; check the host's tool or narrow the query")
