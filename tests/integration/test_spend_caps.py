"""Spend caps (worker.policy, worker/lua/lib/guards.lua) against real Redis and the real sandbox: at a
lane's daily cap the lane pauses with reason `budget`, its jobs wait (nothing dropped, no event),
status and metrics say so; the cap is overshot by at most one submit call (a batch, or SCRIPT_CHUNK
messages of a bigger one), also with two dispatchers at once; `sms-worker
resume --extra N` lifts it only when confirmed; a campaign over its cap waits without pausing."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import orjson
import pytest

from tests.integration.test_guards import SWISS, PolicyRig, rig_factory
from tests.support.cli import cli_runner
from worker import metrics
from worker.status import StatusConfig, collect, render
from worker.store import SCRIPT_CHUNK

Cli = Callable[..., tuple[int, str, str]]


@pytest.fixture
def make_rig(redis_url: str, sbx: Any) -> Iterator[Any]:
    yield from rig_factory(redis_url, sbx)


def _bulk(**policy: Any) -> dict[str, Any]:
    return {"otp": {"max_wait_ms": 0}, "bulk": {"max_wait_ms": 0, "suppression": False, **policy}}


def _jobs(n: int, text: str = "sale", **extra: Any) -> list[dict[str, Any]]:
    return [{"to": SWISS.format(i), "text": text, **extra} for i in range(n)]


def _pending(rig: PolicyRig, lane: str) -> int:
    return int(rig.store.r.xpending(rig.store.outbox(lane), "dispatch")["pending"])


def test_at_the_daily_cap_the_lane_pauses_for_budget_and_its_jobs_wait(make_rig: Any, sbx: Any) -> None:
    """Cap 10 messages, batches of 4: the batch that reaches the cap is sent (12 in all, overshoot
    below one batch), the lane pauses until midnight, the other 18 wait pending with no event;
    status and the metrics show the pause and today's spend."""
    rig = make_rig(_bulk(batch_size=4, daily_cap={"messages": 10}))
    rig.outbox.enqueue_many(_jobs(30), "bulk")
    rig.dispatcher.run("bulk")
    accepted = sbx.stats()["messages_accepted"]
    assert accepted == 12
    assert len(rig.events()) == 12 and {e["type"] for e in rig.events()} == {"accepted"}
    assert rig.store.paused("bulk") == "budget"
    assert rig.store.r.xlen(rig.store.outbox("bulk")) == 18  # nothing dropped
    assert 0 < rig.store.r.pttl(rig.store.pause_key("bulk")) <= 86_400_000
    status = collect(StatusConfig.from_settings(rig.settings), rig.store)
    bulk = next(lane for lane in status.lanes if lane.lane == "bulk")
    assert bulk.paused == "budget" and bulk.budget == {"messages": [12, 10]}
    text = render(status)
    assert "budget, lifts in" in text and "--extra N" in text and "12/10 messages today (AT CAP)" in text
    exposed = b"".join(metrics.render([_registry(rig)])[0].splitlines(keepends=True))
    assert b'sms_lane_paused{lane="bulk",reason="budget"} 1.0' in exposed
    assert b'sms_lane_spend_today{lane="bulk",unit="messages"} 12.0' in exposed


def test_a_big_batch_stops_at_the_cap_within_one_submit_call_not_one_batch(make_rig: Any, sbx: Any) -> None:
    """Batches of 1,000 against a cap of 250: the guards decide in each submit.lua call of
    SCRIPT_CHUNK (100) messages, so the batch stops after the call that reached the cap (300 sent,
    not the whole batch) and the rest of the same batch waits, nothing dropped."""
    rig = make_rig(_bulk(batch_size=1000, daily_cap={"messages": 250}))
    rig.outbox.enqueue_many(_jobs(1000), "bulk")
    rig.dispatcher.run("bulk")
    assert SCRIPT_CHUNK == 100
    assert sbx.stats()["messages_accepted"] == 300
    assert rig.store.spend_today(["bulk"])["bulk"].messages == 300
    assert rig.store.paused("bulk") == "budget"
    assert rig.store.r.xlen(rig.store.outbox("bulk")) == 700 and {e["type"] for e in rig.events()} == {"accepted"}


def _registry(rig: PolicyRig) -> Any:
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    registry.register(metrics.RedisStateCollector(StatusConfig.from_settings(rig.settings), rig.store))
    return registry


def test_a_parts_cap_counts_parts(make_rig: Any, sbx: Any) -> None:
    """Three-part messages against a cap of 9 parts, one message per batch: three are sent."""
    rig = make_rig(_bulk(batch_size=1, daily_cap={"parts": 9}))
    rig.outbox.enqueue_many(_jobs(6, text="x" * 400), "bulk")
    rig.dispatcher.run("bulk")
    assert sbx.stats()["messages_accepted"] == 3
    assert rig.store.spend_today(["bulk"])["bulk"].parts == 9
    assert rig.store.paused("bulk") == "budget"


