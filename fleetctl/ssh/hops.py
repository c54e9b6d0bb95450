"""Shared hops: every host behind the same bastion rides on one SSH connection to it, as OpenSSH's
ControlMaster, Fabric's ``gateway=`` and asyncssh's ``tunnel=`` do.

Hosts whose routes begin with the same hops (the same resolved address, port, user, keys and
ProxyCommand: the same :class:`~fleetctl.ssh.seam.Hop` values) share one logged-in link to each of
them, at every level of a chain; each host behind is a ``direct-tcpip`` channel on it. A bastion's
sshd thus sees one login per round, not one per host (at OpenSSH's default ``MaxStartups 10:30:100``
the eleventh concurrent login may be dropped).

- A link is opened by the first host that needs it; the others wait for that one attempt. If it
  fails, they all get its error (``bastion_unreachable`` naming the bastion), and nobody tries that
  bastion again for ``ConnectOptions.hop_retry_after_s``: one connect timeout per round, not per host.
- A link that died (the bastion restarted) is replaced by the next host that asks: one reconnect
  for every host behind it. A link is closed when the last connection riding on it closes.
- Logins to any one sshd run at most ``ConnectOptions.handshakes_per_sshd`` at a time.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from fleetctl.errors import TransportError
from fleetctl.ssh.link import ConnectOptions, Link
from fleetctl.ssh.seam import Hop

Chain = tuple[Hop, ...]


@dataclass
class _Shared:
    lock: threading.Lock = field(default_factory=threading.Lock)  # one attempt at a time
    link: Link | None = None
    failure: TransportError | None = None
    failed_at: float = 0.0


def _again(exc: TransportError) -> TransportError:
    """The same error for another host: a fresh instance (a traceback is per raise), same fields."""
    fresh = type(exc).__new__(type(exc))
    fresh.__dict__.update(exc.__dict__)
    fresh.args = exc.args
    return fresh


class HopPool:
    """The links to bastions of one controller (one per ``Hosts``), and the per-sshd login gates."""

    def __init__(self, options: ConnectOptions) -> None:
        self.options = options
        self._lock = threading.Lock()
        self._shared: dict[Chain, _Shared] = {}
        self._gates: dict[tuple[Chain, str, int], threading.BoundedSemaphore] = {}
        self.logins = 0  # links opened to bastions since the start (for tests and benchmarks)

    def gate(self, via: Chain, hop: Hop) -> threading.BoundedSemaphore:
        """The semaphore that bounds concurrent logins to ``hop``'s sshd as reached along ``via``."""
        key = (via, hop.hostname, hop.port)
        with self._lock:
            gate = self._gates.get(key)
            if gate is None:
                gate = self._gates[key] = threading.BoundedSemaphore(max(1, self.options.handshakes_per_sshd))
            return gate

    def open_link(self, hop: Hop, *, via: Link | None, via_chain: Chain, timeout: float, is_bastion: bool,
                  probe: bool = False) -> Link:
        """A new link to ``hop`` (not shared), its login counted against the sshd's gate."""
        with self.gate(via_chain, hop):
            return Link(hop, via=via, options=self.options, timeout=timeout, is_bastion=is_bastion, probe=probe)

    def acquire(self, chain: Chain, timeout: float) -> Link:
        """The shared link to ``chain[-1]`` (a bastion), reached through ``chain[:-1]``; release it
        with :meth:`release`. Raises the TransportError of the attempt that failed."""
        asked_at = time.monotonic()
        with self._lock:
            shared = self._shared.setdefault(chain, _Shared())
        with shared.lock:
            link = shared.link
            if link is not None and link.is_active:
                with self._lock:
                    link.users += 1
                return link
            failure = shared.failure
            if failure is not None and (shared.failed_at >= asked_at
                                        or time.monotonic() - shared.failed_at < self.options.hop_retry_after_s):
                raise _again(failure) from failure.__cause__
            via = self.acquire(chain[:-1], timeout) if len(chain) > 1 else None
            try:
                fresh = self.open_link(chain[-1], via=via, via_chain=chain[:-1], timeout=timeout, is_bastion=True)
            except TransportError as exc:
                if via is not None:
                    self.release(via)
                shared.failure, shared.failed_at = exc, time.monotonic()
                raise
            with self._lock:
                self.logins += 1
                fresh.users = 1
                shared.link, shared.failure = fresh, None
            return fresh

    def release(self, link: Link) -> None:
        """One connection stopped riding on ``link``; the last one out closes it."""
        with self._lock:
            link.users -= 1
            if link.users > 0:
                return
            for shared in self._shared.values():
                if shared.link is link:
                    shared.link = None
        link.close()
        if link.via is not None:
            self.release(link.via)

    def links(self) -> list[Link]:
        """The shared links open now."""
        with self._lock:
            return [s.link for s in self._shared.values() if s.link is not None]
