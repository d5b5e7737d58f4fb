"""Delivery reports against real Redis and the real sandbox: drain, fencing, processing, parking, sweeps."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Callable, MutableMapping
from typing import Any

import httpx
import orjson
import pytest
from structlog.testing import capture_logs

from tests.support.redis_server import RedisServer
from tests.support.sandbox import API_KEY
from worker import events, reports
from worker.devtools.sandbox.config import SandboxConfig
from worker.devtools.sandbox.process import SandboxProcess
from worker.errors import StoreError
from worker.provider import Provider, ProviderConfig
from worker.reports import (
    CONFLICT,
    DRAIN_LEASE,
    PARKED,
    DrainConfig,
    Drainer,
    Op,
    ProcessConfig,
    Processor,
    ReportState,
    SweepConfig,
    Sweeper,
)
from worker.settings import Settings
from worker.store import Store, connect

STATUSES = {
    "DELIVERED": {"groupId": 3, "groupName": "DELIVERED", "id": 5, "name": "DELIVERED_TO_HANDSET",
                  "description": "Message delivered to handset"},
    "UNDELIVERABLE": {"groupId": 2, "groupName": "UNDELIVERABLE", "id": 9, "name": "UNDELIVERABLE_NOT_DELIVERED",
                      "description": "Message sent not delivered"},
    "EXPIRED": {"groupId": 4, "groupName": "EXPIRED", "id": 15, "name": "EXPIRED_EXPIRED",
                "description": "Message expired"},
    "REJECTED": {"groupId": 5, "groupName": "REJECTED", "id": 6, "name": "REJECTED_NETWORK",
                 "description": "Network is forbidden"},
    "PENDING": {"groupId": 1, "groupName": "PENDING", "id": 7, "name": "PENDING_ENROUTE",
                "description": "Message sent to next instance"},
}
NO_ERROR = {"groupId": 0, "groupName": "OK", "id": 0, "name": "NO_ERROR", "description": "No Error",
            "permanent": False}


# --- helpers ---------------------------------------------------------------------------------------


def _message(store: Store, mid: str, *, state: str = "ACCEPTED", n: int = 0, deadline_ms: int | None = None,
             **fields: Any) -> None:
    """A message hash with the fields the dispatcher writes (and its awaiting entry when accepted)."""
    job = {"to": f"4179{n:07d}", "text": "hello", "id": f"order-{n}", "metadata": {"n": n}}
    store.r.hset(store.msg(mid), mapping={"state": state, "lane": "bulk", "job": orjson.dumps(job),
                                          "bulk_id": "bulk-1", "attempts": 1, **fields})
    if state == "ACCEPTED":
        store.r.zadd(store.awaiting, {mid: deadline_ms or int(time.time() * 1000) + 3_600_000})


def _report(mid: str, group: str = "DELIVERED", n: int = 0) -> dict[str, Any]:
    return {
        "bulkId": "bulk-1", "messageId": mid, "to": f"4179{n:07d}", "sentAt": "2026-11-27T10:00:00.000+0000",
        "doneAt": "2026-11-27T10:00:02.000+0000", "messageCount": 1,
        "price": {"pricePerMessage": 0.01, "currency": "EUR"}, "status": STATUSES[group], "error": NO_ERROR,
        "mccMnc": "22801",
    }


def _raw(store: Store, *items: Any, src: str = "drain") -> str:
    page = orjson.dumps({"results": list(items)})
    return str(store.r.xadd(store.reports_raw, {"page": page, "src": src}).decode())


def _events(store: Store) -> list[dict[str, Any]]:
    return [orjson.loads(f[b"event"]) for _, f in store.r.xrange(store.events)]


def _dead(store: Store) -> list[dict[str, Any]]:
    return [orjson.loads(f[b"entry"]) for _, f in store.r.xrange(store.dlq)]


def _raw_left(store: Store) -> int:
    return int(store.r.xlen(store.reports_raw))


def _with(settings: Settings, **changes: Any) -> Settings:
    """A validated copy of `settings` with some fields changed."""
    return Settings.model_validate({**settings.model_dump(), **changes})


def _poll(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.02)


@pytest.fixture
def processor(settings: Settings, store: Store) -> Processor:
    return Processor(ProcessConfig.from_settings(settings), store)


@pytest.fixture
def sweeper(settings: Settings, store: Store, processor: Processor) -> Sweeper:
    return Sweeper(SweepConfig.from_settings(settings), store, processor)


# --- processing ------------------------------------------------------------------------------------


def test_final_reports_move_accepted_messages_and_emit_one_event_each(store: Store, processor: Processor) -> None:
    """Each final group moves its message to that state with one event carrying the job and the report."""
    groups = ["DELIVERED", "UNDELIVERABLE", "EXPIRED", "REJECTED"]
    for n, _ in enumerate(groups):
        _message(store, f"m-{n}", n=n)
    _raw(store, *[_report(f"m-{n}", g, n) for n, g in enumerate(groups)])

    tally = processor.process()

    assert tally.applied == 4
    by_id = {e["message_id"]: e for e in _events(store)}
    assert [by_id[f"m-{n}"]["type"] for n in range(4)] == ["delivered", "undeliverable", "expired", "rejected"]
    first = by_id["m-0"]
    assert first["event_id"] == "m-0:delivered"
    assert first["id"] == "order-0" and first["metadata"] == {"n": 0} and first["to"] == "41790000000"
    assert first["lane"] == "bulk" and first["bulk_id"] == "bulk-1"
    assert first["status"]["name"] == "DELIVERED_TO_HANDSET" and first["error"]["name"] == "NO_ERROR"
    assert first["price"] == {"pricePerMessage": 0.01, "currency": "EUR"} and first["mcc_mnc"] == "22801"
    assert first["sent_at"].startswith("2026-11-27T10:00:00") and first["message_count"] == 1
    assert [store.message(f"m-{n}")["state"] for n in range(4)] == groups
    assert store.r.zcard(store.awaiting) == 0
    assert _raw_left(store) == 0


def test_the_same_report_by_webhook_and_drain_and_twice_in_a_page_gives_one_event(
    store: Store, processor: Processor
) -> None:
    """Duplicates (both paths, a page replayed, a repeat inside one page) produce exactly one event."""
    _message(store, "m-1")
    report = _report("m-1")
    _raw(store, report, report, src="webhook")
    _raw(store, report, src="drain")
    processor.process()
    _raw(store, report, src="drain")
    tally = processor.process()

    assert [e["event_id"] for e in _events(store)] == ["m-1:delivered"]
    assert tally.duplicates == 1
    assert _raw_left(store) == 0


def test_reports_settle_messages_still_submitting_ambiguous_or_queued(store: Store, processor: Processor) -> None:
    """A report that raced ahead of the send's bookkeeping still settles the message."""
    for mid, state in [("s", "SUBMITTING"), ("a", "AMBIGUOUS"), ("q", "QUEUED"), ("f", "FAILED")]:
        _message(store, mid, state=state)
    _raw(store, _report("s"), _report("a", "UNDELIVERABLE"), _report("q", "REJECTED"), _report("f"))
    processor.process()

    assert sorted(e["event_id"] for e in _events(store)) == ["a:undeliverable", "q:rejected", "s:delivered"]
    assert store.message("f")["state"] == "FAILED"  # terminal: a report changes nothing


