"""A kept-open shell on the host that runs each heartbeat's script on request.

An exec channel costs about fifteen SSH packets per command (open, confirm, exec, success, data,
EOF, exit-status, close twice, window adjusts), each decoded in Python. A shell kept open on one
channel costs two or three: the script goes out as one data packet, its output and an end marker
come back. The marker carries a random nonce, so no tool output can forge it, and the command's
stdin is /dev/null, so no tool can swallow the next request.

It ends exactly as an exec would: a command past its deadline raises CommandTimeout and the shell
is closed (the next run opens a new one); output past the limit raises OutputTooLarge and closes
it; a dropped connection raises ConnectionLost.
"""

from __future__ import annotations

import re
import secrets
import threading
import time

import paramiko

from fleetctl.errors import CommandTimeout, ConnectionLost, OutputTooLarge
from fleetctl.ssh.errors import translated
from fleetctl.transport import CommandResult

_READ_CHUNK = 1 << 16


class ShellSession:
    def __init__(self, transport: paramiko.Transport, address: str, timeout: float) -> None:
        self.address = address
        with translated("command", f"cannot open a session on {address}", hop=address):
            self.channel = transport.open_session(timeout=timeout)
            # `exec sh`: the login shell sets the environment up once, as for an exec, then steps aside.
            self.channel.exec_command("exec sh")
        self._readable = threading.Event()
        self.channel.in_buffer.set_event(self._readable)
        self.channel.in_stderr_buffer.set_event(self._readable)
        self._lock = threading.Lock()

    @property
    def usable(self) -> bool:
        return not (self.channel.closed or self.channel.eof_received or self.channel.exit_status_ready())

    def close(self) -> None:
        self.channel.close()

    def run(self, command: str, *, timeout: float, max_stdout: int, max_stderr: int) -> CommandResult:
        with self._lock:
            return self._run(command, timeout, max_stdout, max_stderr)

    def _run(self, command: str, timeout: float, max_stdout: int, max_stderr: int) -> CommandResult:
        started = time.monotonic()
        deadline = started + timeout
        mark = f"\x1efleetctl-end-{secrets.token_hex(8)}"
        # A subshell, so `exit` or `cd` in the command cannot end or change the kept shell; the
        # newline before `)` keeps a trailing comment in the command from swallowing it.
        request = f"( {command}\n) </dev/null\nprintf '\\n{mark} %s\\n' \"$?\"; printf '\\n{mark}\\n' >&2\n"
        with translated("command", f"connection to {self.address} lost while sending a command", hop=self.address):
            self.channel.sendall(request.encode())
        stdout, stderr = bytearray(), bytearray()
        out_end = re.compile(rb"\n" + re.escape(mark.encode()) + rb" (\d+)\n")
        err_end = b"\n" + mark.encode() + b"\n"
        found: re.Match[bytes] | None = None
        err_at = -1
        while found is None or err_at < 0:
            while self.channel.recv_ready():
                stdout += self.channel.recv(_READ_CHUNK)
            while self.channel.recv_stderr_ready():
                stderr += self.channel.recv_stderr(_READ_CHUNK)
            found = found or out_end.search(stdout)
            err_at = err_at if err_at >= 0 else stderr.find(err_end)
            if len(stdout) > max_stdout + len(mark) + 32 or len(stderr) > max_stderr + len(mark) + 32:
                self.close()
                which, cap = ("stdout", max_stdout) if len(stdout) > max_stdout else ("stderr", max_stderr)
                del stdout[max_stdout:], stderr[max_stderr:]  # never hold a decoded copy of a flood
                partial = CommandResult(command, -1, stdout.decode("utf-8", "replace"), stderr.decode("utf-8", "replace"),
                                        time.monotonic() - started)
                raise OutputTooLarge(f"{self.address} sent {which} larger than {cap} bytes; reading stopped", partial,
                                     hint="the command's output is bounded; check the host's tool or narrow the query")
            if found is not None and err_at >= 0:
                break
            if self.channel.closed or self.channel.eof_received:
                if not (self.channel.recv_ready() or self.channel.recv_stderr_ready()):
                    self.close()
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
        exit_code = int(found.group(1))
        return CommandResult(command, exit_code, stdout[: found.start()].decode("utf-8", "replace"),
                             stderr[:err_at].decode("utf-8", "replace"), time.monotonic() - started)
