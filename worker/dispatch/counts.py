"""The send path's counters and tallies: what a settled batch and a reconciliation add to the metrics."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import structlog

from worker import metrics
from worker.models import State
from worker.store import AbsentVerdict, Outcome, Verdict

# The logger keeps the name it had when the send path was one module.
log = structlog.get_logger("worker.dispatch")


def note_verdicts(lane: str, verdicts: Sequence[Verdict]) -> None:
    """sms_reconcile_total per absent.lua verdict, and one log line when not all were resends."""
    tally = Counter(v.state for v in verdicts)
    for verdict in verdicts:
        metrics.RECONCILE.labels(verdict.state.lower()).inc()
    if tally[AbsentVerdict.RESEND] < len(verdicts):
        log.info("reconcile_verdicts", lane=lane, resend=tally[AbsentVerdict.RESEND],
                 **{v.lower(): n for v, n in tally.items() if v != AbsentVerdict.RESEND})


_OUTCOME_LABELS = {State.ACCEPTED: "accepted", State.REJECTED: "rejected", State.FAILED: "failed",
                   State.QUEUED: "retry", State.AMBIGUOUS: "ambiguous"}
_EVENT_TYPES = {State.ACCEPTED: "accepted", State.REJECTED: "rejected", State.FAILED: "failed"}


def count_settled(lane: str, outcomes: Sequence[Outcome], applied: Sequence[bool]) -> None:
    """sms_messages_total and sms_events_total for the outcomes settle applied."""
    by_outcome: Counter[str] = Counter()
    published: Counter[str] = Counter()
    for outcome, done in zip(outcomes, applied, strict=True):
        if outcome.state is None or not done or outcome.state not in _OUTCOME_LABELS:
            continue
        by_outcome[_OUTCOME_LABELS[outcome.state]] += 1
        if outcome.event and outcome.state in _EVENT_TYPES:
            published[_EVENT_TYPES[outcome.state]] += 1
    for label, n in by_outcome.items():
        metrics.MESSAGES.labels(lane, label).inc(n)
    for kind, n in published.items():
        metrics.EVENTS.labels(kind).inc(n)