def test_intermediate_reports_change_nothing(store: Store, processor: Processor) -> None:
    """PENDING reports leave the state, emit nothing and are not parked, even for unknown messages."""
    _message(store, "m-1")
    _raw(store, _report("m-1", "PENDING"), _report("nobody", "PENDING"))
    tally = processor.process()

    assert tally.intermediate == 2
    assert store.message("m-1")["state"] == "ACCEPTED"
    assert _events(store) == []
    assert store.r.zcard(store.reports_parked_since) == 0
    assert _raw_left(store) == 0


def test_malformed_pages_and_items_are_dead_lettered_without_blocking(store: Store, processor: Processor) -> None:
    """A page that is not JSON, one without results, and bad items go to dead letters; the rest applies."""
    _message(store, "good")
    store.r.xadd(store.reports_raw, {"page": b"<html>502</html>", "src": "drain"})
    store.r.xadd(store.reports_raw, {"page": b'{"results": "nope"}', "src": "drain"})
    _raw(store, _report("good"), {"status": STATUSES["DELIVERED"]}, {"messageId": "x", "status": {"groupName": 7}},
         {"messageId": "y", "status": {"groupName": "?"}}, "not an object")
    processor.process()

    assert [e["event_id"] for e in _events(store)] == ["good:delivered"]
    reasons = Counter(d["reason"] for d in _dead(store))
    assert reasons == {"report_page_malformed": 2, "report_malformed": 3, "report_unknown_status": 1}
    assert any(d.get("page") == "<html>502</html>" for d in _dead(store))
    assert _raw_left(store) == 0


def test_an_op_whose_message_appeared_since_the_read_is_retried_before_the_ack(
    settings: Settings, store: Store, processor: Processor
) -> None:
    """report_apply.lua refuses to park a report once its message exists and then acknowledges nothing."""
    entry = _raw(store, _report("m-1"))
    _message(store, "m-1")
    acked, results = processor.state.apply([Op("P", "m-1", payload=orjson.dumps(_report("m-1")))], ack=[entry])

    assert (acked, results) == (False, [CONFLICT])
    assert _raw_left(store) == 1
    processor.process()
    assert [e["event_id"] for e in _events(store)] == ["m-1:delivered"]
    assert _raw_left(store) == 0


@pytest.mark.parametrize("conflict_first", [True, False])
def test_apply_calls_acknowledge_the_pages_only_when_no_call_conflicted(
    store: Store, processor: Processor, monkeypatch: pytest.MonkeyPatch, conflict_first: bool
) -> None:
    """A batch goes to Redis in several report_apply calls; the pages are acknowledged and the dead
    letters written by the last call, and not at all if an earlier call had a conflict."""
    monkeypatch.setattr(reports.ops, "APPLY_CALL_OPS", 1)
    entry = _raw(store, _report("m-1"), _report("m-2"))
    if conflict_first:
        _message(store, "m-1")  # parking m-1's report now conflicts: the message exists
    ops = [Op("P", mid, payload=orjson.dumps(_report(mid))) for mid in ("m-1", "m-2")]
    acked, results = processor.state.apply(ops, ack=[entry], dead=[("", b'{"reason": "test"}')])

    if conflict_first:
        assert (acked, results) == (False, [CONFLICT, PARKED])
        assert _raw_left(store) == 1 and store.r.xlen(store.dlq) == 0
    else:
        assert (acked, results) == (True, [PARKED, PARKED])
        assert _raw_left(store) == 0 and store.r.xlen(store.dlq) == 1


# --- parking ---------------------------------------------------------------------------------------


