"""The dispatcher in-process against real Redis and the real sandbox over HTTP (no Dramatiq)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import orjson
import pytest

from tests.support.sandbox import API_KEY
from worker.devtools.devstack import wait_until
from worker.devtools.sandbox.process import SandboxProcess
from worker.dispatch import DispatchConfig, Dispatcher
from worker.errors import JobValidationError
from worker.outbox import Outbox, OutboxConfig
from worker.provider import Provider, ProviderConfig
from worker.ratelimit import RateLimiter, RateLimiterConfig
from worker.settings import Settings
from worker.store import Store


class RecordingWake:
    """Stands in for Dramatiq: records what the dispatcher asked to be woken. `on_dispatch`, when set,
    runs at each dispatch wake-up, for a test that looks at the store at that moment."""

    def __init__(self) -> None:
        self.dispatches: list[tuple[str, int]] = []
        self.reconciles: list[tuple[str, list[str], int]] = []
        self.on_dispatch: Callable[[str], object] | None = None

    def dispatch(self, lane: str, delay_ms: int = 0) -> bool:
        self.dispatches.append((lane, delay_ms))
        if self.on_dispatch is not None:
            self.on_dispatch(lane)
        return True

    def reconcile(self, lane: str, entry_ids: Any, delay_ms: int) -> None:
        self.reconciles.append((lane, list(entry_ids), delay_ms))


def _settings(redis_url: str, sandbox: SandboxProcess, **overrides: Any) -> Settings:
    base: dict[str, Any] = {
        "redis_url": redis_url, "icomm_base_url": sandbox.url, "icomm_api_key": API_KEY,
        "icomm_read_timeout_s": 0.5, "icomm_connect_timeout_s": 0.5, "icomm_write_timeout_s": 0.5,
        "icomm_retry_backoff_base_s": 0.01, "icomm_retry_backoff_max_s": 0.05, "sms_lease_s": 10,
        "sms_reconcile_delay_s": 0, "sms_logs_rate_per_min": 6000, "log_format": "console",
        "sms_lanes": {"otp": {"batch_size": 10, "max_wait_ms": 0}, "bulk": {"batch_size": 1000, "max_wait_ms": 0}},
    }
    return Settings.model_validate({**base, **overrides})


class Rig:
    def __init__(self, settings: Settings, store: Store) -> None:
        self.settings = settings
        self.store = store
        self.provider = Provider(ProviderConfig.from_settings(settings))
        self.wake = RecordingWake()
        self.outbox = Outbox(OutboxConfig.from_settings(settings), store)
        self.config = replace(DispatchConfig.from_settings(settings), recover_every_s=0, listen=False)
        self.limiter = RateLimiter(RateLimiterConfig.from_settings(settings), store)
        self.dispatcher = Dispatcher(self.config, store, self.provider, self.limiter, self.wake, "t1")

    def reconfigure(self, stopping: Callable[[], bool] = lambda: False, **changes: Any) -> None:
        """Rebuild the rig's dispatcher with these config changes (kept for later calls), e.g. lease_ms=0."""
        self.config = replace(self.config, **changes)
        self.dispatcher = Dispatcher(self.config, self.store, self.provider, self.limiter, self.wake, "t1",
                                     stopping=stopping)

    def events(self) -> list[dict[str, Any]]:
        return [orjson.loads(f[b"event"]) for _, f in self.store.r.xrange(self.store.events)]

    def types(self) -> dict[str, str]:
        return {e["message_id"]: e["type"] for e in self.events()}


@pytest.fixture
def rig(redis_url: str, sbx: SandboxProcess, store: Store) -> Iterator[Rig]:
    rig = Rig(_settings(redis_url, sbx), store)
    yield rig
    rig.provider.close()


def _jobs(n: int, **extra: Any) -> list[dict[str, Any]]:
    return [{"to": f"4179{i:07d}", "text": f"hello {i}", "id": f"job-{i}", "metadata": {"i": i}, **extra}
            for i in range(n)]


