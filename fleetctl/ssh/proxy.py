"""ProxyCommand as the first hop's transport (cloudflared, AWS SSM, ``ssh -W %h:%p bastion``).

The command runs as OpenSSH runs it (``$SHELL -c "exec COMMAND"``) with one end of a socketpair as
its stdin and stdout, so paramiko reads a real socket (timeouts and select work as with TCP). Its
stderr goes to a private temporary file whose tail explains a failure. Closing kills and reaps it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import tempfile

from fleetctl.errors import UnreachableError
from fleetctl.ssh.seam import Hop

STDERR_TAIL = 2000
SUPPORTED_TOKENS = "hpnr%"


def expand_proxy_command(command: str, hop: Hop) -> str:
    """``%h %p %r %n %%`` as OpenSSH expands them in ProxyCommand; any other token is refused."""
    out: list[str] = []
    index = 0
    values = {"h": hop.hostname, "p": str(hop.port), "r": hop.user, "n": hop.alias or hop.hostname, "%": "%"}
    while index < len(command):
        char = command[index]
        if char == "%" and index + 1 < len(command):
            token = command[index + 1]
            if token not in values:
                raise UnreachableError(f"ProxyCommand for {hop.address}: token %{token} is not supported",
                                       hop=hop.address, hint=f"use only %{', %'.join(SUPPORTED_TOKENS)}")
            out.append(values[token])
            index += 2
            continue
        out.append(char)
        index += 1
    return "".join(out)


class ProxyProcess:
    """A running ProxyCommand and the socket that talks to it."""

    def __init__(self, hop: Hop, timeout: float) -> None:
        assert hop.proxy_command is not None
        self.command = expand_proxy_command(hop.proxy_command, hop)
        self.hop = hop
        ours, theirs = socket.socketpair()
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 -- lives as long as the proxy; closed in close()
        shell = os.environ.get("SHELL") or "/bin/sh"
        try:
            self.process = subprocess.Popen([shell, "-c", f"exec {self.command}"], stdin=theirs.fileno(), stdout=theirs.fileno(),
                                            stderr=self._stderr, start_new_session=True, close_fds=True)
        except OSError as exc:
            ours.close()
            self._stderr.close()
            raise UnreachableError(f"cannot start ProxyCommand for {hop.address}: {exc.strerror}", hop=hop.address,
                                   hint="check the ProxyCommand in ssh_config") from exc
        finally:
            theirs.close()
        ours.settimeout(timeout)
        self.socket = ours

    def failure(self) -> str:
        """Why the proxy went away: its exit status and the last line it wrote to stderr."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=0.5)
        self._stderr.seek(0, os.SEEK_END)
        size = self._stderr.tell()
        self._stderr.seek(max(0, size - STDERR_TAIL))
        lines = [line for line in self._stderr.read().decode("utf-8", "replace").splitlines() if line.strip()]
        status = self.process.returncode
        said = f": {lines[-1].strip()}" if lines else ""
        state = "is still running" if status is None else f"exited {status}"
        return f"ProxyCommand `{self.command}` {state}{said}"

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.socket.close()
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=2)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self._stderr.close()
