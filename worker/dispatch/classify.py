"""The send path's decisions as pure functions: a batch and the provider's answer -> a `Decision`.

This is the outcome table of docs/architecture.md ("## Outcomes") in code: what becomes of each
message after a POST (or the error instead of one), of a submit.lua answer and of an absent.lua
verdict. Nothing here touches Redis, the provider, logs or metrics: a `Decision` lists the outcomes
to settle and the actions to take (pause the lane, reconcile entries, bring entries back later, the
log lines and counters), and the dispatcher (worker.dispatch.dispatcher) performs them. The only
clock read here is the timestamp inside events and dead letters (worker.events); the time that
decides something (`now_ms`) is an argument.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal

from worker import events
from worker.deadletters import job_dead_letter
from worker.dispatch.config import DispatchConfig
from worker.errors import (
    ProviderAmbiguous,
    ProviderAuthError,
    ProviderBadRequest,
    ProviderError,
    ProviderNotActedOn,
    SendWindowClosed,
)
from worker.models import MAX_VALIDITY_S, State, validity_seconds
from worker.provider import SendResponse, SendResult
from worker.statuses import ACCEPTED_GROUPS, DUPLICATE_MESSAGE_ID, KNOWN_GROUPS
from worker.store import (
    GUARD_ANSWERS,
    AbsentVerdict,
    Entry,
    Outcome,
    SubmitAnswer,
    Submitted,
    Verdict,
    campaign_spec,
)

# Outcomes that are our own decisions (not the provider's facts): applied only while we own the
# message (settle.lua's guards).
GUARDED = frozenset({State.QUEUED, State.AMBIGUOUS, State.FAILED})


class PauseReason(StrEnum):
    """Why a lane is paused (the pause key's value, `sms_lane_paused{reason}`)."""

    AUTH = "auth"  # 401/403: the key was refused
    PROVIDER_UNAVAILABLE = "provider_unavailable"  # connect errors, 429, 503 after every retry
    # The traffic policy's (worker.policy): a daily cap reached (set by submit.lua's guards, until midnight
    # UTC), and guards whose state Redis could not give on a lane that fails closed.
    BUDGET = "budget"
    GUARD_UNAVAILABLE = "guard_unavailable"


@dataclass(frozen=True, slots=True)
class Item:
    """One message of a batch as the send path knows it: its outbox entry, its job, its attempts."""

    entry: Entry
    job: dict[str, Any]
    attempts: int = 0

    @property
    def message_id(self) -> str:
        return self.entry.message_id

    @property
    def entry_id(self) -> str:
        return self.entry.entry_id


@dataclass(frozen=True, slots=True)
class Pause:
    reason: PauseReason
    seconds: float


@dataclass(frozen=True, slots=True)
class RetryIn:
    """Pending entries to bring back for another attempt in `delay_ms` (after a lane pause)."""

    entry_ids: list[str]
    delay_ms: int


@dataclass(frozen=True, slots=True)
class Note:
    """A log line the dispatcher writes for a decision (with the lane added)."""

    level: Literal["info", "warning", "error"]
    event: str
    fields: dict[str, Any]


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A message given up on: the `dead_lettered` log line and `sms_dead_letters_total{reason}`."""

    message_id: str
    reason: str
    detail: str


@dataclass(slots=True)
class Decision:
    """What to do after one POST (or after deciding without one): outcomes to settle, and actions."""

    outcomes: list[Outcome] = field(default_factory=list)
    # A 400 for a bulk of several messages: nothing is decided, each half is sent on its own.
    split: bool = False
    pause: Pause | None = None
    # Entry ids to reconcile after SMS_RECONCILE_DELAY_S, one reconcile message per list.
    reconcile: list[list[str]] = field(default_factory=list)
    retry_in: RetryIn | None = None
    bulk_id: str | None = None
    dead_letters: list[DeadLetter] = field(default_factory=list)
    notes: list[Note] = field(default_factory=list)
    fenced: int = 0  # sms_send_window_closed_total
    unknown_statuses: int = 0  # sms_provider_unknown_values_total{kind="send_status_group"}

    def add(self, other: Decision) -> None:
        """Take in the outcomes and the bookkeeping of `other` (pauses and reconciles are not merged)."""
        self.outcomes += other.outcomes
        self.dead_letters += other.dead_letters
        self.notes += other.notes


# --- one POST -------------------------------------------------------------------------------------
def classify_response(
    config: DispatchConfig, lane: str, items: Sequence[Item], response: SendResponse, *, resend: bool, now_ms: int
) -> Decision:
    """Per-destination outcomes of a 200: accepted, rejected, or ambiguous when the answer does not
    say (a destination missing from it, or a status group this code does not know)."""
    decision = Decision(bulk_id=response.bulk_id)
    results = {r.message_id: r for r in response.messages}
    unanswered: list[Item] = []
    unknown: list[Item] = []
    for item in items:
        result = results.get(item.message_id)
        if result is None:
            unanswered.append(item)
        elif result.status.group_name not in KNOWN_GROUPS:
            # A status group this code does not know (the API grew one): never guessed into a
            # terminal state. The logs settle it like any ambiguous answer.
            decision.notes.append(Note("warning", "provider_unknown_status", {
                "message_id": item.message_id, "group": result.status.group_name, "status": result.status.name}))
            decision.unknown_statuses += 1
            unknown.append(item)
        else:
            decision.outcomes.append(_answered(config, lane, item, response.bulk_id, result, resend, now_ms))
    for lost, why in ((unanswered, "missing from the provider's answer"), (unknown, "unknown status group")):
        if lost:
            # A 200 that does not tell what became of a message we sent: we cannot know; reconcile it.
            decision.reconcile.append([item.entry_id for item in lost])
            decision.outcomes += [ambiguous(item, why) for item in lost]
    return decision


def _answered(
    config: DispatchConfig, lane: str, item: Item, bulk_id: str | None, result: SendResult, resend: bool, now_ms: int
) -> Outcome:
    status = result.status.to_wire()
    # A resend answered "duplicate" means our earlier attempt got through.
    if result.status.group_name in ACCEPTED_GROUPS or (result.status.name == DUPLICATE_MESSAGE_ID and resend):
        return accepted(lane, item.entry, item.job, bulk_id, status, now_ms=now_ms, grace_s=config.no_report_grace_s)
    return Outcome(
        item.message_id, item.entry_id, State.REJECTED, ack=True,
        event=events.build("rejected", item.message_id, item.job, lane=lane, bulk_id=bulk_id, status=status),
        fields={"bulk_id": bulk_id or "", "status": result.status.name},
    )


def classify_error(
    config: DispatchConfig, lane: str, items: Sequence[Item], error: ProviderError, *, now_ms: int
) -> Decision:
    """The outcome table for a bulk the provider did not answer with 200."""
    entry_ids = [item.entry_id for item in items]
    if isinstance(error, ProviderBadRequest):
        if len(items) > 1:
            return Decision(split=True)  # isolate the bad message(s): each half is sent on its own
        detail = "; ".join(f"{v.property}: {v.violation}" for v in error.violations) or str(error)
        item = items[0]
        return give_up(lane, item.entry, item.job, "bad_request", detail, item.attempts, answer=error.body)
    if isinstance(error, SendWindowClosed):
        # This process was paused or starved past the batch's send window: nothing was written,
        # and another worker may own the batch by now. Not an outage: no pause, no attempt counted.
        decision = retry_later(config, lane, items, error, now_ms=now_ms, count_attempt=False)
        decision.notes.append(Note("warning", "send_window_closed", {
            "messages": len(items), "window_s": config.send_window_ms / 1000}))
        decision.fenced = len(items)
        decision.retry_in = RetryIn(entry_ids, 0)
        return decision
    if isinstance(error, ProviderAuthError):
        decision = retry_later(config, lane, items, error, now_ms=now_ms, count_attempt=False)
        decision.pause = Pause(PauseReason.AUTH, config.auth_pause_s)
        decision.notes.append(Note("error", "provider_auth_failed", {
            "status": error.status_code, "pause_s": config.auth_pause_s, "messages_kept": len(items)}))
        decision.retry_in = RetryIn(entry_ids, int(config.auth_pause_s * 1000))
        return decision
    if isinstance(error, ProviderNotActedOn):
        # Certainly not sent: an outage of any length is retried up to the horizon, whatever the
        # number of tries (SMS_MAX_ATTEMPTS bounds sends that may have gone through).
        decision = retry_later(config, lane, items, error, now_ms=now_ms, count_attempt=True, limit_attempts=False)
        decision.pause = Pause(PauseReason.PROVIDER_UNAVAILABLE, config.outage_pause_s)
        decision.notes.append(Note("warning", "provider_unavailable", {
            "status": error.status_code, "error_class": type(error).__name__, "pause_s": config.outage_pause_s}))
        decision.retry_in = RetryIn(entry_ids, int(config.outage_pause_s * 1000))
        return decision
    if isinstance(error, ProviderAmbiguous):
        return Decision(
            outcomes=[ambiguous(item, describe(error)) for item in items], reconcile=[entry_ids],
            notes=[Note("warning", "send_ambiguous", {
                "messages": len(items), "status": error.status_code, "error_class": type(error).__name__})],
        )
    # Any other answer (an unexpected 4xx): not acted on as far as we can tell, but not safe to
    # repeat forever either; the attempts limit dead-letters it.
    decision = retry_later(config, lane, items, error, now_ms=now_ms, count_attempt=True)
    decision.notes.append(Note("error", "provider_unexpected_answer", {"status": error.status_code}))
    return decision


def retry_later(
    config: DispatchConfig, lane: str, items: Sequence[Item], error: ProviderError, *, now_ms: int, count_attempt: bool,
    limit_attempts: bool = True,
) -> Decision:
    """Not sent, certainly: back to QUEUED, pending in the outbox until recovery takes it again;
    dead-lettered instead once past the attempts limit or SMS_RETRY_HORIZON_S (when the attempt counts)."""
    decision = Decision()
    now_s = now_ms / 1000
    for item in items:
        too_many = limit_attempts and item.attempts >= config.max_attempts
        if count_attempt and (too_many or now_s - entry_time_s(item.entry_id, now_s) > config.retry_horizon_s):
            decision.add(give_up(lane, item.entry, item.job, "retries_exhausted", describe(error), item.attempts,
                                 answer=error.body))
            continue
        fields: dict[str, str | int] = {"last_error": describe(error)}
        if not count_attempt:
            fields["attempts"] = max(0, item.attempts - 1)
        decision.outcomes.append(Outcome(item.message_id, item.entry_id, State.QUEUED, ack=False, fields=fields))
    return decision


# --- outcomes -------------------------------------------------------------------------------------
def accepted(
    lane: str, entry: Entry, job: dict[str, Any], bulk_id: str | None, status: dict[str, Any] | None, *,
    now_ms: int, grace_s: float,
) -> Outcome:
    """ACCEPTED with its event, awaiting its report until the validity period plus the grace is over."""
    validity = job.get("validity_period")
    validity_s = MAX_VALIDITY_S
    if isinstance(validity, dict):
        validity_s = validity_seconds(int(validity.get("amount", 2880)), validity.get("time_unit", "MINUTES"))
    return Outcome(
        entry.message_id, entry.entry_id, State.ACCEPTED, ack=True,
        event=events.build("accepted", entry.message_id, job, lane=lane, bulk_id=bulk_id, status=status),
        deadline_ms=now_ms + int((validity_s + grace_s) * 1000), fields={"bulk_id": bulk_id or ""},
    )


def ambiguous(item: Item, why: str) -> Outcome:
    """AMBIGUOUS, entry kept pending: the provider may have the message; only its logs can tell."""
    return Outcome(item.message_id, item.entry_id, State.AMBIGUOUS, ack=False, fields={"last_error": why})


def give_up(
    lane: str, entry: Entry, job: dict[str, Any], reason: str, detail: str, attempts: int, answer: object = None,
) -> Decision:
    """FAILED with a `failed` event and a dead letter an operator can replay."""
    dead = job_dead_letter(message_id=entry.message_id, lane=lane, entry_id=entry.entry_id, reason=reason,
                           detail=detail, attempts=attempts, job=entry.job, last_answer=answer)
    outcome = Outcome(
        entry.message_id, entry.entry_id, State.FAILED, ack=True,
        # Its own id per entry: a replayed message that fails again is a new state change.
        event=events.build("failed", entry.message_id, job, lane=lane, reason=reason,
                           event_id=f"{entry.message_id}:failed:{entry.entry_id}"),
        fields={"reason": reason, "lane": lane, "job": entry.job.decode("utf-8", "replace")},
        dead_letter=dead, campaign=campaign_spec(entry.job, entry.counted, job),
    )
    return Decision(outcomes=[outcome], dead_letters=[DeadLetter(entry.message_id, reason, detail)])


# Settle's guard for a policy rejection: applied only while the message was never submitted or is
# certainly not sent (no record yet, or QUEUED), so a message another worker took over in between
# is never marked rejected (worker/lua/settle.lua).
POLICY_GUARD = "p:"


def policy_rejected(lane: str, entry: Entry, job: dict[str, Any], reason: str, rule: str) -> Outcome:
    """REJECTED by the traffic policy (worker.policy), never sent: a `rejected` event with its reason
    and the rule that fired. A message never recorded is recorded here under its campaign, as a
    `failed` one is (give_up)."""
    return Outcome(
        entry.message_id, entry.entry_id, State.REJECTED, ack=True,
        event=events.build("rejected", entry.message_id, job, lane=lane, reason=reason, rule=rule),
        fields={"reason": reason, "rule": rule, "lane": lane, "job": entry.job.decode("utf-8", "replace")},
        guard=POLICY_GUARD, campaign=campaign_spec(entry.job, entry.counted, job),
    )


# --- the store's answers --------------------------------------------------------------------------
@dataclass(slots=True)
class SubmitPlan:
    """What a batch's submit.lua answers ask for, message by message."""

    send: list[Item] = field(default_factory=list)  # now SUBMITTING under the batch's fence
    check: list[Item] = field(default_factory=list)  # may have been sent: reconcile first
    waiting: list[tuple[str, int]] = field(default_factory=list)  # (entry id, ms): look again later
    acknowledge: list[Item] = field(default_factory=list)  # settled already: only the ack is left
    stopped: list[tuple[Item, SubmitAnswer]] = field(default_factory=list)  # by the lane's counted guards


def plan_submitted(items: Sequence[Item], answers: Sequence[Submitted]) -> SubmitPlan:
    """Sort a batch by submit.lua's answers (BUSY: another consumer's; nothing to do)."""
    plan = SubmitPlan()
    for item, answer in zip(items, answers, strict=True):
        counted = Item(item.entry, item.job, answer.attempts)
        if answer.state in (SubmitAnswer.NEW, SubmitAnswer.QUEUED):
            plan.send.append(counted)
        elif answer.state in (SubmitAnswer.SUBMITTING, SubmitAnswer.AMBIGUOUS):
            plan.check.append(counted)
        elif answer.state == SubmitAnswer.WAIT:
            # Its owner (paused, or slow) may still write the request: nobody looks yet.
            plan.waiting.append((item.entry_id, answer.wait_ms))
        elif answer.state == SubmitAnswer.SETTLED:
            # Already settled (a report may have raced ahead): the entry only needs its ack.
            plan.acknowledge.append(item)
        elif answer.state in GUARD_ANSWERS:
            plan.stopped.append((item, answer.state))
    return plan


@dataclass(slots=True)
class AbsentPlan:
    """What absent.lua's verdicts ask for (STALE: another reconciler's now; nothing to do)."""

    resend: list[Item] = field(default_factory=list)  # SUBMITTING again under the resend's fence
    waiting: list[tuple[str, int]] = field(default_factory=list)  # (entry id, ms): check again later
    decision: Decision = field(default_factory=Decision)  # the exhausted ones, dead-lettered


def plan_absent(lane: str, items: Sequence[Item], verdicts: Sequence[Verdict], *, checker: str) -> AbsentPlan:
    """Sort messages missing from the logs by absent.lua's verdicts; an exhausted one is given up
    on only while `checker` still holds its reconciliation lease."""
    plan = AbsentPlan()
    for item, verdict in zip(items, verdicts, strict=True):
        if verdict.state == AbsentVerdict.RESEND:
            plan.resend.append(Item(item.entry, item.job, verdict.attempts))
        elif verdict.state == AbsentVerdict.WAIT:
            plan.waiting.append((item.entry_id, verdict.wait_ms))
        elif verdict.state == AbsentVerdict.EXHAUSTED:
            failed = give_up(lane, item.entry, item.job, "retries_exhausted",
                             "not found at the provider after repeated attempts", verdict.attempts)
            failed.outcomes[0].guard = f"c:{checker}"
            plan.decision.add(failed)
    return plan


# --- helpers --------------------------------------------------------------------------------------
def describe(error: ProviderError) -> str:
    return f"{type(error).__name__}" + (f" {error.status_code}" if error.status_code else "")


def entry_time_s(entry_id: str, default_s: float) -> float:
    """Stream entry ids start with the server's time in ms: when the job was queued."""
    try:
        return int(entry_id.split("-", 1)[0]) / 1000
    except ValueError:
        return default_s
