"""The message-state transitions of the send path's Lua scripts: which state each may move a message from and to.

The scripts (worker/lua/) are where the transitions happen, atomically; this table says the same in
Python so it can be read in one place and checked. tests/unit/test_transitions.py drives each script
from every state against a real Redis and asserts that every state change it makes is in this table
and that every entry of the table is made by some call, so a change to either side alone fails.

Only changes are listed: a script may always leave a message's state as it is (and does, for a
state it does not handle). `None` is "no record yet". The report side (report_apply.lua) keeps its
own transitions with the reports.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import Final

from worker.models import State


class Script(StrEnum):
    """The send path's scripts that read or write a message's state."""

    SUBMIT = "submit"  # before a POST: a new or QUEUED message becomes SUBMITTING under a fence
    ABSENT = "absent"  # a message missing from the logs: resent (SUBMITTING) or checked again (AMBIGUOUS)
    SETTLE = "settle"  # the outcome of a POST or a reconciliation (its ALLOWED table)
    CHECK_RENEW = "check_renew"  # renews a reconciliation lease; never changes a state
    SCHEDULE = "schedule"  # a job with a future send_at is held in its lane's schedule
    DUE = "due"  # a due scheduled job is appended to its lane's outbox
    CANCEL = "cancel"  # a message never submitted is cancelled (it is never sent)


Transition = tuple[State | None, State]

TRANSITIONS: Final[Mapping[Script, frozenset[Transition]]] = {
    Script.SUBMIT: frozenset({
        (None, State.SUBMITTING),
        (State.QUEUED, State.SUBMITTING),
    }),
    Script.ABSENT: frozenset({
        (State.SUBMITTING, State.AMBIGUOUS),  # WAIT: absent, not yet in enough checks
        (State.AMBIGUOUS, State.SUBMITTING),  # RESEND
    }),
    Script.SETTLE: frozenset({
        (State.QUEUED, State.SUBMITTING),
        (State.SUBMITTING, State.ACCEPTED), (State.AMBIGUOUS, State.ACCEPTED), (State.QUEUED, State.ACCEPTED),
        (State.SUBMITTING, State.REJECTED), (State.AMBIGUOUS, State.REJECTED), (State.QUEUED, State.REJECTED),
        (None, State.REJECTED),  # a traffic-policy rejection (worker.policy) of a message never submitted
        (State.SUBMITTING, State.AMBIGUOUS),
        (State.SUBMITTING, State.QUEUED), (State.AMBIGUOUS, State.QUEUED),
        (None, State.FAILED), (State.QUEUED, State.FAILED), (State.SUBMITTING, State.FAILED),
        (State.AMBIGUOUS, State.FAILED),
    }),
    Script.CHECK_RENEW: frozenset(),
    Script.SCHEDULE: frozenset({(None, State.SCHEDULED)}),
    Script.DUE: frozenset({(State.SCHEDULED, State.QUEUED)}),
    # Only before any attempt: from SUBMITTING on, a request may have reached the provider.
    Script.CANCEL: frozenset({
        (None, State.CANCELLED),  # still in the outbox, unclaimed or claimed but not submitted
        (State.SCHEDULED, State.CANCELLED),
        (State.QUEUED, State.CANCELLED),  # moved from the schedule, or certainly not sent by a failed attempt
    }),
}


def allowed(script: Script, before: State | None, after: State | None) -> bool:
    """Whether `script` may leave a message in state `after` that it found in `before`."""
    return before == after or (after is not None and (before, after) in TRANSITIONS[script])
