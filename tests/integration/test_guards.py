"""The traffic policy's guards before the POST (worker.policy), in the dispatcher against real Redis and
the real sandbox: each rule stops what it must and lets the rest through, a rejection is one
`rejected` event with its reason and rule, two dispatchers together never exceed a velocity rule,
and unreadable guard state fails open or closed as the lane says."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import orjson
import pytest

from tests.support.sandbox import API_KEY
from worker import metrics
from worker.devtools.devstack import wait_until
from worker.devtools.sandbox.process import SandboxProcess
from worker.dispatch import DispatchConfig, Dispatcher, guarded
from worker.dispatch.classify import Item
from worker.dispatch.jobs import parse_job
from worker.outbox import Outbox, OutboxConfig
from worker.provider import Provider, ProviderConfig
from worker.ratelimit import RateLimiter, RateLimiterConfig
from worker.settings import Settings
from worker.store import Store, connect

SWISS = "4179123{:04d}"  # Swiss mobile numbers: 41 79 123 nnnn
GERMAN_MOBILE = "4915112345678"
SWISS_PREMIUM = "41900123456"


class Wake:
    def __init__(self) -> None:
        self.reconciles: list[tuple[str, list[str]]] = []

    def dispatch(self, lane: str, delay_ms: int = 0) -> bool:
        return True

    def reconcile(self, lane: str, entry_ids: Any, delay_ms: int) -> None:
        self.reconciles.append((lane, list(entry_ids)))


class PolicyRig:
    """An in-process dispatcher (no Dramatiq) on lanes configured as a test says."""

    def __init__(self, redis_url: str, sandbox: SandboxProcess, lanes: dict[str, Any], **overrides: Any) -> None:
        self.settings = Settings.model_validate({
            "redis_url": redis_url, "icomm_base_url": sandbox.url, "icomm_api_key": API_KEY,
            "icomm_read_timeout_s": 0.5, "icomm_connect_timeout_s": 0.5, "icomm_write_timeout_s": 0.5,
            "icomm_retry_backoff_base_s": 0.01, "icomm_retry_backoff_max_s": 0.05, "sms_lease_s": 10,
            "sms_outage_pause_s": 0.5, "log_format": "console", "sms_lanes": lanes, **overrides,
        })
        self.store = Store(connect(redis_url))  # its own connection, as every worker process has
        self.provider = Provider(ProviderConfig.from_settings(self.settings))
        self.outbox = Outbox(OutboxConfig.from_settings(self.settings), self.store)
        self.config = replace(DispatchConfig.from_settings(self.settings), recover_every_s=0, listen=False)
        self.limiter = RateLimiter(RateLimiterConfig.from_settings(self.settings), self.store)
        self.dispatcher = Dispatcher(self.config, self.store, self.provider, self.limiter, Wake(), "t1")

    def twin(self, consumer: str) -> Dispatcher:
        """A second dispatcher with its own Store and provider, as another process would have."""
        store = Store(connect(self.settings.redis_url))
        provider = Provider(ProviderConfig.from_settings(self.settings))
        limiter = RateLimiter(RateLimiterConfig.from_settings(self.settings), store)
        return Dispatcher(self.config, store, provider, limiter, Wake(), consumer)

    def race(self, *lanes: str) -> None:
        """Run one dispatcher per lane named (a lane named twice: two of it) at once, each with its own
        Store, as that many processes."""
        dispatchers = [self.twin(f"w{i}") for i in range(len(lanes))]
        threads = [threading.Thread(target=d.run, args=(lane,)) for d, lane in zip(dispatchers, lanes, strict=True)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=20)
        for d in dispatchers:
            d.provider.close()
            d.store.close()

    def events(self) -> list[dict[str, Any]]:
        return [orjson.loads(f[b"event"]) for _, f in self.store.r.xrange(self.store.events)]

    def rejected(self) -> dict[str, tuple[str, str]]:
        """message id -> (reason, rule) of the policy's rejections."""
        return {e["message_id"]: (e["reason"], e["rule"]) for e in self.events() if e["type"] == "rejected"}

    def accepted(self) -> set[str]:
        return {e["message_id"] for e in self.events() if e["type"] == "accepted"}

    def close(self) -> None:
        self.provider.close()
        self.store.close()