def test_a_batch_is_sent_as_one_bulk_and_every_message_accepted(rig: Rig, sbx: SandboxProcess) -> None:
    """1000 jobs become one POST; each gets an accepted event echoing its id and metadata."""
    queued = rig.outbox.enqueue_many(_jobs(1000), "bulk")
    assert rig.dispatcher.run("bulk") == 1000
    stats = sbx.stats()
    assert stats["messages_accepted"] == 1000
    assert stats["duplicates"] == 0
    events = rig.events()
    assert {e["type"] for e in events} == {"accepted"}
    assert {e["message_id"] for e in events} == {q.message_id for q in queued}
    first = next(e for e in events if e["id"] == "job-7")
    assert first["metadata"] == {"i": 7} and first["to"] == "41790000007" and first["bulk_id"]
    assert rig.store.r.xlen(rig.store.outbox("bulk")) == 0
    assert rig.store.message(queued[0].message_id)["state"] == "ACCEPTED"


def test_multi_part_texts_are_charged_to_the_rate_limiter_by_parts(
    redis_url: str, sbx: SandboxProcess, store: Store
) -> None:
    """The provider counts SMS parts: 10 three-part texts cost 30 tokens, the 20 beyond one per
    message charged after the claim, so the next grant waits for them."""
    rig = Rig(_settings(redis_url, sbx, sms_rate_limit_mps=10, sms_rate_limit_burst_s=1), store)
    try:
        rig.outbox.enqueue_many([{"to": f"4179{i:07d}", "text": "a" * 400} for i in range(10)], "bulk")
        entries = store.claim("bulk", "t1", 10, lease_ms=60_000, max_wait_ms=0, recover=False).entries
        assert rig.dispatcher.process("bulk", entries) == 10
        assert sbx.stats()["messages_accepted"] == 10
        granted, wait_ms = rig.limiter.acquire("bulk", 1)
        # 20 tokens of debt at 10/s, 1 s of it within the burst: the next message in ~1.1 s.
        assert granted == 0 and 800 <= wait_ms <= 1100
    finally:
        rig.provider.close()


def test_the_same_producer_id_is_sent_once(rig: Rig, sbx: SandboxProcess) -> None:
    """Enqueueing the same id twice reports a duplicate, and the sandbox sees one send."""
    first = rig.outbox.enqueue({"to": "41790000001", "text": "a", "id": "once"})
    again = rig.outbox.enqueue({"to": "41790000001", "text": "a", "id": "once"})
    assert first.queued and again.duplicate and again.message_id == first.message_id
    rig.dispatcher.run("bulk")
    assert sbx.stats()["messages_accepted"] == 1


def test_bad_jobs_are_refused_at_enqueue_with_every_problem(rig: Rig) -> None:
    """A bad job lists each field's problem and nothing reaches the outbox."""
    with pytest.raises(JobValidationError) as caught:
        rig.outbox.enqueue_many([{"to": "41790000001", "text": "ok"}, {"to": "12", "text": "", "colour": "red"}])
    message = str(caught.value)
    assert "jobs[1].to" in message and "jobs[1].text" in message and "jobs[1].colour: unknown option" in message
    assert rig.store.r.exists(rig.store.outbox("bulk")) == 0


def test_raw_redis_jobs_are_validated_and_deduplicated_at_dispatch(rig: Rig, sbx: SandboxProcess) -> None:
    """Plain XADD entries: a good one is sent once, a repeat id is dropped, a broken one is dead-lettered."""
    outbox = rig.store.outbox("bulk")
    rig.store.r.xadd(outbox, {"job": b'{"to":"+41790000001","text":"hi","id":"raw-1"}'})
    rig.store.r.xadd(outbox, {"job": b'{"to":"41790000001","text":"hi","id":"raw-1"}'})
    rig.store.r.xadd(outbox, {"job": b"{not json"})
    rig.store.r.xadd(outbox, {"job": b'{"to":"41790000002","text":"hi","colour":"red"}'})
    rig.dispatcher.run("bulk")
    assert sbx.stats()["messages_accepted"] == 1
    assert sorted(rig.types().values()) == ["accepted", "failed", "failed"]
    reasons = [orjson.loads(f[b"entry"])["reason"] for _, f in rig.store.r.xrange(rig.store.dlq)]
    assert reasons == ["invalid_job", "invalid_job"]
    assert rig.store.r.xlen(outbox) == 0


