"""The job state machine, declared once: ``(state, event) -> next state``.

Every change of a job's state is one of these events; the queue's compare-and-set methods
(:mod:`fleetctl.jobs.queue`) take the event's name and derive the states it may leave from this
table, so no caller chooses states by hand, and an event the table does not know from a state is
refused (:func:`next_state` raises a one-line :class:`~fleetctl.errors.JobError`).

    queued --claim--> dispatching --launch--> running --collect_<outcome>--> succeeded | failed | cancelled | timed_out
    dispatching --requeue--> queued             (dispatch failed, or the restart found nothing to launch)
    dispatching | running --retry--> queued     (its host is lost and a retry is left; the attempt is remembered)
    dispatching | running --lose--> lost        (provisionally: ``finished`` is set by ``finalize_lost``)
    queued --resume--> running                  (the remembered attempt still runs: no retry needed)
    lost | queued --late_<outcome>--> ...       (the lost or requeued attempt's result came back after all)

Events that set no new state (a reason, a remote directory, a cancel mark) are not transitions: they
are written by the queue's other methods, in the states named there."""

from __future__ import annotations

from typing import Literal, get_args

from fleetctl.errors import JobError
from fleetctl.jobs.model import JobState

Outcome = Literal["succeeded", "failed", "cancelled", "timed_out"]
JobEvent = Literal[
    "claim", "launch", "requeue", "retry", "lose", "finalize_lost", "resume",
    "cancel", "cancel_lost", "cancel_before_launch", "reject", "dispatch_failed",
    "collect_succeeded", "collect_failed", "collect_cancelled", "collect_timed_out",
    "late_succeeded", "late_failed", "late_cancelled", "late_timed_out",
]
OUTCOMES: tuple[Outcome, ...] = get_args(Outcome)
EVENTS: tuple[JobEvent, ...] = get_args(JobEvent)

TRANSITIONS: dict[tuple[JobState, JobEvent], JobState] = {
    ("queued", "claim"): "dispatching",
    ("dispatching", "launch"): "running",
    ("dispatching", "requeue"): "queued",
    ("dispatching", "retry"): "queued",
    ("running", "retry"): "queued",
    ("dispatching", "lose"): "lost",
    ("running", "lose"): "lost",
    ("lost", "finalize_lost"): "lost",  # only while ``finished`` is empty: the guard is the queue's
    ("queued", "resume"): "running",
    ("queued", "cancel"): "cancelled",
    ("lost", "cancel_lost"): "cancelled",
    ("dispatching", "cancel_before_launch"): "cancelled",
    ("queued", "reject"): "failed",  # a dependency failed, or no agent could ever take it
    ("dispatching", "dispatch_failed"): "failed",  # its launch failed, or its code cannot run there
    **{(state, f"collect_{outcome}"): outcome for state in ("dispatching", "running") for outcome in OUTCOMES},  # type: ignore[misc]
    **{(state, f"late_{outcome}"): outcome for state in ("lost", "queued") for outcome in OUTCOMES},  # type: ignore[misc]
}


def next_state(state: JobState, event: str) -> JobState:
    """Where ``event`` takes a job in ``state``; a :class:`JobError` for a pair the table does not hold."""
    target = TRANSITIONS.get((state, event))  # type: ignore[arg-type]
    if target is None:
        if event not in EVENTS:
            raise JobError(f"{event!r} is not a job event", hint=f"one of {', '.join(EVENTS)}")
        allowed = ", ".join(sources(event))
        raise JobError(f"a {state} job cannot take the event {event!r}", hint=f"only a job that is {allowed} can")
    return target


def sources(event: JobEvent) -> tuple[JobState, ...]:
    """The states ``event`` may leave: what the queue's compare-and-set expects."""
    found = tuple(state for (state, name) in TRANSITIONS if name == event)
    if not found:
        raise JobError(f"{event!r} is not a job event", hint=f"one of {', '.join(EVENTS)}")
    return found


def target(event: JobEvent) -> JobState:
    """The one state ``event`` leads to (every event of the table has one, whatever it leaves)."""
    return TRANSITIONS[(sources(event)[0], event)]


def collected(outcome: Outcome | JobState, *, late: bool = False) -> JobEvent:
    """The event of a result collected with this outcome: ``collect_failed``, or ``late_failed``
    when it came back after its job was marked lost or requeued."""
    if outcome not in OUTCOMES:
        raise JobError(f"{outcome!r} is not how a run ends", hint=f"one of {', '.join(OUTCOMES)}")
    return f"{'late' if late else 'collect'}_{outcome}"  # type: ignore[return-value]
