"""The Lua scripts behind the outbox, message states and the rate limiter, against real Redis."""

from __future__ import annotations

import time

import orjson

from worker.store import Outcome, Store


def _jobs(n: int, start: int = 0) -> list[tuple[bytes, str | None]]:
    return [(orjson.dumps({"to": f"4179{start + i:07d}", "text": "hi"}), None) for i in range(n)]


def test_enqueue_refuses_a_producer_id_seen_before(store: Store) -> None:
    """A job whose producer id was queued before is reported as a duplicate and not written."""
    first = store.enqueue("bulk", [(b'{"to":"41790000001","text":"a"}', "order-1")])
    again = store.enqueue("bulk", [(b'{"to":"41790000001","text":"a"}', "order-1"), *_jobs(1)])
    assert first[0][1] is True
    assert again[0] == (first[0][0], False)
    assert again[1][1] is True
    assert store.r.xlen(store.outbox("bulk")) == 2


def test_enqueue_in_overlapping_chunks_keeps_every_answer_in_order(store: Store) -> None:
    """Several chunks in flight on one connection: each job gets its own answer, repeats (of an
    earlier call and within the call, across chunk borders) are reported and their entries deleted."""
    store.enqueue("bulk", [(b'{"to":"41790000001","text":"a","id":"old"}', "old")])
    jobs: list[tuple[bytes, str | None]] = []
    for i in range(2_500):
        producer_id = None if i % 3 == 0 else f"id-{i % 1_000}"  # ids repeat every 1000 jobs
        jobs.append((orjson.dumps({"to": f"4179{i:07d}", "text": f"t{i}", "id": producer_id}), producer_id))
    jobs.insert(1_700, (b'{"to":"41790000002","text":"b","id":"old"}', "old"))
    results = store.enqueue("bulk", jobs, chunk=300)

    assert len(results) == len(jobs)
    first_mid: dict[str, str] = {}
    for (_, producer_id), (mid, queued) in zip(jobs, results, strict=True):
        if producer_id is None:
            assert queued and mid.startswith("sw-bulk-")
        elif producer_id in first_mid:
            assert (mid, queued) == (first_mid[producer_id], False)
        else:
            first_mid[producer_id] = mid
            assert queued == (producer_id != "old")
    assert all(store.r.get(store.idem(pid)).decode() == mid for pid, mid in first_mid.items())
    entries = store.r.xrange(store.outbox("bulk"))
    queued_mids = [mid for mid, queued in results if queued]
    assert len(entries) == 1 + len(queued_mids)
    texts = [orjson.loads(fields[b"job"])["text"] for _, fields in entries[1:]]
    assert texts == [orjson.loads(job)["text"] for (job, _), (_, queued) in zip(jobs, results, strict=True) if queued]


def test_claim_waits_for_a_partial_batch_then_takes_it(store: Store) -> None:
    """A partial batch younger than the max wait is left; a full one is taken at once."""
    store.enqueue("bulk", _jobs(3))
    claim = store.claim("bulk", "c1", 10, lease_ms=60_000, max_wait_ms=5_000, recover=False)
    assert claim.kind == "wait" and 0 < claim.wait_ms <= 5_000
    claim = store.claim("bulk", "c1", 3, lease_ms=60_000, max_wait_ms=5_000, recover=False)
    assert claim.kind == "new" and len(claim.entries) == 3
    assert claim.entries[0].message_id == "sw-bulk-" + claim.entries[0].entry_id
    assert store.claim("bulk", "c1", 3, lease_ms=60_000, max_wait_ms=0, recover=False).kind == "empty"


def test_claim_reads_entries_written_before_the_group_existed(store: Store) -> None:
    """Plain XADD from another language before any worker ran is not skipped."""
    store.r.xadd(store.outbox("otp"), {"job": b'{"to":"41790000001","text":"a"}'})
    claim = store.claim("otp", "c1", 10, lease_ms=60_000, max_wait_ms=0, recover=False)
    assert [(e.message_id, e.job) for e in claim.entries] == [
        ("sw-otp-" + claim.entries[0].entry_id, b'{"to":"41790000001","text":"a"}')
    ]


