"""The Lua scripts behind the outbox, message states and the rate limiter, against real Redis."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import orjson
import pytest
import redis

from tests.support.redis_server import RedisServer
from worker.errors import EnqueueIncomplete, StoreError
from worker.outbox import Outbox, OutboxConfig
from worker.ratelimit import RateLimiter, RateLimiterConfig
from worker.settings import Settings
from worker.store import SCRIPT_CHUNK, Entry, Outcome, Store, Submitted, connect, resp
from worker.store.policy import GuardBatch, GuardLimits


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


def test_a_script_another_client_loads_between_two_of_our_calls_runs_each_call_once(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Redis that forgot its scripts answers NOSCRIPT to our first call, and another process loads
    the script before our second call arrives: the second ran. Only the refused call is sent again;
    sending both again ran the second twice, and its messages, found SUBMITTING by their own batch,
    waited out their send window and the provider's logs (minutes) before they were sent."""
    store.enqueue("bulk", _jobs(2 * SCRIPT_CHUNK))
    entries = store.claim("bulk", "c1", 2 * SCRIPT_CHUNK, lease_ms=60_000, max_wait_ms=0, recover=False).entries
    store.r.script_flush()
    sent = store.send_calls
    load = (b"SCRIPT", b"LOAD", store.script("submit").script)

    def another_client_loads_it_in_between(commands: Any) -> list[Any]:
        if len(commands) < 2:
            return sent(commands)
        replies = resp.pipeline(store.r, [commands[0], load, *commands[1:]], checked=False)
        return [replies[0], *replies[2:]]

    monkeypatch.setattr(store, "send_calls", another_client_loads_it_in_between)
    answers = store.submit("bulk", entries, consumer="c1", lease_ms=60_000, state_ttl_s=3600, fence="f1",
                           send_window_ms=60_000)
    assert [a.state for a in answers] == ["NEW"] * (2 * SCRIPT_CHUNK)
    assert {store.message(e.message_id)["attempts"] for e in entries} == {"1"}


def test_a_message_named_twice_in_one_submit_call_is_recorded_and_sent_once(store: Store) -> None:
    """Two outbox entries of one message id in one call: the first is recorded (NEW), the second
    finds it SUBMITTING under its send window (WAIT, looked at later), as two calls would; never
    two NEWs, which would put the message twice in one POST."""
    store.enqueue("bulk", _jobs(1))
    [entry] = store.claim("bulk", "c1", 1, lease_ms=60_000, max_wait_ms=0, recover=False).entries
    twin = Entry("0-1", entry.message_id, entry.job)
    answers = store.submit("bulk", [entry, twin], consumer="c1", lease_ms=60_000, state_ttl_s=3600, fence="f1",
                           send_window_ms=60_000)
    assert [a.state for a in answers] == ["NEW", "WAIT"]
    assert store.message(entry.message_id)["attempts"] == "1"


def test_a_message_named_twice_in_one_guarded_call_is_counted_once_and_refused_twice(store: Store) -> None:
    """With a per-number limit of 1: the first message to a number is counted once although named
    twice (NEW, WAIT); the next message to it is refused in both of its turns, never let through by
    the second."""
    limits = GuardLimits(number_limit=1, number_window_ms=3_600_000)
    args = store.guard_args("bulk", limits, fail_open=False)
    store.enqueue("bulk", _jobs(1) + _jobs(1))  # two messages to one number
    first, second = store.claim("bulk", "c1", 2, lease_ms=60_000, max_wait_ms=0, recover=False).entries

    def submit(*entries: Entry) -> list[str]:
        guards = GuardBatch(args, ["41790000000"] * len(entries), [""] * len(entries), [1] * len(entries),
                            [""] * len(entries))
        answers, _ = store.submit_guarded("bulk", list(entries), guards, consumer="c1", lease_ms=60_000,
                                          state_ttl_s=3600, fence="f1", send_window_ms=60_000)
        return [a.state for a in answers]

    assert submit(first, Entry("0-1", first.message_id, first.job)) == ["NEW", "WAIT"]
    assert store.spend_today(["bulk"])["bulk"].messages == 1  # counted once, not twice
    window = int(store.r.time()[0]) // 3600
    assert store.r.hget(f"{store.policy_prefix('bulk')}n:{window}", "41790000000") == b"1"
    assert submit(second, Entry("0-2", second.message_id, second.job)) == ["NUMBER", "NUMBER"]
    assert "state" not in store.message(second.message_id)


def test_submit_then_settle_moves_state_and_publishes_once(store: Store) -> None:
    """Settle applies an allowed transition once, writes one event, and acks the entry."""
    store.enqueue("bulk", _jobs(1))
    entry = store.claim("bulk", "c1", 1, lease_ms=60_000, max_wait_ms=0, recover=False).entries[0]
    kw: dict[str, Any] = {"consumer": "c1", "lease_ms": 1000, "state_ttl_s": 3600, "fence": "f1",
                          "send_window_ms": 1, "margin_ms": 0}
    assert store.submit("bulk", [entry], **kw) == [Submitted("NEW", 1)]
    time.sleep(0.002)  # past the 1 ms send window: the record may be reconciled now
    assert store.submit("bulk", [entry], **kw) == [Submitted("SUBMITTING", 1)]
    assert store.submit("bulk", [entry], **{**kw, "consumer": "c2"}) == [Submitted("BUSY", 1)]
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


