"""The declared job state machine: every (state, event) pair in the table leads where it says, every
other pair is refused with one line (the queue following it on a real store: tests/integration/test_job_states.py)."""

from __future__ import annotations

from typing import get_args

import pytest

from fleetctl.errors import JobError
from fleetctl.jobs.model import FINAL_STATES, JobState
from fleetctl.jobs.states import EVENTS, OUTCOMES, TRANSITIONS, collected, next_state, sources, target

STATES: tuple[JobState, ...] = get_args(JobState)
PAIRS = [(state, event) for state in STATES for event in EVENTS]


@pytest.mark.no_store
@pytest.mark.parametrize(("state", "event"), PAIRS)
def test_every_pair_in_the_table_leads_where_it_says_and_every_other_is_refused(state: JobState, event: str) -> None:
    if (state, event) in TRANSITIONS:
        assert next_state(state, event) == TRANSITIONS[(state, event)]  # type: ignore[index]
    else:
        with pytest.raises(JobError, match=f"a {state} job cannot take the event '{event}'") as refused:
            next_state(state, event)
        assert "\n" not in str(refused.value) and refused.value.hint


@pytest.mark.no_store
def test_the_table_is_what_the_queue_relies_on() -> None:
    for event in EVENTS:  # every event has sources and one target, whatever state it leaves
        assert sources(event) and len({TRANSITIONS[(s, event)] for s in sources(event)}) == 1
    assert not any(state in FINAL_STATES and state != "lost" for state, _ in TRANSITIONS)  # a final state is final
    assert sources("claim") == ("queued",) and sources("retry") == ("dispatching", "running")
    assert [collected(o) for o in OUTCOMES] == ["collect_succeeded", "collect_failed", "collect_cancelled", "collect_timed_out"]
    assert target(collected("failed", late=True)) == "failed" and sources("late_failed") == ("lost", "queued")
    with pytest.raises(JobError, match="'explode' is not a job event"):
        next_state("queued", "explode")
    with pytest.raises(JobError, match="'lost' is not how a run ends"):
        collected("lost")