def rig_factory(redis_url: str, sbx: SandboxProcess) -> Iterator[Any]:
    """The body of the `make_rig` fixture (test_spend_caps.py has one too): rigs made by a test are
    closed after it."""
    made: list[PolicyRig] = []

    def make(lanes: dict[str, Any], **overrides: Any) -> PolicyRig:
        made.append(PolicyRig(redis_url, sbx, lanes, **overrides))
        return made[-1]

    yield make
    for rig in made:
        rig.close()


@pytest.fixture
def make_rig(redis_url: str, sbx: SandboxProcess) -> Iterator[Any]:
    yield from rig_factory(redis_url, sbx)


def _otp(**policy: Any) -> dict[str, Any]:
    return {"otp": {"batch_size": 100, "max_wait_ms": 0, **policy}, "bulk": {"max_wait_ms": 0}}


def _bulk(**policy: Any) -> dict[str, Any]:
    return {"otp": {"max_wait_ms": 0}, "bulk": {"batch_size": 1000, "max_wait_ms": 0, **policy}}


def _rejected_metric(lane: str, reason: str) -> float:
    return metrics.POLICY_REJECTED.labels(lane, reason)._value.get()


def test_the_sixth_otp_to_one_number_in_the_window_is_rejected_for_velocity(make_rig: Any,
                                                                             sbx: SandboxProcess) -> None:
    """Limit 5 per number per hour: 7 codes to one number -> 5 sent, 2 rejected naming the rule; codes
    to other numbers are sent; the rejected ones are never POSTed and their entries are acknowledged."""
    rig = make_rig(_otp(velocity={"per_number": {"limit": 5, "window_s": 3600}}))
    before = _rejected_metric("otp", "velocity")
    same = rig.outbox.enqueue_many([{"to": SWISS.format(1), "text": f"code {i}"} for i in range(7)], "otp")
    others = rig.outbox.enqueue_many([{"to": SWISS.format(10 + i), "text": "code"} for i in range(3)], "otp")
    assert rig.dispatcher.run("otp") == 10
    assert rig.accepted() == {q.message_id for q in same[:5] + others}
    assert rig.rejected() == {q.message_id: ("velocity", "velocity.per_number:5/3600s") for q in same[5:]}
    assert sbx.stats()["messages_accepted"] == 8
    assert rig.store.r.xlen(rig.store.outbox("otp")) == 0
    assert rig.store.message(same[6].message_id)["state"] == "REJECTED"
    assert _rejected_metric("otp", "velocity") == before + 2
    # The window is counted across batches and runs: one more is rejected too.
    [late] = rig.outbox.enqueue_many([{"to": SWISS.format(1), "text": "again"}], "otp")
    rig.dispatcher.run("otp")
    assert late.message_id in rig.rejected()


def test_a_number_prefix_over_its_limit_is_rejected(make_rig: Any, sbx: SandboxProcess) -> None:
    """Sequential numbers of one range (SMS pumping): at most 20 per prefix (3 digits dropped)."""
    rig = make_rig(_otp(velocity={"per_prefix": {"digits_dropped": 3, "limit": 20, "window_s": 3600}}))
    pumped = rig.outbox.enqueue_many([{"to": SWISS.format(i), "text": "code"} for i in range(25)], "otp")
    other = rig.outbox.enqueue({"to": "41781234567", "text": "code"}, "otp")
    rig.dispatcher.run("otp")
    assert rig.accepted() == {q.message_id for q in pumped[:20]} | {other.message_id}
    assert set(rig.rejected().values()) == {("velocity", "velocity.per_prefix:20/3600s:-3")}
    assert set(rig.rejected()) == {q.message_id for q in pumped[20:]}
    assert sbx.stats()["messages_accepted"] == 21


