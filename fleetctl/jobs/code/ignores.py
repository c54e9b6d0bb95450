"""Which paths of a code directory a snapshot leaves out, decided as git decides (pathspec implements
git's wildmatch rules; this module adds how git stacks the files).

Git's order, kept here: the ``.gitignore`` of the deepest directory that has a matching pattern
decides, and within one file the last matching line wins (so ``!keep.log`` after ``*.log``
re-includes); a directory that is ignored is not entered, so nothing below it can be re-included;
``.git/info/exclude`` ranks below every ``.gitignore``. A ``.fleetctlignore`` sits beside them with
the same syntax and outranks the ``.gitignore`` of its own directory (its lines come after). When
the code directory is inside a repository, the ``.gitignore`` files between the repository's root
and the directory apply too, as ``git status`` run there would apply them. ``.git`` itself is always
left out. (Not read: the user's global ``core.excludesFile``, which is per machine, not per project;
and the index: a tracked file that matches an ignore pattern is left out here, where git keeps it.)
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from pathspec import GitIgnoreSpec

IGNORE_FILES = (".gitignore", ".fleetctlignore")  # read in this order: the later one outranks
ALWAYS_LEFT_OUT = frozenset({".git"})


@dataclass(frozen=True)
class Level:
    """The ignore patterns of one directory: ``base`` is its path from the rules' root ('' or 'a/b/')."""

    base: str
    spec: GitIgnoreSpec


@dataclass
class IgnoreRules:
    """A stack of :class:`Level` from the root down to the directory being walked."""

    levels: list[Level] = field(default_factory=list)

    def decide(self, path: str, is_dir: bool) -> bool:
        """True if ``path`` (posix, relative to the rules' root) is ignored. Pure."""
        if path.rsplit("/", 1)[-1] in ALWAYS_LEFT_OUT:
            return True
        for level in reversed(self.levels):  # deepest first: the first level with a match decides
            if level.base and not path.startswith(level.base):
                continue
            relative = path[len(level.base):] + ("/" if is_dir else "")
            verdict = level.spec.check_file(relative).include
            if verdict is not None:
                return bool(verdict)
        return False

    def below(self, base: str, lines: Iterable[str]) -> IgnoreRules:
        """These rules with one more level (``lines`` of the directory ``base``); self if it has none."""
        patterns = [line for line in lines if line.strip()]
        if not patterns:
            return self
        return IgnoreRules([*self.levels, Level(base, GitIgnoreSpec.from_lines(patterns))])


def read_lines(directory: Path, names: Iterable[str] = IGNORE_FILES) -> list[str]:
    """The lines of the ignore files in ``directory`` that exist, in rank order (unreadable ones count as empty)."""
    lines: list[str] = []
    for name in names:
        try:
            lines.extend((directory / name).read_text(encoding="utf-8", errors="surrogateescape").splitlines())
        except OSError:
            continue
    return lines


def repository_root(directory: Path) -> Path | None:
    """The nearest directory at or above ``directory`` that holds a ``.git``, as git finds it."""
    for candidate in (directory, *directory.parents):
        if (candidate / ".git").exists():
            return candidate
    return None


def rules_for(directory: Path) -> tuple[IgnoreRules, str]:
    """The rules that apply at ``directory`` before its own ignore files are read, and its path
    from the rules' root ('' or 'sub/dir/'): inside a repository, its root's ``info/exclude``
    and the ``.gitignore`` files from the root down to ``directory``'s parent."""
    root = repository_root(directory)
    if root is None:
        return IgnoreRules(), ""
    rules = IgnoreRules()
    exclude = read_lines(root / ".git" / "info", ("exclude",)) if (root / ".git").is_dir() else []
    prefix = directory.relative_to(root).as_posix()
    prefix = "" if prefix == "." else prefix + "/"
    parts = prefix.rstrip("/").split("/") if prefix else []
    # info/exclude ranks below the root's .gitignore: its lines come first in the root level.
    rules = rules.below("", exclude + (read_lines(root, (".gitignore",)) if parts else []))
    for depth in range(1, len(parts)):
        base = "/".join(parts[:depth]) + "/"
        rules = rules.below(base, read_lines(root / base, (".gitignore",)))
    return rules, prefix


def listdir_sorted(directory: str) -> list[os.DirEntry[str]]:
    """A directory's entries in a stable order (the manifest and its hash do not depend on the filesystem)."""
    with os.scandir(directory) as entries:
        return sorted(entries, key=lambda entry: entry.name)
