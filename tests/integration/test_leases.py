"""Leases and fencing on a real store (SQLite and PostgreSQL): agents spread over live controllers,
taken over when one dies or leaves, and a controller that slept past its lease writes nothing."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime, timezone

import pytest

from fleetctl.jobs.model import JobSpec
from fleetctl.jobs.queue import JobQueue
from fleetctl.store import Store
from fleetctl.store.leases import Fence, Membership, assign, controller_rows, live_controllers, rendezvous_owner
from fleetctl.telemetry.health import HealthPolicy
from fleetctl.telemetry.history import record
from fleetctl.telemetry.snapshot import TelemetrySnapshot
from tests.waiting import wait_for

AGENTS = [f"gpu-{n:02d}" for n in range(20)]


def settle(*members: Membership) -> None:
    """Two renewals each: the first registers everyone, the second hands agents to their owners."""
    for _ in range(2):
        for member in members:
            member.renew()


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    wait_for("the condition", condition, timeout)


def snapshot(agent: str) -> TelemetrySnapshot:
    return TelemetrySnapshot(agent=agent, hostname="h", timestamp=datetime.now(timezone.utc), status="ok")


def test_rendezvous_moves_only_the_share_of_a_leaving_controller() -> None:
    three = ["ca", "cb", "cc"]
    before = {a: rendezvous_owner(a, three) for a in AGENTS * 5}
    after = {a: rendezvous_owner(a, ["ca", "cb"]) for a in AGENTS * 5}
    assert {a for a in before if before[a] != after[a]} == {a for a in before if before[a] == "cc"}
    assert rendezvous_owner("x", []) is None


def test_bounded_loads_spread_evenly_and_a_leaver_moves_few() -> None:
    six = [f"a{n}" for n in range(6)]
    for ids in (["c1", "c2", "c3"], ["x", "y", "z"], ["c0b", "c7d", "c1f"]):
        counts = sorted(list(assign(six, ids).values()).count(c) for c in ids)
        assert counts == [2, 2, 2]
    many = [f"gpu-{n:04d}" for n in range(1000)]
    before, after = assign(many, ["ca", "cb", "cc", "cd"]), assign(many, ["ca", "cb", "cc"])
    assert max(list(before.values()).count(c) for c in ["ca", "cb", "cc", "cd"]) == 250
    moved = sum(1 for a in many if before[a] != after[a])
    assert moved < 300  # the leaver's 250 and a few more to even out, never a reshuffle
    assert assign(six, []) == {}


def test_agents_spread_without_overlap_and_move_when_one_leaves(make_store: Callable[[], Store]) -> None:
    one, two = Membership(make_store(), AGENTS), Membership(make_store(), AGENTS)
    settle(one, two)
    a, b = one.fence.agents(), two.fence.agents()
    assert a and b and not a & b and a | b == set(AGENTS)
    assert sorted(live_controllers(one.store)) == sorted([one.id, two.id])

    one.leave()
    change = two.renew()
    assert two.fence.agents() == set(AGENTS) and change.acquired == frozenset(a)
    rows = {row.id: row for row in controller_rows(two.store)}
    assert not rows[one.id].live and rows[two.id].live and len(rows[two.id].agents) == len(AGENTS)


def test_a_controller_that_slept_past_its_lease_is_fenced_and_rejoins_under_a_new_id(
        make_store: Callable[[], Store]) -> None:
    sleeper, other = Membership(make_store(), AGENTS, lease_s=1.0), Membership(make_store(), AGENTS, lease_s=1.0)
    settle(sleeper, other)
    stale = sleeper.fence
    mine = sorted(stale.tokens)
    assert mine
    tokens = dict(stale.tokens)
    # The sleeper stops renewing; its own clock tells it first that it holds nothing any more.
    wait_until(lambda: not stale.holds(mine[0]), timeout=5)
    wait_until(lambda: sleeper.id not in live_controllers(other.store), timeout=5)
    other.renew()
    assert set(other.fence.tokens) == set(AGENTS)  # what the store granted (agents() also needs the clock)
    taken = {agent: token for agent, token in other.fence.tokens.items() if agent in tokens}
    assert all(taken[agent] == tokens[agent] + 1 for agent in mine)  # every takeover is a new token

    # Woken up, its writes are refused by the store even with a fence it still believes in.
    believed = Fence(stale.controller, stale.tokens, time.monotonic() + 60)
    assert record(sleeper.store, [snapshot(mine[0])], HealthPolicy(), fence=believed) == []
    history = sleeper.store.query("SELECT COUNT(*) FROM telemetry WHERE controller = ?", (stale.controller,))
    assert history[0][0] == 0

    old = sleeper.id
    change = sleeper.renew()
    assert change.retired == old and sleeper.id != old
    assert old not in live_controllers(sleeper.store)


def test_fenced_job_transitions_need_the_agents_lease(make_store: Callable[[], Store]) -> None:
    one, two = Membership(make_store(), AGENTS), Membership(make_store(), AGENTS)
    settle(one, two)
    agent_of_one = sorted(one.fence.agents())[0]
    submitted = JobQueue(one.store).submit(JobSpec(command=["true"]))
    # The other controller cannot claim a job onto an agent it does not hold ...
    assert not JobQueue(two.store, two.fence).claim(submitted.id, agent_of_one, [], 1)
    # ... the holder can, once; a second claim of the same attempt finds it taken.
    queue = JobQueue(one.store, one.fence)
    assert queue.claim(submitted.id, agent_of_one, [], 1)
    assert not queue.claim(submitted.id, agent_of_one, [], 1)
    assert not JobQueue(two.store, two.fence).mark_running(submitted.id, "/tmp/x")
    assert queue.mark_running(submitted.id, "/tmp/x")
    events = one.store.query("SELECT event, controller FROM job_events WHERE job_id = ? ORDER BY ts, rowid",
                             (submitted.id,))
    assert [(e[0], e[1]) for e in events] == [("submitted", None), ("dispatching", one.id), ("running", one.id)]

    one.leave()
    two.renew()
    # After the takeover the old holder's transitions land nowhere; the new holder's do.
    assert not queue.lose(submitted.id, detail="x", reason="x")
    assert not queue.note(submitted.id, "duplicate", "a stale controller's view")
    assert JobQueue(two.store, two.fence).lose(submitted.id, detail="taken over", reason="x")
    assert JobQueue(two.store, two.fence).note(submitted.id, "orphan_removed", "the holder's")
    assert JobQueue(one.store).note(submitted.id, "cli", None)  # an unfenced reader-writer (the CLI) is not a controller


@pytest.mark.parametrize("claimers", [4])
def test_concurrent_claims_of_one_job_have_one_winner(make_store: Callable[[], Store], claimers: int) -> None:
    import threading

    members = [Membership(make_store(), ["only"]) for _ in range(claimers)]
    settle(*members)
    holder = next(m for m in members if m.fence.holds("only"))
    jobs = [JobQueue(holder.store).submit(JobSpec(command=["true"])).id for _ in range(20)]
    stores = [make_store() for _ in range(claimers)]
    wins: list[str] = []
    barrier = threading.Barrier(claimers)

    def claim(store: Store) -> None:
        queue = JobQueue(store, holder.fence)
        barrier.wait()
        for job_id in jobs:
            if queue.claim(job_id, "only", [], 1):
                wins.append(job_id)

    threads = [threading.Thread(target=claim, args=(store,)) for store in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(wins) == sorted(jobs)


def test_a_sole_controller_takes_a_dead_predecessors_leases_at_once(make_store: Callable[[], Store]) -> None:
    """On the SQLite file the lock proves the last serve is gone: a restart must not wait lease_s."""
    dead = Membership(make_store(), AGENTS, lease_s=600)
    dead.renew()
    successor = Membership(make_store(), AGENTS, lease_s=600, sole=True)
    successor.renew()
    assert successor.fence.agents() == set(AGENTS)
    assert live_controllers(successor.store) == [successor.id]


def test_a_fence_past_its_local_deadline_writes_nothing_even_for_jobs_on_no_agent(
        make_store: Callable[[], Store]) -> None:
    member = Membership(make_store(), AGENTS)
    member.renew()
    queued = JobQueue(member.store).submit(JobSpec(command=["true"]))
    lapsed = Fence(member.fence.controller, member.fence.tokens, time.monotonic() - 1)
    stale = JobQueue(member.store, lapsed)
    assert not stale.set_reason(queued.id, "from a controller that slept")
    assert not stale.note(queued.id, "x")
    assert JobQueue(member.store, member.fence).set_reason(queued.id, "from the live one")


def test_a_sole_controller_late_past_its_lease_revives_under_the_same_id(make_store: Callable[[], Store]) -> None:
    """On the SQLite file nobody else can take over: a renewal late past lease_s (a suspended laptop)
    keeps the id and the work going instead of rejoining as a stranger."""
    sole = Membership(make_store(), AGENTS, lease_s=1.0, sole=True)
    sole.renew()
    first = sole.id
    wait_until(lambda: first not in live_controllers(sole.store), timeout=5)
    change = sole.renew()
    assert change.retired is None and sole.id == first and set(sole.fence.tokens) == set(AGENTS)
    assert sole.fence.holds(AGENTS[0])  # no local deadline: a late renewal never stops a sole controller
