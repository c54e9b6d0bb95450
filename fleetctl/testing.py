"""An in-process stand-in for an SSH connection, shipped for tests (as httpx ships MockTransport).

    conn = ScriptedConnection(route, answers=[CommandResult(...), ConnectionLost("gone", hop="h")])
    fleet = Fleet(inventory, connector=lambda route: conn)

Each ``run``/``run_kept`` takes the next scripted answer: a CommandResult (its command is set to
the one asked), an exception to raise (the connection then counts as closed, as a real one would),
or a callable of the command that returns either. Files written are kept in ``files``. It raises
exactly the types the real connection raises (``tests/integration/test_connection_contract.py``
runs one contract against both): a missing file is RemoteFileNotFound, a closed connection
ConnectionLost.
Anything about SSH behaviour itself is proven against real sshd, not with this.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from fleetctl.errors import ConnectionLost, RemoteFileNotFound
from fleetctl.ssh.seam import CommandResult, HostKeySeen, Route

Answer = CommandResult | BaseException | Callable[[str], "CommandResult | BaseException"]


class ScriptedConnection:
    def __init__(self, route: Route, answers: list[Answer] | None = None,
                 default: Answer | None = None) -> None:
        self.route = route
        self.host_keys: list[HostKeySeen] = []
        self.answers = list(answers or [])
        self.default = default
        self.commands: list[str] = []
        self.files: dict[str, bytes] = {}
        self._open = True

    @property
    def is_open(self) -> bool:
        return self._open

    def run(self, command: str, *, timeout: float | None = None, max_stdout: int | None = None,
            max_stderr: int | None = None) -> CommandResult:
        if not self._open:  # as the real connection: a closed one runs nothing
            raise ConnectionLost(f"connection to {self.route.target.address} lost while starting a command",
                                 hop=self.route.target.address, hint="the host or network went away; retry")
        self.commands.append(command)
        answer = self.answers.pop(0) if self.answers else self.default
        if answer is None:
            return CommandResult(command, 0, "", "")
        if callable(answer) and not isinstance(answer, BaseException):
            answer = answer(command)
        if isinstance(answer, BaseException):
            self._open = False
            raise answer
        return replace(answer, command=command)

    run_kept = run

    def write_bytes(self, remote_path: str, data: bytes) -> None:
        self.files[remote_path] = bytes(data)

    def read_bytes(self, remote_path: str, *, max_bytes: int | None = None) -> bytes:
        if remote_path not in self.files:
            raise RemoteFileNotFound(f"cannot read {remote_path}: no such file", hop=self.route.target.address)
        data = self.files[remote_path]
        return data[-max_bytes:] if max_bytes is not None else data

    def get(self, remote_path: str, local_path: Path) -> None:
        Path(local_path).write_bytes(self.read_bytes(remote_path))

    def close(self) -> None:
        self._open = False
