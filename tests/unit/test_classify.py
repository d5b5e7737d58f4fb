"""The outcome table of docs/architecture.md ("## Outcomes"), row by row, against the pure decisions of
worker.dispatch.classify: a batch and the provider's answer (or error) in, outcomes and actions out."""

from __future__ import annotations

import time
from typing import Any

import orjson

from worker.dispatch import DispatchConfig
from worker.dispatch.classify import (
    Item,
    Pause,
    PauseReason,
    RetryIn,
    classify_error,
    classify_response,
    plan_absent,
    plan_submitted,
)
from worker.errors import (
    ProviderAmbiguous,
    ProviderAuthError,
    ProviderBadRequest,
    ProviderNotActedOn,
    ProviderRateLimited,
    SendWindowClosed,
    Violation,
)
from worker.models import State
from worker.provider import MessageStatus, SendResponse, SendResult
from worker.settings import LaneConfig
from worker.store import AbsentVerdict, Entry, SubmitAnswer, Submitted, Verdict

CONFIG = DispatchConfig(
    lanes={"bulk": LaneConfig()}, lease_ms=180_000, send_window_ms=30_000, state_ttl_s=3 * 86400,
    events_maxlen=1_000_000, max_text_parts=25, metadata_max_bytes=2048, idempotency_ttl_s=2 * 86400,
    max_attempts=10, retry_horizon_s=6 * 3600, reconcile_checks=3, reconcile_window_ms=60_000,
    reconcile_delay_ms=5000, auth_pause_s=30, outage_pause_s=10, no_report_grace_s=3600,
    default_sender=None, webhook_url=None,
)
NOW_MS = int(time.time() * 1000)
PENDING = MessageStatus(1, "PENDING", 26, "PENDING_ACCEPTED", "Message sent to next instance")
REJECTED = MessageStatus(5, "REJECTED", 8, "REJECTED_PREFIX_MISSING", "Number prefix missing")
DUPLICATE = MessageStatus(5, "REJECTED", 71, "REJECTED_DUPLICATE_MESSAGE_ID", "Duplicate message id")
SCHEDULED = MessageStatus(9, "SCHEDULED", 90, "SCHEDULED_FOR_LATER", "A group this code does not know")


def _items(n: int, attempts: int = 1, queued_ms: int = NOW_MS) -> list[Item]:
    return [Item(Entry(f"{queued_ms}-{i}", f"sw-bulk-{i}", orjson.dumps({"to": "41790000000", "text": "hi"})),
                 {"to": "41790000000", "text": "hi", "id": f"job-{i}"}, attempts) for i in range(n)]


def _response(items: list[Item], status: MessageStatus, skip: int = 0) -> SendResponse:
    return SendResponse("bulk-1", [SendResult(item.message_id, "41790000000", status, 1) for item in items[skip:]], 0.1)


def _states(decision: Any) -> list[State | None]:
    return [o.state for o in decision.outcomes]


def _event(outcome: Any) -> dict[str, Any]:
    return dict(orjson.loads(outcome.event))


def test_200_pending_or_accepted_is_accepted_acked_with_an_event_awaiting_its_report() -> None:
    items = _items(2)
    decision = classify_response(CONFIG, "bulk", items, _response(items, PENDING), resend=False, now_ms=NOW_MS)
    assert _states(decision) == [State.ACCEPTED] * 2
    assert all(o.ack and not o.guard for o in decision.outcomes)
    assert _event(decision.outcomes[0])["type"] == "accepted" and _event(decision.outcomes[0])["id"] == "job-0"
    # No validity period: 48 h, plus the no-report grace.
    assert decision.outcomes[0].deadline_ms == NOW_MS + (48 * 3600 + 3600) * 1000
    assert decision.bulk_id == "bulk-1" and decision.reconcile == [] and decision.pause is None


def test_an_accepted_messages_report_deadline_is_its_validity_period_plus_the_grace() -> None:
    validity = {"amount": 2, "time_unit": "HOURS"}
    items = [Item(item.entry, {**item.job, "validity_period": validity}) for item in _items(1)]
    decision = classify_response(CONFIG, "bulk", items, _response(items, PENDING), resend=False, now_ms=NOW_MS)
    assert decision.outcomes[0].deadline_ms == NOW_MS + (2 * 3600 + 3600) * 1000


