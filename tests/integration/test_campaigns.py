"""Campaign counters against real Redis: counted in the enqueue's own transaction (sync and asyncio),
uncounted exactly once with a repeat's deletion, read, listed, pruned, found for cancel; and end to end
through real worker processes and the sandbox: a mixed campaign counted exactly (a recount of the
messages' states agrees), its prices summed, and a cancelled campaign never POSTed."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import orjson
import pytest
import redis

from tests.support.cli import run_cli
from tests.support.redis_server import RedisServer
from tests.support.system import SANDBOX_FLAGS, System, running
from worker.campaigns import STATE_FIELD, STATE_FIELDS, Campaign
from worker.client import AsyncClient, Client
from worker.devtools.devstack import wait_until
from worker.errors import EnqueueIncomplete
from worker.models import State
from worker.outbox import Outbox, OutboxConfig
from worker.store import Store, connect
from worker.store.base import load_script

CONFIG = OutboxConfig(lanes=("otp", "bulk"), default_lane="bulk", max_text_parts=10, metadata_max_bytes=4096,
                      idempotency_ttl_s=3600, state_ttl_s=7200)


def _job(i: int, campaign: str | None = "spring", **extra: Any) -> dict[str, Any]:
    job: dict[str, Any] = {"to": f"4179{i:07d}", "text": f"hello {i}", **extra}
    if campaign is not None:
        job["campaign_reference_id"] = campaign
    return job


def _at(seconds: float) -> str:
    return (datetime.now(UTC) + timedelta(seconds=seconds)).isoformat()


def _counts(store: Store, campaign: str) -> Campaign:
    found = store.campaign_counts(campaign)
    assert found is not None, f"campaign {campaign} has no counters"
    return found


def _entries(store: Store, lane: str = "bulk") -> list[tuple[str, dict[bytes, bytes]]]:
    return [(entry_id.decode(), fields) for entry_id, fields in store.r.xrange(store.outbox(lane))]


def recount(store: Store, message_ids: Iterable[tuple[str, str]]) -> Counter[str]:
    """Each message's counter from its own record, (lane, message id) pairs: its hash's state, or
    `queued` for one with no record whose entry is still in its lane's outbox (`missing` otherwise)."""
    counts: Counter[str] = Counter()
    entries: dict[str, set[str]] = {}
    for lane, mid in message_ids:
        state = store.r.hget(store.msg(mid), "state")
        if state is not None:
            counts[STATE_FIELD[State(state.decode())]] += 1
            continue
        if lane not in entries:
            entries[lane] = set()
            for entry_id, fields in _entries(store, lane):
                entries[lane].add(fields[b"mid"].decode() if b"mid" in fields else store.lane_prefix(lane) + entry_id)
        counts["queued" if mid in entries[lane] else "missing"] += 1
    return counts


def assert_counts_agree(store: Store, campaign: str, message_ids: list[tuple[str, str]]) -> Campaign:
    """The counters equal a recount of the messages' own states, and total equals the messages."""
    counted = _counts(store, campaign)
    again = recount(store, message_ids)
    assert again["missing"] == 0, again
    assert {name: counted.count(name) for name in STATE_FIELDS} == {name: again[name] for name in STATE_FIELDS}, \
        (counted, again)
    assert counted.total == len(message_ids)
    return counted


