"""The queue's compare-and-set follows the declared state table (fleetctl.jobs.states) on a real store,
SQLite and PostgreSQL: from every state, each event moves the job exactly when the table holds the pair."""

from __future__ import annotations

from collections.abc import Callable
from typing import get_args

import pytest

from fleetctl.errors import JobError
from fleetctl.jobs.model import JobSpec, JobState
from fleetctl.jobs.queue import JobQueue
from fleetctl.jobs.states import EVENTS, TRANSITIONS
from fleetctl.store import Store

STATES: tuple[JobState, ...] = get_args(JobState)


def _apply(queue: JobQueue, job_id: str, event: str) -> bool:
    """The queue method that makes ``event``, as the runner and the API call it."""
    calls: dict[str, Callable[[], bool]] = {
        "claim": lambda: queue.claim(job_id, "a", [], 1),
        "launch": lambda: queue.mark_running(job_id, "/tmp/fleetctl-job-x"),
        "resume": lambda: queue.resume(job_id, 0, "still running"),
        "lose": lambda: queue.lose(job_id, detail="gone", reason="gone"),
        "finalize_lost": lambda: queue.finalize_lost(job_id, "gone for good"),
    }
    if event in ("requeue", "retry"):
        return queue.requeue(job_id, event, detail=None, reason=None)  # type: ignore[arg-type]
    return calls[event]() if event in calls else queue.finish(job_id, event, reason="ended")  # type: ignore[arg-type]


@pytest.mark.parametrize("state", STATES)
def test_the_queue_moves_a_job_only_along_the_table(make_store: Callable[[], Store], state: JobState) -> None:
    queue = JobQueue(make_store())
    for event in EVENTS:
        job = queue.submit(JobSpec(command=["true"]))
        with queue.store.transaction() as db:  # put it in ``state`` (lost: provisionally, as ``lose`` leaves it)
            db.execute("UPDATE jobs SET state = ?, remote_dir = ?, finished = NULL WHERE id = ?",
                       (state, "/tmp/fleetctl-job-x", job.id))
        moved = _apply(queue, job.id, event)
        after = queue.get(job.id)
        if (state, event) in TRANSITIONS:
            assert moved and after.state == TRANSITIONS[(state, event)], (state, event)  # type: ignore[index]
        else:
            assert not moved and after.state == state, (state, event)


def test_a_method_refuses_an_event_it_does_not_make(make_store: Callable[[], Store]) -> None:
    queue = JobQueue(make_store())
    job = queue.submit(JobSpec(command=["true"]))
    with pytest.raises(JobError, match="'claim' does not end a job"):
        queue.finish(job.id, "claim", reason="no")  # type: ignore[arg-type]
    with pytest.raises(JobError, match="'lose' does not requeue a job"):
        queue.requeue(job.id, "lose", detail=None, reason=None)
    assert queue.get(job.id).state == "queued"
