"""Several controllers, one fleet: which controller drives which agent.

Every ``serve`` registers a row in ``controllers`` and renews it every ``lease_s / 3``; a row not
renewed for ``lease_s`` (by the database's clock, so controllers' clocks need not agree) belongs to a
dead or stopped controller. Agents are spread evenly over the live controllers by rendezvous hashing
with bounded loads (:func:`assign`): a controller that joins or leaves moves few agents, and every
controller computes the same answer without talking to the others. Each agent has one row in
``leases`` (holder, token, expiry). A controller takes a lease only when it is free or expired, and
every new holder gets the next token.

Fencing. A controller acts on an agent only while it holds both:

- the lease in the store with the token it was granted, checked inside the same transaction as each
  write (telemetry, health, and every job transition: :meth:`Fence.guard`);
- a local deadline on its own monotonic clock, ``lease_s`` minus a margin after the renewal that
  granted it began. A process paused (SIGSTOP, a frozen VM) past its lease wakes with that deadline
  gone and stops at once, before it even reaches the store.

A controller whose own row expired while it slept is retired: it rejoins under a new id and takes
leases afresh, so nothing is ever written under the old id after it wakes (tests check exactly that).
"""

from __future__ import annotations

import hashlib
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from fleetctl.settings import ControllerSettings, default_of
from fleetctl.store import Connection, Store

DEFAULT_LEASE_S: float = default_of(ControllerSettings, "lease_s")
# The local deadline ends this share of the lease early: slack for a renewal's own duration.
LOCAL_MARGIN = 0.2
FORGET_AFTER_S = 86400.0  # rows of controllers gone this long are deleted at the next join


def new_controller_id() -> str:
    return "c" + secrets.token_hex(4)


def _weight(controller: str, agent: str) -> bytes:
    return hashlib.blake2b(f"{controller}\0{agent}".encode(), digest_size=8).digest()


def rendezvous_owner(agent: str, controllers: Sequence[str]) -> str | None:
    """Plain rendezvous hashing: the highest hash of (controller, agent) wins."""
    return max(controllers, key=lambda controller: _weight(controller, agent), default=None)


def assign(agents: Sequence[str], controllers: Sequence[str]) -> dict[str, str]:
    """Agent -> controller: rendezvous hashing with bounded loads. Agents are taken in name order,
    each by its highest-hash controller that still has room (loads differ by one at most), so six
    agents on three controllers are 2/2/2 and ten are 4/3/3 (plain rendezvous gives 4/2/0 as often as
    not), while a controller that joins or leaves still moves few agents. Every controller computes
    the same map."""
    if not controllers:
        return {}
    names = sorted(set(agents))
    least, extra = divmod(len(names), len(controllers))  # ``extra`` controllers take one more than ``least``
    load = dict.fromkeys(controllers, 0)
    owners: dict[str, str] = {}
    for agent in names:
        ranked = sorted(controllers, key=lambda controller: _weight(controller, agent), reverse=True)
        owner = next(c for c in ranked if load[c] < least or (load[c] == least and extra > 0))
        if load[owner] == least:
            extra -= 1
        load[owner] += 1
        owners[agent] = owner
    return owners


