"""``fleetctl top`` in a real pseudo-terminal (80x24) against real sshd hosts, one of them failing."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import sys
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from rich.cells import cell_len

from fleetctl.sandbox import HostSpec, Sandbox
from tests.conftest import needs_netns, require_sshd, run_cli

COLUMNS, LINES = 80, 24
DEADLINE_S = 30.0
_CONTROL = re.compile(r"\x1b\[([0-9;?]*)([ -/]*[@-~])|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[()][0-9A-Za-z]|\x1b[=>78]")


class Screen:
    """Just enough of a terminal to read what rich draws: cursor moves, erases and text on a grid
    of ``LINES`` x ``COLUMNS``. Text that would pass the right margin is recorded, not wrapped."""

    def __init__(self) -> None:
        self.rows = [[" "] * COLUMNS for _ in range(LINES)]
        self.row = self.col = 0
        self.overflows: list[str] = []

    def feed(self, text: str) -> None:
        position = 0
        while position < len(text):
            match = _CONTROL.match(text, position)
            if match:
                self._control(match.group(1) or "", match.group(2) or "")
                position = match.end()
                continue
            char = text[position]
            position += 1
            if char == "\r":
                self.col = 0
            elif char == "\n":
                self.row = min(LINES - 1, self.row + 1)
            elif char >= " ":
                if self.col + cell_len(char) > COLUMNS:
                    self.overflows.append(self.line(self.row) + char)
                    continue
                self.rows[self.row][self.col] = char
                self.col += cell_len(char)

    def _control(self, params: str, final: str) -> None:
        numbers = [int(n) if n.isdigit() else 0 for n in params.split(";")] if params else []
        if final == "H":
            self.row = max(1, numbers[0] if numbers else 1) - 1
            self.col = max(1, numbers[1] if len(numbers) > 1 else 1) - 1
        elif final == "A":
            self.row = max(0, self.row - max(1, numbers[0] if numbers else 1))
        elif final == "J" and (numbers[:1] == [2] or not numbers):
            start = 0 if numbers[:1] == [2] else self.row
            for row in range(start, LINES):
                self.rows[row] = [" "] * COLUMNS
        elif final == "K":
            self.rows[self.row][self.col:] = [" "] * (COLUMNS - self.col)
        # colours, cursor visibility and the alternate screen change nothing that is checked here

    def line(self, row: int) -> str:
        return "".join(self.rows[row]).rstrip()

    def text(self) -> str:
        return "\n".join(self.line(row) for row in range(LINES))


class Top:
    """``fleetctl top`` started in a pseudo-terminal of its own (its controlling terminal)."""

    def __init__(self, *args: str) -> None:
        env = {**os.environ, "COLUMNS": str(COLUMNS), "LINES": str(LINES), "TERM": "xterm-256color"}
        env.pop("NO_COLOR", None)
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: becomes fleetctl, with the pty as its terminal
            fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", LINES, COLUMNS, 0, 0))
            os.execve(sys.executable, [sys.executable, "-m", "fleetctl", "top", *args], env)
        self.screen = Screen()
        self.raw = ""
        self.code: int | None = None

    def pump(self, timeout: float) -> None:
        """Read what top drew within ``timeout`` seconds; notice when it exits."""
        if select.select([self.fd], [], [], timeout)[0]:
            try:
                data = os.read(self.fd, 65536)
            except OSError:  # EIO: the child is gone and the pty closed
                data = b""
            text = data.decode("utf-8", "replace")
            self.raw += text
            self.screen.feed(text)
        if self.code is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.code = os.waitstatus_to_exitcode(status)

    def wait_for(self, predicate: str, check: object) -> None:
        deadline = time.monotonic() + DEADLINE_S
        while time.monotonic() < deadline:
            if callable(check) and check():
                return
            if self.code is not None:
                pytest.fail(f"top exited {self.code} while waiting for {predicate}:\n{self.raw[-2000:]}")
            self.pump(0.1)
        pytest.fail(f"no {predicate} within {DEADLINE_S}s; screen:\n{self.screen.text()}")

    def press(self, keys: bytes) -> None:
        os.write(self.fd, keys)

    def exit_code(self) -> int:
        deadline = time.monotonic() + DEADLINE_S
        while self.code is None and time.monotonic() < deadline:
            self.pump(0.1)
        if self.code is None:
            self.kill()
            pytest.fail(f"top did not exit within {DEADLINE_S}s; screen:\n{self.screen.text()}")
        return self.code

    def kill(self) -> None:
        if self.code is None:
            os.kill(self.pid, 9)
            os.waitpid(self.pid, 0)
            self.code = -9

    def close(self) -> None:
        self.kill()
        os.close(self.fd)


@pytest.fixture(scope="module")
def small_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    """A healthy host listed first and a failing one listed last: top must still show it first."""
    require_sshd()
    sandbox = Sandbox(tmp_path_factory.mktemp("top"),
                      [HostSpec("aaa-healthy", gpus=2), HostSpec("zzz-broken", mode="driver_error")])
    sandbox.up()
    yield sandbox
    sandbox.down()


def _start(sandbox: Sandbox, tmp_path: Path) -> Top:
    return Top("--config", str(sandbox.inventory_path), "--state-dir", str(tmp_path / "state"), "--interval", "1")


def _table_rows(screen: Screen) -> list[str]:
    lines = [screen.line(row) for row in range(LINES)]
    header = next(i for i, line in enumerate(lines) if line.startswith("HOST"))
    return [line for line in lines[header + 1:] if line and not line.startswith("rows ")]


def test_top_in_a_terminal_shows_clock_failed_host_first_and_quits_on_q(small_fleet: Sandbox, tmp_path: Path) -> None:
    top = _start(small_fleet, tmp_path)
    try:
        top.wait_for("a frame with both hosts and the key hint",
                     lambda: "zzz-broken" in top.screen.text() and "aaa-healthy" in top.screen.text()
                     and "q/Esc quit" in top.screen.text())
        first = top.screen.line(0)
        assert re.match(r"\d\d:\d\d:\d\d  1/2 hosts ok  1 failed", first), first
        assert re.search(r"updated \d+s ago", first), first
        rows = _table_rows(top.screen)
        assert rows[0].startswith("zzz-broken") and "driver_error" in rows[0], rows
        assert all(row.startswith("aaa-healthy") for row in rows[1:]) and len(rows) == 3, rows
        assert top.screen.overflows == [], top.screen.overflows
        # The clock moves while nothing else does: a still screen is visibly alive.
        top.wait_for("the clock to tick", lambda: top.screen.line(0)[:8] != first[:8])
        top.press(b"q")
        assert top.exit_code() == 0
        assert "\x1b[?1049l" in top.raw  # the alternate screen was left: the shell's screen is back
    finally:
        top.close()


@pytest.mark.parametrize("quit_key", [b"\x1b", b"\x03"], ids=["esc", "ctrl-c"])
def test_escape_and_ctrl_c_quit_and_scroll_keys_do_not(small_fleet: Sandbox, tmp_path: Path, quit_key: bytes) -> None:
    top = _start(small_fleet, tmp_path)
    try:
        top.wait_for("the first frame", lambda: "q/Esc quit" in top.screen.text())
        # Arrow keys, PgDn and j/k are taken as keys, never as Esc followed by letters.
        top.press(b"\x1b[B\x1b[6~jk\x1b[A\x1b[5~ b")
        top.pump(0.5)
        assert top.code is None, top.raw[-2000:]
        top.press(quit_key)
        assert top.exit_code() == 0
        mode = termios.tcgetattr(top.fd)[3]  # the terminal is given back as it was: echo, line editing
        assert mode & termios.ECHO and mode & termios.ICANON
    finally:
        top.close()


def test_rows_beyond_the_screen_are_reached_by_scrolling(tmp_path: Path) -> None:
    require_sshd()
    # 12 hosts of 2 GPUs: 24 rows, more than the 21 that fit in 24 lines.
    sandbox = Sandbox(tmp_path / "many", [HostSpec(f"h{n:02d}", gpus=2) for n in range(12)])
    sandbox.up()
    top = _start(sandbox, tmp_path)
    try:
        top.wait_for("a full first page", lambda: "rows 1-21 of 24" in top.screen.text())
        assert "h11" not in top.screen.text() and "..." not in top.screen.text()
        top.press(b"G")
        top.wait_for("the last page", lambda: "rows 4-24 of 24" in top.screen.text())
        assert _table_rows(top.screen)[-1].startswith("h11")
        top.press(b"k")
        top.wait_for("one row up", lambda: "rows 3-23 of 24" in top.screen.text())
        top.press(b"q")
        assert top.exit_code() == 0
    finally:
        top.close()
        sandbox.down()


def test_top_when_piped_prints_plain_frames(small_fleet: Sandbox, tmp_path: Path) -> None:
    result = run_cli("top", "--once", "--config", str(small_fleet.inventory_path),
                     "--state-dir", str(tmp_path / "state"))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert re.match(r"\d\d:\d\d:\d\d  1/2 hosts ok  1 failed", lines[0]), lines
    assert lines[2].startswith("zzz-broken") and "driver_error" in lines[2], lines
    assert len(lines) == 5 and "\x1b" not in result.stdout and "q/Esc" not in result.stdout


@needs_netns
def test_a_black_holed_host_never_holds_the_others_rows(tmp_path: Path) -> None:
    """Each host shows as soon as it answers: the healthy one is on screen long before the
    black-holed one's connect timeout (3 s in the sandbox) gives it a row."""
    require_sshd()
    sandbox = Sandbox(tmp_path / "holed", [HostSpec("aaa-healthy"), HostSpec("hole", mode="blackhole")])
    sandbox.up()
    try:
        top = _start(sandbox, tmp_path)
        try:
            started = time.monotonic()
            top.wait_for("the healthy host's rows", lambda: "aaa-healthy" in top.screen.text())
            assert "hole" not in top.screen.text() and time.monotonic() - started < 3.0, top.screen.text()
            top.wait_for("the black-holed host's row", lambda: "hole" in top.screen.text())
            top.press(b"q")
            assert top.exit_code() == 0
        finally:
            top.close()
    finally:
        sandbox.down()
