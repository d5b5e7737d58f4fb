"""Reports that never came are found in the provider's logs: by `sms-worker reconcile`, and by the sweep
an hour after acceptance (not only at the no-report deadline, two days later).

Real Redis and the real sandbox over HTTP: the sandbox pushes each report to a webhook on a loopback
port nobody listens on, once (`webhook_max_attempts=1`), and drops it, as a provider gives up on a
webhook that is down; GET /sms/3/logs still shows the final status.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx
import orjson
import pytest
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from tests.support.sandbox import API_KEY
from worker import reports
from worker.devtools.devstack import free_port, wait_until
from worker.devtools.sandbox.config import SandboxConfig
from worker.devtools.sandbox.process import SandboxProcess
from worker.provider import Provider, ProviderConfig
from worker.ratelimit import RateLimiter, RateLimiterConfig
from worker.reconcile import force_reconcile
from worker.reports import ProcessConfig, Processor, SweepConfig, Sweeper
from worker.settings import Settings
from worker.store import Store

HOUR_MS = 3_600_000
DEADLINE_MS = 49 * HOUR_MS  # 48 h validity + the default 1 h grace


@pytest.fixture(scope="module")
def sandbox_config() -> SandboxConfig:
    """Reports at once, all delivered; a webhook tried once (tests/integration/conftest.py starts the sandbox)."""
    return SandboxConfig(report_delay_ms=0, seed=11, outcome_mix={"delivered": 1.0}, webhook_max_attempts=1,
                         webhook_retry_base_ms=10)


def _settings(settings: Settings, sandbox: SandboxProcess, **changes: Any) -> Settings:
    return Settings.model_validate({**settings.model_dump(), "icomm_base_url": sandbox.url,
                                    "icomm_api_key": API_KEY, "sms_logs_rate_per_min": 6000, **changes})


def _send_with_dead_webhook(sandbox: SandboxProcess, mids: list[str]) -> None:
    """Send through the sandbox with a webhook URL that refuses connections: every report is dropped."""
    dead = f"http://127.0.0.1:{free_port()}/webhooks/icomm/delivery"
    messages = [{"destinations": [{"to": f"4179{i:07d}", "messageId": mid}], "content": {"text": "hi"},
                 "webhooks": {"delivery": {"url": dead}}} for i, mid in enumerate(mids)]
    before = sandbox.stats()["webhooks"]["dropped"]
    httpx.post(f"{sandbox.url}/sms/3/messages", json={"messages": messages}, headers=sandbox.auth_header,
               timeout=10).raise_for_status()
    wait_until(lambda: sandbox.stats()["webhooks"]["dropped"] - before >= len(mids), 10,
               f"{len(mids)} webhook reports to be dropped")


def _accepted(store: Store, mid: str, *, at_ms: int, n: int = 0, validity_h: int = 48) -> None:
    """A message hash as settle.lua leaves an accepted one, and its no-report deadline."""
    job = orjson.dumps({"to": f"4179{n:07d}", "text": "hi", "id": f"order-{n}"})
    store.r.hset(store.msg(mid), mapping={"state": "ACCEPTED", "lane": "bulk", "job": job, "bulk_id": "",
                                          "attempts": 1, "updated_ms": at_ms})
    store.r.zadd(store.awaiting, {mid: at_ms + (validity_h + 1) * HOUR_MS})


def _events(store: Store) -> list[dict[str, Any]]:
    return [orjson.loads(f[b"event"]) for _, f in store.r.xrange(store.events)]


class Calls:
    """Counts GET /sms/3/logs calls (the hook each one passes before it is made)."""

    def __init__(self, limiter: Callable[[], None] | None = None) -> None:
        self.n = 0
        self.limiter = limiter

    def __call__(self) -> None:
        self.n += 1
        if self.limiter is not None:
            self.limiter()


def _lookups(result: str) -> float:
    return REGISTRY.get_sample_value("sms_report_lookups_total", {"result": result}) or 0.0


# --- 6a: sms-worker reconcile ----------------------------------------------------------------------


def test_reconcile_of_an_accepted_message_applies_the_final_status_the_logs_hold(
    settings: Settings, store: Store, sbx: SandboxProcess
) -> None:
    """`reconcile --message-id` of an accepted message whose report was lost settles it from the logs, as
    one more report source: one event, and a second reconcile finds it settled and changes nothing."""
    settings = _settings(settings, sbx)
    _send_with_dead_webhook(sbx, ["rc-lost"])
    now = int(time.time() * 1000)
    _accepted(store, "rc-lost", at_ms=now - 60_000)
    _accepted(store, "rc-absent", at_ms=now - 60_000, n=1)  # never reached the provider: nothing to find

    result = force_reconcile(settings, store, message_ids=["rc-lost", "rc-absent"], bulk_ids=[])

    assert result["already_settled"] == 0, result
    assert result["looked_up"] == 2 and result["recovered_from_logs"] == 1, result
    assert result["states"] == {"rc-lost": "DELIVERED", "rc-absent": "ACCEPTED"}
    [event] = _events(store)
    assert event["event_id"] == "rc-lost:delivered" and event["id"] == "order-0"
    assert event["status"]["groupName"] == "DELIVERED"
    assert store.r.zscore(store.awaiting, "rc-lost") is None
    assert store.r.zscore(store.awaiting, "rc-absent") is not None  # still waits for its report (or no_report)

    again = force_reconcile(settings, store, message_ids=["rc-lost"], bulk_ids=[])

    assert again["already_settled"] == 1 and again["looked_up"] == 0, again
    assert len(_events(store)) == 1


# --- 6b: the sweep looks accepted messages up an hour after acceptance ------------------------------


def test_a_report_lost_with_the_webhook_is_found_an_hour_after_acceptance_not_two_days(
    settings: Settings, store: Store, sbx: SandboxProcess
) -> None:
    """Accepted two hours ago, reports dropped by a webhook outage: the next sweep looks them up in the
    logs and they get their real final event, 47 hours before their no-report deadline. A message
    accepted ten minutes ago is not looked up yet; one the logs do not know stays accepted."""
    settings = _settings(settings, sbx)
    _send_with_dead_webhook(sbx, ["lost-0", "lost-1"])
    now = int(time.time() * 1000)
    for n, mid in enumerate(["lost-0", "lost-1", "absent"]):
        _accepted(store, mid, at_ms=now - 2 * HOUR_MS, n=n)
    _accepted(store, "recent", at_ms=now - 600_000, n=3)
    before = _lookups("final"), _lookups("not_final")
    calls = Calls()
    with Provider(ProviderConfig.from_settings(settings)) as provider:
        processor = Processor(ProcessConfig.from_settings(settings), store)
        sweeper = Sweeper(SweepConfig.from_settings(settings), store, processor, provider=provider,
                          before_logs_call=calls)
        with capture_logs() as logs:
            result = sweeper.sweep(now)
        processor.process()

    by_id = {e["message_id"]: e for e in _events(store)}
    assert {mid: e["type"] for mid, e in by_id.items()} == {"lost-0": "delivered", "lost-1": "delivered"}
    assert by_id["lost-0"]["event_id"] == "lost-0:delivered" and by_id["lost-0"]["id"] == "order-0"
    assert {m: store.message(m)["state"] for m in ("absent", "recent")} == {"absent": "ACCEPTED",
                                                                           "recent": "ACCEPTED"}
    assert result["looked_up"] == 3 and result["found_by_lookup"] == 2, result
    assert result["expired_no_report"] == 0 and result["recovered_from_logs"] == 0
    assert calls.n == 1
    [swept] = [e for e in logs if e["event"] == "reports_swept"]
    assert swept["looked_up"] == 3 and swept["found_by_lookup"] == 2
    assert (_lookups("final") - before[0], _lookups("not_final") - before[1]) == (2, 1)


def test_a_message_not_final_in_the_logs_is_looked_up_again_only_after_a_backoff(
    settings: Settings, store: Store, sbx: SandboxProcess
) -> None:
    """Not every sweep: after 1 h, then 2 h later, ...; and the no-report expiry at the deadline is
    unchanged (after its own last look in the logs)."""
    settings = _settings(settings, sbx)
    now = int(time.time() * 1000)
    accepted = now - 2 * HOUR_MS
    _accepted(store, "absent", at_ms=accepted)
    calls = Calls()
    with Provider(ProviderConfig.from_settings(settings)) as provider:
        processor = Processor(ProcessConfig.from_settings(settings), store)
        sweeper = Sweeper(SweepConfig.from_settings(settings), store, processor, provider=provider,
                          before_logs_call=calls)

        def looked_up(at_ms: int) -> int:
            return int(sweeper.sweep(at_ms)["looked_up"])

        assert looked_up(now) == 1
        assert [looked_up(now + s * 1000) for s in (5, 10, 600, 3500)] == [0, 0, 0, 0]  # backoff: 1 h
        assert looked_up(now + HOUR_MS + 1000) == 1
        assert [looked_up(now + HOUR_MS + s * 1000) for s in (5, 3600, 7100)] == [0, 0, 0]  # then 2 h
        assert looked_up(now + 3 * HOUR_MS + 2000) == 1
        assert calls.n == 3
        assert store.message("absent")["state"] == "ACCEPTED" and not _events(store)

        expired = sweeper.sweep(accepted + DEADLINE_MS + 1)
        processor.process()

    assert expired["expired_no_report"] == 1 and expired["looked_up"] == 0
    assert calls.n == 4  # the expiry's own last look in the logs
    [event] = _events(store)
    assert (event["type"], event["reason"], event["event_id"]) == ("expired", "no_report", "absent:expired:no_report")


def test_lookups_come_in_bounded_batches_per_sweep_through_the_shared_logs_limiter(
    settings: Settings, store: Store, sbx: SandboxProcess
) -> None:
    """SMS_REPORT_LOOKUP_BATCH messages per sweep at most, oldest first; each call waits for the shared
    `logs` bucket (the one reconciliation uses)."""
    settings = _settings(settings, sbx, sms_report_lookup_batch=50)
    now = int(time.time() * 1000)
    for n in range(120):
        _accepted(store, f"stuck-{n:03d}", at_ms=now - 2 * HOUR_MS - n * 1000, n=n)
    limiter = RateLimiter(RateLimiterConfig.from_settings(settings), store)
    calls = Calls(limiter.wait_for_logs_call)
    with Provider(ProviderConfig.from_settings(settings)) as provider:
        sweeper = Sweeper(SweepConfig.from_settings(settings), store,
                          Processor(ProcessConfig.from_settings(settings), store), provider=provider,
                          before_logs_call=calls)
        counts = [sweeper.sweep(now + i)["looked_up"] for i in range(4)]

    assert counts == [50, 50, 20, 0]
    assert calls.n == 3
    assert store.r.exists(store.bucket("logs"))  # the calls were charged to the shared bucket


def test_lookups_never_take_more_than_half_the_logs_calls_of_a_sweep_interval(
    settings: Settings, store: Store, sbx: SandboxProcess
) -> None:
    """At 12 calls/min and a sweep every 5 s, half the budget is one call per sweep, whatever the batch:
    reconciliation keeps the rest."""
    settings = _settings(settings, sbx, sms_logs_rate_per_min=12, sms_report_lookup_batch=1000)
    now = int(time.time() * 1000)
    mids = [f"a-message-id-long-enough-to-fill-a-call-{n:04d}" for n in range(120)]  # ~45 per call
    for n, mid in enumerate(mids):
        _accepted(store, mid, at_ms=now - 2 * HOUR_MS, n=n)
    calls = Calls()
    with Provider(ProviderConfig.from_settings(settings)) as provider:
        sweeper = Sweeper(SweepConfig.from_settings(settings), store,
                          Processor(ProcessConfig.from_settings(settings), store), provider=provider,
                          before_logs_call=calls)
        first = sweeper.sweep(now)["looked_up"]
        assert calls.n == 1 and 0 < first < len(mids)
        rest = [sweeper.sweep(now + i)["looked_up"] for i in range(1, 4)]

    assert calls.n == 3 and first + sum(rest) == len(mids) and rest[-1] == 0  # one call each, then none due


def test_the_pass_over_the_awaiting_set_goes_round_and_finds_every_validity(
    settings: Settings, store: Store, sbx: SandboxProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The awaiting set is ordered by deadline, not by acceptance: a one-day validity puts a message a
    day ahead of a two-day one accepted with it. The pass visits a bounded number of entries per sweep
    and goes round, so every overdue message is found whatever its validity, and one not overdue yet
    when the pass went by is found on a later round."""
    monkeypatch.setattr(reports.sweep, "LOOKUP_SCAN", 4)
    settings = _settings(settings, sbx)
    now = int(time.time() * 1000)
    for n in range(6):
        _accepted(store, f"two-day-{n}", at_ms=now - 2 * HOUR_MS + n * 1000, n=n)
    for n in range(2):
        _accepted(store, f"one-day-{n}", at_ms=now - 2 * HOUR_MS, n=10 + n, validity_h=24)
    _accepted(store, "one-day-recent", at_ms=now - 1_800_000, n=20, validity_h=24)
    with Provider(ProviderConfig.from_settings(settings)) as provider:
        sweeper = Sweeper(SweepConfig.from_settings(settings), store,
                          Processor(ProcessConfig.from_settings(settings), store), provider=provider)
        first_round = [sweeper.sweep(now + i)["looked_up"] for i in range(5)]
        later = now + 1_900_000  # the recent one is an hour old now; the others are backing off
        second_round = [sweeper.sweep(later + i)["looked_up"] for i in range(3)]

    assert first_round == [3, 4, 1, 0, 0]  # 4 entries visited per sweep; the recent one skipped
    assert sum(second_round) == 1
    assert store.r.hget(store.reports_lookup_tries, "one-day-recent") == b"1"