def test_countries_allow_list(make_rig: Any, sbx: SandboxProcess) -> None:
    rig = make_rig(_bulk(countries={"allow": ["CH"]}, suppression=False))
    swiss = rig.outbox.enqueue({"to": SWISS.format(1), "text": "hi"}, "bulk")
    german = rig.outbox.enqueue({"to": GERMAN_MOBILE, "text": "hi"}, "bulk")
    rig.dispatcher.run("bulk")
    assert rig.accepted() == {swiss.message_id}
    assert rig.rejected() == {german.message_id: ("country_blocked", "countries.allow")}
    assert sbx.stats()["messages_accepted"] == 1


def test_countries_block_list(make_rig: Any) -> None:
    rig = make_rig(_bulk(countries={"block": ["DE"]}, suppression=False))
    swiss = rig.outbox.enqueue({"to": SWISS.format(1), "text": "hi"}, "bulk")
    german = rig.outbox.enqueue({"to": GERMAN_MOBILE, "text": "hi"}, "bulk")
    rig.dispatcher.run("bulk")
    assert rig.accepted() == {swiss.message_id}
    assert rig.rejected() == {german.message_id: ("country_blocked", "countries.block")}


def test_premium_rate_numbers_are_never_sent_on_otp_by_default(make_rig: Any, sbx: SandboxProcess) -> None:
    rig = make_rig(_otp())
    premium = rig.outbox.enqueue({"to": SWISS_PREMIUM, "text": "code"}, "otp")
    mobile = rig.outbox.enqueue({"to": SWISS.format(1), "text": "code"}, "otp")
    rig.dispatcher.run("otp")
    assert rig.accepted() == {mobile.message_id}
    assert rig.rejected() == {premium.message_id: ("number_type_blocked", "block_number_types:PREMIUM_RATE")}
    assert sbx.stats()["messages_accepted"] == 1


def test_suppressed_numbers_are_rejected_on_bulk_by_default_and_sent_on_otp(make_rig: Any) -> None:
    rig = make_rig({"otp": {"max_wait_ms": 0}, "bulk": {"max_wait_ms": 0}})
    rig.store.suppress([SWISS.format(1)])
    on_bulk = rig.outbox.enqueue({"to": "+" + SWISS.format(1), "text": "sale"}, "bulk")
    fine = rig.outbox.enqueue({"to": SWISS.format(2), "text": "sale"}, "bulk")
    on_otp = rig.outbox.enqueue({"to": SWISS.format(1), "text": "code"}, "otp")
    rig.dispatcher.run("bulk")
    rig.dispatcher.run("otp")
    assert rig.accepted() == {fine.message_id, on_otp.message_id}
    assert rig.rejected() == {on_bulk.message_id: ("suppressed", "suppression")}