# --- counting at enqueue ---------------------------------------------------------------------------------
def test_campaign_jobs_are_counted_in_the_enqueue_and_their_entries_say_so(store: Store) -> None:
    outbox = Outbox(CONFIG, store)
    jobs = [_job(0), _job(1, id="p-1"), _job(2, campaign=None), _job(3, campaign="autumn", id="p-3"),
            _job(4, id="p-4"), {"to": "41790000005", "text": "plain fast path"}]
    before = int(time.time() * 1000)
    queued = outbox.enqueue_many(jobs, "bulk")
    assert all(q.queued for q in queued)
    spring, autumn = _counts(store, "spring"), _counts(store, "autumn")
    assert (spring.total, spring.count("queued"), autumn.total, autumn.count("queued")) == (3, 3, 1, 1)
    assert spring.first_ms is not None and before - 1000 <= spring.first_ms <= int(time.time() * 1000) + 1000
    assert 0 < store.r.ttl(store.campaign("spring")) <= 7200
    assert {m.decode() for m in store.r.zrange(store.campaigns, 0, -1)} == {"spring", "autumn"}
    marks = [fields.get(b"c") for _, fields in _entries(store)]
    assert marks == [b"spring", b"spring", None, b"autumn", b"spring", None]
    assert_counts_agree(store, "spring", [("bulk", queued[i].message_id) for i in (0, 1, 4)])

    # A single enqueue is counted the same way; a job without a campaign touches no counter.
    outbox.enqueue(_job(6), "bulk")
    outbox.enqueue(_job(7, campaign=None), "bulk")
    assert _counts(store, "spring").total == 4
    assert sorted(k.decode() for k in store.r.keys(store.campaign("*"))) == [store.campaign("autumn"),
                                                                             store.campaign("spring")]


def test_a_repeated_producer_id_is_uncounted_with_its_entry(store: Store) -> None:
    """A repeat (of an earlier call, and within one call across a chunk border) is counted in its
    chunk's transaction, then deleted and uncounted: the counters hold each message once."""
    outbox = Outbox(CONFIG, store)
    first = outbox.enqueue(_job(0, id="dup"), "bulk")
    again = outbox.enqueue(_job(0, id="dup"), "bulk")
    assert again.duplicate and again.message_id == first.message_id
    jobs = [(orjson.dumps(_job(i, id=f"id-{i % 3}")), f"id-{i % 3}") for i in range(7)]
    answers = store.enqueue("bulk", jobs, chunk=2, campaigns=["spring"] * 7, state_ttl_s=7200)
    assert [queued for _, queued in answers] == [True, True, True, False, False, False, False]
    counted = _counts(store, "spring")
    assert (counted.total, counted.count("queued")) == (4, 4)
    assert len(_entries(store)) == 4
    assert_counts_agree(store, "spring", [("bulk", first.message_id), *(("bulk", mid) for mid, _ in answers[:3])])


def test_uncount_takes_an_entry_out_only_if_it_deletes_it(store: Store) -> None:
    """uncount.lua run twice on one entry (a retried undo, or the dispatcher deleting it too) uncounts it once."""
    outbox_key, key = store.outbox("bulk"), store.campaign("spring")
    entry = store.r.xadd(outbox_key, {"job": b"{}", "c": "spring"})
    store.r.hset(key, mapping={"total": 5, "queued": 5})
    script = load_script("uncount")
    assert store.r.eval(script, 2, outbox_key, key, entry) == 1
    assert store.r.eval(script, 2, outbox_key, key, entry) == 0
    assert store.r.hmget(key, "total", "queued") == [b"4", b"4"]


def test_uncount_runs_when_redis_is_out_of_memory(private_redis: RedisServer) -> None:
    """An undo after Redis filled up: the XDEL frees memory and the counters follow it (a script that has
    written may go on writing), so a deleted entry is never left counted."""
    store = Store(connect(private_redis.url))
    outbox_key, key = store.outbox("bulk"), store.campaign("spring")
    entry = store.r.xadd(outbox_key, {"job": b"{}", "c": "spring"})
    store.r.hset(key, mapping={"total": 1, "queued": 1})
    store.r.config_set("maxmemory-policy", "noeviction")
    store.r.config_set("maxmemory", 1)
    try:
        with pytest.raises(redis.exceptions.OutOfMemoryError):
            store.r.hset(store.campaign("other"), "total", 1)  # Redis is out of memory indeed
        assert store.r.eval(load_script("uncount"), 2, outbox_key, key, entry) == 1
    finally:
        store.r.config_set("maxmemory", 0)
    assert store.r.hmget(key, "total", "queued") == [b"0", b"0"]
    assert store.r.xlen(outbox_key) == 0


