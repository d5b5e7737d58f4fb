"""The synchronous producer client against real Redis: send, send_many, status, cancel, threads, close."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
import redis

from worker.client import CancelOutcome, Client, ClientConfig, JobValidationError, State
from worker.client.sync import make_producer_broker
from worker.errors import ConfigError
from worker.settings import Settings
from worker.store import Store
from worker.triggers import lane_queue


@pytest.fixture
def client(redis_url: str) -> Iterator[Client]:
    with Client(redis_url) as sms:
        yield sms


def _entries(redis_client: redis.Redis, lane: str, prefix: str = "sms") -> list[dict[str, object]]:
    r: Any = redis_client  # replies are bytes (decode_responses off)
    return [orjson.loads(fields[b"job"]) for _, fields in r.xrange(f"{prefix}:outbox:{lane}")]


def test_send_queues_the_job_it_describes(client: Client, redis_client: redis.Redis) -> None:
    sent = client.send("+41793026727", "Your code is 123456", lane="otp", id="otp-1", metadata={"user": 42},
                       sender="Shop", campaign_reference_id="spring")
    assert sent.queued and sent.lane == "otp" and sent.message_id.startswith("sw-otp-")
    assert _entries(redis_client, "otp") == [{"to": "41793026727", "text": "Your code is 123456", "id": "otp-1",
                                              "metadata": {"user": 42}, "sender": "Shop",
                                              "campaign_reference_id": "spring", "v": 1}]


def test_a_repeated_id_is_a_duplicate_of_the_first(client: Client, redis_client: redis.Redis) -> None:
    first = client.send("41793026727", "a", id="order-42")
    again = client.send("41793026727", "a", id="order-42")
    assert (again.message_id, again.queued, again.duplicate) == (first.message_id, False, True)
    assert len(_entries(redis_client, "bulk")) == 1


def test_send_many_is_all_or_nothing(client: Client, redis_client: redis.Redis) -> None:
    jobs = [{"to": "41793026727", "text": "ok"}, {"to": "12", "text": "bad"}, {"to": "41793026728"}]
    with pytest.raises(JobValidationError) as refused:
        client.send_many(jobs, lane="bulk")
    assert [p.field for p in refused.value.problems] == ["jobs[1].to", "jobs[2].(job)"]
    assert redis_client.xlen("sms:outbox:bulk") == 0

    sent = client.send_many([{"to": f"4179{i:07d}", "text": f"hi {i}"} for i in range(2500)], lane="bulk")
    assert len({s.message_id for s in sent}) == 2500 and all(s.queued for s in sent)
    assert redis_client.xlen("sms:outbox:bulk") == 2500


def test_an_unknown_lane_or_option_is_refused_where_it_entered(client: Client, redis_client: redis.Redis) -> None:
    with pytest.raises(JobValidationError, match="unknown lane 'nope'"):
        client.send("41793026727", "hi", lane="nope")
    with pytest.raises(JobValidationError, match="colour: unknown option"):
        client.send("41793026727", "hi", colour="red")
    assert redis_client.keys("sms:outbox:*") == []


def test_status_follows_a_message(client: Client, store: Store) -> None:
    plain = client.send("41793026727", "a")
    given = client.send("41793026727", "b", id="order-7")
    assert client.status(plain.message_id).state is State.QUEUED
    by_id = client.status(id="order-7")
    assert (by_id.message_id, by_id.state, by_id.lane) == (given.message_id, State.QUEUED, "bulk")

    # Once a dispatcher has recorded it, its record answers (without the job: number and text stay put).
    store.r.hset(store.msg(plain.message_id), mapping={"state": "ACCEPTED", "lane": "bulk", "attempts": "1",
                                                       "job": "{}"})
    store.r.xtrim(store.outbox("bulk"), maxlen=0)
    status = client.status(plain.message_id)
    assert (status.state, status.final) == (State.ACCEPTED, False)
    assert status.fields == {"state": "ACCEPTED", "lane": "bulk", "attempts": "1"}
    # Its outbox entry gone and no record: the producer-id message is unknown now.
    assert client.status(given.message_id).state is None


def test_status_of_what_was_never_queued_is_unknown(client: Client) -> None:
    for message_id in ("sw-bulk-1700000000000-0", "sw-bulk-1700000000000-pdeadbeef0", "no-such-thing"):
        assert client.status(message_id).known is False
    assert client.status(id="never-sent").known is False
    with pytest.raises(TypeError):
        client.status()


def test_a_scheduled_send_can_be_cancelled(client: Client, redis_client: redis.Redis) -> None:
    later = datetime.now(UTC) + timedelta(hours=2)
    sent = client.send("41793026727", "later", id="sched-1", send_at=later)
    assert client.status(sent.message_id).state is State.SCHEDULED
    assert redis_client.xlen("sms:outbox:bulk") == 0

    answer = client.cancel(id="sched-1")
    assert (answer.outcome, answer.message_id) == (CancelOutcome.CANCELLED, sent.message_id)
    assert client.status(sent.message_id).state is State.CANCELLED
    assert client.cancel(sent.message_id).outcome is CancelOutcome.NOT_CANCELLABLE
    assert client.cancel("sw-bulk-1700000000000-0").outcome is CancelOutcome.UNKNOWN
    r: Any = redis_client
    events = [orjson.loads(f[b"event"]) for _, f in r.xrange("sms:events")]
    assert [(e["type"], e["message_id"]) for e in events] == [("cancelled", sent.message_id)]


def test_a_naive_send_at_is_refused(client: Client) -> None:
    with pytest.raises(JobValidationError, match="send_at: has no UTC offset"):
        client.send("41793026727", "later", send_at=datetime(2030, 1, 1, 9, 30))


def test_threads_share_one_client(client: Client, redis_client: redis.Redis) -> None:
    answers: list[str] = []
    lock = threading.Lock()
    errors: list[BaseException] = []

    def produce(worker: int) -> None:
        try:
            for i in range(100):
                sent = client.send(f"4179{worker:03d}{i:04d}", "hi", id=f"t{worker}-{i}")
                with lock:
                    answers.append(sent.message_id)
        except BaseException as error:  # noqa: BLE001 - handed to the main thread's assertion
            errors.append(error)

    threads = [threading.Thread(target=produce, args=(w,)) for w in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == [] and len(answers) == 800 and len(set(answers)) == 800
    assert redis_client.xlen("sms:outbox:bulk") == 800


def test_close_releases_the_pool_and_refuses_calls(redis_url: str, redis_client: redis.Redis) -> None:
    def clients() -> int:
        return int(redis_client.info("clients")["connected_clients"])

    before = clients()
    sms = Client(redis_url)
    sms.send("41793026727", "hi", lane="otp")  # the enqueue and the wake-up (its Dramatiq message)
    assert clients() > before
    sms.close()
    sms.close()  # idempotent
    assert clients() == before
    with pytest.raises(RuntimeError, match="closed"):
        sms.send("41793026727", "hi")


def test_a_send_wakes_the_lane_through_the_workers_broker(settings: Settings, redis_client: redis.Redis) -> None:
    from worker.runtime import make_broker  # the worker's side, to compare with

    worker_broker, _ = make_broker(settings)
    producer_broker = make_producer_broker(ClientConfig.from_settings(settings), redis_client)
    assert producer_broker.namespace == worker_broker.namespace
    assert {lane_queue(lane) for lane in settings.sms_lanes} <= producer_broker.get_declared_queues()
    worker_broker.close()

    with Client.from_settings(settings) as sms:
        sms.send("41793026727", "hi", lane="otp")
    queued = redis_client.lrange(f"{worker_broker.namespace}:{lane_queue('otp')}", 0, -1)
    assert len(queued) == 1
    with Client.from_settings(settings, wake=False) as quiet:
        quiet.send("41793026727", "hi", lane="bulk")
    assert redis_client.llen(f"{worker_broker.namespace}:{lane_queue('bulk')}") == 0


def test_from_env_reads_the_workers_variables(redis_url: str, redis_client: redis.Redis,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("SMS_KEY_PREFIX", "shop")
    monkeypatch.setenv("SMS_LANES", '{"alerts": {}}')
    monkeypatch.setenv("SMS_DEFAULT_LANE", "alerts")
    with Client.from_env(wake=False) as sms:
        sent = sms.send("41793026727", "hi")
    assert sent.lane == "alerts" and sent.message_id.startswith("sw-alerts-")
    assert redis_client.xlen("shop:outbox:alerts") == 1


def test_explicit_arguments_are_checked() -> None:
    with pytest.raises(ConfigError, match="default lane 'otp'"):
        Client("redis://127.0.0.1:9/0", lanes=["bulk"], default_lane="otp")
    config = ClientConfig.of(lanes=["alerts", "bulk"])
    assert (config.outbox.default_lane, config.prefix) == ("alerts", "sms")