@dataclass(frozen=True)
class Fence:
    """What one controller may act on now: its id, each held agent's lease token, and the local
    (monotonic) deadline after which it holds nothing until the next renewal says otherwise."""

    controller: str
    tokens: Mapping[str, int] = field(default_factory=dict)
    deadline: float = 0.0

    def holds(self, agent: str | None) -> bool:
        return agent is not None and agent in self.tokens and self.live()

    def live(self) -> bool:
        """Within the local deadline: False once this process slept (or lost the store) past it."""
        return time.monotonic() < self.deadline

    def agents(self) -> set[str]:
        return set(self.tokens) if self.live() else set()

    def guard(self, agent: str, store: Store) -> tuple[str, tuple[str, str, int]]:
        """SQL (and its parameters) true while this controller holds ``agent``'s lease with the token
        it was granted: a write guarded by it cannot land after a takeover, nor after a lease this
        controller gave up and took again (a new token)."""
        return (f"EXISTS (SELECT 1 FROM leases WHERE leases.agent = ? AND leases.controller = ? "
                f"AND leases.token = ? AND leases.expires > {store.clock_sql})",
                (agent, self.controller, self.tokens.get(agent, -1)))

    def held_tokens(self, db: Connection, store: Store, agent: str | None = None) -> dict[str, int]:
        """Inside a write transaction: the leases the store says this controller holds now (of ``agent``
        only, if given). A transaction that does not take the store-wide write lock passes ``agent``:
        that one row is share-locked on PostgreSQL, so a takeover waits for the transaction to end
        (one row only: two such transactions never lock rows in opposite orders)."""
        sql = f"SELECT agent, token FROM leases WHERE controller = ? AND expires > {store.clock_sql}"
        if agent is not None:
            sql = store.for_share(f"{sql} AND agent = ?")
        rows = db.execute(sql, (self.controller, *((agent,) if agent is not None else ()))).fetchall()
        return {row[0]: row[1] for row in rows}


FenceSource = Callable[[], "Fence | None"]  # the current fence, read at each use (it changes at every renewal)


@dataclass(frozen=True)
class LeaseChange:
    acquired: frozenset[str]
    released: frozenset[str]
    retired: str | None = None  # the old id, when this controller had been given up for dead


@dataclass(frozen=True)
class ControllerRow:
    id: str
    host: str
    pid: int
    started: float
    seen: float
    expires: float
    stopped: float | None
    live: bool
    agents: tuple[str, ...]


_TAKE = (
    "INSERT INTO leases (agent, controller, token, expires) VALUES (?, ?, 1, {clock} + ?) "
    "ON CONFLICT (agent) DO UPDATE SET "
    "token = CASE WHEN leases.controller = excluded.controller AND leases.expires > {clock} "
    "THEN leases.token ELSE leases.token + 1 END, "
    "controller = excluded.controller, expires = excluded.expires "
    "WHERE leases.controller = excluded.controller OR leases.controller IS NULL OR leases.expires <= {clock}"
)