@pytest.fixture
def private_redis() -> Iterator[RedisServer]:
    """A redis-server of this test alone: it changes the memory limit."""
    server = RedisServer().start()
    yield server
    server.cleanup()


def test_halves_and_failed_appends_are_not_left_counted(store: Store) -> None:
    """A job appended whose claim failed (WRONGTYPE inside EXEC) is deleted and uncounted; appends
    that all fail inside EXEC (the outbox is no stream) are taken out of the count again."""
    store.r.hset(store.idem("ok-1"), "not", "a string")
    jobs = [(orjson.dumps(_job(i, id=f"ok-{i}")), f"ok-{i}") for i in range(3)]
    with pytest.raises(EnqueueIncomplete):
        store.enqueue("bulk", jobs, campaigns=["spring"] * 3, state_ttl_s=7200)
    counted = _counts(store, "spring")
    assert (counted.total, counted.count("queued")) == (2, 2)
    assert [f[b"c"] for _, f in _entries(store)] == [b"spring", b"spring"]

    store.r.set(store.outbox("otp"), "not a stream")
    with pytest.raises(EnqueueIncomplete):
        store.enqueue("otp", [*jobs[:1], (orjson.dumps(_job(9)), None)], campaigns=["autumn", "autumn"])
    autumn = _counts(store, "autumn")
    assert (autumn.total, autumn.count("queued")) == (0, 0)


def test_the_counters_ttl_is_never_shortened(store: Store) -> None:
    store.r.hset(store.campaign("spring"), "total", 0)
    store.r.expire(store.campaign("spring"), 90_000)
    Outbox(CONFIG, store).enqueue(_job(0), "bulk")  # state TTL 7200
    assert store.r.ttl(store.campaign("spring")) > 80_000


def test_the_async_client_counts_like_the_sync_one(redis_url: str, store: Store) -> None:
    async def send() -> list[Any]:
        async with AsyncClient(redis_url, lanes=["otp", "bulk"], default_lane="bulk", wake=False) as client:
            one = await client.send("41790000001", "hi", campaign_reference_id="spring", id="a-1")
            many = await client.send_many([_job(2), _job(3, campaign=None), _job(4, id="a-1")])
            plain = await client.send_many([_job(5, campaign=None)])
            return [one, *many, *plain, await client.campaign("spring"), await client.campaign("nope")]

    one, two, _, repeat, plain, counted, unknown = asyncio.run(send())
    assert repeat.duplicate and not plain.duplicate and unknown is None
    assert isinstance(counted, Campaign) and (counted.total, counted.count("queued")) == (2, 2)
    assert [f.get(b"c") for _, f in _entries(store)] == [b"spring", b"spring", None, None]
    assert_counts_agree(store, "spring", [("bulk", one.message_id), ("bulk", two.message_id)])


def test_the_sync_client_counts_and_reads_a_campaign(redis_url: str, store: Store) -> None:
    with Client(redis_url, lanes=["otp", "bulk"], default_lane="bulk", wake=False) as client:
        sent = client.send("41790000001", "hi", campaign_reference_id="spring", id="s-1")
        client.send_many([_job(2), _job(3, send_at=_at(3600))])
        counted = client.campaign("spring")
        assert client.campaign("nope") is None
    assert counted is not None and (counted.total, counted.count("queued"), counted.count("scheduled")) == (3, 2, 1)
    assert not sent.duplicate and [f.get(b"c") for _, f in _entries(store)] == [b"spring", b"spring"]


# --- readers -----------------------------------------------------------------------------------------------
def test_list_newest_first_and_prune_expired_campaigns(store: Store) -> None:
    outbox = Outbox(CONFIG, store)
    outbox.enqueue(_job(0, campaign="old"), "bulk")
    time.sleep(0.005)  # distinct update times (ms), so the order is defined
    outbox.enqueue(_job(1, campaign="new"), "bulk")
    assert [c.id for c in store.list_campaigns()] == ["new", "old"]
    assert [c.id for c in store.list_campaigns(limit=1)] == ["new"]
    store.r.delete(store.campaign("old"))  # as if it expired
    assert [c.id for c in store.list_campaigns()] == ["new"]
    assert [m.decode() for m in store.r.zrange(store.campaigns, 0, -1)] == ["new"]
    assert store.campaign_counts("old") is None


