"""The public face of ``fleetctl`` is exactly ``__all__`` (after httpx's tests/test_exported_members.py),
and ``Fleet``'s public methods are exactly those a notebook user calls."""

import importlib
import subprocess
import sys
import types
from pathlib import Path

import fleetctl

PUBLIC = [
    "Agent", "AuthError", "Bastion", "CommandFailed", "CommandResult", "CommandTimeout", "ConfigError",
    "ConnectTimeout", "ConnectionLost", "DriverError", "Fleet", "FleetError", "GpuSample", "HeartbeatRound",
    "HostBasics", "HostKeyError", "InvalidQueryError", "Inventory", "Job", "JobError", "JobRecord", "JobResult",
    "JobSpec", "LeaseLost", "NoGpusError", "OutputTooLarge", "ParseError", "RemoteFileError", "RemoteFileNotFound",
    "Registration", "SandboxError", "StoreError", "Sweep", "SweepRecord", "TelemetrySnapshot", "ToolMissingError", "TransportError",
    "UnknownAgentError", "UnreachableError", "__version__", "load_config", "parse_gpu_output", "register_ssh",
]
# The parts of the package (tests/test_layers.py draws them): namespaces one imports from
# (fleetctl.testing, fleetctl.sandbox, fleetctl.ssh ...), never names of the API itself.
PARTS = {"errors", "settings", "paths", "ssh", "store", "inventory", "telemetry", "hosts", "jobs", "fleet",
         "fabric", "testing", "serve", "cli", "sandbox"}
NOTEBOOK_METHODS = {"agents", "close", "drain", "from_config", "health", "heartbeat", "heartbeat_each", "history",
                    "inventory", "job", "jobs", "run", "settings", "submit", "submit_sweep", "sweep"}


def test_public_api_is_exactly_all() -> None:
    assert sorted(fleetctl.__all__) == sorted(PUBLIC)
    # A fresh interpreter: what `import fleetctl` alone exposes, not what other tests imported.
    probe = ("import fleetctl, json, types; print(json.dumps(sorted(n for n, v in vars(fleetctl).items() "
             "if not n.startswith('_') and not isinstance(v, types.ModuleType))))")
    names = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert set(__import__("json").loads(names)) == set(fleetctl.__all__) - {"__version__"}
    for name in fleetctl.__all__:
        assert hasattr(fleetctl, name)


def test_the_only_modules_on_fleetctl_are_its_parts() -> None:
    for part in PARTS:
        importlib.import_module(f"fleetctl.{part}")
    modules = {n for n, v in vars(fleetctl).items() if isinstance(v, types.ModuleType) and not n.startswith("_")}
    assert modules == PARTS, modules ^ PARTS


def test_fleet_offers_what_a_notebook_calls_and_no_plumbing() -> None:
    """The host core underneath is ``fleet.hosts``, for the library's own layers (serve, the CLI, jobs)."""
    public = {n for n in dir(fleetctl.Fleet) if not n.startswith("_")}
    assert public == NOTEBOOK_METHODS, public ^ NOTEBOOK_METHODS


def test_every_exception_is_in_the_one_tree_and_its_docstring() -> None:
    tree = fleetctl.errors.__doc__ or ""
    package = Path(fleetctl.__file__).parent
    for path in package.rglob("*.py"):
        if path.name == "__main__.py":  # runs the CLI when imported
            continue
        module = "fleetctl." + ".".join(path.relative_to(package).with_suffix("").parts).removesuffix(".__init__")
        loaded = importlib.import_module(module)
        for name, value in vars(loaded).items():
            if isinstance(value, type) and issubclass(value, fleetctl.FleetError) and value.__module__ == module:
                assert name in tree, f"{module}.{name} is not drawn in fleetctl/errors.py's tree"


def test_only_the_ssh_module_imports_paramiko() -> None:
    package = Path(fleetctl.__file__).parent
    importers = sorted(str(p.relative_to(package)) for p in package.rglob("*.py") if "import paramiko" in p.read_text())
    assert importers and all(i.startswith("ssh/") for i in importers), importers
