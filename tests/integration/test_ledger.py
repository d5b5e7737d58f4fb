"""The ledger (worker/lua/lib/ledger.lua) against real Redis: every state change a script makes also
appends the message's trail and moves its campaign's counters, in the same call.

These drive the store's own calls (claim, submit, settle, reports, schedule, cancel, replay) with
outbox entries written as a producer in another language would (plain XADD, not counted at
enqueue) and as the producer API does (field `c`, counted at enqueue), and compare the counters
with what the messages' states are."""

from __future__ import annotations

from collections import Counter
from importlib import resources

import orjson
import pytest

from worker.deadletters import job_dead_letter
from worker.models import State
from worker.reports.ops import Op, OpCode, price_spec
from worker.store import Outcome, Store
from worker.store.deadletters import Requeue

LANE = "bulk"
KW = {"consumer": "c1", "lease_ms": 60_000, "state_ttl_s": 3600, "fence": "f1", "send_window_ms": 30_000}
SETTLE = {"now_ms": 1, "events_maxlen": 10_000, "state_ttl_s": 3600}
COUNTERS = ("scheduled", "queued", "sending", "accepted", "rejected", "delivered", "undeliverable", "expired",
            "failed", "cancelled")


def _job(n: int, campaign: str | None = "spring") -> bytes:
    job: dict[str, object] = {"to": f"4179{n:07d}", "text": "hi"}
    if campaign:
        job["campaign_reference_id"] = campaign
    return orjson.dumps(job)


def _counts(store: Store, campaign: str = "spring") -> dict[str, int]:
    raw = store.r.hgetall(store.campaign(campaign))
    return {k.decode(): int(v) for k, v in raw.items() if not k.startswith(b"first") and not k.startswith(b"updated")}


def _recount(store: Store, campaign: str = "spring") -> Counter[str]:
    """What the counters must say: the campaign's messages by state, read from their hashes."""
    names = {"SUBMITTING": "sending", "AMBIGUOUS": "sending"}
    states: Counter[str] = Counter()
    for key in store.r.scan_iter(match=store.msg("*")):
        state, of = store.r.hmget(key, "state", "campaign")
        if of == campaign.encode():
            states[names.get(state.decode(), state.decode().lower())] += 1
    return states


def _assert_exact(store: Store, campaign: str = "spring", unrecorded: int = 0) -> None:
    counts = _counts(store, campaign)
    recount = _recount(store, campaign)
    assert {name: counts.get(name, 0) for name in COUNTERS if counts.get(name, 0) or recount[name]} == {
        name: recount[name] + (unrecorded if name == "queued" else 0)
        for name in COUNTERS if counts.get(name, 0) or recount[name]}
    assert counts["total"] == sum(recount.values()) + unrecorded


def _trail(store: Store, mid: str) -> list[str]:
    raw = store.r.hget(store.msg(mid), "trail")
    return raw.decode().split("\n") if raw else []


def _claim(store: Store, n: int) -> list:  # type: ignore[type-arg]
    return store.claim(LANE, "c1", n, lease_ms=60_000, max_wait_ms=0, recover=False).entries


