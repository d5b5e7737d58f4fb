"""Fencing and reconciliation verdicts against real Redis: a stale owner never sends or decides.

The scripts (submit.lua, absent.lua, check_renew.lua, settle.lua's guards) are exercised directly, then
the dispatcher with a provider that stands still between submit and POST the way a paused process does.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import httpx
import orjson

from tests.integration.test_dispatch import RecordingWake, _jobs, _settings
from tests.support.sandbox import API_KEY
from worker.devtools.devstack import wait_until
from worker.devtools.sandbox.process import SandboxProcess
from worker.dispatch import DispatchConfig, Dispatcher
from worker.errors import SendWindowClosed
from worker.outbox import Outbox, OutboxConfig
from worker.provider import Provider, ProviderConfig, SendResponse, WireRequest
from worker.ratelimit import RateLimiter, RateLimiterConfig
from worker.settings import Settings
from worker.store import Entry, Outcome, Store, Submitted


def _claimed(store: Store, n: int, consumer: str = "c1") -> list[Entry]:
    store.enqueue("bulk", [(orjson.dumps({"to": f"4179{i:07d}", "text": "hi"}), None) for i in range(n)])
    return store.claim("bulk", consumer, n, lease_ms=60_000, max_wait_ms=0, recover=False).entries


def _submit(store: Store, entries: list[Entry], consumer: str, fence: str, window_ms: int) -> list[Submitted]:
    return store.submit("bulk", entries, consumer=consumer, lease_ms=60_000, state_ttl_s=3600, fence=fence,
                        send_window_ms=window_ms, margin_ms=0)


# --- the scripts ----------------------------------------------------------------------------------


def test_a_takeover_waits_until_the_old_owner_can_no_longer_send(store: Store) -> None:
    """While a SUBMITTING batch's window is open its fence lives and a taker gets WAIT; after it, the
    fence is gone and the taker may reconcile."""
    entries = _claimed(store, 3)
    assert [s.state for s in _submit(store, entries, "owner", "f-owner", 400)] == ["NEW"] * 3
    assert store.fences_alive(["f-owner"])
    waits = _submit(store, entries, "taker", "f-taker", 400)
    assert {s.state for s in waits} == {"WAIT"} and all(0 < s.wait_ms <= 400 for s in waits)
    assert not store.r.exists(store.fence_key("f-taker")), "a taker that sends nothing sets no fence"
    wait_until(lambda: not store.fences_alive(["f-owner"]), 2, "the owner's fence to expire", interval_s=0.01)
    assert [s.state for s in _submit(store, entries, "taker", "f-taker", 400)] == ["SUBMITTING"] * 3
    assert store.message(entries[0].message_id)["checker"] == "taker"


def test_a_stale_owners_own_decisions_are_not_applied(store: Store) -> None:
    """settle.lua applies a guarded outcome only for the current fence / checker, and then leaves the
    entry pending for its owner; the provider's facts (accepted) apply whoever learnt them."""
    first, second = _claimed(store, 2)
    _submit(store, [first, second], "owner", "f-old", 60_000)
    # Someone else resent both under a new fence (as absent.lua does).
    for e in (first, second):
        store.r.hset(store.msg(e.message_id), mapping={"fence": "f-new"})
    kw: dict[str, Any] = {"now_ms": 1, "events_maxlen": 1000, "state_ttl_s": 3600}
    stale = Outcome(first.message_id, first.entry_id, "QUEUED", ack=False, guard="f:f-old")
    fact = Outcome(second.message_id, second.entry_id, "ACCEPTED", ack=True, event=b"{}", guard="")
    assert store.settle("bulk", [stale, fact], **kw) == [False, True]
    assert store.message(first.message_id)["state"] == "SUBMITTING"
    assert store.message(second.message_id)["state"] == "ACCEPTED"
    owner = Outcome(first.message_id, first.entry_id, "AMBIGUOUS", ack=False, guard="f:f-new")
    assert store.settle("bulk", [owner], **kw) == [True]
    given_up = Outcome(first.message_id, first.entry_id, "FAILED", ack=True, guard="c:nobody")
    assert store.settle("bulk", [given_up], **kw) == [False]
    assert store.message(first.message_id)["state"] == "AMBIGUOUS"
    assert int(store.r.xlen(store.outbox("bulk"))) == 1, "only the accepted entry is acknowledged and deleted"


