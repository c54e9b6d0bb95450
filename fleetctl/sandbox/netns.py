"""Network namespaces that make bastions necessary, not decorative.

    controller (root ns) --veth-- dmz ns --veth-- lan ns --veth-- deep ns
         198.18.B.1       198.18.B.2   .B+1.1   .B+1.x  .B+2.1    .B+2.x

New namespaces do not forward packets and the controller has routes only to 198.18.B.0/24, so a
host in ``lan`` is reachable only through a bastion in ``dmz``, and one in ``deep`` only through a
second bastion in ``lan``. 198.18.0.0/15 is the range set aside for benchmarking networks, so
it collides with nothing real. A fourth subnet holds a black-holed address: a static neighbour
entry points it at a MAC nobody has, so a connect to it hangs until its timeout, like a firewall
that drops packets.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field

from fleetctl.errors import SandboxError

ZONES = ("dmz", "lan", "deep")
MAX_SLOTS = 64


def available() -> bool:
    """Namespaces need root and iproute2."""
    return os.geteuid() == 0 and shutil.which("ip") is not None


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and result.returncode != 0:
        raise SandboxError(f"`ip {' '.join(args)}` failed: {result.stderr.strip()}")
    return result


@dataclass
class Topology:
    slot: int
    namespaces: list[str] = field(default_factory=list)
    root_links: list[str] = field(default_factory=list)

    @property
    def base(self) -> int:
        return self.slot * 4

    def ns(self, zone: str) -> str:
        return f"fl{self.slot}{zone}"

    def subnet(self, offset: int) -> str:
        return f"198.18.{self.base + offset}"

    @property
    def dmz_address(self) -> str:
        return f"{self.subnet(0)}.2"

    def zone_address(self, zone: str, host_number: int) -> str:
        """Address number ``host_number`` (from 10) in ``lan`` or ``deep``."""
        return f"{self.subnet(ZONES.index(zone))}.{10 + host_number}"

    @property
    def blackhole_address(self) -> str:
        return f"{self.subnet(3)}.9"

    def add_address(self, zone: str, address: str) -> None:
        _ip("-n", self.ns(zone), "addr", "add", f"{address}/24", "dev", zone_device(self, zone))

    def to_dict(self) -> dict[str, object]:
        return {"slot": self.slot, "namespaces": self.namespaces, "root_links": self.root_links}

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> Topology:
        return cls(int(data["slot"]), list(data["namespaces"]), list(data["root_links"]))  # type: ignore[call-overload]


def _claim_slot() -> Topology:
    existing = set(_ip("netns", "list").stdout.split())
    for slot in range(MAX_SLOTS):
        topology = Topology(slot)
        if topology.ns("dmz") in existing:
            continue
        # `ip netns add` fails if another sandbox took the slot meanwhile: that is our lock.
        if _ip("netns", "add", topology.ns("dmz"), check=False).returncode == 0:
            topology.namespaces.append(topology.ns("dmz"))
            return topology
    raise SandboxError("no free sandbox network slot", hint="run `fleetctl sandbox down` for old sandboxes")


def _link(topology: Topology, left_ns: str | None, left: str, right_ns: str, right: str,
          left_addr: str, right_addr: str) -> None:
    _ip("link", "add", left, "type", "veth", "peer", "name", right)
    if left_ns is None:
        topology.root_links.append(left)
    else:
        _ip("link", "set", left, "netns", left_ns)
    _ip("link", "set", right, "netns", right_ns)
    for ns, dev, addr in ((left_ns, left, left_addr), (right_ns, right, right_addr)):
        prefix = ["-n", ns] if ns else []
        _ip(*prefix, "addr", "add", f"{addr}/24", "dev", dev)
        _ip(*prefix, "link", "set", dev, "up")


def create() -> Topology:
    topology = _claim_slot()
    try:
        for zone in ZONES[1:]:
            _ip("netns", "add", topology.ns(zone))
            topology.namespaces.append(topology.ns(zone))
        for zone in ZONES:
            _ip("-n", topology.ns(zone), "link", "set", "lo", "up")
        s = topology.slot
        _link(topology, None, f"fl{s}rout", topology.ns("dmz"), f"fl{s}din",
              f"{topology.subnet(0)}.1", topology.dmz_address)
        _link(topology, topology.ns("dmz"), f"fl{s}dout", topology.ns("lan"), f"fl{s}lin",
              f"{topology.subnet(1)}.1", f"{topology.subnet(1)}.2")
        _link(topology, topology.ns("lan"), f"fl{s}lout", topology.ns("deep"), f"fl{s}ein",
              f"{topology.subnet(2)}.1", f"{topology.subnet(2)}.2")
        # The black hole: a link whose far end has no address, and a neighbour entry for a MAC
        # that does not exist, so SYNs leave and nothing ever answers.
        _ip("netns", "add", f"fl{s}void")
        topology.namespaces.append(f"fl{s}void")
        _link_void(topology)
    except BaseException:
        destroy(topology)
        raise
    return topology


def _link_void(topology: Topology) -> None:
    s = topology.slot
    _ip("link", "add", f"fl{s}bh", "type", "veth", "peer", "name", f"fl{s}bhv")
    topology.root_links.append(f"fl{s}bh")
    _ip("link", "set", f"fl{s}bhv", "netns", f"fl{s}void")
    _ip("-n", f"fl{s}void", "link", "set", f"fl{s}bhv", "up")
    _ip("addr", "add", f"{topology.subnet(3)}.1/24", "dev", f"fl{s}bh")
    _ip("link", "set", f"fl{s}bh", "up")
    _ip("neigh", "replace", topology.blackhole_address, "lladdr", "02:00:00:00:00:09",
        "dev", f"fl{s}bh", "nud", "permanent")


# The veth end inside each zone that faces the controller side is named fl<slot><z>in.
def zone_device(topology: Topology, zone: str) -> str:
    return f"fl{topology.slot}{zone[0] if zone != 'deep' else 'e'}in"


def destroy(topology: Topology) -> None:
    """Remove everything ``create`` made; missing pieces are fine (idempotent)."""
    for link in topology.root_links:
        _ip("link", "del", link, check=False)
    for ns in reversed(topology.namespaces):
        _ip("netns", "del", ns, check=False)


def exec_prefix(topology: Topology | None, zone: str) -> list[str]:
    """Command prefix that runs a program inside ``zone`` (nothing for the controller's zone)."""
    if topology is None or zone == "direct":
        return []
    return ["ip", "netns", "exec", topology.ns(zone)]