def test_a_plain_xadd_campaign_is_counted_when_recorded_and_follows_every_state(store: Store) -> None:
    for n in range(4):
        store.r.xadd(store.outbox(LANE), {"job": _job(n)})
    store.r.xadd(store.outbox(LANE), {"job": _job(9, campaign=None)})  # no campaign: never counted
    entries = _claim(store, 5)
    store.submit(LANE, entries, **KW)
    assert _counts(store) == {"total": 4, "sending": 4}
    ok, rejected, ambiguous, failed = entries[:4]
    store.settle(LANE, [
        Outcome(ok.message_id, ok.entry_id, State.ACCEPTED, ack=True, event=b'{"type":"accepted"}'),
        Outcome(rejected.message_id, rejected.entry_id, State.REJECTED, ack=True, event=b"{}",
                fields={"status": "REJECTED_NETWORK"}),
        Outcome(ambiguous.message_id, ambiguous.entry_id, State.AMBIGUOUS, ack=False, fields={"last_error": "timeout"}),
        Outcome(failed.message_id, failed.entry_id, State.QUEUED, ack=False, fields={"last_error": "HTTP 503"}),
    ], **SETTLE)
    _assert_exact(store)
    assert _counts(store)["sent"] == 1
    assert store.r.zscore(store.campaigns, "spring") is not None
    assert 0 < store.r.ttl(store.campaign("spring")) <= 3600

    item = {"messageId": ok.message_id, "price": {"pricePerMessage": 0.0075, "currency": "EUR"}}
    _, results = store.apply_reports(
        [Op(OpCode.APPLY, ok.message_id, "DELIVERED", "DELIVERED_TO_HANDSET", b'{"type":"delivered"}',
            price_spec(item), "webhook")], group="reports", now_ms=2, events_maxlen=10_000)
    assert results == [1]
    counts = _counts(store)
    assert counts["delivered"] == 1 and counts["accepted"] == 0 and counts["price:EUR"] == 7500
    _assert_exact(store)

    trail = _trail(store, ok.message_id)
    steps = [line.split(" ")[1] for line in trail]
    # The first submit is the record itself (no text built on the common path), then one line a step.
    assert steps == ["state", "report"]
    assert store.r.hmget(store.msg(ok.message_id), "first_by", "fence", "attempts") == [b"c1", b"f1", b"1"]
    accepted_event = trail[0].split("event=")[1]
    assert store.r.xrange(store.events, accepted_event, accepted_event)[0][1][b"event"] == b'{"type":"accepted"}'
    assert "to=DELIVERED status=DELIVERED_TO_HANDSET source=webhook event=" in trail[1]
    assert _trail(store, failed.message_id)[-1].endswith("state to=QUEUED note=HTTP 503")
    assert _trail(store, rejected.message_id)[-1].endswith("note=REJECTED_NETWORK")


def test_entries_counted_at_enqueue_move_from_queued_and_a_counted_repeat_leaves_once(store: Store) -> None:
    # As the producer API writes them: the entry names its campaign in `c`, counted in the same MULTI.
    for n in range(3):
        store.r.xadd(store.outbox(LANE), {"job": _job(n), "c": "spring"})
    store.r.hincrby(store.campaign("spring"), "total", 3)
    store.r.hincrby(store.campaign("spring"), "queued", 3)
    first, second, repeat = _claim(store, 3)
    assert first.counted == "spring"
    store.submit(LANE, [first, second], **KW)
    _assert_exact(store, unrecorded=1)
    # The third repeats a producer id: acknowledged, and it leaves the campaign; acknowledging it
    # again (a recovered copy of the batch) finds it deleted and uncounts nothing.
    for _ in range(2):
        store.settle(LANE, [Outcome.acknowledge(repeat.message_id, repeat.entry_id, repeat_of=repeat)], **SETTLE)
        assert _counts(store) == {"total": 2, "queued": 0, "sending": 2}
    assert store.r.xlen(store.outbox(LANE)) == 2


def test_an_invalid_job_fails_into_its_campaign(store: Store) -> None:
    store.r.xadd(store.outbox(LANE), {"job": _job(1), "c": "spring"})
    store.r.hincrby(store.campaign("spring"), "total", 1)
    store.r.hincrby(store.campaign("spring"), "queued", 1)
    (entry,) = _claim(store, 1)
    dead = job_dead_letter(message_id=entry.message_id, lane=LANE, entry_id=entry.entry_id, reason="invalid_job",
                           detail="x", attempts=0, job=entry.job, last_answer=None)
    store.settle(LANE, [Outcome(entry.message_id, entry.entry_id, State.FAILED, ack=True, event=b"{}",
                                fields={"reason": "invalid_job"}, dead_letter=dead, campaign="1spring")], **SETTLE)
    assert _counts(store) == {"total": 1, "queued": 0, "failed": 1}
    (line,) = _trail(store, entry.message_id)
    dlq_id = line.split("dlq=")[1].split(" ")[0]
    assert store.r.xrange(store.dlq, dlq_id, dlq_id)

    # Replayed under its own id: QUEUED again, out of `failed`, and the replay is on its trail.
    store.replay_dead_letter(Requeue(dlq_id=dlq_id, lane=LANE, job=entry.job.decode(), message_id=entry.message_id,
                                     event=b"{}", handover_id=None, new_message_id=False,
                                     original_message_id=entry.message_id, idempotency_ttl_s=60, events_maxlen=100))
    assert _counts(store) == {"total": 1, "queued": 1, "failed": 0}
    assert _trail(store, entry.message_id)[-1].endswith(f"requeued dlq={dlq_id}")


