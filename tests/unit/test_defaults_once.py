"""Each default written once: a guard against a second copy coming back.

The settings models (``ControllerSettings``, the inventory's ``Agent``, ``JobSpec``) hold every default.
A copy is the same number given, anywhere else in the package, as the default of something named
like the setting: a constant (``DEFAULT_LEASE_S = 15.0``), a field (``connect_timeout: float = 10.0``),
a parameter (``lease_s: float = 15.0``), a flag (``--gpus ... default=0``), or a flag's bounds
(``IntRange(0, 64)``). Other numbers (exit codes, buffer sizes, widths) are not settings and are not
looked at, so the guard does not trip on them."""

from __future__ import annotations

import ast
import dataclasses
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import BaseModel

import fleetctl
from fleetctl.inventory.config import Agent
from fleetctl.jobs.model import JobSpec
from fleetctl.settings import ControllerSettings

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

pytestmark = pytest.mark.no_store  # never opens a store: the PostgreSQL pass deselects it

PACKAGE = Path(fleetctl.__file__).resolve().parent
ROOT = PACKAGE.parent
AGENT_SETTINGS = ("connect_timeout_s", "command_timeout_s")  # the per-agent values; ssh_port is OpenSSH's 22
JOB_SETTINGS = ("gpus", "retries", "priority", "min_free_mem_mib")
# Other names a setting went by as a copy (fanout's ``DEFAULT_TIMEOUT_S`` was the command timeout).
ALIASES = {"command_timeout_s": {"default_timeout_s"}}
# Named like a setting, yet another thing: (a folder or file the module's path contains, the name).
NOT_SETTINGS = {("store", "CONNECT_TIMEOUT_S")}  # PostgreSQL's connect timeout, not SSH's per hop


def _settings() -> Iterator[tuple[type[BaseModel], str]]:
    yield from ((ControllerSettings, name) for name in ControllerSettings.model_fields)
    yield from ((Agent, name) for name in AGENT_SETTINGS)
    yield from ((JobSpec, name) for name in JOB_SETTINGS)


def _stem(name: str) -> str:
    name = name.lower().lstrip("_").removeprefix("default_")
    return name.removesuffix("_s")


def _number(node: ast.AST | None) -> float | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return node.value
    if isinstance(node, ast.Call):  # Field(default=...) and the like
        return next((_number(k.value) for k in node.keywords if k.arg == "default"), None)
    return None


def _name(target: ast.AST) -> str | None:
    if isinstance(target, ast.Name):
        return target.id
    return target.attr if isinstance(target, ast.Attribute) else None


def _flag_name(call: ast.Call) -> str | None:
    """``click.option("--max-parallel-ssh", ...)`` -> ``max_parallel_ssh``."""
    for arg in call.args:
        if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and arg.value.startswith("--"):
            return arg.value[2:].replace("-", "_")
    return None


def default_sites(tree: ast.AST) -> Iterator[tuple[str, float, int]]:
    """(name, number, line) of every number given as the default of something named."""
    for node in ast.walk(tree):
        if isinstance(node, ast.AnnAssign) and (name := _name(node.target)) and (value := _number(node.value)) is not None:
            yield name, value, node.lineno
        elif isinstance(node, ast.Assign) and (value := _number(node.value)) is not None:
            yield from ((name, value, node.lineno) for target in node.targets if (name := _name(target)))
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            positional = [*node.args.posonlyargs, *node.args.args]
            pairs = [*zip(positional[len(positional) - len(node.args.defaults):], node.args.defaults, strict=True),
                     *zip(node.args.kwonlyargs, node.args.kw_defaults, strict=True)]
            yield from ((arg.arg, value, node.lineno) for arg, default in pairs if (value := _number(default)) is not None)
        elif isinstance(node, ast.Call):
            flag = _flag_name(node)
            for keyword in node.keywords:
                value = _number(keyword.value)
                if value is None or keyword.arg is None:
                    continue
                if keyword.arg == "default" and flag:
                    yield flag, value, node.lineno
                elif keyword.arg != "default" and not (isinstance(node.func, ast.Name) and node.func.id == "Field"):
                    yield keyword.arg, value, node.lineno