def test_two_sweeps_at_once_never_look_the_same_message_up_twice(
    settings: Settings, store: Store, sbx: SandboxProcess
) -> None:
    """A sweep that outlasts the clock's interval overlaps the next one: messages one has claimed are
    not looked up by the other (each costs calls of the shared budget)."""
    settings = _settings(settings, sbx)
    now = int(time.time() * 1000)
    for n in range(3):
        _accepted(store, f"slow-{n}", at_ms=now - 2 * HOUR_MS, n=n)
    overlapping: list[dict[str, int]] = []
    other_calls = Calls()
    with Provider(ProviderConfig.from_settings(settings)) as provider:
        other = Sweeper(SweepConfig.from_settings(settings), store,
                        Processor(ProcessConfig.from_settings(settings), store), provider=provider,
                        before_logs_call=other_calls)

        def meanwhile() -> None:  # the other sweep runs while this one's logs call is on its way
            if not overlapping:
                overlapping.append(other.sweep(now + 1))

        first = Sweeper(SweepConfig.from_settings(settings), store,
                        Processor(ProcessConfig.from_settings(settings), store), provider=provider,
                        before_logs_call=meanwhile)
        looked_up = first.sweep(now)["looked_up"]

    assert looked_up == 3
    assert overlapping[0]["looked_up"] == 0 and other_calls.n == 0