def test_extra_parts_are_charged_to_the_message_buckets(store: Store) -> None:
    """A batch whose texts have more parts than messages owes the difference: charged after the
    claim, it delays the next grants as if the parts had been granted (the provider counts parts)."""
    buckets = [("mps", 100.0, 100.0, "messages")]
    assert store.acquire_tokens(50, buckets) == (50, 0)  # 50 messages granted, half the burst
    store.charge_tokens(150, [("mps", 100.0)])  # ... of 200 parts: 150 more than granted
    granted, wait_ms = store.acquire_tokens(10, buckets)
    assert granted == 0 and 900 <= wait_ms <= 1010  # 100 tokens of debt past the burst: ~1 s at 100/s
    limiter = RateLimiter(RateLimiterConfig(mps=100.0, lane_shares={"bulk": 1.0}), store)
    before = store.r.get(store.bucket("mps"))
    limiter.charge_parts("bulk", 0)
    RateLimiter(RateLimiterConfig(lane_shares={"bulk": 1.0}), store).charge_parts("bulk", 10)  # no limit: no charge
    assert store.r.get(store.bucket("mps")) == before
    limiter.charge_parts("bulk", 10)
    assert float(store.r.get(store.bucket("mps"))) > float(before)


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


# --- enqueue when Redis refuses part of a call ----------------------------------------------------


@pytest.fixture
def private_redis() -> Iterator[RedisServer]:
    """A redis-server of this test alone: these tests change its users and memory limit."""
    server = RedisServer().start()
    yield server
    server.cleanup()


def _restricted_store(server: RedisServer, *key_patterns: str, commands: tuple[str, ...] = ("+@all",)) -> Store:
    """A Store logged in as a user that may touch only keys matching `key_patterns`: Redis refuses
    a command on any other key with NOPERM while queueing it, like a command refused for memory."""
    admin = redis.Redis.from_url(server.url)
    admin.acl_setuser("producer", enabled=True, passwords=["+producer-pw"], keys=list(key_patterns),
                      commands=list(commands))
    admin.close()
    return Store(connect(f"redis://producer:producer-pw@127.0.0.1:{server.port}/0"))


def _id_jobs(n: int, name: Callable[[int], str] = lambda i: f"ok-{i}") -> list[tuple[bytes, str | None]]:
    return [(orjson.dumps({"to": f"4179{i:07d}", "text": f"t{i}", "id": name(i)}), name(i)) for i in range(n)]


def _outbox_and_claims(store: Store) -> tuple[dict[str, str], dict[str, str]]:
    """(message id -> producer id) of every outbox entry, (producer id -> message id) of every claim."""
    entries = {fields[b"mid"].decode(): orjson.loads(fields[b"job"])["id"]
               for _, fields in store.r.xrange(store.outbox("bulk"))}
    claims = {key.decode().removeprefix(store.idem("")): store.r.get(key).decode()
              for key in store.r.scan_iter(store.idem("*"))}
    return entries, claims


def test_a_refused_append_leaves_its_producer_id_unclaimed(private_redis: RedisServer) -> None:
    """Redis refuses the XADD but would run the SET of its producer id (independent commands): the
    chunk is one transaction, so nothing is claimed, and the retry is queued, not a "duplicate"."""
    admin = Store(connect(private_redis.url))
    refused = _restricted_store(private_redis, "sms:idem:*")  # may claim, may not append
    jobs = _id_jobs(5)
    with pytest.raises(StoreError) as caught:
        refused.enqueue("bulk", jobs, chunk=2)
    assert _outbox_and_claims(admin) == ({}, {})

    retried = admin.enqueue("bulk", jobs, chunk=2)
    assert all(queued for _, queued in retried), "a job never written was reported as a duplicate"
    entries, claims = _outbox_and_claims(admin)
    assert entries == {mid: f"ok-{i}" for i, (mid, _) in enumerate(retried)}
    assert claims == {f"ok-{i}": mid for i, (mid, _) in enumerate(retried)}
    assert isinstance(caught.value, EnqueueIncomplete) and caught.value.queued == [None] * 5
    assert "NOPERM" in str(caught.value)