def test_200_rejected_is_rejected_acked_with_a_terminal_event() -> None:
    items = _items(1)
    decision = classify_response(CONFIG, "bulk", items, _response(items, REJECTED), resend=False, now_ms=NOW_MS)
    assert _states(decision) == [State.REJECTED]
    outcome = decision.outcomes[0]
    assert outcome.ack and _event(outcome)["type"] == "rejected"
    assert outcome.fields == {"bulk_id": "bulk-1", "status": "REJECTED_PREFIX_MISSING"}


def test_200_duplicate_message_id_on_a_resend_is_accepted() -> None:
    items = _items(1, attempts=2)
    resent = classify_response(CONFIG, "bulk", items, _response(items, DUPLICATE), resend=True, now_ms=NOW_MS)
    assert _states(resent) == [State.ACCEPTED]
    # On a first send the same answer is the provider's rejection.
    first = classify_response(CONFIG, "bulk", items, _response(items, DUPLICATE), resend=False, now_ms=NOW_MS)
    assert _states(first) == [State.REJECTED]


def test_200_without_a_destination_we_sent_is_ambiguous_pending_and_reconciled() -> None:
    items = _items(3)
    decision = classify_response(CONFIG, "bulk", items, _response(items, PENDING, skip=1), resend=False,
                                 now_ms=NOW_MS)
    assert _states(decision) == [State.ACCEPTED, State.ACCEPTED, State.AMBIGUOUS]
    lost = decision.outcomes[-1]
    assert lost.message_id == items[0].message_id and not lost.ack
    assert lost.fields == {"last_error": "missing from the provider's answer"}
    assert decision.reconcile == [[items[0].entry_id]]


def test_connect_error_429_503_is_queued_pending_with_a_lane_pause_and_the_batch_due_after_it() -> None:
    items = _items(2, attempts=30)  # past SMS_MAX_ATTEMPTS: an outage is retried whatever the tries
    for error in (ProviderNotActedOn("connect refused"), ProviderRateLimited("429", status_code=429),
                  ProviderNotActedOn("503", status_code=503)):
        decision = classify_error(CONFIG, "bulk", items, error, now_ms=NOW_MS)
        assert _states(decision) == [State.QUEUED] * 2 and not any(o.ack for o in decision.outcomes)
        assert decision.pause == Pause(PauseReason.PROVIDER_UNAVAILABLE, 10)
        assert decision.retry_in == RetryIn([i.entry_id for i in items], 10_000)
        assert "attempts" not in (decision.outcomes[0].fields or {}), "the attempt counts"
        assert decision.dead_letters == []


def test_an_outage_past_the_retry_horizon_is_dead_lettered() -> None:
    old = _items(1, queued_ms=NOW_MS - int(CONFIG.retry_horizon_s * 1000) - 1000)
    decision = classify_error(CONFIG, "bulk", old, ProviderNotActedOn("503", status_code=503), now_ms=NOW_MS)
    assert _states(decision) == [State.FAILED]
    assert decision.outcomes[0].ack and decision.outcomes[0].dead_letter
    assert [d.reason for d in decision.dead_letters] == ["retries_exhausted"]


def test_400_for_the_bulk_is_split_until_the_bad_message_is_alone_then_dead_lettered() -> None:
    error = ProviderBadRequest("400", body={"errorCode": "E400"}, violations=(Violation("to", "is invalid"),))
    split = classify_error(CONFIG, "bulk", _items(4), error, now_ms=NOW_MS)
    assert split.split and split.outcomes == []
    alone = classify_error(CONFIG, "bulk", _items(1), error, now_ms=NOW_MS)
    assert not alone.split and _states(alone) == [State.FAILED]
    assert orjson.loads(alone.outcomes[0].dead_letter)["detail"] == "to: is invalid"
    assert orjson.loads(alone.outcomes[0].dead_letter)["last_answer"] == {"errorCode": "E400"}
    assert _event(alone.outcomes[0])["type"] == "failed" and _event(alone.outcomes[0])["reason"] == "bad_request"