def test_scheduled_then_due_then_cancelled(store: Store) -> None:
    (mid, _), (later, _) = store.schedule(LANE, [(_job(1), None, 1), (_job(2), "p-2", 2**41)], state_ttl_s=3600,
                                          idempotency_ttl_s=60)
    assert _counts(store) == {"total": 2, "scheduled": 2}
    assert store.move_due(LANE, state_ttl_s=3600)[0] == 1
    assert _counts(store) == {"total": 2, "scheduled": 1, "queued": 1}
    for target in (mid, later):
        assert store.cancel(message_id=target, events_maxlen=100, state_ttl_s=3600).cancelled
    assert _counts(store) == {"total": 2, "scheduled": 0, "queued": 0, "cancelled": 2}
    assert [line.split(" ")[1] for line in _trail(store, mid)] == ["scheduled", "queued", "cancelled"]
    _assert_exact(store)


def test_a_counted_entry_never_claimed_is_cancelled_out_of_queued(store: Store) -> None:
    entry_id = store.r.xadd(store.outbox(LANE), {"job": _job(1), "c": "spring"}).decode()
    store.r.hincrby(store.campaign("spring"), "total", 1)
    store.r.hincrby(store.campaign("spring"), "queued", 1)
    answer = store.cancel(message_id=store.lane_prefix(LANE) + entry_id, events_maxlen=100, state_ttl_s=3600)
    assert answer.cancelled
    assert _counts(store) == {"total": 1, "queued": 0, "cancelled": 1}


@pytest.mark.parametrize("lines", [3, 400])
def test_the_trail_is_capped_keeping_its_first_line_and_the_newest(store: Store, lines: int) -> None:
    script = (resources.files("worker") / "lua" / "lib" / "ledger.lua").read_text()
    script += ("\nlocal t = false\nfor i = 1, tonumber(ARGV[1]) do t = ledger_trail(t, i .. ' step n=' .. i) end"
               "\nreturn t")
    trail = store.r.eval(script, 0, lines).decode().split("\n")
    if lines == 3:
        assert trail == ["1 step n=1", "2 step n=2", "3 step n=3"]
        return
    assert sum(len(line) + 1 for line in trail) <= 4096
    assert trail[0] == "1 step n=1" and trail[1].endswith(" trimmed") and trail[-1] == "400 step n=400"
    assert sum(line.endswith(" trimmed") for line in trail) == 1  # the last trim's mark only
    assert [int(line.split(" ")[0]) for line in trail[2:]] == list(range(int(trail[2].split(" ")[0]), 401))


def test_price_spec_reads_a_report_price_in_millionths() -> None:
    assert price_spec({"price": {"pricePerMessage": 0.0075, "currency": "EUR"}}) == "7500 EUR"
    assert price_spec({"price": {"pricePerMessage": 1, "currency": "CHF"}}) == "1000000 CHF"
    assert price_spec({"price": {"pricePerMessage": "0.1", "currency": "EUR"}}) == ""
    assert price_spec({"price": {"pricePerMessage": float("nan"), "currency": "EUR"}}) == ""
    assert price_spec({"price": {"pricePerMessage": 0.1, "currency": "E R"}}) == ""
    assert price_spec({}) == ""
