"""The asyncio producer client against real Redis, under a running loop: the same answers and errors as
the synchronous one, all-or-nothing send_many, status, cancel, a loop that is never blocked, close."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
import redis

from worker.client import (
    AsyncClient,
    CancelOutcome,
    Client,
    EnqueueIncomplete,
    JobValidationError,
    State,
    StoreUnavailable,
)
from worker.triggers import lane_queue

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(redis_url) as sms:
        yield sms


def _r(redis_client: redis.Redis) -> Any:
    return redis_client  # replies are bytes (decode_responses off)


BAD_JOBS: list[dict[str, Any]] = [
    {"to": "12", "text": "hi"},
    {"to": "41793026727"},
    {"to": "41793026727", "text": "   "},
    {"to": "41793026727", "text": "hi", "colour": "red"},
    {"to": "41793026727", "text": "hi", "id": ""},
    {"to": "41793026727", "text": "hi", "metadata": {"x": "y" * 5000}},
    {"to": "41793026727", "text": "x" * 10_000},
    {"to": "41793026727", "text": "\ud800"},
    {"to": "41793026727", "text": "hi", "send_at": "tomorrow"},
    {"to": "41793026727", "text": "hi", "send_at": "2030-01-01T09:30:00"},
    {"to": "41793026727", "text": "hi", "send_at": "2999-01-01T09:30:00Z"},
    {"to": "41793026727", "text": "hi", "validity_period": {"amount": "5"}},
]


@pytest.mark.parametrize("job", BAD_JOBS, ids=range(len(BAD_JOBS)))
async def test_both_flavours_refuse_a_job_with_the_same_error(client: AsyncClient, redis_url: str,
                                                             redis_client: redis.Redis, job: dict[str, Any]) -> None:
    with Client(redis_url, wake=False) as sync:
        with pytest.raises(JobValidationError) as sync_single:
            sync.send(**job)
        with pytest.raises(JobValidationError) as sync_many:
            sync.send_many([{"to": "41793026727", "text": "fine"}, job])
    with pytest.raises(JobValidationError) as async_single:
        await client.send(**job)
    with pytest.raises(JobValidationError) as async_many:
        await client.send_many([{"to": "41793026727", "text": "fine"}, job])
    assert str(async_single.value) == str(sync_single.value)
    assert async_many.value.problems == sync_many.value.problems
    assert async_many.value.problems[0].field.startswith("jobs[1].")
    assert _r(redis_client).keys("sms:*") == []  # nothing written by either


async def test_send_and_status(client: AsyncClient, redis_client: redis.Redis) -> None:
    sent = await client.send("+41793026727", "Your code", lane="otp", id="otp-1", metadata={"user": 1})
    assert sent.queued and sent.message_id.startswith("sw-otp-")
    again = await client.send("41793026727", "Your code", lane="otp", id="otp-1")
    assert (again.message_id, again.duplicate) == (sent.message_id, True)
    assert _r(redis_client).xlen("sms:outbox:otp") == 1
    [(_, fields)] = _r(redis_client).xrange("sms:outbox:otp")
    assert orjson.loads(fields[b"job"]) == {"to": "41793026727", "text": "Your code", "id": "otp-1",
                                            "metadata": {"user": 1}}

    assert (await client.status(sent.message_id)).state is State.QUEUED
    assert (await client.status(id="otp-1")).message_id == sent.message_id
    assert (await client.status("sw-otp-1700000000000-0")).known is False
    assert (await client.status(id="never")).known is False


async def test_the_two_flavours_write_alike(client: AsyncClient, redis_url: str, redis_client: redis.Redis) -> None:
    """The same jobs through each flavour: the same entries, the same duplicates."""
    def jobs(tag: str) -> list[dict[str, Any]]:
        return [{"to": f"4179{i:07d}", "text": f"t{i}", **({"id": f"{tag}-{i % 700}"} if i % 3 else {})}
                for i in range(2_400)]

    async_answers = await client.send_many(jobs("a"), lane="bulk")
    with Client(redis_url, wake=False) as sync:
        sync_answers = sync.send_many(jobs("s"), lane="otp")
    assert [a.queued for a in async_answers] == [a.queued for a in sync_answers]
    assert sum(a.queued for a in async_answers) == 800 + 700  # the repeats of an id are duplicates
    bulk = [f[b"job"].replace(b'"a-', b'"?-') for _, f in _r(redis_client).xrange("sms:outbox:bulk")]
    otp = [f[b"job"].replace(b'"s-', b'"?-') for _, f in _r(redis_client).xrange("sms:outbox:otp")]
    assert bulk == otp and len(bulk) == 1_500
    for answer in async_answers:  # every answer, new or duplicate, names a queued message
        assert (await client.status(answer.message_id)).state is State.QUEUED


async def test_send_many_is_all_or_nothing(client: AsyncClient, redis_client: redis.Redis) -> None:
    jobs: list[dict[str, Any]] = [{"to": f"4179{i:07d}", "text": "hi"} for i in range(3_000)]
    jobs[2_500] = {"to": "1", "text": "hi"}
    jobs[10] = {"to": "41793026727"}
    with pytest.raises(JobValidationError) as refused:
        await client.send_many(jobs)
    assert [p.field for p in refused.value.problems] == ["jobs[10].(job)", "jobs[2500].to"]
    assert _r(redis_client).exists("sms:outbox:bulk") == 0
    with pytest.raises(JobValidationError, match="unknown lane 'nope'"):
        await client.send_many(jobs[:5], lane="nope")
    assert await client.send_many([]) == []


async def test_a_refused_write_is_reported_as_the_sync_store_does(client: AsyncClient,
                                                                 redis_client: redis.Redis) -> None:
    """Redis out of memory: EnqueueIncomplete, nothing written, every job answered None."""
    r = _r(redis_client)
    policy = r.config_get("maxmemory-policy")["maxmemory-policy"]
    r.config_set("maxmemory-policy", "noeviction")
    r.config_set("maxmemory", "1")
    try:
        with pytest.raises(EnqueueIncomplete) as refused:
            await client.send_many([{"to": "41793026727", "text": "hi", "id": f"o-{i}"} for i in range(1500)])
    finally:
        r.config_set("maxmemory", "0")
        r.config_set("maxmemory-policy", policy)
    assert refused.value.queued == [None] * 1500
    assert r.exists("sms:outbox:bulk") == 0 and r.keys("sms:idem:*") == []
    assert (await client.send("41793026727", "after", id="o-1")).queued  # the claim was never written


async def test_the_loop_is_never_blocked_for_long(client: AsyncClient, redis_client: redis.Redis) -> None:
    """A ticker's longest gap stays small while a big send_many runs (validation is sliced, the
    writes are awaited)."""
    gaps: list[float] = []
    stop = asyncio.Event()

    async def tick() -> None:
        last = time.perf_counter()
        while not stop.is_set():
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    ticker = asyncio.create_task(tick())
    await asyncio.sleep(0.01)
    started = time.perf_counter()
    sent = await client.send_many([{"to": f"4179{i:07d}", "text": f"hi {i}"} for i in range(50_000)])
    took = time.perf_counter() - started
    stop.set()
    await ticker
    assert len(sent) == 50_000 and _r(redis_client).xlen("sms:outbox:bulk") == 50_000
    # A blocking implementation shows one gap as long as the call. (Relative to the call, so a
    # busy machine that slows both does not fail it; ~25 ms of ~400 ms when measured, and 100 ms of
    # 356 ms once in CI with a second test run on the machine: a quarter was too close.)
    assert max(gaps) < took / 2, (max(gaps), took)
    assert len(gaps) > 20


async def test_a_cancelled_call_leaves_the_client_usable(client: AsyncClient, redis_client: redis.Redis) -> None:
    jobs = [{"to": f"4179{i:07d}", "text": "hi", "id": f"c-{i}"} for i in range(50_000)]
    task = asyncio.create_task(client.send_many(jobs))
    while _r(redis_client).xlen("sms:outbox:bulk") == 0:  # bounded by the test timeout
        await asyncio.sleep(0.001)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # The half-read connection was dropped, not reused: the next calls get whole answers.
    again = await client.send_many(jobs)
    assert len(again) == 50_000
    assert _r(redis_client).xlen("sms:outbox:bulk") == 50_000  # retrying with ids queued each job once


async def test_a_scheduled_send_and_its_cancel(client: AsyncClient, redis_client: redis.Redis) -> None:
    later = datetime.now(UTC) + timedelta(hours=1)
    sent = await client.send("41793026727", "later", id="s-1", send_at=later)
    now = await client.send("41793026727", "now", send_at=datetime.now(UTC) - timedelta(minutes=1))
    assert (await client.status(sent.message_id)).state is State.SCHEDULED
    assert (await client.status(now.message_id)).state is State.QUEUED

    answer = await client.cancel(id="s-1")
    assert (answer.outcome, answer.message_id) == (CancelOutcome.CANCELLED, sent.message_id)
    assert (await client.status(sent.message_id)).state is State.CANCELLED
    queued = await client.send("41793026727", "queued")
    assert (await client.cancel(queued.message_id)).outcome is CancelOutcome.CANCELLED
    assert (await client.cancel(queued.message_id)).outcome is CancelOutcome.NOT_CANCELLABLE
    assert (await client.cancel(id="never")).outcome is CancelOutcome.UNKNOWN
    types = [orjson.loads(f[b"event"])["type"] for _, f in _r(redis_client).xrange("sms:events")]
    assert types == ["cancelled", "cancelled"]


async def test_a_send_wakes_its_lane(redis_url: str, redis_client: redis.Redis) -> None:
    async with AsyncClient(redis_url) as sms:
        await sms.send("41793026727", "hi", lane="otp")
        await sms.send("41793026727", "hi again", lane="otp")  # within the kick's de-duplication window
    assert _r(redis_client).llen(f"sms:dramatiq:{lane_queue('otp')}") == 1


async def test_close_releases_both_pools_and_refuses_calls(redis_url: str, redis_client: redis.Redis) -> None:
    def clients() -> int:
        return int(_r(redis_client).info("clients")["connected_clients"])

    before = clients()
    sms = AsyncClient(redis_url)
    await sms.send("41793026727", "hi", lane="otp")
    assert clients() > before
    await sms.close()
    await sms.close()
    assert clients() == before
    with pytest.raises(RuntimeError, match="closed"):
        await sms.send("41793026727", "hi")


async def test_redis_down_is_store_unavailable() -> None:
    async with AsyncClient("redis://127.0.0.1:9/0", wake=False) as sms:
        with pytest.raises(StoreUnavailable):
            await sms.send("41793026727", "hi")
        with pytest.raises(StoreUnavailable):
            await sms.status("sw-bulk-1700000000000-0")