def test_platform_rejections_are_terminal_and_do_not_affect_the_rest(rig: Rig, sbx: SandboxProcess) -> None:
    """A destination the platform rejects gets `rejected`; the others in the bulk are accepted."""
    rig.store.r.xadd(rig.store.outbox("bulk"), {"job": b'{"to":"41790000009","text":"hi"}'})
    rig.outbox.enqueue_many(_jobs(5), "bulk")
    # The sandbox says REJECTED_DUPLICATE_MESSAGE_ID for a messageId it has seen: a first send
    # with a used id is a platform rejection, not ours to count as accepted.
    sbx_mid = "sw-bulk-" + rig.store.r.xrange(rig.store.outbox("bulk"))[0][0].decode()
    import httpx

    httpx.post(f"{sbx.url}/sms/3/messages", headers=sbx.auth_header, timeout=5,
               json={"messages": [{"destinations": [{"to": "41790000009", "messageId": sbx_mid}],
                                   "content": {"text": "x"}}]}).raise_for_status()
    rig.dispatcher.run("bulk")
    types = rig.types()
    assert types[sbx_mid] == "rejected"
    assert sorted(types.values()).count("accepted") == 5


def test_401_pauses_the_lane_and_keeps_every_job(rig: Rig, sbx: SandboxProcess) -> None:
    """With the key refused, nothing is lost: jobs stay pending, the lane pauses, then all go out."""
    rig.outbox.enqueue_many(_jobs(20), "bulk")
    sbx.configure(forbidden_keys=[API_KEY])
    rig.dispatcher.run("bulk")
    assert rig.store.paused("bulk") == "auth"
    assert rig.events() == []
    assert rig.store.r.xlen(rig.store.outbox("bulk")) == 20
    sbx.configure(forbidden_keys=[])
    rig.store.resume("bulk")
    # Pending entries come back through recovery once their lease is over; force it now.
    rig.reconfigure(lease_ms=0)
    rig.dispatcher.run("bulk")
    assert sorted(set(rig.types().values())) == ["accepted"] and len(rig.types()) == 20
    assert sbx.stats()["duplicates"] == 0


def test_accept_then_timeout_is_reconciled_not_resent(rig: Rig, sbx: SandboxProcess) -> None:
    """A POST that timed out after the provider accepted it is confirmed from the logs, never resent."""
    rig.outbox.enqueue_many(_jobs(50), "bulk")
    sbx.configure(accept_then_timeout_rate=1.0, timeout_delay_ms=1500)
    rig.dispatcher.run("bulk")
    assert rig.events() == []
    assert len(rig.wake.reconciles) == 1
    sbx.configure(accept_then_timeout_rate=0.0)
    lane, entry_ids, _ = rig.wake.reconciles[0]
    rig.dispatcher.reconcile(lane, entry_ids)
    assert sorted(set(rig.types().values())) == ["accepted"] and len(rig.types()) == 50
    stats = sbx.stats()
    assert stats["messages_accepted"] == 50 and stats["duplicates"] == 0


def test_a_crash_before_the_post_is_resent_after_reconciliation(
    redis_url: str, sbx: SandboxProcess, store: Store
) -> None:
    """Messages left SUBMITTING by a dead worker are checked in the logs, then sent once: only after
    its send window, and only once they stayed absent over the reconcile window."""
    rig = Rig(_settings(redis_url, sbx, sms_reconcile_window_s=0.5, sms_reconcile_checks=2), store)
    rig.reconfigure(fence_margin_ms=0)
    rig.outbox.enqueue_many(_jobs(30), "bulk")
    claim = rig.store.claim("bulk", "dead-worker", 30, lease_ms=0, max_wait_ms=0, recover=False)
    rig.store.submit("bulk", claim.entries, consumer="dead-worker", lease_ms=0, state_ttl_s=3600, fence="dead",
                     send_window_ms=300)
    rig.reconfigure(lease_ms=100)  # recovery takes the entries over after 100 ms

    def taken_over() -> bool:
        rig.dispatcher.run("bulk")
        return bool(rig.wake.reconciles)

    wait_until(taken_over, 5, "the dead worker's batch to be taken over", interval_s=0.02)
    # The dead worker's window is still open: nobody may look at the logs, let alone resend.
    assert rig.types() == {} and sbx.stats()["messages_accepted"] == 0
    assert [(lane, len(ids)) for lane, ids, _ in rig.wake.reconciles] == [("bulk", 30)]
    assert 0 < rig.wake.reconciles[0][2] <= 300

    def settled() -> bool:
        lane, entry_ids, _ = rig.wake.reconciles[-1]
        rig.dispatcher.reconcile(lane, entry_ids)
        return len(rig.types()) == 30

    wait_until(settled, 10, "the taken-over batch to be resent", interval_s=0.1)
    assert set(rig.types().values()) == {"accepted"}
    stats = sbx.stats()
    assert stats["messages_accepted"] == 30 and stats["duplicates"] == 0
    assert {rig.store.message(e.message_id)["attempts"] for e in claim.entries} == {"2"}
    rig.provider.close()