def test_campaign_job_ids_finds_scheduled_and_unclaimed_jobs_only(store: Store) -> None:
    outbox = Outbox(CONFIG, store)
    claimed = outbox.enqueue(_job(0, id="c-0"), "bulk")
    store.claim("bulk", "t1", 1, lease_ms=60_000, max_wait_ms=0, recover=False)  # a dispatcher has this one
    held = outbox.enqueue_many([_job(1, send_at=_at(3600)), _job(2, send_at=_at(3600), campaign="other")], "bulk")
    waiting = outbox.enqueue_many([_job(3), _job(4, id="c-4"), _job(5, campaign=None)], "bulk")
    raw = store.r.xadd(store.outbox("otp"), {"job": orjson.dumps(_job(6))}).decode()  # a plain XADD, no `c`
    found = store.campaign_job_ids("spring", ["otp", "bulk"])
    assert found.scheduled == [("bulk", held[0].message_id)]
    assert found.queued == [("otp", store.lane_prefix("otp") + raw), ("bulk", waiting[0].message_id),
                            ("bulk", waiting[1].message_id)]
    assert claimed.message_id not in found.message_ids and not found.truncated
    assert store.campaign_job_ids("nope", ["otp", "bulk", "gone"]).message_ids == []


def test_cancel_each_cancels_every_job_by_the_per_message_script(store: Store) -> None:
    outbox = Outbox(CONFIG, store)
    jobs = outbox.enqueue_many([_job(1, send_at=_at(3600)), _job(2, send_at=_at(3600), id="s-2"), _job(3),
                                _job(4, id="q-4")], "bulk")
    raw = store.r.xadd(store.outbox("bulk"), {"job": orjson.dumps(_job(5))}).decode()
    mids = [j.message_id for j in jobs] + [store.lane_prefix("bulk") + raw]
    answers = store.cancel_each([*mids, "sw-bulk-1-1"], events_maxlen=1000, state_ttl_s=7200, batch=2)
    assert [a.outcome.value for a in answers] == ["cancelled"] * 5 + ["unknown"]
    counted = assert_counts_agree(store, "spring", [("bulk", mid) for mid in mids])
    assert (counted.total, counted.count("cancelled"), counted.complete) == (5, 5, True)
    assert store.r.zcard(store.scheduled("bulk")) == 0
    events = [orjson.loads(f[b"event"]) for _, f in store.r.xrange(store.events)]
    assert sorted(e["message_id"] for e in events if e["type"] == "cancelled") == sorted(mids)


# --- the CLI -------------------------------------------------------------------------------------------------
def _run(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], redis_url: str,
         *args: str) -> tuple[int, str, str]:
    return run_cli(monkeypatch, capsys, redis_url, *args, ci=True)