def test_a_chunk_refused_mid_call_is_reported_exactly(private_redis: RedisServer) -> None:
    """Chunk 2 of 4 is refused while chunk 3 is already in flight: EnqueueIncomplete says chunks 1
    and 3 are queued, chunks 2 and 4 left nothing behind; retrying exactly those is safe."""
    admin = Store(connect(private_redis.url))
    store = _restricted_store(private_redis, "sms:outbox:*", "sms:idem:ok-*")
    jobs = _id_jobs(8, lambda i: "bad-3" if i == 3 else f"ok-{i}")  # chunks of 2: the second is refused
    jobs[6] = (b'{"to":"41790000006","text":"t6"}', None)  # a job without a producer id in the unsent chunk
    with pytest.raises(EnqueueIncomplete) as caught:
        store.enqueue("bulk", jobs, chunk=2)
    queued = caught.value.queued
    assert [answer is not None for answer in queued] == [True, True, False, False, True, True, False, False]
    assert all(answer[1] for answer in queued if answer is not None)
    entries, claims = _outbox_and_claims(admin)
    assert entries == {answer[0]: jobs[i][1] for i, answer in enumerate(queued) if answer is not None}
    assert claims == {jobs[i][1]: answer[0] for i, answer in enumerate(queued) if answer is not None}

    again = [i for i, answer in enumerate(queued) if answer is None]
    retried = admin.enqueue("bulk", [jobs[i] for i in again], chunk=2)
    assert all(queued for _, queued in retried)
    assert admin.r.xlen(admin.outbox("bulk")) == len(jobs)


def test_enqueue_when_redis_is_out_of_memory_writes_nothing(private_redis: RedisServer) -> None:
    """maxmemory reached under noeviction: every chunk is refused whole, EnqueueIncomplete says so,
    no producer id is claimed, and once there is memory again the retry is queued."""
    admin = Store(connect(private_redis.url))
    admin.r.config_set("maxmemory-policy", "noeviction")
    admin.r.config_set("maxmemory", 1)
    jobs = [*_id_jobs(3), *_jobs(2)]
    with pytest.raises(EnqueueIncomplete) as caught:
        admin.enqueue("bulk", jobs, chunk=2)
    assert caught.value.queued == [None] * 5
    assert "OOM" in str(caught.value)
    admin.r.config_set("maxmemory", 0)
    assert _outbox_and_claims(admin) == ({}, {})
    assert all(queued for _, queued in admin.enqueue("bulk", jobs, chunk=2))


def test_a_command_failing_inside_the_transaction_is_undone(store: Store) -> None:
    """A command that fails only when EXEC runs it (WRONGTYPE) does not stop the rest of the
    transaction: the other half of that job is deleted again and the job reported as not written."""
    store.r.hset(store.idem("ok-1"), "not", "a string")  # job 1: appended, then its claim fails
    with pytest.raises(EnqueueIncomplete) as caught:
        store.enqueue("bulk", _id_jobs(3))
    queued = caught.value.queued
    assert queued[1] is None and queued[0] is not None and queued[2] is not None
    entries = [orjson.loads(fields[b"job"])["id"] for _, fields in store.r.xrange(store.outbox("bulk"))]
    assert entries == ["ok-0", "ok-2"]
    assert [store.r.get(store.idem(pid)).decode() for pid in ("ok-0", "ok-2")] == [queued[0][0], queued[2][0]]

    store.r.flushall()
    store.r.set(store.outbox("bulk"), "not a stream")  # every append fails, every claim succeeds
    with pytest.raises(EnqueueIncomplete) as caught:
        store.enqueue("bulk", _id_jobs(3))
    assert caught.value.queued == [None] * 3
    assert list(store.r.scan_iter(store.idem("*"))) == []


def test_when_multi_itself_is_refused_the_halves_written_are_undone(private_redis: RedisServer) -> None:
    """MULTI refused (here by an ACL): the commands run one by one, so each job's append may
    succeed while its claim is refused; the appends are deleted again and the jobs reported as not written."""
    admin = Store(connect(private_redis.url))
    store = _restricted_store(private_redis, "sms:outbox:*", commands=("+@all", "-multi"))
    with pytest.raises(EnqueueIncomplete) as caught:
        store.enqueue("bulk", _id_jobs(3))
    assert caught.value.queued == [None] * 3
    assert _outbox_and_claims(admin) == ({}, {})
    assert [mid.startswith("sw-bulk-") for mid, _ in store.enqueue("bulk", _jobs(2))] == [True, True]


def test_outbox_passes_a_partial_failure_through_and_wakes_the_lane(private_redis: RedisServer,
                                                                    settings: Settings) -> None:
    """Outbox.enqueue_many raises EnqueueIncomplete as it is, after waking the lane for what was queued."""
    store = _restricted_store(private_redis, "sms:outbox:*", "sms:idem:ok-*")
    woken: list[str] = []
    outbox = Outbox(OutboxConfig.from_settings(settings), store, wake=woken.append)
    jobs = [{"to": f"4179{i:07d}", "text": "hi", "id": "bad-1500" if i == 1500 else f"ok-{i}"} for i in range(2500)]
    with pytest.raises(EnqueueIncomplete) as caught:
        outbox.enqueue_many(jobs, "bulk")
    # The second chunk refused, the third already in flight and written.
    assert [answer is not None for answer in caught.value.queued] == [True] * 1000 + [False] * 1000 + [True] * 500
    assert woken == ["bulk"]
    with pytest.raises(EnqueueIncomplete) as caught:
        outbox.enqueue({"to": "41790000001", "text": "hi", "id": "bad-1"}, "bulk")
    assert caught.value.queued == [None]
    assert woken == ["bulk"]