def test_an_empty_suppression_list_costs_no_normalising_and_a_new_entry_applies_to_the_next_batch(
        make_rig: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Bulk checks the list by default; with nothing on it a batch normalises no number (one SCARD
    instead), and the first number added is refused from the next batch on."""
    rig = make_rig(_bulk())
    normalised: list[str] = []
    real = guarded.numbers.normal_or_raw
    monkeypatch.setattr(guarded.numbers, "normal_or_raw", lambda raw: normalised.append(raw) or real(raw))
    first = rig.outbox.enqueue_many([{"to": SWISS.format(i), "text": "sale"} for i in range(5)], "bulk")
    rig.dispatcher.run("bulk")
    assert rig.accepted() == {q.message_id for q in first} and normalised == []
    rig.store.suppress([SWISS.format(7)])
    later = rig.outbox.enqueue_many([{"to": SWISS.format(i), "text": "sale"} for i in range(6, 9)], "bulk")
    rig.dispatcher.run("bulk")
    assert rig.rejected() == {later[1].message_id: ("suppressed", "suppression")}
    assert rig.accepted() == {q.message_id for q in first} | {later[0].message_id, later[2].message_id}
    assert len(normalised) == 3


def test_parts_and_ucs2_limits(make_rig: Any) -> None:
    rig = make_rig(_bulk(max_parts=1, allow_ucs2=False, suppression=False))
    short = rig.outbox.enqueue({"to": SWISS.format(1), "text": "short"}, "bulk")
    long = rig.outbox.enqueue({"to": SWISS.format(2), "text": "x" * 200}, "bulk")
    emoji = rig.outbox.enqueue({"to": SWISS.format(3), "text": "sale \U0001f600"}, "bulk")
    rig.dispatcher.run("bulk")
    assert rig.accepted() == {short.message_id}
    assert rig.rejected() == {long.message_id: ("too_many_parts", "max_parts:1"),
                              emoji.message_id: ("ucs2_refused", "allow_ucs2:false")}


def test_a_rejection_of_a_campaign_job_is_counted_under_its_campaign(make_rig: Any) -> None:
    """REJECTED from no record moves the campaign's counters like FAILED from no record does."""
    rig = make_rig(_otp())
    rig.outbox.enqueue({"to": SWISS_PREMIUM, "text": "code", "campaign_reference_id": "spring"}, "otp")
    rig.outbox.enqueue({"to": SWISS.format(1), "text": "code", "campaign_reference_id": "spring"}, "otp")
    rig.dispatcher.run("otp")
    counters = {k.decode(): int(v) for k, v in rig.store.r.hgetall(rig.store.campaign("spring")).items()
                if not k.endswith(b"_ms")}
    assert counters["rejected"] == 1 and counters["accepted"] == 1 and counters["total"] == 2
    assert counters.get("queued", 0) == 0


def test_two_dispatchers_together_never_exceed_a_velocity_rule(make_rig: Any, sbx: SandboxProcess) -> None:
    """Two dispatchers (own Store, own connection each, as two processes) send 60 codes to 3 numbers
    at once in small batches: exactly 5 per number get through."""
    rig = make_rig(_otp(batch_size=4, concurrency=4, velocity={"per_number": {"limit": 5, "window_s": 3600}}))
    rig.outbox.enqueue_many([{"to": SWISS.format(i % 3), "text": f"code {i}"} for i in range(60)], "otp")
    rig.race("otp", "otp")
    rig.dispatcher.run("otp")  # whatever the two left
    assert sbx.stats()["messages_accepted"] == 15
    sent = Counter(e["to"] for e in rig.events() if e["type"] == "accepted")
    assert sent == {SWISS.format(i): 5 for i in range(3)}
    assert len(rig.rejected()) == 45


def _plant_wrong_type(rig: PolicyRig, lane: str) -> None:
    """A key of the wrong type where the guards keep the lane's day counters: Redis refuses their read."""
    day = int(rig.store.r.time()[0]) // 86400
    rig.store.r.set(rig.store.budget_key(lane, day), "not a hash")


def test_unreadable_guards_fail_closed_on_bulk(make_rig: Any, sbx: SandboxProcess) -> None:
    """Closed: nothing is sent, the jobs stay pending (no event), the lane pauses with reason
    guard_unavailable, and once the state is readable again they are sent."""
    rig = make_rig(_bulk(daily_cap={"messages": 1000}, suppression=False))
    _plant_wrong_type(rig, "bulk")
    before = metrics.POLICY_GUARD_ERRORS.labels("bulk", "closed")._value.get()
    queued = rig.outbox.enqueue_many([{"to": SWISS.format(i), "text": "sale"} for i in range(3)], "bulk")
    rig.dispatcher.run("bulk")
    assert sbx.stats()["messages_accepted"] == 0 and rig.events() == []
    assert rig.store.paused("bulk") == "guard_unavailable"
    assert rig.store.r.xpending(rig.store.outbox("bulk"), "dispatch")["pending"] == 3
    assert metrics.POLICY_GUARD_ERRORS.labels("bulk", "closed")._value.get() == before + 1
    rig.store.r.delete(rig.store.budget_key("bulk", int(rig.store.r.time()[0]) // 86400))
    rig.store.resume("bulk")
    rig.dispatcher.config = replace(rig.config, lease_ms=0)  # the kept entries are due again at once
    rig.dispatcher.run("bulk")
    assert rig.accepted() == {q.message_id for q in queued}


def test_unreadable_guards_fail_open_on_otp(make_rig: Any, sbx: SandboxProcess) -> None:
    """Open (otp's default): sent as if allowed, with a metric; the static rules still apply."""
    rig = make_rig(_otp(daily_cap={"messages": 1000}))
    _plant_wrong_type(rig, "otp")
    before = metrics.POLICY_GUARD_ERRORS.labels("otp", "open")._value.get()
    code = rig.outbox.enqueue({"to": SWISS.format(1), "text": "code"}, "otp")
    premium = rig.outbox.enqueue({"to": SWISS_PREMIUM, "text": "code"}, "otp")
    rig.dispatcher.run("otp")
    assert rig.accepted() == {code.message_id} and set(rig.rejected()) == {premium.message_id}
    assert rig.store.paused("otp") is None
    assert metrics.POLICY_GUARD_ERRORS.labels("otp", "open")._value.get() == before + 1


def test_an_unreadable_suppression_list_fails_closed_on_bulk(make_rig: Any, sbx: SandboxProcess) -> None:
    rig = make_rig(_bulk())
    rig.store.r.set(rig.store.suppressed_key, "not a set")  # SMISMEMBER answers WRONGTYPE
    rig.outbox.enqueue({"to": SWISS.format(1), "text": "sale"}, "bulk")
    rig.dispatcher.run("bulk")
    assert sbx.stats()["messages_accepted"] == 0 and rig.events() == []
    assert rig.store.paused("bulk") == "guard_unavailable"


def test_a_retry_after_an_outage_is_not_counted_twice(make_rig: Any, sbx: SandboxProcess) -> None:
    """A job allowed once counts once: after a 503 it comes back QUEUED and is sent, not rejected."""
    rig = make_rig(_otp(velocity={"per_number": {"limit": 1, "window_s": 3600}}))
    code = rig.outbox.enqueue({"to": SWISS.format(1), "text": "code"}, "otp")
    sbx.configure(down=True)
    rig.dispatcher.run("otp")
    assert rig.store.message(code.message_id)["state"] == "QUEUED"
    sbx.configure(down=False)
    rig.store.resume("otp")
    rig.dispatcher.config = replace(rig.config, lease_ms=0)
    rig.dispatcher.run("otp")
    assert rig.accepted() == {code.message_id} and rig.rejected() == {}


def test_a_job_whose_worker_died_after_its_submit_is_counted_once(make_rig: Any, sbx: SandboxProcess) -> None:
    """The guards count a message in the submit.lua call that records it SUBMITTING: a worker that dies
    right after it (before its POST) leaves the message counted and SUBMITTING; the worker that takes
    it over reconciles and resends it without counting it again or refusing it for the count, and the
    number's next code is refused (counted exactly once: not twice, not zero times)."""
    rig = make_rig(_otp(velocity={"per_number": {"limit": 1, "window_s": 3600}}),
                   sms_reconcile_window_s=0.6, sms_reconcile_checks=2)
    code = rig.outbox.enqueue({"to": SWISS.format(1), "text": "your only code"}, "otp")
    claim = rig.store.claim("otp", "doomed", 10, lease_ms=0, max_wait_ms=0, recover=False)
    items = [Item(e, parse_job(e.job, max_text_parts=10, metadata_max_bytes=4096)[0]) for e in claim.entries]
    checked = rig.dispatcher._guard.check("otp", items)
    answers, _ = rig.store.submit_guarded("otp", [i.entry for i in checked.send], checked.counted, consumer="doomed",
                                          lease_ms=0, state_ttl_s=3600, fence="doomed", send_window_ms=200)
    assert [a.state for a in answers] == ["NEW"]  # recorded and counted; the doomed worker dies here
    number = SWISS.format(1)  # its normal form
    window = int(rig.store.r.time()[0]) // 3600
    counts = f"{rig.store.policy_prefix('otp')}n:{window}"
    assert rig.store.r.hget(counts, number) == b"1"
    rig.dispatcher.config = replace(rig.config, lease_ms=100, fence_margin_ms=0)  # the takeover, 100 ms on

    def sent() -> bool:
        reconciles = rig.dispatcher.wake.reconciles
        if reconciles:
            rig.dispatcher.reconcile(*reconciles[-1])
        else:
            rig.dispatcher.run("otp")
        return bool(rig.accepted())

    wait_until(sent, 10, "the taken-over code to be reconciled and resent", interval_s=0.1)
    assert rig.accepted() == {code.message_id} and rig.rejected() == {}
    assert sbx.stats()["messages_accepted"] == 1
    assert rig.store.r.hget(counts, number) == b"1"
    again = rig.outbox.enqueue({"to": SWISS.format(1), "text": "another code"}, "otp")
    rig.dispatcher.run("otp")
    assert set(rig.rejected()) == {again.message_id}

def test_two_worker_processes_together_never_exceed_a_velocity_rule() -> None:
    """The real thing: two `sms-worker worker` processes and a clock, a pumping burst of 40 codes to
    one number plus 10 legitimate ones: exactly 5 to the pumped number are sent, every job ends in one
    event."""
    from tests.support.system import running

    lanes = {"otp": {"batch_size": 5, "max_wait_ms": 0, "concurrency": 4,
                     "velocity": {"per_number": {"limit": 5, "window_s": 3600}}},
             "bulk": {"max_wait_ms": 0}}
    with running({"SMS_LANES": orjson.dumps(lanes).decode()}, workers=2) as system:
        pumped = system.outbox.enqueue_many([{"to": SWISS.format(1), "text": f"code {i}"} for i in range(40)], "otp")
        legit = system.outbox.enqueue_many([{"to": SWISS.format(100 + i), "text": "code"} for i in range(10)], "otp")
        outcomes = system.wait_for_send_outcomes(50, timeout_s=20)
        assert system.stats()["messages_accepted"] == 15
        assert [outcomes[q.message_id] for q in legit] == ["accepted"] * 10
        assert Counter(outcomes[q.message_id] for q in pumped) == {"accepted": 5, "rejected": 35}
        assert len(system.events()) == 50


def test_velocity_counts_in_fixed_windows_of_the_servers_clock(make_rig: Any) -> None:
    """window_s 1: a second code in the same window is rejected, one in the next window is sent."""
    from worker.devtools.devstack import wait_until

    rig = make_rig(_otp(velocity={"per_number": {"limit": 1, "window_s": 1}}))

    def server_ms() -> int:
        seconds, micros = rig.store.r.time()
        return int(seconds) * 1000 + int(micros) // 1000

    wait_until(lambda: server_ms() % 1000 < 500, 2, "the start of a window", interval_s=0.01)
    first, second = rig.outbox.enqueue_many([{"to": SWISS.format(1), "text": "a"}, {"to": SWISS.format(1),
                                                                                   "text": "b"}], "otp")
    window = server_ms() // 1000
    rig.dispatcher.run("otp")
    if server_ms() // 1000 != window:
        pytest.skip("the batch straddled a window boundary (a starved machine)")
    assert rig.accepted() == {first.message_id} and set(rig.rejected()) == {second.message_id}
    wait_until(lambda: server_ms() // 1000 > window, 2, "the next window", interval_s=0.01)
    third = rig.outbox.enqueue({"to": SWISS.format(1), "text": "c"}, "otp")
    rig.dispatcher.run("otp")
    assert third.message_id in rig.accepted()