def test_cli_lists_shows_watches_and_cancels_a_campaign(monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str], redis_url: str,
                                                        store: Store) -> None:
    outbox = Outbox(CONFIG, store)
    queued = outbox.enqueue_many([_job(1, send_at=_at(3600)), _job(2), _job(3, id="q-3")], "bulk")
    outbox.enqueue(_job(4, campaign="other"), "bulk")

    code, out, _ = _run(monkeypatch, capsys, redis_url, "campaigns")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["CAMPAIGN", "TOTAL", "WAITING"]
    assert sorted(line.split()[:3] for line in lines[1:]) == [["other", "1", "1"], ["spring", "3", "3"]]
    listed = orjson.loads(_run(monkeypatch, capsys, redis_url, "campaigns", "--json")[1])
    assert sorted((c["id"], c["total"], c["scheduled"], c["queued"]) for c in listed) == [("other", 1, 0, 1),
                                                                                          ("spring", 3, 1, 2)]

    code, out, _ = _run(monkeypatch, capsys, redis_url, "campaign", "spring")
    assert code == 0 and out.startswith("campaign spring: 0 of 3 final (0.0%), in progress")
    code, out, err = _run(monkeypatch, capsys, redis_url, "campaign", "nope")
    assert code == 1 and out == "" and "unknown campaign 'nope'" in err
    code, out, err = _run(monkeypatch, capsys, redis_url, "campaign", "spring", "--watch", "--timeout", "0.3",
                          "--interval", "0.05")
    assert code == 1 and out.splitlines() == ["campaign spring: 0/3 final (0.0%): 1 scheduled, 2 queued"]
    assert "not complete after 0.3 s" in err

    # No terminal and no --yes: refused, nothing cancelled.
    code, out, err = _run(monkeypatch, capsys, redis_url, "cancel", "--campaign", "spring")
    assert code == 1 and "give --yes" in err and _counts(store, "spring").count("cancelled") == 0
    code, out, err = _run(monkeypatch, capsys, redis_url, "cancel", "--campaign", "spring", "--yes")
    assert code == 0, err
    assert out.splitlines()[0] == ("campaign spring: cancelled 3 of 1 scheduled and 2 queued job(s) found; "
                                   "0 already past cancelling (being sent, sent or final)")
    assert_counts_agree(store, "spring", [("bulk", q.message_id) for q in queued])
    code, out, err = _run(monkeypatch, capsys, redis_url, "campaign", "spring", "--watch", "--json")
    assert code == 0 and orjson.loads(out.splitlines()[-1])["complete"] is True and "complete" in err
    code, out, err = _run(monkeypatch, capsys, redis_url, "cancel", "--campaign", "nope", "--yes")
    assert code == 1 and "unknown campaign 'nope'" in err
    code, _, err = _run(monkeypatch, capsys, redis_url, "cancel", "--campaign", "spring", "sw-bulk-1-1")
    assert code == 2 and "--campaign goes alone" in err


# --- end to end: real workers, the sandbox --------------------------------------------------------------------
REPORTS_SOON = ("--report-delay-ms", "300", *SANDBOX_FLAGS[2:])


def _mids_of(store: Store, answers: Iterable[Any]) -> list[tuple[str, str]]:
    return [(a.lane, a.message_id) for a in answers if a.queued]


def _report_prices(system: System, mids: set[str]) -> dict[str, Decimal]:
    """The summed price of the final report events of these messages, per currency."""
    sums: dict[str, Decimal] = {}
    for event in system.events():
        price = event.get("price")
        if event["message_id"] in mids and event.get("done_at") is not None and isinstance(price, dict):
            currency = price["currency"]
            sums[currency] = sums.get(currency, Decimal(0)) + Decimal(str(price["pricePerMessage"]))
    return sums


