"""Single keypresses from a terminal, read without blocking: what ``fleetctl top`` listens to.

The terminal goes to cbreak mode (keys arrive at once and are not echoed, while Ctrl-C still sends
SIGINT) only inside :func:`cbreak`, which puts the previous settings back however the block ends.
"""

from __future__ import annotations

import os
import re
import select
import termios
import tty
from collections.abc import Iterator
from contextlib import contextmanager

# What common terminals send for the keys top understands (xterm, VT100 application mode, linux console).
SEQUENCES = {
    "\x1b[A": "up", "\x1bOA": "up", "\x1b[B": "down", "\x1bOB": "down",
    "\x1b[C": "right", "\x1bOC": "right", "\x1b[D": "left", "\x1bOD": "left",
    "\x1b[5~": "pgup", "\x1b[6~": "pgdn",
    "\x1b[H": "home", "\x1bOH": "home", "\x1b[1~": "home", "\x1b[7~": "home",
    "\x1b[F": "end", "\x1bOF": "end", "\x1b[4~": "end", "\x1b[8~": "end",
}
_ANY_SEQUENCE = re.compile(r"\x1b(?:\[[0-9;?]*[ -/]*[@-~]|O.)")
ESC_DELAY_S = 0.05  # how long a lone ESC waits for the rest of an arrow key's sequence


def parse(text: str) -> list[str]:
    """Key names in ``text``: printable keys as themselves, ``esc``, ``up``, ``pgdn``...
    An unknown escape sequence is skipped whole, so its letters are not taken as commands."""
    keys: list[str] = []
    position = 0
    while position < len(text):
        if text[position] != "\x1b":
            keys.append(text[position])
            position += 1
            continue
        match = _ANY_SEQUENCE.match(text, position)
        if match is None:
            keys.append("esc")
            position += 1
            continue
        if match.group(0) in SEQUENCES:
            keys.append(SEQUENCES[match.group(0)])
        position = match.end()
    return keys


@contextmanager
def cbreak(fd: int) -> Iterator[None]:
    """The terminal on ``fd`` in cbreak mode for the block; its settings restored on any exit."""
    saved = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd, termios.TCSANOW)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


class KeyReader:
    """Keys from a terminal file descriptor, waiting at most a given time (``select``, no thread)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.closed = False  # the terminal went away (EOF): no more keys will come

    def read(self, timeout: float) -> list[str] | None:
        """The keys pressed within ``timeout`` seconds, ``[]`` if none, ``None`` once input is closed."""
        if self.closed:
            return None
        if not select.select([self.fd], [], [], max(0.0, timeout))[0]:
            return []
        data = os.read(self.fd, 1024)
        if not data:
            self.closed = True
            return None
        # A lone trailing ESC is the Esc key or the first byte of a sequence still in flight.
        while data.endswith(b"\x1b") and select.select([self.fd], [], [], ESC_DELAY_S)[0]:
            more = os.read(self.fd, 1024)
            if not more:
                break
            data += more
        return parse(data.decode("utf-8", "replace"))