def test_unknown_report_is_parked_then_resolved_when_the_message_appears(
    store: Store, processor: Processor, sweeper: Sweeper
) -> None:
    """A report for a message with no state yet is kept, and applied on a later run once the message exists."""
    _raw(store, _report("late", "UNDELIVERABLE"))
    tally = processor.process()

    assert tally.parked == 1 and _events(store) == [] and _raw_left(store) == 0
    assert orjson.loads(store.r.hget(store.reports_parked, "late"))["messageId"] == "late"
    assert store.r.zscore(store.reports_parked_since, "late") is not None
    assert sweeper.sweep()["still_parked"] == 1

    _message(store, "late", n=7)
    result = sweeper.sweep()

    assert result["resolved"] == 1
    [event] = _events(store)
    assert event["event_id"] == "late:undeliverable" and event["id"] == "order-7"
    assert store.r.hlen(store.reports_parked) == 0 and store.r.zcard(store.reports_parked_since) == 0


@pytest.mark.parametrize(("policy", "expected_events"), [("emit", 1), ("drop", 0)])
def test_unknown_report_past_the_park_timeout_is_emitted_or_dropped_and_counted(
    settings: Settings, store: Store, policy: str, expected_events: int
) -> None:
    """A report still unknown after the park timeout becomes an unknown_message event (or is dropped)."""
    settings = _with(settings, sms_report_park_timeout_s=60.0, sms_unknown_reports=policy)
    processor = Processor(ProcessConfig.from_settings(settings), store)
    sweeper = Sweeper(SweepConfig.from_settings(settings), store, processor)
    _raw(store, _report("stranger", "DELIVERED", n=5))
    processor.process()

    assert sweeper.sweep()["still_parked"] == 1  # young: kept
    later = int(time.time() * 1000) + 61_000
    result = sweeper.sweep(now_ms=later)

    assert result["unknown"] == 1
    events = _events(store)
    assert len(events) == expected_events
    if events:
        assert events[0]["type"] == "unknown_message" and events[0]["event_id"] == "stranger:unknown_message"
        assert events[0]["to"] == "41790000005" and events[0]["status"]["groupName"] == "DELIVERED"
    counters = processor.state.counters()
    assert counters.get("unknown_emitted" if policy == "emit" else "unknown_dropped") == 1
    assert store.r.zcard(store.reports_parked_since) == 0


# --- the no-report sweep ---------------------------------------------------------------------------


def test_no_report_sweep_expires_overdue_messages_and_a_late_report_replaces_it(
    store: Store, processor: Processor, sweeper: Sweeper
) -> None:
    """Past the deadline an accepted message gets expired/no_report; a real report later still updates it."""
    past = int(time.time() * 1000) - 1000
    _message(store, "overdue", deadline_ms=past)
    _message(store, "overdue-2", deadline_ms=past)
    _message(store, "in-time")
    _message(store, "done", state="DELIVERED")
    store.r.zadd(store.awaiting, {"done": past})

    result = sweeper.sweep()

    assert result["expired_no_report"] == 2
    expired = {e["message_id"]: e for e in _events(store)}
    assert set(expired) == {"overdue", "overdue-2"}
    assert expired["overdue"]["reason"] == "no_report" and expired["overdue"]["type"] == "expired"
    assert expired["overdue"]["event_id"] == "overdue:expired:no_report"
    assert expired["overdue"]["id"] == "order-0"
    assert store.message("overdue")["reason"] == "no_report"
    assert store.r.zrange(store.awaiting, 0, -1) == [b"in-time"]
    assert sweeper.sweep()["expired_no_report"] == 0

    _raw(store, _report("overdue", "DELIVERED"), _report("overdue-2", "EXPIRED"))
    processor.process()

    late = [e for e in _events(store) if e["reason"] is None]
    assert sorted(e["event_id"] for e in late) == ["overdue-2:expired", "overdue:delivered"]
    assert store.message("overdue")["state"] == "DELIVERED" and "reason" not in store.message("overdue")
    _raw(store, _report("overdue", "DELIVERED"))
    processor.process()
    assert len(_events(store)) == 4


# --- the drain, against the sandbox ----------------------------------------------------------------


@pytest.fixture(scope="module")
def sandbox_config() -> SandboxConfig:
    """Reports at once (tests/integration/conftest.py starts the sandbox)."""
    return SandboxConfig(report_delay_ms=0, seed=4)


def _sandbox_settings(settings: Settings, sandbox: SandboxProcess) -> Settings:
    return _with(settings, icomm_base_url=sandbox.url, icomm_api_key=API_KEY)


def _send_direct(sandbox: SandboxProcess, store: Store, n: int, prefix: str = "d") -> list[str]:
    """Send `n` SMS straight to the sandbox (no webhook) and record them as accepted, as dispatch would."""
    mids = [f"{prefix}-{i}" for i in range(n)]
    with httpx.Client(base_url=sandbox.url, headers=sandbox.auth_header, timeout=10) as client:
        for start in range(0, n, 1000):
            messages = [{"destinations": [{"to": f"4179{i:07d}", "messageId": mids[i]}], "content": {"text": "hi"}}
                        for i in range(start, min(n, start + 1000))]
            client.post("/sms/3/messages", json={"messages": messages}).raise_for_status()
    for i, mid in enumerate(mids):
        _message(store, mid, n=i)
    return mids


def _generated(sandbox: SandboxProcess, n: int) -> None:
    _poll(lambda: sandbox.stats()["reports"]["generated"] >= n, 10, f"{n} reports to be generated")