@pytest.mark.slow
def test_a_mixed_campaign_is_counted_exactly_through_real_workers() -> None:
    """Queued, scheduled, poisoned (dead-lettered), plain-XADD and repeated jobs of one campaign: when
    every message is final, the counters equal a recount of the messages' states, total equals the
    messages, `sent` the accepted sends, and the prices the sum of the reports'."""
    with running(sandbox_flags=REPORTS_SOON) as system:
        store = system.store
        system.configure(reject_text_containing="POISON")
        queued = system.outbox.enqueue_many([_job(i, id=f"c-{i}") for i in range(60)], "bulk")
        scheduled = system.outbox.enqueue_many([_job(100 + i, id=f"s-{i}", send_at=_at(2)) for i in range(20)],
                                               "bulk")
        poisoned = system.outbox.enqueue_many([_job(200 + i, text=f"POISON {i}") for i in range(10)], "bulk")
        repeat = system.outbox.enqueue(_job(0, id="c-0"), "bulk")
        assert repeat.duplicate
        raw = [store.r.xadd(store.outbox("bulk"), {"job": orjson.dumps(_job(300 + i))}).decode() for i in range(10)]
        # A plain XADD repeating a producer id (never counted), and an entry the producer API counted
        # whose producer died before deleting it as a repeat (the dispatcher deletes and uncounts it).
        store.r.xadd(store.outbox("bulk"), {"job": orjson.dumps(_job(1, id="c-1"))})
        with store.r.pipeline() as pipe:
            pipe.xadd(store.outbox("bulk"), {"job": orjson.dumps(_job(2, id="c-2")),
                                             "mid": f"sw-bulk-{int(time.time() * 1000)}-pdead0", "c": "spring"})
            pipe.hincrby(store.campaign("spring"), "total", 1)
            pipe.hincrby(store.campaign("spring"), "queued", 1)
            pipe.execute()
        mids = [*_mids_of(store, queued), *_mids_of(store, scheduled), *_mids_of(store, poisoned),
                *(("bulk", store.lane_prefix("bulk") + entry) for entry in raw)]
        assert len(mids) == 100

        try:
            wait_until(lambda: _counts(store, "spring").complete, 90, "the campaign to complete", interval_s=0.2)
        except TimeoutError:
            print(system.stack.logs())
            raise
        counted = assert_counts_agree(store, "spring", mids)
        assert counted.total == 100 and counted.final == 100
        assert counted.count("failed") == 10, counted  # the poisoned ones, dead-lettered
        assert counted.count("cancelled") == 0 and counted.waiting == 0
        events = system.events()
        ids = {mid for _, mid in mids}
        accepted = {e["message_id"] for e in events if e["type"] == "accepted" and e["message_id"] in ids}
        assert counted.sent == len(accepted) == 90
        assert counted.prices == _report_prices(system, ids)
        assert counted.prices, "the sandbox prices its reports"
        assert system.stats()["messages_accepted"] == 90


@pytest.mark.slow
def test_a_cancelled_campaign_is_never_posted() -> None:
    """Scheduled jobs and queued ones no dispatcher claimed yet (the lane paused) are cancelled by
    `cancel --campaign`; another campaign's jobs are sent; none of the cancelled reaches the sandbox."""
    with running(sandbox_flags=REPORTS_SOON) as system:
        store = system.store
        store.pause("bulk", "test", 60)
        held = system.outbox.enqueue_many([_job(i, send_at=_at(2)) for i in range(20)], "bulk")
        waiting = system.outbox.enqueue_many([_job(50 + i, id=f"w-{i}") for i in range(10)], "bulk")
        other = system.outbox.enqueue_many([_job(100 + i, campaign="other") for i in range(5)], "bulk")
        from worker.cancel import CancelConfig, campaign_jobs, cancel_campaign

        jobs = campaign_jobs(store, "spring", ["otp", "bulk"])
        assert (len(jobs.scheduled), len(jobs.queued)) == (20, 10)
        done = cancel_campaign(store, CancelConfig.from_settings(system.settings), "spring", jobs)
        assert done.cancelled == 30 and done.lost_race == 0 and done.past_cancelling == 0
        store.resume("bulk")
        system.triggers.dispatch("bulk")
        wait_until(lambda: _counts(store, "other").complete, 60, "the other campaign to complete", interval_s=0.2)
        # Well past the cancelled jobs' due time and the clock's ticks: nothing of them was sent.
        deadline_ms = max(int(store.message(h.message_id)["due_ms"]) for h in held) + 1500
        wait_until(lambda: time.time() * 1000 >= deadline_ms, 10, "the cancelled jobs' due time", interval_s=0.05)
        spring = assert_counts_agree(store, "spring", _mids_of(store, [*held, *waiting]))
        assert (spring.total, spring.count("cancelled"), spring.sent, spring.complete) == (30, 30, 0, True)
        sent = system.stats(per_message=True)["accepted_per_message_id"]
        assert set(sent) == {o.message_id for o in other}
        cancelled = [e["message_id"] for e in system.events() if e["type"] == "cancelled"]
        assert sorted(cancelled) == sorted(mid for _, mid in _mids_of(store, [*held, *waiting]))