def _verdict(store: Store, entries: list[Entry], consumer: str = "checker", **kw: Any) -> list[str]:
    args = {"checks": 3, "window_ms": 300, "fence": "f-resend", "send_window_ms": 60_000, "max_attempts": 5, **kw}
    return [v.state for v in store.absent(entries, consumer=consumer, **args)]


def _take_check(store: Store, entries: list[Entry], consumer: str = "checker") -> list[str]:
    return [s.state for s in _submit(store, entries, consumer, "unused", 1)]


def test_absence_must_hold_over_several_checks_spread_over_the_window(store: Store) -> None:
    """absent.lua resends only after `checks` absences spanning `window_ms`, and only for the lease holder."""
    entries = _claimed(store, 2)
    _submit(store, entries, "dead", "f-dead", 1)
    wait_until(lambda: not store.fences_alive(["f-dead"]), 2, "the dead owner's window to pass", interval_s=0.005)
    started = time.monotonic()
    rounds = 0
    while True:
        assert _take_check(store, entries) == (["SUBMITTING"] * 2 if rounds == 0 else ["AMBIGUOUS"] * 2)
        verdicts = _verdict(store, entries)
        rounds += 1
        if verdicts != ["WAIT", "WAIT"]:
            break
        assert time.monotonic() - started < 5
        time.sleep(0.05)  # the pace of reconciles (the scenario), not a wait for a condition
    assert verdicts == ["RESEND", "RESEND"]
    assert rounds >= 3 and time.monotonic() - started >= 0.3
    message = store.message(entries[0].message_id)
    assert message["state"] == "SUBMITTING" and message["fence"] == "f-resend" and message["attempts"] == "2"
    assert store.fences_alive(["f-resend"])
    assert "absent_checks" not in message and "checker" not in message


def test_a_reconciler_that_lost_its_lease_neither_resends_nor_gives_up(store: Store) -> None:
    """STALE for anyone but the current lease holder; renewal works only for the holder; EXHAUSTED at the limit."""
    entries = _claimed(store, 1)
    _submit(store, entries, "dead", "f-dead", 1)
    wait_until(lambda: not store.fences_alive(["f-dead"]), 2, "the dead owner's window to pass", interval_s=0.005)
    assert _take_check(store, entries, "slow") == ["SUBMITTING"]
    store.r.hset(store.msg(entries[0].message_id), mapping={"check_until": 1})  # its lease ran out
    assert store.renew_checks([entries[0].message_id], "slow", 60_000) == 0
    assert _take_check(store, entries, "fast") == ["SUBMITTING"]
    assert store.renew_checks([entries[0].message_id], "fast", 60_000) == 1
    assert _verdict(store, entries, "slow", checks=1, window_ms=0) == ["STALE"]
    assert _verdict(store, entries, "fast", checks=1, window_ms=0, max_attempts=1) == ["EXHAUSTED"]
    assert store.message(entries[0].message_id)["state"] == "SUBMITTING"


# --- the dispatcher with a provider that stands still ------------------------------------------------


class Frozen:
    """A Provider whose first send stops between submit.lua and the request, like a paused process."""

    def __init__(self, provider: Provider, hold: threading.Event, resume: threading.Event) -> None:
        self.provider = provider
        self.hold, self.resume = hold, resume
        self.refused = 0

    def send(self, request: WireRequest, *, fence: Callable[[], bool] | None = None, **kw: Any) -> SendResponse:
        if not self.hold.is_set():
            self.hold.set()
            assert self.resume.wait(30)
        try:
            return self.provider.send(request, fence=fence, **kw)
        except SendWindowClosed:
            self.refused += 1
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self.provider, name)


def _dispatcher(settings: Settings, store: Store, provider: Any, wake: RecordingWake, name: str) -> Dispatcher:
    config = replace(DispatchConfig.from_settings(settings), recover_every_s=0, listen=False, fence_margin_ms=0,
                     lease_ms=300)
    limiter = RateLimiter(RateLimiterConfig.from_settings(settings), store)
    return Dispatcher(config, store, provider, limiter, wake, name)