def test_drain_fetches_every_page_and_each_report_becomes_one_event(
    settings: Settings, store: Store, sbx: SandboxProcess
) -> None:
    """2,500 reports come in full pages then a short one; each reaches exactly one final event."""
    settings = _sandbox_settings(settings, sbx)
    mids = _send_direct(sbx, store, 2500)
    _generated(sbx, 2500)
    with Provider(ProviderConfig.from_settings(settings)) as provider:
        result = Drainer(DrainConfig.from_settings(settings), store, provider).drain()
    Processor(ProcessConfig.from_settings(settings), store).process()

    assert (result.outcome, result.pages, result.reports) == ("drained", 3, 2500)
    stats = sbx.stats()["reports"]
    assert stats["fetched"] == stats["generated"] == 2500
    events = _events(store)
    assert Counter(e["message_id"] for e in events) == Counter(mids)
    assert len({e["event_id"] for e in events}) == 2500
    assert store.r.exists(store.lease_key(DRAIN_LEASE)) == 0  # released for the next drain


def test_a_processor_that_dies_after_the_get_loses_no_report(
    settings: Settings, store: Store, sbx: SandboxProcess
) -> None:
    """Pages read by a processor that crashed before acknowledging are recovered via XAUTOCLAIM, once each."""
    settings = _sandbox_settings(settings, sbx)
    mids = _send_direct(sbx, store, 1500)
    _generated(sbx, 1500)
    with Provider(ProviderConfig.from_settings(settings)) as provider:
        Drainer(DrainConfig.from_settings(settings), store, provider).drain()

    class CrashingState(ReportState):
        def apply(self, *_args: Any, **_kwargs: Any) -> Any:
            raise RuntimeError("killed before the apply")

    config = ProcessConfig.from_settings(settings)
    doomed = Processor(config, store, consumer="doomed", state=CrashingState(store, config.events_maxlen))
    with pytest.raises(RuntimeError):
        doomed.process()
    assert _events(store) == [] and _raw_left(store) == 2

    survivor = Processor(ProcessConfig.from_settings(settings), store, consumer="survivor", claim_idle_ms=50)
    _poll(lambda: survivor.process().applied == 0 and len(_events(store)) >= 1500, 10, "recovery")

    assert Counter(e["message_id"] for e in _events(store)) == Counter(mids)
    assert _raw_left(store) == 0
    assert store.r.xpending(store.reports_raw, "reports")["pending"] == 0


def test_a_drainer_whose_lease_was_taken_over_stores_its_page_and_stops(settings: Settings, store: Store) -> None:
    """A drainer that paused past its lease during the GET stores the page it was handed (processing
    is idempotent, and the provider never hands it out again), then fetches nothing more."""
    page = orjson.dumps({"results": [_report(f"m-{i}", n=i) for i in range(reports.PAGE_SIZE)]})  # a full page
    gets = []

    def handler(request: httpx.Request) -> httpx.Response:
        gets.append(request.url.path)
        # The GET takes so long that the lease expires and another drainer takes it over.
        store.r.delete(store.lease_key(DRAIN_LEASE))
        assert store.lease(DRAIN_LEASE, "the-new-drainer", 60_000) > 0
        return httpx.Response(200, content=page)

    provider_config = ProviderConfig.from_settings(settings)
    with capture_logs() as logs, Provider(provider_config, transport=httpx.MockTransport(handler)) as provider:
        result = Drainer(DrainConfig.from_settings(settings), store, provider).drain()

    assert (result.outcome, result.pages, gets) == ("fenced", 1, ["/sms/3/reports"])  # no further page
    [(_, fields)] = store.r.xrange(store.reports_raw)
    assert fields[b"page"] == page and fields[b"src"] == b"drain"
    assert _dead(store) == []
    assert store.r.get(store.lease_key(DRAIN_LEASE)) == b"the-new-drainer"  # not released by the loser
    assert [e["log_level"] for e in logs if e["event"] == "reports_drain_lease_lost"] == ["error"]
    for n in range(reports.PAGE_SIZE):
        _message(store, f"m-{n}", n=n)
    Processor(ProcessConfig.from_settings(settings), store).process()
    assert len({e["event_id"] for e in _events(store)}) == reports.PAGE_SIZE


def test_append_stores_with_a_stale_fencing_token_and_says_it_is_stale(settings: Settings, store: Store) -> None:
    """report_append.lua writes every page; only the answer tells a stale token from the current one."""
    with Provider(ProviderConfig.from_settings(settings)) as provider:
        drainer = Drainer(DrainConfig.from_settings(settings), store, provider)
        old = store.lease(DRAIN_LEASE, "a", 60_000)
        store.release_lease(DRAIN_LEASE, "a")
        new = store.lease(DRAIN_LEASE, "b", 60_000)
        assert drainer.append(b'{"results":[]}', new) is True
        assert drainer.append(b'{"results":[]}', old) is False
    fences = [f[b"fence"] for _, f in store.r.xrange(store.reports_raw)]
    assert fences == [str(new).encode(), str(old).encode()]
    assert _dead(store) == []


def test_a_second_drainer_does_not_fetch_while_the_lease_is_held(
    settings: Settings, store: Store, sbx: SandboxProcess
) -> None:
    """With the drain lease held elsewhere, drain() returns at once without calling the provider."""
    settings = _sandbox_settings(settings, sbx)
    _send_direct(sbx, store, 10)
    _generated(sbx, 10)
    assert store.lease(DRAIN_LEASE, "someone-else", 60_000) > 0
    with Provider(ProviderConfig.from_settings(settings)) as provider:
        result = Drainer(DrainConfig.from_settings(settings), store, provider).drain()

    assert result.outcome == "busy"
    assert sbx.stats()["requests"].get("GET /sms/3/reports", {}) == {}
    assert sbx.stats()["reports"]["fetched"] == 0


