"""SSH, and only SSH: the one package that imports paramiko. A newcomer's map:

    resolve.py      where a host is and how to log in: ssh_config via `ssh -G` (or config_file.py's subset)
    config_file.py  ssh_config read like OpenSSH's readconf.c, with file:line provenance
    connection.py   one host's connection: run / read / write / close
    link.py         one logged-in transport to one hop: TCP, ProxyCommand, or a bastion's channel
    hops.py         bastion links shared by every host behind them (ControlMaster); login gates
    fastpath.py     the fence: which paramiko the fast path trusts; FLEETCTL_SSH_FAST=0 is stock
    loop.py         (fast path) paramiko's Transport with its read loop movable: own thread until login, then...
    reader.py       (fast path) ...one thread that reads every logged-in connection (not one thread each)
    lean_sync.py    (fast path) lean Events and Conditions for the objects fleetctl creates
    lean_swap.py    (fast path) puts them into fleetctl's own transports and channels, one by one
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

from fleetctl.ssh.connection import Connector, SSHConnection, connect, probe_host_key
from fleetctl.ssh.hostkeys import HostKeyPolicy
from fleetctl.ssh.known_hosts import KnownHosts, fingerprint
from fleetctl.ssh.link import ConnectOptions
from fleetctl.ssh.resolve import Resolved, SshConfigResolver, SshOptions

__all__ = ["ConnectOptions", "Connector", "HostKeyPolicy", "KnownHosts", "Resolved", "SSHConnection", "SshConfigResolver",
           "SshOptions", "connect", "fingerprint", "probe_host_key"]