def test_provider_outage_keeps_jobs_and_retries_them_after_the_pause(
    redis_url: str, sbx: SandboxProcess, store: Store
) -> None:
    """503s after every retry leave the jobs QUEUED with no dead letter; they go out after the pause, not the lease."""
    rig = Rig(_settings(redis_url, sbx, sms_outage_pause_s=0.3), store)
    queued = rig.outbox.enqueue_many(_jobs(10), "bulk")
    sbx.configure(down=True)
    rig.dispatcher.run("bulk")
    assert rig.store.paused("bulk") == "provider_unavailable"
    assert rig.store.r.xlen(rig.store.dlq) == 0
    assert rig.store.message(queued[0].message_id)["state"] == "QUEUED"
    sbx.configure(down=False)

    def sent() -> bool:
        rig.dispatcher.run("bulk")
        return len(rig.types()) == 10

    # The lease is 10 s: only the retry schedule can bring them back within 5 s.
    wait_until(sent, 5, "the batch to be retried after the outage pause", interval_s=0.05)
    assert sbx.stats()["duplicates"] == 0
    rig.provider.close()


def test_an_immediate_lane_listens_for_jobs_for_the_rest_of_its_budget(
    redis_url: str, sbx: SandboxProcess, store: Store
) -> None:
    """An otp dispatcher that found its lane empty keeps waiting on the outbox: a job queued later is
    sent by the same run, without any wake-up message. A stop request ends the wait within a slice."""
    rig = Rig(_settings(redis_url, sbx), store)
    stop = threading.Event()
    rig.reconfigure(stopping=stop.is_set, listen=True)
    handled: list[int] = []
    runner = threading.Thread(target=lambda: handled.append(rig.dispatcher.run("otp", budget_s=30)))
    runner.start()
    try:
        wait_until(lambda: rig.store.r.exists(rig.store.outbox("otp")) == 1, 5, "the first (empty) claim")
        queued = rig.outbox.enqueue({"to": "41790000001", "text": "Your code is 123456"}, "otp")
        wait_until(lambda: rig.types().get(queued.message_id) == "accepted", 10, "the listening run to send it")
        assert rig.wake.dispatches == []  # nobody was woken: the run that was waiting took it
    finally:
        stop.set()
        runner.join(timeout=5)
    assert not runner.is_alive() and handled == [1]
    assert sbx.stats()["messages_accepted"] == 1
    rig.provider.close()


def test_a_backlog_of_stale_entries_is_recovered_batch_after_batch(rig: Rig, sbx: SandboxProcess) -> None:
    """Entries a dead worker left pending (after an outage: every batch tried) come back in one run,
    batch after batch, not one batch per recovery interval."""
    rig.outbox.enqueue_many(_jobs(35), "otp")
    rig.store.claim("otp", "dead-worker", 35, lease_ms=0, max_wait_ms=0, recover=False)
    rig.reconfigure(lease_ms=0, recover_every_s=3600)  # only the run's first claim is a scheduled recovery
    assert rig.dispatcher.run("otp") == 35  # batches of 10: 10, 10, 10, 5
    assert len(rig.types()) == 35 and set(rig.types().values()) == {"accepted"}
    stats = sbx.stats()
    assert stats["messages_accepted"] == 35 and stats["duplicates"] == 0
    assert stats["requests"]["POST /sms/3/messages"] == {"200": 4}


def test_a_listening_run_hands_over_to_a_successor_after_releasing_its_slot(
    redis_url: str, sbx: SandboxProcess, store: Store
) -> None:
    """At the end of its budget a quiet otp run asks for a successor, once its slot is free again,
    so the successor can take it and the lane keeps a listener."""
    rig = Rig(_settings(redis_url, sbx), store)
    rig.reconfigure(listen=True)
    slots_taken_at_hand_over: list[int] = []

    def count_slots(lane: str) -> None:
        slots_taken_at_hand_over.append(int(rig.store.r.zcard(rig.store.dispatchers(lane))))

    rig.wake.on_dispatch = count_slots
    started = time.monotonic()
    assert rig.dispatcher.run("otp", budget_s=0.4) == 0
    assert time.monotonic() - started >= 0.4  # it listened for its whole budget
    assert slots_taken_at_hand_over == [0]
    rig.provider.close()