def test_two_dispatchers_together_overshoot_a_cap_by_less_than_one_batch(make_rig: Any, sbx: Any) -> None:
    """Two dispatchers, each with its own Store and connection, race on one lane with a cap of 50 and
    batches of 7: at least 50 and fewer than 57 are sent, and the rest wait."""
    rig = make_rig(_bulk(batch_size=7, concurrency=4, daily_cap={"messages": 50}))
    rig.outbox.enqueue_many(_jobs(300), "bulk")
    rig.race("bulk", "bulk")
    sent = sbx.stats()["messages_accepted"]
    assert 50 <= sent < 57, sent
    assert rig.store.spend_today(["bulk"])["bulk"].messages == sent
    assert rig.store.r.xlen(rig.store.outbox("bulk")) == 300 - sent
    assert rig.store.paused("bulk") == "budget"


@pytest.fixture
def cli(redis_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Cli:
    return cli_runner(monkeypatch, capsys, redis_url,
                      SMS_LANES=orjson.dumps(_bulk(batch_size=5, daily_cap={"messages": 5})).decode())


def test_a_budget_pause_is_resumed_only_with_more_allowance_and_a_confirmation(
    make_rig: Any, sbx: Any, cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    rig = make_rig(_bulk(batch_size=5, daily_cap={"messages": 5}))
    rig.outbox.enqueue_many(_jobs(12), "bulk")
    rig.dispatcher.run("bulk")
    assert sbx.stats()["messages_accepted"] == 5 and rig.store.paused("bulk") == "budget"

    code, _, err = cli("resume", "--lane", "bulk")  # no --extra: resuming would pause at once
    assert code == 1 and "give --extra N" in err and "5 messages" in err
    code, _, err = cli("resume", "--lane", "bulk", "--extra", "5")  # no terminal, no --yes
    assert code == 1 and "--yes" in err
    assert rig.store.paused("bulk") == "budget"

    monkeypatch.setattr("sys.stdin.isatty", lambda: True)
    monkeypatch.setattr("builtins.input", lambda prompt: "n")
    code, out, _ = cli("resume", "--lane", "bulk", "--extra", "5")
    assert code == 1 and "not resumed" in out and rig.store.paused("bulk") == "budget"
    monkeypatch.setattr("builtins.input", lambda prompt: "y")
    code, out, err = cli("resume", "--lane", "bulk", "--extra", "5")
    assert code == 0, err
    assert "lifted the pause (budget)" in out and rig.store.paused("bulk") is None
    assert rig.store.spend_today(["bulk"])["bulk"].extra == 5

    # The cap applies again with the extra: five more, then the lane pauses again.
    rig.dispatcher.config = replace(rig.config, lease_ms=0)
    rig.dispatcher.run("bulk")
    assert sbx.stats()["messages_accepted"] == 10 and rig.store.paused("bulk") == "budget"
    code, out, err = cli("resume", "--lane", "bulk", "--extra", "2", "--yes")
    assert code == 0, err
    rig.dispatcher.run("bulk")
    assert sbx.stats()["messages_accepted"] == 12
    assert rig.store.r.xlen(rig.store.outbox("bulk")) == 0


def test_a_campaign_over_its_daily_cap_waits_without_pausing_the_lane(make_rig: Any, sbx: Any) -> None:
    rig = make_rig(_bulk(campaign_daily_cap=3))
    rig.outbox.enqueue_many(_jobs(5, campaign_reference_id="spring"), "bulk")
    others = rig.outbox.enqueue_many(_jobs(2, campaign_reference_id="autumn"), "bulk")
    plain = rig.outbox.enqueue({"to": SWISS.format(9), "text": "no campaign"}, "bulk")
    rig.dispatcher.run("bulk")
    assert sbx.stats()["messages_accepted"] == 6
    assert {q.message_id for q in others} | {plain.message_id} <= {e["message_id"] for e in rig.events()}
    assert rig.store.paused("bulk") is None
    assert _pending(rig, "bulk") == 2 and not [e for e in rig.events() if e["type"] != "accepted"]


def test_two_worker_processes_together_overshoot_a_cap_by_less_than_one_batch() -> None:
    """Two `sms-worker worker` processes and a clock on a lane capped at 20 messages, batches of 5,
    with 100 jobs: 20 to 24 are sent, the lane is paused for budget, and the rest wait in the outbox."""
    from tests.support.system import running
    from worker.devtools.devstack import wait_until

    lanes = _bulk(batch_size=5, concurrency=4, daily_cap={"messages": 20})
    with running({"SMS_LANES": orjson.dumps(lanes).decode()}, workers=2) as system:
        system.outbox.enqueue_many(_jobs(100), "bulk")
        wait_until(lambda: system.store.paused("bulk") == "budget", 20, "the budget pause", interval_s=0.1)
        wait_until(lambda: system.store.r.xlen(system.store.events) >= 20, 10, "20 accepted", interval_s=0.1)
        pending_sends = system.store.spend_today(["bulk"])["bulk"].messages
        wait_until(lambda: system.stats()["messages_accepted"] == pending_sends, 10, "the last batch's POST",
                   interval_s=0.1)
        sent = system.stats()["messages_accepted"]
        assert 20 <= sent < 25, sent
        assert system.store.r.xlen(system.store.outbox("bulk")) == 100 - sent
        assert {e["type"] for e in system.events()} == {"accepted"}
