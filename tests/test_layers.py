"""The folder listing is the architecture: each part imports only the parts below it.

    cli, sandbox     the commands; a sandbox fleet of real sshd for tests and the demo
    serve, fleet.py  the controller and its Prometheus exporter; the notebook facade (and fabric.py,
                     testing.py: the Fabric bridge and the shipped fake connection)
    jobs             the queue, placement, dispatch and collection
    hosts            the host core: connections, heartbeat rounds, fan-out, register-ssh, doctor, trust
    telemetry        snapshots, the heartbeat, parsers, GPU health, history
    inventory        ssh-agents.toml, routes (ssh_config resolved), labels
    store            the Store interface, SQLite and PostgreSQL, leases
    ssh              the one package that imports paramiko
    errors, settings, paths, _text, _durations   leaves

Imports made only for type checking (``if TYPE_CHECKING:``) are not counted: they never run.
"""

from __future__ import annotations

import ast
from pathlib import Path

import fleetctl

PACKAGE = Path(fleetctl.__file__).parent
LAYERS = [
    {"errors", "settings", "paths", "_text", "_durations"},
    {"ssh"},
    {"store"},
    {"inventory"},
    {"telemetry"},
    {"hosts"},
    {"jobs"},
    {"fleet", "fabric", "testing", "serve", "__init__"},
    {"cli", "sandbox", "__main__"},
]
LEVEL = {part: level for level, parts in enumerate(LAYERS) for part in parts}


def _part(module: str) -> str:
    """fleetctl.ssh.link -> ssh; fleetctl.fleet -> fleet; fleetctl -> __init__."""
    return module.split(".")[1] if module.count(".") else "__init__"


def _runtime_imports(tree: ast.Module) -> set[str]:
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(child) for stmt in node.body for child in ast.walk(stmt))
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom) and node.module == "fleetctl":
            found.update("fleetctl." + alias.name for alias in node.names if alias.name in LEVEL)
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fleetctl."):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("fleetctl."))
    return found


def test_every_part_is_in_a_layer() -> None:
    parts = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()
             if p.suffix == ".py" or (p / "__init__.py").exists()}
    assert parts == set(LEVEL), parts ^ set(LEVEL)


def test_imports_only_point_down() -> None:
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE)
        here = "__init__" if relative == Path("__init__.py") else relative.parts[0].removesuffix(".py")
        for imported in _runtime_imports(ast.parse(path.read_text())):
            there = _part(imported)
            if there != here and LEVEL[there] > LEVEL[here]:
                upward.append(f"fleetctl/{relative} ({here}) imports {imported} ({there})")
    assert not upward, "\n".join(upward)
