"""SSH, and only SSH: the one package that imports paramiko. A newcomer's map:

    resolve.py      where a host is and how to log in: ssh_config via `ssh -G` (or config_file.py's subset)
    config_file.py  ssh_config read like OpenSSH's readconf.c, with file:line provenance
    connection.py   connect along a route (bastions, ProxyCommand); run / read / write / close
    loop.py         paramiko's Transport with its read loop movable: own thread until login, then...
    reader.py       ...one thread that reads every direct connection (not one thread each)
    lean_sync.py    paramiko's per-connection Events and Conditions at a tenth of the memory
    session.py      the kept-open shell that runs each heartbeat's script
    auth.py         which keys are offered, in OpenSSH's order: agent, IdentityFile, certificates
    hostkeys.py     judging a host key: pin, known_hosts, StrictHostKeyChecking, trust on first use
    known_hosts.py  known_hosts files read as OpenSSH reads them; fleetctl's own TOFU file
    proxy.py        ProxyCommand as the first hop's transport
    fabric_policy.py  hostkeys.py's judgement inside fabric.Connection (for fleetctl.fabric)
    errors.py       the one table that turns paramiko/socket errors into fleetctl's

Nothing here knows about GPUs, jobs or the store; policy (timeouts as health, retries,
concurrency) lives above.
"""

import importlib.util
import sys
import types


def _import_paramiko_without_invoke() -> None:
    """``import paramiko`` imports ``invoke`` (for ``Match exec`` in paramiko's own SSHConfig, which
    fleetctl never uses: ssh_config is resolved by ``ssh -G`` or config_file.py) whenever fabric's
    dependencies are installed: about 6 MiB of every process. Hold invoke back while paramiko loads,
    then hand paramiko.config a stand-in that imports invoke on first use, so ``Match exec`` (fabric's
    SSHConfig) still works and ``import invoke`` / ``import fabric`` later load it as usual."""
    if "paramiko" in sys.modules or "invoke" in sys.modules or importlib.util.find_spec("invoke") is None:
        return
    sys.modules["invoke"] = None  # type: ignore[assignment]  # makes `import invoke` raise ImportError
    try:
        import paramiko.config
    finally:
        del sys.modules["invoke"]

    class _LazyInvoke(types.ModuleType):
        def __getattr__(self, name: str) -> object:
            import invoke

            paramiko.config.invoke = invoke
            return getattr(invoke, name)

    if getattr(paramiko.config, "invoke", None) is None:
        paramiko.config.invoke = _LazyInvoke("invoke")
        paramiko.config.invoke_import_error = None


_import_paramiko_without_invoke()

from fleetctl.ssh.connection import ConnectOptions, SSHConnection, connect, probe_host_key  # noqa: E402
from fleetctl.ssh.hostkeys import HostKeyPolicy  # noqa: E402
from fleetctl.ssh.known_hosts import KnownHosts, fingerprint  # noqa: E402
from fleetctl.ssh.resolve import Resolved, SshConfigResolver, SshOptions  # noqa: E402

__all__ = ["ConnectOptions", "HostKeyPolicy", "KnownHosts", "Resolved", "SSHConnection", "SshConfigResolver",
           "SshOptions", "connect", "fingerprint", "probe_host_key"]