def test_a_paused_owner_never_sends_after_its_batch_was_taken_over(
    redis_url: str, sbx: SandboxProcess, store: Store,
) -> None:
    """Owner A stops after submit.lua; B recovers the batch, waits out A's window, finds nothing in the
    logs over the reconcile window and resends; A wakes up and its request is refused by the fence.
    The provider accepts every message exactly once."""
    settings = _settings(redis_url, sbx, sms_send_window_s=0.5, sms_reconcile_window_s=0.5, sms_reconcile_checks=2)
    hold, resume = threading.Event(), threading.Event()
    frozen = Frozen(Provider(ProviderConfig.from_settings(settings)), hold, resume)
    a = _dispatcher(settings, store, frozen, RecordingWake(), "worker-a")
    wake_b = RecordingWake()
    provider_b = Provider(ProviderConfig.from_settings(settings))
    b = _dispatcher(settings, store, provider_b, wake_b, "worker-b")
    Outbox(OutboxConfig.from_settings(settings), store).enqueue_many(_jobs(20), "bulk")
    owner = threading.Thread(target=a.run, args=("bulk",))
    owner.start()
    assert hold.wait(10), "A never reached its POST"

    def taken_over_and_sent() -> bool:
        b.run("bulk")  # recovery (the lease is 300 ms), then WAIT for A's window, then checks
        for lane, ids, _ in wake_b.reconciles:
            b.reconcile(lane, ids)
        return sbx.stats()["messages_accepted"] == 20

    wait_until(taken_over_and_sent, 15, "B to take the batch over and send it", interval_s=0.1)
    resume.set()
    owner.join(30)
    assert frozen.refused == 1, "A's request must be refused by its fence"
    stats = sbx.stats()
    assert stats["messages_accepted"] == 20 and stats["duplicates"] == 0
    states = {store.r.hget(key, "state") for key in store.r.scan_iter(f"{store.p}:msg:*")}
    assert states == {b"ACCEPTED"}
    frozen.provider.close()
    provider_b.close()


def test_an_unknown_status_group_is_reconciled_not_rejected(redis_url: str, store: Store) -> None:
    """A 200 whose status group is new to this code is ambiguous: the logs settle it (accepted), and no
    send-side `rejected` is published."""
    seen: dict[str, Any] = {}

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/sms/3/messages":
            body = orjson.loads(request.content)
            seen["ids"] = [d["messageId"] for m in body["messages"] for d in m["destinations"]]
            status = {"groupId": 9, "groupName": "SCHEDULED", "id": 90, "name": "SCHEDULED_FOR_LATER"}
            return httpx.Response(200, json={"bulkId": "b-1", "messages": [
                {"messageId": mid, "destination": "41790000000", "status": status} for mid in seen["ids"]]})
        pending = {"groupId": 1, "groupName": "PENDING", "id": 26, "name": "PENDING_ACCEPTED"}
        return httpx.Response(200, json={"results": [
            {"messageId": mid, "bulkId": "b-1", "status": pending} for mid in seen["ids"]]})

    settings = Settings.model_validate({
        "redis_url": redis_url, "icomm_base_url": "http://127.0.0.1:9", "icomm_api_key": API_KEY,
        "log_format": "console", "sms_reconcile_delay_s": 0,
        "sms_lanes": {"bulk": {"batch_size": 10, "max_wait_ms": 0}},
    })
    provider = Provider(ProviderConfig.from_settings(settings), transport=httpx.MockTransport(handler))
    wake = RecordingWake()
    dispatcher = _dispatcher(settings, store, provider, wake, "w")
    Outbox(OutboxConfig.from_settings(settings), store).enqueue_many(_jobs(3), "bulk")
    dispatcher.run("bulk")
    states = {store.message(mid)["state"] for mid in seen["ids"]}
    assert states == {"AMBIGUOUS"}
    assert [len(ids) for _, ids, _ in wake.reconciles] == [3]
    dispatcher.reconcile("bulk", wake.reconciles[0][1])
    assert {store.message(mid)["state"] for mid in seen["ids"]} == {"ACCEPTED"}
    types = [orjson.loads(f[b"event"])["type"] for _, f in store.r.xrange(store.events)]
    assert types == ["accepted"] * 3
    provider.close()