class Membership:
    """This process as one controller of a shared store: join, renew (every ``lease_s / 3``), leave."""

    def __init__(self, store: Store, agents: Sequence[str], lease_s: float = DEFAULT_LEASE_S, *,
                 sole: bool = False) -> None:
        self.store = store
        self.agents = list(agents)
        self.lease_s = lease_s
        # ``sole``: something else (the SQLite state dir's lock file) already proves no other
        # controller is alive, so a predecessor's unexpired leases are taken at once, not after lease_s.
        self.sole = sole
        self.id = new_controller_id()
        self.fence = Fence(self.id)
        self._joined = False
        self._lock = threading.Lock()

    @property
    def renew_every_s(self) -> float:
        return self.lease_s / 3

    def renew(self) -> LeaseChange:
        """Renew this controller's row, give back agents that now hash to another live controller,
        take or renew the rest of its share; the new :attr:`fence` holds what the store granted."""
        with self._lock:
            began = time.monotonic()
            before = held_before = set(self.fence.tokens)
            clock = self.store.clock_sql
            retired = None
            me = self.id  # becomes self.id only once the transaction commits
            with self.store.transaction() as db:
                alive = db.execute(f"UPDATE controllers SET seen = {clock}, expires = {clock} + ? "
                                   "WHERE id = ? AND stopped IS NULL AND expires > " + clock,
                                   (self.lease_s, me)).rowcount == 1
                if not alive and self.sole and self._joined:
                    # Late (a suspended laptop, a long prune), but nobody else can have taken over: revive.
                    alive = db.execute(f"UPDATE controllers SET seen = {clock}, expires = {clock} + ?, stopped = NULL "
                                       "WHERE id = ?", (self.lease_s, me)).rowcount == 1
                if not alive:
                    if self._joined:  # slept past its lease: the others took over; start afresh
                        retired, me = me, new_controller_id()
                        before = set()
                    self._register(db, me)
                live = [row[0] for row in db.execute(
                    f"SELECT id FROM controllers WHERE stopped IS NULL AND expires > {clock}").fetchall()]
                owners = assign(self.agents, live)
                share = [agent for agent in self.agents if owners.get(agent) == me]
                moved = sorted(before - set(share))
                if moved:
                    db.execute(f"UPDATE leases SET controller = NULL, expires = 0 WHERE controller = ? "
                               f"AND agent IN ({','.join('?' * len(moved))})", (me, *moved))
                if share:
                    db.executemany(_TAKE.format(clock=clock), [(agent, me, self.lease_s) for agent in share])
                tokens = Fence(me).held_tokens(db, self.store)
            # ``sole``: nothing else can take these agents, so a late renewal never stops the work.
            deadline = float("inf") if self.sole else began + self.lease_s * (1 - LOCAL_MARGIN)
            self.id = me
            self.fence = Fence(me, tokens, deadline)
            self._joined = True
            # Retired, everything held before counts as given up (the new id took whatever it holds afresh).
            return LeaseChange(frozenset(set(tokens) - before), frozenset(held_before - set(tokens)), retired)

    def _register(self, db: Connection, me: str) -> None:
        clock = self.store.clock_sql
        db.execute(f"DELETE FROM controllers WHERE expires < {clock} - ?", (FORGET_AFTER_S,))
        if self.sole:
            db.execute(f"UPDATE controllers SET expires = {clock} WHERE stopped IS NULL AND expires > {clock}")
            db.execute("UPDATE leases SET controller = NULL, expires = 0")
        db.execute(f"INSERT INTO controllers (id, host, pid, started, seen, expires) "
                   f"VALUES (?, ?, ?, {clock}, {clock}, {clock} + ?)",
                   (me, socket.gethostname(), os.getpid(), self.lease_s))

    def leave(self) -> None:
        """Stop: this controller's row says so and its leases are free for the others at once."""
        with self._lock:
            self.fence = Fence(self.id)
            if not self._joined:
                return
            clock = self.store.clock_sql
            with self.store.transaction() as db:
                db.execute(f"UPDATE controllers SET stopped = {clock}, expires = {clock} WHERE id = ?", (self.id,))
                db.execute("UPDATE leases SET controller = NULL, expires = 0 WHERE controller = ?", (self.id,))


def live_controllers(store: Store, *, excluding: str | None = None) -> list[str]:
    rows = store.query(f"SELECT id FROM controllers WHERE stopped IS NULL AND expires > {store.clock_sql}")
    return [row[0] for row in rows if row[0] != excluding]


def controller_rows(store: Store) -> list[ControllerRow]:
    """Every controller the store remembers (live ones first), with the agents it holds now."""
    clock = store.clock_sql
    now = store.now()
    held: dict[str, list[str]] = {}
    for row in store.query(f"SELECT controller, agent FROM leases WHERE controller IS NOT NULL AND expires > {clock} "
                           "ORDER BY agent"):
        held.setdefault(row[0], []).append(row[1])
    rows = store.query("SELECT id, host, pid, started, seen, expires, stopped FROM controllers ORDER BY started")
    found = [ControllerRow(row[0], row[1], row[2], row[3], row[4], row[5], row[6],
                           row[6] is None and row[5] > now, tuple(held.get(row[0], ()))) for row in rows]
    return sorted(found, key=lambda c: not c.live)


def lease_rows(store: Store) -> list[tuple[str, str | None, int, float]]:
    """(agent, holder or None, token, expires) of every lease, by agent."""
    rows = store.query("SELECT agent, controller, token, expires FROM leases ORDER BY agent")
    return [(row[0], row[1], row[2], row[3]) for row in rows]