def test_two_drainers_at_once_store_each_report_once(settings: Settings, store: Store, sbx: SandboxProcess) -> None:
    """Drainers started together: one drains, the other is turned away; no report is stored twice."""
    settings = _sandbox_settings(settings, sbx)
    mids = _send_direct(sbx, store, 3000)
    _generated(sbx, 3000)
    start = threading.Barrier(2)
    outcomes: list[str] = []

    def run() -> None:
        with Provider(ProviderConfig.from_settings(settings)) as provider:
            drainer = Drainer(DrainConfig.from_settings(settings), store, provider)
            start.wait()
            outcomes.append(drainer.drain().outcome)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)

    stored = [r["messageId"] for _, f in store.r.xrange(store.reports_raw)
              for r in orjson.loads(f[b"page"])["results"]]
    assert Counter(stored) == Counter(mids)
    assert "drained" in outcomes
    Processor(ProcessConfig.from_settings(settings), store).process()
    assert len({e["event_id"] for e in _events(store)}) == len(_events(store)) == 3000


class RecordingWake:
    """Stands in for Dramatiq: records the actors the report code asked to wake."""

    def __init__(self) -> None:
        self.sent: list[str] = []

    def process_reports(self) -> None:
        self.sent.append("process_reports")

    def send(self, actor: str, *args: Any, delay_ms: int = 0) -> None:
        self.sent.append(actor)


def test_a_long_backlog_is_drained_in_bounded_runs_that_hand_over(
    settings: Settings, store: Store, sbx: SandboxProcess
) -> None:
    """A drain wakes the processor per stored page, stops after its page budget and hands over the rest."""
    settings = _sandbox_settings(settings, sbx)
    _send_direct(sbx, store, 2500)
    _generated(sbx, 2500)
    wake = RecordingWake()
    with Provider(ProviderConfig.from_settings(settings)) as provider:
        first = Drainer(DrainConfig.from_settings(settings), store, provider, wake, max_pages=2).drain()
        second = Drainer(DrainConfig.from_settings(settings), store, provider, wake, max_pages=2).drain()

    assert (first.outcome, first.pages, first.reports) == ("page_limit", 2, 2000)
    assert (second.outcome, second.pages, second.reports) == ("drained", 1, 500)
    assert wake.sent == ["process_reports", "process_reports", "drain_reports", "process_reports"]


class SiblingWake(RecordingWake):
    """Dramatiq handing the follow-up drain message at once to another thread of the same process:
    that thread runs the same Drainer, and the sending drain waits for it (as it may, or not)."""

    def __init__(self) -> None:
        super().__init__()
        self.drainer: Drainer | None = None
        self.results: list[Any] = []

    def send(self, actor: str, *args: Any, delay_ms: int = 0) -> None:
        super().send(actor, *args, delay_ms=delay_ms)
        assert self.drainer is not None
        sibling = threading.Thread(target=lambda: self.results.append(self.drainer.drain()))  # type: ignore[union-attr]
        sibling.start()
        sibling.join(timeout=30)


def test_a_follow_up_taken_at_once_by_a_sibling_thread_carries_the_drain_on(
    settings: Settings, store: Store, sbx: SandboxProcess
) -> None:
    """The hand-over is sent after the drain let go of its process's lock: a follow-up that a thread
    of the same process takes at once is not refused as busy (which left the rest undrained until
    the clock's next interval)."""
    settings = _sandbox_settings(settings, sbx)
    _send_direct(sbx, store, 2500)
    _generated(sbx, 2500)
    wake = SiblingWake()
    with Provider(ProviderConfig.from_settings(settings)) as provider:
        wake.drainer = Drainer(DrainConfig.from_settings(settings), store, provider, wake, max_pages=1)
        first = wake.drainer.drain()
    assert (first.outcome, first.pages) == ("page_limit", 1)
    assert [(r.outcome, r.pages) for r in wake.results] == [("drained", 1), ("page_limit", 1)]  # innermost first
    assert sbx.stats()["reports"]["fetched"] == 2500


def test_an_idle_drain_stores_nothing(settings: Settings, store: Store, sbx: SandboxProcess) -> None:
    """With no report waiting, a drain makes one GET and writes no raw entry."""
    settings = _sandbox_settings(settings, sbx)
    wake = RecordingWake()
    with Provider(ProviderConfig.from_settings(settings)) as provider:
        result = Drainer(DrainConfig.from_settings(settings), store, provider, wake).drain()
    assert (result.outcome, result.pages) == ("drained", 0)
    assert _raw_left(store) == 0 and wake.sent == []


class FlakyStore(Store):
    """A Store whose first `failures` script calls of one name fail, as in a Redis connection blip."""

    def __init__(self, store: Store, name: str, failures: int) -> None:
        super().__init__(store.r, store.p, store.mid_prefix)
        self.name = name
        self.failures = failures

    def run(self, name: str, keys: Any, args: Any) -> Any:
        if name == self.name and self.failures > 0:
            self.failures -= 1
            raise StoreError("Redis: ConnectionError: connection reset by peer")
        return super().run(name, keys, args)


def test_a_page_already_taken_from_the_provider_survives_a_redis_blip(settings: Settings, store: Store) -> None:
    """Appending a fetched page is retried through a short Redis outage instead of losing the page."""
    page = orjson.dumps({"results": [_report("m-1")]})
    flaky = FlakyStore(store, "report_append", failures=2)
    provider_config = ProviderConfig.from_settings(settings)
    answer = httpx.MockTransport(lambda _: httpx.Response(200, content=page))
    with Provider(provider_config, transport=answer) as provider:
        result = Drainer(DrainConfig.from_settings(settings), flaky, provider).drain()
    assert (result.outcome, result.pages) == ("drained", 1)
    assert _raw_left(store) == 1


