"""The documentation site (docs/, built by mkdocs) and the README: their examples run, so they cannot rot.

Conventions (written for authors in docs/development.md):
- a ```python block runs; the blocks of one page run in order in one namespace, against a sandbox
  fleet of three hosts that is the default inventory ($FLEETCTL_CONFIG) in an isolated home;
  ```{.python .notest} is shown only (it needs your own fleet, or runs inside a job);
- a ```{.sh .tested} block runs in bash (-e: every line must succeed) in an empty directory;
- a ```toml block is a valid inventory; a shell line starting with `fleetctl` names a real command.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import click
import pytest
from markdown_it import MarkdownIt

import fleetctl
from fleetctl.sandbox import Sandbox, default_hosts

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.glob("*.md"))
SNIPPET = re.compile(r'^--8<-- "([^"]+)"$', re.MULTILINE)  # pymdownx.snippets, base_path "." (mkdocs.yml)


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # of the block's first line of code, 1-based
    lang: str
    classes: frozenset[str]
    text: str

    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def _info(info: str) -> tuple[str, frozenset[str]]:
    """```python -> ("python", {}); ```{.python .notest} (Material's attribute form) -> ("python", {"notest"})."""
    info = info.strip()
    if not info.startswith("{"):
        return (info.split() or [""])[0], frozenset()
    words = [w[1:] for w in info.strip("{} ").split() if w.startswith(".")]
    return (words[0] if words else ""), frozenset(words[1:])


def blocks(path: Path) -> list[Block]:
    found = []
    for token in MarkdownIt("commonmark").parse(path.read_text()):
        if token.type == "fence" and token.map:
            lang, classes = _info(token.info)
            text = SNIPPET.sub(lambda m: (ROOT / m.group(1)).read_text(), token.content)
            found.append(Block(path, token.map[0] + 2, lang, classes, text))
    return found


ALL_BLOCKS = [block for page in PAGES for block in blocks(page)]


def _runnable_pages() -> list[Path]:
    return [page for page in PAGES if any(b.lang == "python" and "notest" not in b.classes for b in blocks(page))]


@pytest.fixture(scope="module")
def docs_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    """The sandbox `fleetctl sandbox up --hosts 3` makes: gpu-1 (NVIDIA), gpu-2 (AMD), gpu-3 behind the bastion."""
    sandbox = Sandbox(tmp_path_factory.mktemp("docs-fleet"), default_hosts(3))
    sandbox.up()
    yield sandbox
    sandbox.down()


@pytest.mark.parametrize("page", _runnable_pages(), ids=lambda p: p.name)
def test_python_examples_run(page: Path, docs_fleet: Sandbox, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEETCTL_CONFIG", str(docs_fleet.inventory_path))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.chdir(tmp_path)
    # Fabric (invoke) copies our stdin to the remote command; pytest's refuses reads: /dev/null, as cron's.
    devnull = open(os.devnull)  # noqa: SIM115  (closed below)
    monkeypatch.setattr(sys, "stdin", devnull)
    namespace: dict[str, object] = {"__name__": "__docs__"}
    try:
        for block in blocks(page):
            if block.lang != "python" or "notest" in block.classes:
                continue
            # Padded so that a traceback names the page's own line numbers.
            code = compile("\n" * (block.line - 1) + block.text, str(block.path), "exec")
            try:
                exec(code, namespace)
            except Exception as exc:
                raise AssertionError(f"the example at {block.where()} failed: {type(exc).__name__}: {exc}") from exc
    finally:
        if "matplotlib.pyplot" in sys.modules:
            sys.modules["matplotlib.pyplot"].close("all")
        for value in namespace.values():  # a page that left a fleet open: close its connections
            if isinstance(value, fleetctl.Fleet):
                value.close()
        devnull.close()


TESTED_SHELL = [b for b in ALL_BLOCKS if b.lang == "sh" and "tested" in b.classes]


def test_some_shell_example_is_run() -> None:
    assert TESTED_SHELL, "no ```{.sh .tested} block in docs/: at least one CLI example runs against a sandbox"


@pytest.mark.parametrize("block", TESTED_SHELL, ids=Block.where)
def test_tested_shell_examples_run(block: Block, tmp_path: Path) -> None:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    try:
        done = subprocess.run(["bash", "-euxo", "pipefail", "-c", block.text], cwd=tmp_path, env=env,
                              capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120)
    finally:
        for state in tmp_path.rglob("sandbox.json"):  # the block failed before its `sandbox down`
            subprocess.run([sys.executable, "-m", "fleetctl", "sandbox", "down", "--dir", str(state.parent)],
                           capture_output=True, env=env, timeout=60)
    assert done.returncode == 0, f"{block.where()}: exit {done.returncode}\n{done.stdout}\n{done.stderr}"


@pytest.mark.no_store
@pytest.mark.parametrize("block", [b for b in ALL_BLOCKS if b.lang == "toml"], ids=Block.where)
def test_toml_examples_are_valid_inventories(block: Block) -> None:
    from fleetctl.inventory.config import parse_inventory

    parse_inventory(block.text, Path(block.where()))  # raises ConfigError naming the line


def _command_of(words: list[str]) -> click.Command | None:
    """The click command a `fleetctl ...` line runs, its options (and their values) skipped; None if unknown."""
    from fleetctl.cli import cli

    command: click.Command = cli
    context = click.Context(cli)
    rest = iter(words[1:])
    for word in rest:
        if not isinstance(command, click.Group):
            break
        if word.startswith("-"):
            option = next((p for p in command.params if isinstance(p, click.Option) and word.split("=")[0] in p.opts), None)
            if option is not None and not option.is_flag and "=" not in word:
                next(rest, None)
            continue
        found = command.get_command(context, word)
        if found is None:
            return None
        command = found
    return None if isinstance(command, click.Group) else command


@pytest.mark.no_store
def test_every_fleetctl_line_names_a_real_command() -> None:
    lines = [(b, line) for b in ALL_BLOCKS + blocks(ROOT / "README.md") if b.lang == "sh"
             for line in b.text.replace("\\\n", " ").splitlines() if line.startswith("fleetctl ")]
    assert len(lines) > 30
    unknown = [f"{b.where()}: {line}" for b, line in lines
               if _command_of(shlex.split(line.replace("[", "").replace("]", ""), comments=True)) is None]
    assert not unknown, unknown


def _status_rows(section: str) -> dict[str, str]:
    text = (DOCS / "troubleshooting.md").read_text()
    body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `(\w+)` \| [^|]+ \| ([^|]+) \|$", body, re.MULTILINE)
    return {status: fix.strip() for status, fix in rows}


@pytest.mark.no_store
def test_every_heartbeat_status_has_its_fix_in_troubleshooting() -> None:
    statuses = set(typing.get_args(fleetctl.TelemetrySnapshot.model_fields["status"].annotation))
    rows = _status_rows("Heartbeat statuses")
    assert set(rows) == statuses
    assert all(rows.values())


@pytest.mark.no_store
def test_every_run_status_has_its_fix_in_troubleshooting() -> None:
    from fleetctl.hosts.fanout import Status

    rows = _status_rows("`fleetctl run` statuses")
    assert set(rows) == set(typing.get_args(Status))
    assert all(rows.values())


@pytest.mark.no_store
def test_the_api_page_documents_exactly_the_public_names() -> None:
    documented = re.findall(r"^::: fleetctl\.(\w+)$", (DOCS / "api.md").read_text(), re.MULTILINE)
    assert sorted(documented) == sorted(name for name in fleetctl.__all__ if name != "__version__")


@pytest.mark.no_store
def test_every_readme_example_is_a_docs_example() -> None:
    """The README is the front door; its examples are copies of the docs' ones, which run here."""
    in_docs = {b.text.strip() for b in ALL_BLOCKS}
    readme = blocks(ROOT / "README.md")
    assert readme
    assert [b.where() for b in readme if b.text.strip() not in in_docs] == []


@pytest.mark.no_store
def test_readme_links_into_the_docs_exist() -> None:
    links = re.findall(r"\]\((docs/[^)#]+)", (ROOT / "README.md").read_text())
    assert links
    assert [link for link in links if not (ROOT / link).is_file()] == []


@pytest.mark.no_store
def test_every_documented_metric_is_exported() -> None:
    source = "".join(p.read_text() for p in (ROOT / "fleetctl").rglob("*.py"))
    names = set(re.findall(r"\b(DCGM_FI_\w+|fleetctl_\w+)", (DOCS / "prometheus.md").read_text()))
    assert len(names) > 10
    assert sorted(name for name in names if name not in source) == []
