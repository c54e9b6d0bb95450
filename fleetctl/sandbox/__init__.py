"""A local fleet of real OpenSSH servers for tests and ``fleetctl demo``."""

from fleetctl.sandbox.sandbox import MODES, HostSpec, Sandbox, default_hosts, sandbox_dir

__all__ = ["MODES", "HostSpec", "Sandbox", "default_hosts", "sandbox_dir"]