def test_stale_pending_entries_are_recovered_by_another_consumer(store: Store) -> None:
    """Entries of a consumer that died are handed to another after the lease."""
    store.enqueue("bulk", _jobs(2))
    taken = store.claim("bulk", "dead", 10, lease_ms=50, max_wait_ms=0, recover=True)
    assert taken.kind == "new"
    deadline = time.monotonic() + 5
    while True:
        again = store.claim("bulk", "alive", 10, lease_ms=50, max_wait_ms=0, recover=True)
        if again.kind == "recovered" or time.monotonic() > deadline:
            break
    assert again.kind == "recovered"
    assert [e.entry_id for e in again.entries] == [e.entry_id for e in taken.entries]


def test_submit_then_settle_moves_state_and_publishes_once(store: Store) -> None:
    """Settle applies an allowed transition once, writes one event, and acks the entry."""
    store.enqueue("bulk", _jobs(1))
    entry = store.claim("bulk", "c1", 1, lease_ms=60_000, max_wait_ms=0, recover=False).entries[0]
    kw = {"consumer": "c1", "lease_ms": 1000, "state_ttl_s": 3600}
    assert store.submit("bulk", [entry], now_ms=1, **kw) == [("NEW", 1)]
    assert store.submit("bulk", [entry], now_ms=2, **kw) == [("SUBMITTING", 1)]
    assert store.submit("bulk", [entry], now_ms=3, **{**kw, "consumer": "c2"}) == [("BUSY", 1)]
    outcome = Outcome(entry.message_id, entry.entry_id, "ACCEPTED", True, b'{"type":"accepted"}', 10**13,
                      {"bulk_id": "b1"})
    kwargs = {"now_ms": 3, "events_maxlen": 1000, "state_ttl_s": 3600}
    assert store.settle("bulk", [outcome], **kwargs) == [True]
    assert store.settle("bulk", [outcome], **kwargs) == [False]
    assert store.r.xlen(store.events) == 1
    assert store.r.xlen(store.outbox("bulk")) == 0
    assert store.message(entry.message_id)["state"] == "ACCEPTED"
    assert store.message(entry.message_id)["bulk_id"] == "b1"
    assert store.r.zscore(store.awaiting, entry.message_id) == 10**13


def test_rate_limiter_grants_at_most_the_burst_then_refills(store: Store) -> None:
    """The GCRA grants up to the burst, then nothing until tokens refill at the rate."""
    buckets = [("mps", 100.0, 100.0, "messages")]
    assert store.acquire_tokens(500, buckets) == (100, 0)
    granted, wait_ms = store.acquire_tokens(500, buckets)
    assert granted == 0 and 0 < wait_ms <= 10
    deadline = time.monotonic() + 2
    while store.acquire_tokens(10, buckets)[0] == 0:
        assert time.monotonic() < deadline


def test_request_bucket_limits_calls_not_messages(store: Store) -> None:
    """A request bucket allows one call per token whatever the message count."""
    buckets = [("mps", 1e6, 1e6, "messages"), ("rps", 1.0, 1.0, "request")]
    assert store.acquire_tokens(1000, buckets)[0] == 1000
    granted, wait_ms = store.acquire_tokens(1000, buckets)
    assert granted == 0 and 900 <= wait_ms <= 1000


def test_penalize_pauses_every_caller(store: Store) -> None:
    """After a 429 push-back, nobody gets tokens until the pause is over."""
    buckets = [("mps", 1e6, 1e6, "messages")]
    store.penalize(300, [(name, rate, burst) for name, rate, burst, _ in buckets])
    granted, wait_ms = store.acquire_tokens(10, buckets)
    assert granted == 0 and 250 <= wait_ms <= 301


def test_slots_bound_concurrent_dispatchers(store: Store) -> None:
    """Only `limit` dispatchers hold a slot; a released slot is free again."""
    assert store.acquire_slot("bulk", "a", 2, 10_000)
    assert store.acquire_slot("bulk", "b", 2, 10_000)
    assert not store.acquire_slot("bulk", "c", 2, 10_000)
    assert store.acquire_slot("bulk", "a", 2, 10_000)  # renewal
    store.release_slot("bulk", "a")
    assert store.acquire_slot("bulk", "c", 2, 10_000)