def range_sites(tree: ast.AST) -> Iterator[tuple[tuple[float, ...], int]]:
    """The literal bounds of every ``IntRange(low, high)`` / ``FloatRange(low, high)`` (one bound alone,
    such as ``IntRange(1)``, says too little to be a copy)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and _name(node.func) in ("IntRange", "FloatRange"):
            numbers = tuple(_number(arg) for arg in node.args)
            if len(numbers) == 2 and all(n is not None for n in numbers):
                yield numbers, node.lineno  # type: ignore[misc]


def _modules() -> Iterator[tuple[str, ast.AST]]:
    for path in sorted(PACKAGE.rglob("*.py")):
        yield str(path.relative_to(ROOT)), ast.parse(path.read_text(encoding="utf-8"))


def _matches(setting: str, name: str, module: str = "") -> bool:
    if any(part in module and name == other for part, other in NOT_SETTINGS):
        return False
    return _stem(name) == _stem(setting) or name.lower() in ALIASES.get(setting, ())


def _bounds(model: type[BaseModel], name: str) -> tuple[float, ...]:
    rules = {type(rule).__name__: next(iter(dataclasses.asdict(rule).values()))  # annotated_types.Ge(ge=0) and the like
             for rule in model.model_fields[name].metadata if dataclasses.is_dataclass(rule)}
    return tuple(rules[kind] for kind in ("Ge", "Gt", "Le", "Lt") if kind in rules)


def test_each_numeric_default_is_written_once_in_the_package() -> None:
    sites = [(module, name, value, line) for module, tree in _modules() for name, value, line in default_sites(tree)]
    copies: list[str] = []
    for model, setting in _settings():
        default = model.model_fields[setting].default
        if not isinstance(default, (int, float)) or isinstance(default, bool):
            continue
        found = [f"{module}:{line} {name} = {value!r}" for module, name, value, line in sites
                 if _matches(setting, name, module) and value == default]
        if len(found) != 1:
            copies.append(f"{model.__name__}.{setting} = {default!r} written {len(found)} times: {found}")
    assert not copies, "read the default from the model (fleetctl.settings.default_of) instead:\n" + "\n".join(copies)


def test_no_flag_writes_a_models_bounds_by_hand() -> None:
    bounds = {_bounds(model, name): f"{model.__name__}.{name}" for model, name in _settings() if len(_bounds(model, name)) == 2}
    copies = [f"{module}:{line} {numbers} are the bounds of {bounds[numbers]} (use cli.common.option_range)"
              for module, tree in _modules() for numbers, line in range_sites(tree) if numbers in bounds]
    assert not copies, "\n".join(copies)


def test_no_help_text_writes_a_default_number_by_hand() -> None:
    """``(default 10)`` in a help string goes stale when the model changes: format it from the model."""
    pattern = re.compile(r"\bdefault:? \d")
    written = [f"{module}:{node.lineno} {node.value!r}" for module, tree in _modules() for node in ast.walk(tree)
               if isinstance(node, ast.Constant) and isinstance(node.value, str) and pattern.search(node.value)]
    assert not written, "\n".join(written)


def test_the_version_is_written_once() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "fleetctl.__version__"}
    versions = [module for module, tree in _modules() for node in ast.walk(tree)
                if isinstance(node, ast.Assign) and any(_name(t) == "__version__" for t in node.targets)]
    assert versions == ["fleetctl/__init__.py"]


def test_the_guard_finds_a_copy_where_there_is_one() -> None:
    copy = ast.parse("DEFAULT_LEASE_S = 15.0\n"
                     "class Route:\n    connect_timeout: float = 10.0\n"
                     "def serve(lease_s: float = 15.0, *, grace_s: float = 10.0) -> None: ...\n"
                     "opt = click.option('--gpus', type=click.IntRange(0, 64), default=0)\n"
                     "Membership(store, lease_s=15)\n"
                     "DEFAULT_TIMEOUT_S = 30.0\n"
                     "subprocess.run(command, timeout=30)\n"
                     "EXIT_SOME_FAILED = 3\n")
    sites = list(default_sites(copy))
    assert [(n, v) for n, v, _ in sites if _matches("lease_s", n)] == [("DEFAULT_LEASE_S", 15.0), ("lease_s", 15.0), ("lease_s", 15)]
    assert [(n, v) for n, v, _ in sites if _matches("connect_timeout_s", n)] == [("connect_timeout", 10.0)]
    assert [(n, v) for n, v, _ in sites if _matches("gpus", n)] == [("gpus", 0)]
    assert [(n, v) for n, v, _ in sites if _matches("command_timeout_s", n)] == [("DEFAULT_TIMEOUT_S", 30.0)]
    assert not _matches("connect_timeout_s", "CONNECT_TIMEOUT_S", "fleetctl/store_pg.py")
    assert not [n for n, _, _ in sites if _matches("kill_grace_s", n) or _matches("offline_after_misses", n)]
    assert [b for b, _ in range_sites(copy)] == [(0, 64)] and _bounds(JobSpec, "gpus") == (0, 64)
