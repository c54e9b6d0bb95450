"""Text from hosts and users, made safe to show: pure helpers, no I/O.

Everything a host sends (GPU names, tool errors, job output shown in tables) and everything a user
types (job names, labels) is data. It must never move the cursor, set a window title, open an OSC 8
link or be read as rich markup, so the CLI shows it through :func:`visible` and never with markup on.
"""

from __future__ import annotations

import re

# C0 controls (tab and newline included: a table cell is one line), DEL, C1 controls, and the
# Unicode bidi overrides/isolates that can make a line read differently from what it holds.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group(0))
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def visible(text: object, limit: int | None = None) -> str:
    """``text`` with every control character shown as an escape (``\\x1b``), cut to ``limit``."""
    shown = _UNSAFE.sub(_escape, str(text))
    if limit is not None and len(shown) > limit:
        shown = shown[: max(0, limit - 3)] + "..."
    return shown


def one_line(text: object, limit: int = 600) -> str:
    """Whitespace runs (newlines included) folded to one space, controls made visible, cut to ``limit``."""
    return visible(" ".join(str(text).split()), limit)