def test_401_403_is_queued_without_counting_the_attempt_and_pauses_the_lane_for_auth() -> None:
    items = _items(2, attempts=3)
    for status in (401, 403):
        decision = classify_error(CONFIG, "bulk", items, ProviderAuthError("refused", status_code=status),
                                  now_ms=NOW_MS)
        assert _states(decision) == [State.QUEUED] * 2 and not any(o.ack for o in decision.outcomes)
        assert decision.outcomes[0].fields == {"last_error": f"ProviderAuthError {status}", "attempts": 2}
        assert decision.pause == Pause(PauseReason.AUTH, 30)
        assert decision.retry_in == RetryIn([i.entry_id for i in items], 30_000)


def test_timeouts_dropped_connections_5xx_and_unreadable_200s_are_ambiguous_and_reconciled() -> None:
    items = _items(2)
    decision = classify_error(CONFIG, "bulk", items, ProviderAmbiguous("read timeout"), now_ms=NOW_MS)
    assert _states(decision) == [State.AMBIGUOUS] * 2 and not any(o.ack for o in decision.outcomes)
    assert decision.reconcile == [[i.entry_id for i in items]]
    assert decision.pause is None and decision.retry_in is None
    assert [n.event for n in decision.notes] == ["send_ambiguous"]


def test_200_with_a_status_group_not_in_the_contract_is_ambiguous_and_reconciled_never_terminal() -> None:
    items = _items(2)
    decision = classify_response(CONFIG, "bulk", items, _response(items, SCHEDULED), resend=False, now_ms=NOW_MS)
    assert _states(decision) == [State.AMBIGUOUS] * 2
    assert decision.outcomes[0].fields == {"last_error": "unknown status group"}
    assert decision.reconcile == [[i.entry_id for i in items]]
    assert decision.unknown_statuses == 2
    assert [n.event for n in decision.notes] == ["provider_unknown_status"] * 2


def test_a_send_window_closed_is_queued_without_counting_the_attempt_due_at_once_and_no_pause() -> None:
    items = _items(2, attempts=1)
    decision = classify_error(CONFIG, "bulk", items, SendWindowClosed("fence gone"), now_ms=NOW_MS)
    assert _states(decision) == [State.QUEUED] * 2
    assert decision.outcomes[0].fields == {"last_error": "SendWindowClosed", "attempts": 0}
    assert decision.pause is None
    assert decision.retry_in == RetryIn([i.entry_id for i in items], 0)
    assert decision.fenced == 2 and [n.event for n in decision.notes] == ["send_window_closed"]


# --- the store's answers ----------------------------------------------------------------------------


def test_submit_answers_say_send_reconcile_wait_or_acknowledge() -> None:
    items = _items(7)
    answers = [Submitted(SubmitAnswer.NEW, 1), Submitted(SubmitAnswer.QUEUED, 2), Submitted(SubmitAnswer.SUBMITTING, 1),
               Submitted(SubmitAnswer.AMBIGUOUS, 3), Submitted(SubmitAnswer.WAIT, 1, 250),
               Submitted(SubmitAnswer.BUSY, 1), Submitted(SubmitAnswer.SETTLED, 1)]
    plan = plan_submitted(items, answers)
    assert [(i.message_id, i.attempts) for i in plan.send] == [("sw-bulk-0", 1), ("sw-bulk-1", 2)]
    assert [(i.message_id, i.attempts) for i in plan.check] == [("sw-bulk-2", 1), ("sw-bulk-3", 3)]
    assert plan.waiting == [(items[4].entry_id, 250)]
    assert [i.message_id for i in plan.acknowledge] == ["sw-bulk-6"]


def test_absent_verdicts_say_resend_wait_give_up_under_the_lease_or_leave_alone() -> None:
    items = _items(4)
    verdicts = [Verdict(AbsentVerdict.RESEND, 2), Verdict(AbsentVerdict.WAIT, 1, 900),
                Verdict(AbsentVerdict.EXHAUSTED, 11), Verdict(AbsentVerdict.STALE, 1)]
    plan = plan_absent("bulk", items, verdicts, checker="me:1")
    assert [(i.message_id, i.attempts) for i in plan.resend] == [("sw-bulk-0", 2)]
    assert plan.waiting == [(items[1].entry_id, 900)]
    assert _states(plan.decision) == [State.FAILED]
    assert plan.decision.outcomes[0].guard == "c:me:1"
    assert [d.reason for d in plan.decision.dead_letters] == ["retries_exhausted"]
