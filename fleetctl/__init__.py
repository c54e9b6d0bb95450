"""fleetctl: agentless control of a GPU fleet over plain SSH.

    >>> import fleetctl
    >>> fleet = fleetctl.Fleet.from_config()          # ~/.config/fleetctl/ssh-agents.toml
    >>> fleet.heartbeat().to_dataframe()              # one row per GPU
    >>> fleet.submit(["python3", "train.py"], gpus=2).wait().result
"""

__version__ = "0.1.0"

from fleetctl.errors import (
    AuthError,
    CommandFailed,
    CommandTimeout,
    ConfigError,
    ConnectionLost,
    ConnectTimeout,
    DriverError,
    FleetError,
    HostKeyError,
    InvalidQueryError,
    JobError,
    LeaseLost,
    NoGpusError,
    OutputTooLarge,
    ParseError,
    RemoteFileError,
    RemoteFileNotFound,
    SandboxError,
    StoreError,
    ToolMissingError,
    TransportError,
    UnknownAgentError,
    UnreachableError,
)
from fleetctl.fleet import Fleet, HeartbeatRound
from fleetctl.hosts.registration import Registration, register_ssh
from fleetctl.inventory.config import Agent, Bastion, Inventory, load_config
from fleetctl.jobs.api import Job
from fleetctl.jobs.model import JobRecord, JobResult, JobSpec, SweepRecord
from fleetctl.jobs.sweeps import Sweep
from fleetctl.ssh.seam import CommandResult
from fleetctl.telemetry.parsers import parse_gpu_output
from fleetctl.telemetry.snapshot import GpuSample, HostBasics, TelemetrySnapshot

__all__ = [
    "Agent", "AuthError", "Bastion", "CommandFailed", "CommandResult", "CommandTimeout", "ConfigError",
    "ConnectTimeout", "ConnectionLost", "DriverError", "Fleet", "FleetError", "GpuSample", "HeartbeatRound",
    "HostBasics", "HostKeyError", "InvalidQueryError", "Inventory", "Job", "JobError", "JobRecord", "JobResult",
    "JobSpec", "LeaseLost", "NoGpusError", "OutputTooLarge", "ParseError", "RemoteFileError", "RemoteFileNotFound",
    "Registration", "SandboxError", "StoreError", "Sweep", "SweepRecord", "TelemetrySnapshot", "ToolMissingError", "TransportError",
    "UnknownAgentError", "UnreachableError", "__version__", "load_config", "parse_gpu_output", "register_ssh",
]
