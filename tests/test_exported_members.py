import fleetctl


def test_public_api_is_pinned() -> None:
    assert sorted(fleetctl.__all__) == sorted([
        "Agent", "AuthError", "Bastion", "CommandFailed", "CommandResult", "CommandTimeout", "ConfigError",
        "ConnectTimeout", "ConnectionLost", "DriverError", "Fleet", "FleetError", "GpuSample", "HeartbeatRound",
        "HostBasics", "HostKeyError", "InvalidQueryError", "Inventory", "Job", "JobError", "JobRecord", "JobResult",
        "JobSpec", "LeaseLost", "NoGpusError", "OutputTooLarge", "ParseError", "RemoteFileError", "RemoteFileNotFound",
        "Registration", "SandboxError", "StoreError", "TelemetrySnapshot", "ToolMissingError", "TransportError",
        "UnknownAgentError", "UnreachableError", "__version__", "load_config", "parse_gpu_output", "register_ssh",
    ])
    for name in fleetctl.__all__:
        assert hasattr(fleetctl, name)


def test_only_the_ssh_module_imports_paramiko() -> None:
    from pathlib import Path
    package = Path(fleetctl.__file__).parent
    importers = sorted(str(p.relative_to(package)) for p in package.rglob("*.py") if "import paramiko" in p.read_text())
    assert importers and all(i.startswith("ssh/") for i in importers), importers