def test_a_malformed_apply_call_is_refused_before_any_write(store: Store, processor: Processor) -> None:
    """report_apply.lua checks every op code first: Lua does not roll back a half-run script."""
    _message(store, "m-1")
    ops = [Op("A", "m-1", "DELIVERED", "DELIVERED_TO_HANDSET", b'{"event":1}'), Op("X", "m-1")]
    with pytest.raises(StoreError, match="unknown op code"):
        processor.state.apply(ops)
    assert store.message("m-1")["state"] == "ACCEPTED" and _events(store) == []


# --- a fetched page is never given up (finding 5) --------------------------------------------------


class Recorded:
    """A reports endpoint (httpx.MockTransport) that hands out `pages` once each, then empty pages."""

    def __init__(self, *pages: bytes) -> None:
        self.pages = list(pages)
        self.gets = 0

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.gets += 1
        return httpx.Response(200, content=self.pages.pop(0) if self.pages else b'{"results": []}')


class Refusing(Store):
    """A Store whose report_append calls fail while `refuse()` says so; `seen` records what the
    endpoint had handed out at each refusal."""

    def __init__(self, store: Store, refuse: Callable[[int], BaseException | None], endpoint: Recorded) -> None:
        super().__init__(store.r, store.p, store.mid_prefix)
        self.refuse = refuse
        self.endpoint = endpoint
        self.calls = 0
        self.seen: list[int] = []

    def run(self, name: str, keys: Any, args: Any) -> Any:
        if name == "report_append":
            self.calls += 1
            error = self.refuse(self.calls)
            if error is not None:
                self.seen.append(self.endpoint.gets)
                raise error
        return super().run(name, keys, args)


@pytest.fixture
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reports.drain, "STORE_BACKOFF_S", 0.001)
    monkeypatch.setattr(reports.drain, "STORE_BACKOFF_MAX_S", 0.005)


def _page(*mids: str) -> bytes:
    return orjson.dumps({"results": [_report(mid, n=i) for i, mid in enumerate(mids)]})


def test_a_fetched_page_is_retried_until_stored_and_nothing_more_is_fetched_meanwhile(
    settings: Settings, store: Store, fast_retries: None
) -> None:
    """Redis refusing the write far longer than a blip: the page is kept and retried, and the drain
    asks for no further page until it is stored (a full page, so the drain goes on afterwards)."""
    full = _page(*[f"m-{i}" for i in range(reports.PAGE_SIZE)])
    endpoint = Recorded(full, _page("m-last"))
    refusing = Refusing(store, lambda n: StoreError("Redis: OOM command not allowed") if n <= 30 else None, endpoint)
    provider_config = ProviderConfig.from_settings(settings)
    with capture_logs() as logs, Provider(provider_config, transport=httpx.MockTransport(endpoint)) as provider:
        result = Drainer(DrainConfig.from_settings(settings), refusing, provider).drain()

    assert (result.outcome, result.pages, result.reports) == ("drained", 2, reports.PAGE_SIZE + 1)
    assert refusing.seen == [1] * 30  # every refusal came while only the first page had been fetched
    stored = [orjson.loads(f[b"page"])["results"][-1]["messageId"] for _, f in store.r.xrange(store.reports_raw)]
    assert stored == [f"m-{reports.PAGE_SIZE - 1}", "m-last"]
    retries = [e for e in logs if e["event"] == "reports_page_store_retry"]
    assert len(retries) == 30 and all(e["reports"] == reports.PAGE_SIZE for e in retries)
    assert [e["attempts"] for e in logs if e["event"] == "reports_page_stored"] == [31]


