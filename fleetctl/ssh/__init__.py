"""SSH, and only SSH: the one package that imports paramiko.

    connection.py   connect along a route (bastions, ProxyCommand); run / read / write / close
    known_hosts.py  known_hosts files read as OpenSSH reads them; trust on first use

Nothing here knows about GPUs, jobs or the store; policy (timeouts as health, retries,
concurrency) lives above.
"""

from fleetctl.ssh.connection import ConnectOptions, HostKeyPolicy, SSHConnection, connect, lookup_ssh_config
from fleetctl.ssh.known_hosts import KnownHosts, fingerprint

__all__ = ["ConnectOptions", "HostKeyPolicy", "KnownHosts", "SSHConnection", "connect", "fingerprint",
           "lookup_ssh_config"]