def test_a_page_an_out_of_memory_redis_refuses_is_stored_once_memory_is_back(
    settings: Settings, store: Store, fast_retries: None
) -> None:
    """The real thing: redis-server at maxmemory with noeviction refuses the page; it is kept (the
    lease renewed meanwhile), stored when the limit is lifted, and processed."""
    _message(store, "m-1")
    endpoint = Recorded(_page("m-1"))
    retried = threading.Event()
    outcome: list[Any] = []

    def get_while_memory_runs_out(request: httpx.Request) -> httpx.Response:
        if endpoint.gets == 0:
            store.r.config_set("maxmemory", 1)  # Redis fills up while the page is on its way
        return endpoint(request)

    def drain() -> None:
        try:
            provider_config = ProviderConfig.from_settings(settings)
            with Provider(provider_config, transport=httpx.MockTransport(get_while_memory_runs_out)) as provider:
                outcome.append(Drainer(DrainConfig.from_settings(settings), store, provider).drain())
        except BaseException as error:  # noqa: BLE001 -- reported by the assertion below
            outcome.append(error)
        retried.set()

    def on_log(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        if event["event"] == "reports_page_store_retry" and event["attempt"] >= 20:
            retried.set()
        return event

    with capture_logs(processors=[on_log]) as logs:
        store.r.config_set("maxmemory-policy", "noeviction")
        try:
            thread = threading.Thread(target=drain, daemon=True)
            thread.start()
            assert retried.wait(20), "the drain never retried the refused page"
            assert int(store.r.xlen(store.reports_raw)) == 0 and endpoint.gets == 1
            assert store.r.get(store.lease_key(DRAIN_LEASE)) is not None  # still held: nobody else fetches
        finally:
            store.r.config_set("maxmemory", 0)
        thread.join(20)

    assert [getattr(o, "outcome", o) for o in outcome] == ["drained"]
    assert any(e["event"] == "reports_page_stored" for e in logs)
    Processor(ProcessConfig.from_settings(settings), store).process()
    assert [e["event_id"] for e in _events(store)] == ["m-1:delivered"]


def test_a_drain_that_must_stop_with_its_page_unstored_says_so_loudly(
    settings: Settings, store: Store, fast_retries: None
) -> None:
    """The process is stopping and Redis still refuses the page: an error with the count, no numbers."""
    endpoint = Recorded(_page("m-1", "m-2", "m-3"))
    stopping = threading.Event()

    def refuse_then_stop(n: int) -> BaseException:
        if n == 3:
            stopping.set()  # the worker is told to shut down while Redis still refuses the page
        return StoreError("Redis: ConnectionError: refused")

    refusing = Refusing(store, refuse_then_stop, endpoint)
    provider_config = ProviderConfig.from_settings(settings)
    with capture_logs() as logs, Provider(provider_config, transport=httpx.MockTransport(endpoint)) as provider:
        drainer = Drainer(DrainConfig.from_settings(settings), refusing, provider, stopping=stopping.is_set)
        with pytest.raises(StoreError):
            drainer.drain()

    [last] = [e for e in logs if e["event"] == "reports_page_unstored"]
    assert last["log_level"] == "error" and last["reports"] == 3 and last["reason"] == "process stopping"
    assert "4179" not in repr(logs)  # never the phone numbers of the page
    assert endpoint.gets == 1


def test_a_drain_interrupted_while_storing_leaves_the_page_to_its_next_drain(settings: Settings, store: Store) -> None:
    """Dramatiq's time limit interrupting the retries: the page stays in the process, and the next
    drain stores it before it fetches anything."""
    from dramatiq.middleware.time_limit import TimeLimitExceeded

    endpoint = Recorded(_page("m-1"))
    refusing = Refusing(store, lambda n: TimeLimitExceeded() if n == 1 else None, endpoint)
    provider_config = ProviderConfig.from_settings(settings)
    with capture_logs() as logs, Provider(provider_config, transport=httpx.MockTransport(endpoint)) as provider:
        drainer = Drainer(DrainConfig.from_settings(settings), refusing, provider)
        with pytest.raises(TimeLimitExceeded):
            drainer.drain()
        assert _raw_left(store) == 0 and endpoint.gets == 1
        store.r.delete(store.lease_key(DRAIN_LEASE))  # long enough later: the lease expired
        result = drainer.drain()

    assert (result.outcome, result.pages, result.reports) == ("drained", 1, 1)
    [(_, fields)] = store.r.xrange(store.reports_raw)
    assert orjson.loads(fields[b"page"])["results"][0]["messageId"] == "m-1"
    assert endpoint.gets == 2  # the held page was stored first, then the endpoint asked again
    assert [e["log_level"] for e in logs if e["event"] == "reports_page_unstored"] == ["error"]


# --- state Redis lost (finding 7) ------------------------------------------------------------------


def test_the_processor_recreates_its_group_after_redis_restarted_empty(settings: Settings) -> None:
    """Redis restarted without persistence: the group the processor made at start is gone; it says
    so loudly, recreates it and processes the new pages (it failed every read with NOGROUP)."""
    server = RedisServer().start()
    try:
        settings = _with(settings, redis_url=server.url)
        store = Store(connect(server.url))
        processor = Processor(ProcessConfig.from_settings(settings), store)
        _message(store, "before")
        _raw(store, _report("before"))
        assert processor.process().applied == 1

        server.stop()
        server.start()  # same port, no AOF, no RDB: empty
        _message(store, "after")
        _raw(store, _report("after"))
        with capture_logs() as logs:
            applied: list[int] = []

            def processed() -> bool:
                try:
                    applied.append(processor.process().applied)
                except StoreError:  # the first call after a restart may meet a dead pooled connection
                    return False
                return sum(applied) >= 1

            _poll(processed, 10, "the report sent after the restart to be processed")
        assert [e["event_id"] for e in _events(store)] == ["after:delivered"]
        [lost] = [e for e in logs if e["event"] == "redis_state_lost"]
        assert lost["log_level"] == "error" and "reports" in lost["missing"]
        store.r.close()
    finally:
        server.cleanup()


def test_the_processor_recreates_a_group_deleted_under_it(store: Store, processor: Processor) -> None:
    """The group destroyed between two runs (an operator, a failover to an empty replica): recreated."""
    _message(store, "m-1")
    _raw(store, _report("m-1"))
    processor.process()
    store.r.xgroup_destroy(store.reports_raw, "reports")
    _message(store, "m-2")
    _raw(store, _report("m-2"))

    with capture_logs() as logs:
        assert processor.process().applied == 1
    assert [e["event_id"] for e in _events(store)] == ["m-1:delivered", "m-2:delivered"]
    assert [e["stream_missing"] for e in logs if e["event"] == "redis_state_lost"] == [False]


# --- one bad entry never blocks the rest (finding 8) -----------------------------------------------


def _nested(levels: int) -> Any:
    value: Any = 1
    for _ in range(levels):
        value = {"a": value}
    return value


def test_a_report_too_deep_to_publish_is_dead_lettered_and_the_pages_behind_it_flow(
    store: Store, processor: Processor
) -> None:
    """orjson reads 1,024 levels but writes 254: a 300-deep price used to fail every batch it was in,
    forever. It is dead-lettered (cut, with its messageId) and the 15 good pages behind it applied."""
    _message(store, "known")
    deep = {**_report("known"), "price": _nested(300)}
    not_an_object: Any = [1]
    for _ in range(300):
        not_an_object = [not_an_object]
    # orjson cannot write these (that is the point): the stdlib can.
    page = json.dumps({"results": [deep, {**_report("stranger"), "error": _nested(300)}, not_an_object]})
    store.r.xadd(store.reports_raw, {"page": page, "src": "drain"})
    for n in range(15):
        _message(store, f"good-{n}", n=n)
        _raw(store, _report(f"good-{n}", n=n))

    tally = processor.process()

    assert tally.applied == 15
    assert sorted(e["message_id"] for e in _events(store)) == sorted(f"good-{n}" for n in range(15))
    dead = _dead(store)
    assert [d["reason"] for d in dead] == ["report_too_deep"] * 3
    assert dead[0]["item"]["messageId"] == "known" and "<cut" in orjson.dumps(dead[0]["item"]).decode()
    assert store.message("known")["state"] == "ACCEPTED"
    assert _raw_left(store) == 0 and store.r.xpending(store.reports_raw, "reports")["pending"] == 0


def test_a_report_that_fails_for_any_other_reason_is_isolated(
    store: Store, processor: Processor, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever makes one report fail (here: building its event raises), it alone goes to the dead
    letters, with its report and the reason; its page and the others are applied and acknowledged."""
    real_build = events.build

    def build(kind: str, message_id: str, *args: Any, **kwargs: Any) -> bytes:
        if message_id == "cursed":
            raise RuntimeError("a bug that only this report triggers")
        return real_build(kind, message_id, *args, **kwargs)

    monkeypatch.setattr(events, "build", build)
    for mid in ("a", "cursed", "b", "c"):
        _message(store, mid)
    _raw(store, _report("a"), _report("cursed"), _report("b"), {"messageId": "x"})
    _raw(store, _report("c"))

    processor.process()

    assert sorted(e["message_id"] for e in _events(store)) == ["a", "b", "c"]
    by_reason = {d["reason"]: d for d in _dead(store)}
    assert set(by_reason) == {"report_unprocessable", "report_malformed"}
    assert by_reason["report_unprocessable"]["item"] == _report("cursed")
    assert "RuntimeError: a bug that only this report triggers" in by_reason["report_unprocessable"]["detail"]
    assert store.message("cursed")["state"] == "ACCEPTED"
    assert _raw_left(store) == 0 and store.r.xpending(store.reports_raw, "reports")["pending"] == 0


def test_a_page_too_large_is_dead_lettered_whole_and_the_others_flow(
    store: Store, processor: Processor, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A page over MAX_PAGE_BYTES is not parsed: it goes to the dead letters with its body."""
    monkeypatch.setattr(reports.parse, "MAX_PAGE_BYTES", 4096)
    _message(store, "small")
    _raw(store, {**_report("huge"), "callbackData": "x" * 5000})
    _raw(store, _report("small"))

    processor.process()

    assert [e["event_id"] for e in _events(store)] == ["small:delivered"]
    [dead] = _dead(store)
    assert dead["reason"] == "report_page_too_large" and '"huge"' in dead["page"]
    assert _raw_left(store) == 0


def test_a_redis_out_of_memory_is_waited_out_not_dead_lettered(store: Store, processor: Processor) -> None:
    """Redis refusing writes is not the page's fault: the batch stays pending, and applies later."""
    processor.process()  # its group exists
    _message(store, "m-1")
    _raw(store, _report("m-1"))
    store.r.config_set("maxmemory-policy", "noeviction")
    store.r.config_set("maxmemory", 1)
    try:
        with pytest.raises(StoreError, match="OOM command not allowed"):  # report_apply.lua's first write
            processor.process()
    finally:
        store.r.config_set("maxmemory", 0)
    assert _dead(store) == [] and _raw_left(store) == 1

    Processor(processor.config, store, claim_idle_ms=0).process()
    assert [e["event_id"] for e in _events(store)] == ["m-1:delivered"] and _raw_left(store) == 0


# --- unknown status groups (finding 9) ---------------------------------------------------------------


def test_an_unknown_status_group_is_never_taken_for_a_final_one(store: Store, processor: Processor) -> None:
    """A group this code does not know (SCHEDULED, with an id that collides with DELIVERED's, or only a
    new id) publishes nothing and leaves the message open; it is kept, logged and counted."""
    from worker import metrics

    before = metrics.REPORTS_UNKNOWN_STATUS._value.get()
    _message(store, "m-1")
    _message(store, "m-2")
    scheduled = {**_report("m-1"), "status": {"groupId": 3, "groupName": "SCHEDULED", "id": 99,
                                              "name": "SCHEDULED_ACCEPTED", "description": "scheduled"}}
    new_id = {**_report("m-2"), "status": {"groupId": 7, "id": 99, "name": "SOMETHING_NEW"}}
    _raw(store, scheduled, new_id)

    with capture_logs() as logs:
        processor.process()

    assert _events(store) == []
    assert store.message("m-1")["state"] == store.message("m-2")["state"] == "ACCEPTED"
    assert [(d["reason"], d["item"]["messageId"]) for d in _dead(store)] == [
        ("report_unknown_status", "m-1"), ("report_unknown_status", "m-2")]
    warned = {e["group"]: e["reports"] for e in logs if e["event"] == "report_unknown_status"}
    assert warned == {"SCHEDULED": 1, "groupId 7": 1}
    assert metrics.REPORTS_UNKNOWN_STATUS._value.get() - before == 2
    # The real final report still settles them, once.
    _raw(store, _report("m-1"), _report("m-2", "UNDELIVERABLE"))
    processor.process()
    assert sorted(e["event_id"] for e in _events(store)) == ["m-1:delivered", "m-2:undeliverable"]
