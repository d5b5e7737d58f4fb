"""Per-account daily spend caps (worker.policy, worker/lua/lib/guards.lua) against real Redis and the real sandbox.

Lanes a and b send through `default`, whose cap (SMS_ACCOUNT_DAILY_CAP) they share; lane c sends
through `other`, with no cap. Together a and b stop at the account's cap (overshoot below one batch,
also with two dispatchers driving the two lanes at once, and with two worker processes), each pauses
`budget` and names the account; `sms-worker resume --account default --extra N` lifts it; c is
unaffected; parts are counted; and a configuration without an account cap writes the keys it wrote
before and no account key.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import orjson
import pytest
import structlog

from tests.integration.test_guards import SWISS, PolicyRig, rig_factory
from tests.support.cli import cli_runner
from worker import metrics
from worker.status import StatusConfig, collect, render

Cli = Callable[..., tuple[int, str, str]]
OTHER = {"other": {"base_url": "https://other.example", "api_key_env": "OTHER_ICOMM_KEY"}}


@pytest.fixture
def make_rig(redis_url: str, sbx: Any) -> Iterator[Any]:
    yield from rig_factory(redis_url, sbx)


def _lanes(batch_size: int = 7) -> dict[str, Any]:
    lane = {"batch_size": batch_size, "max_wait_ms": 0, "concurrency": 4}
    return {"a": lane, "b": lane, "c": {**lane, "account": "other"}}


def _rig(make_rig: Callable[..., PolicyRig], cap: dict[str, int], batch_size: int = 7) -> PolicyRig:
    return make_rig(_lanes(batch_size), sms_default_lane="a", sms_accounts=OTHER, sms_account_daily_cap=cap)


def _jobs(n: int, start: int = 0, text: str = "sale") -> list[dict[str, Any]]:
    return [{"to": SWISS.format(start + i), "text": text} for i in range(n)]


def _day(rig: PolicyRig) -> int:
    return int(rig.store.r.time()[0]) // 86400


def _account_spend(rig: PolicyRig) -> Any:
    return rig.store.account_spend_today(["default"])["default"]


@pytest.fixture
def cli(redis_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Cli:
    return cli_runner(monkeypatch, capsys, redis_url, SMS_LANES=orjson.dumps(_lanes()).decode(), SMS_DEFAULT_LANE="a",
                      SMS_ACCOUNTS=orjson.dumps(OTHER).decode(), SMS_ACCOUNT_DAILY_CAP='{"messages": 50}')


def test_two_lanes_of_an_account_stop_together_at_its_cap_and_resume_together(
    make_rig: Any, sbx: Any, cli: Cli
) -> None:
    """Cap 50 messages over a and b, batches of 7: a sends its 40, b's second batch reaches the cap
    (54, below 50 + one batch), b pauses, and a's next batch is refused and pauses a; c (another
    account) sends everything. Status and the metrics show the account's spend; `resume --account
    default --extra 10` lifts both, and they stop again at 60 + less than a batch."""
    rig = _rig(make_rig, {"messages": 50})
    rig.outbox.enqueue_many(_jobs(40), "a")
    rig.dispatcher.run("a")
    assert sbx.stats()["messages_accepted"] == 40 and rig.store.paused("a") is None
    rig.outbox.enqueue_many(_jobs(40, start=100), "b")
    rig.outbox.enqueue_many(_jobs(20, start=200), "c")
    with structlog.testing.capture_logs() as logs:
        rig.dispatcher.run("b")
        rig.outbox.enqueue_many(_jobs(10, start=300), "a")
        rig.dispatcher.run("a")
        rig.dispatcher.run("c")
    assert sbx.stats()["messages_accepted"] == 40 + 14 + 20
    assert rig.store.paused("b") == "budget" and rig.store.paused("a") == "budget"
    assert rig.store.paused("c") is None and rig.store.r.xlen(rig.store.outbox("c")) == 0
    assert rig.store.r.xlen(rig.store.outbox("b")) == 26 and rig.store.r.xlen(rig.store.outbox("a")) == 10
    spend = _account_spend(rig)
    assert (spend.messages, spend.parts, spend.extra) == (54, 54, 0)
    assert rig.store.spend_today(["a", "b"])["b"].messages == 14  # the lanes keep their own counts too
    paused = [e for e in logs if e["event"] == "lane_budget_paused"]
    assert [(e["lane"], e["log_level"], e["batch_sent"]) for e in paused] == [("b", "error", True),
                                                                              ("a", "error", False)]
    assert all(e["account"] == "default" and e["account_messages_today"] == 54 and e["account_cap_messages"] == 50
               and e["resume"] == "sms-worker resume --account default --extra N" for e in paused)

    status = collect(StatusConfig.from_settings(rig.settings), rig.store)
    [default] = [a for a in status.accounts if a["account"] == "default"]
    assert default["budget"] == {"messages": [54, 50]}
    assert [a["budget"] for a in status.accounts if a["account"] == "other"] == [None]
    text = render(status)
    assert "daily cap 54/50 messages today (AT CAP)" in text
    assert "budget, lifts in" in text and "sms-worker resume --account default --extra N" in text
    assert "api_key" not in text.lower() and "OTHER_ICOMM_KEY" not in text
    assert status.as_dict()["accounts"][0]["budget"] == {"messages": [54, 50]}  # the JSON form
    exposed = metrics.render([_registry(rig)])[0]
    assert b'sms_account_spend_today{account="default",unit="messages"} 54.0' in exposed
    assert b'sms_account_daily_cap{account="default",unit="messages"} 50.0' in exposed
    assert b'sms_account_spend_today{account="other"' not in exposed

    # The lane form points to the account: raising b's own caps would not let it send.
    code, _, err = cli("resume", "--lane", "b", "--extra", "5", "--yes")
    assert code == 1 and "its account default is at the account's daily cap" in err and "--account default" in err
    code, _, err = cli("resume", "--account", "default")
    assert code == 1 and "give --extra N" in err and "54 messages" in err
    code, _, err = cli("resume", "--account", "default", "--extra", "10")  # no terminal, no --yes
    assert code == 1 and "--yes" in err and _account_spend(rig).extra == 0
    code, out, err = cli("resume", "--account", "default", "--extra", "10", "--yes")
    assert code == 0, err
    assert "a: lifted the pause (budget)" in out and "b: lifted the pause (budget)" in out
    assert rig.store.paused("a") is None and rig.store.paused("b") is None and _account_spend(rig).extra == 10

    rig.dispatcher.config = replace(rig.config, lease_ms=0)  # the held entries are due again at once
    rig.dispatcher.run("b")
    rig.dispatcher.run("a")
    assert sbx.stats()["messages_accepted"] == 74 + 7  # 54 + 7 = 61 reaches 60: b pauses, a is refused
    assert rig.store.paused("a") == "budget" and rig.store.paused("b") == "budget"


def _registry(rig: PolicyRig) -> Any:
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    registry.register(metrics.RedisStateCollector(StatusConfig.from_settings(rig.settings), rig.store))
    return registry


def test_resume_account_leaves_a_lane_at_its_own_cap_paused(make_rig: Any, sbx: Any, cli: Cli,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A lane at its own lane cap as well stays paused (it would pause again at once): it is named
    with the lane form of resume. A terminal's y/N confirms like the lane form's."""
    lanes = _lanes()
    lanes["b"] = {**lanes["b"], "daily_cap": {"messages": 7}}
    monkeypatch.setenv("SMS_LANES", orjson.dumps(lanes).decode())
    rig = make_rig(lanes, sms_default_lane="a", sms_accounts=OTHER, sms_account_daily_cap={"messages": 10})
    rig.outbox.enqueue_many(_jobs(7, start=100), "b")
    rig.dispatcher.run("b")  # 7: b's own cap
    rig.outbox.enqueue_many(_jobs(20), "a")
    rig.dispatcher.run("a")  # 14: the account's cap
    assert rig.store.paused("a") == "budget" and rig.store.paused("b") == "budget"
    monkeypatch.setattr("sys.stdin.isatty", lambda: True)
    monkeypatch.setattr("builtins.input", lambda prompt: "n")
    code, out, _ = cli("resume", "--account", "default", "--extra", "20")
    assert code == 1 and "not resumed" in out and _account_spend(rig).extra == 0
    monkeypatch.setattr("builtins.input", lambda prompt: "y")
    code, out, err = cli("resume", "--account", "default", "--extra", "20")
    assert code == 0, err
    assert "a: lifted the pause (budget)" in out
    assert "b: still at its own daily cap" in out and "resume --lane b --extra N" in out
    assert rig.store.paused("a") is None and rig.store.paused("b") == "budget"
    code, _, err = cli("resume", "--account", "nope", "--extra", "1", "--yes")
    assert code != 0 and "unknown account 'nope'" in err
    code, _, err = cli("resume", "--account", "other", "--extra", "1", "--yes")
    assert code != 0 and "has no daily cap" in err


def test_an_account_parts_cap_counts_parts(make_rig: Any, sbx: Any) -> None:
    """Three-part texts against an account cap of 9 parts, one message per batch, on two lanes: a
    sends two (6 parts), b one (9: the cap), then a is refused."""
    rig = _rig(make_rig, {"parts": 9}, batch_size=1)
    rig.outbox.enqueue_many(_jobs(2, text="x" * 400), "a")
    rig.dispatcher.run("a")
    rig.outbox.enqueue_many(_jobs(3, start=100, text="x" * 400), "b")
    rig.dispatcher.run("b")
    rig.outbox.enqueue_many(_jobs(1, start=200, text="x" * 400), "a")
    rig.dispatcher.run("a")
    assert sbx.stats()["messages_accepted"] == 3
    spend = _account_spend(rig)
    assert (spend.messages, spend.parts) == (3, 9)
    assert rig.store.paused("a") == "budget" and rig.store.paused("b") == "budget"


def test_two_dispatchers_on_the_two_lanes_at_once_overshoot_the_account_cap_by_less_than_one_batch(
    make_rig: Any, sbx: Any
) -> None:
    """Each lane driven by its own dispatcher (own Store and connection, as two processes) at the same
    time: at least 50 and fewer than 57 are sent in all, and both lanes end paused for budget."""
    rig = _rig(make_rig, {"messages": 50})
    rig.outbox.enqueue_many(_jobs(150), "a")
    rig.outbox.enqueue_many(_jobs(150, start=1000), "b")
    rig.race("a", "b")
    sent = sbx.stats()["messages_accepted"]
    assert 50 <= sent < 57, sent
    assert _account_spend(rig).messages == sent
    lanes = rig.store.spend_today(["a", "b"])
    assert lanes["a"].messages + lanes["b"].messages == sent and lanes["a"].messages and lanes["b"].messages
    assert rig.store.paused("a") == "budget" and rig.store.paused("b") == "budget"
    assert rig.store.r.xlen(rig.store.outbox("a")) + rig.store.r.xlen(rig.store.outbox("b")) == 300 - sent


def _policy_keys(rig: PolicyRig) -> set[str]:
    return {k.decode() for k in rig.store.r.scan_iter(match=f"{rig.store.p}:policy:*")}


def test_a_lane_only_configuration_writes_the_same_keys_as_before_and_no_account_key(
    make_rig: Any, sbx: Any
) -> None:
    """Without an account cap a lane with its own cap counts in its own key only (the day's spend), as
    before accounts had caps; a lane without any counted rule writes no policy key at all."""
    rig = make_rig(_lanes() | {"c": {"max_wait_ms": 0, "daily_cap": {"messages": 100}}}, sms_default_lane="a")
    rig.outbox.enqueue_many(_jobs(5), "c")
    rig.outbox.enqueue_many(_jobs(5, start=100), "a")
    rig.dispatcher.run("c")
    rig.dispatcher.run("a")
    assert sbx.stats()["messages_accepted"] == 10
    assert _policy_keys(rig) == {rig.store.budget_key("c", _day(rig))}
    assert rig.store.account_spend_today(["default"])["default"].messages == 0


def test_with_an_account_cap_its_lanes_also_count_in_the_account_s_key(make_rig: Any, sbx: Any) -> None:
    """A lane with no rule of its own is counted once its account has a cap: in its own day key and
    the account's; the lane of the other account writes nothing."""
    rig = _rig(make_rig, {"messages": 100})
    rig.outbox.enqueue_many(_jobs(5), "a")
    rig.outbox.enqueue_many(_jobs(5, start=100), "c")
    rig.dispatcher.run("a")
    rig.dispatcher.run("c")
    day = _day(rig)
    assert _policy_keys(rig) == {rig.store.budget_key("a", day), rig.store.account_budget_key("default", day)}
    assert _account_spend(rig).messages == 5


def test_two_worker_processes_on_two_lanes_overshoot_the_account_cap_by_less_than_one_batch() -> None:
    """Two `sms-worker worker` processes and a clock, lanes otp and bulk sharing the default account's
    cap of 20 messages, batches of 5, 50 jobs on each: 20 to 24 are sent in all, both lanes end
    paused for budget, and the rest wait in the outboxes."""
    from tests.support.system import running
    from worker.devtools.devstack import wait_until

    lanes = {"otp": {"batch_size": 5, "max_wait_ms": 0, "concurrency": 4},
             "bulk": {"batch_size": 5, "max_wait_ms": 0, "concurrency": 4, "suppression": False}}
    env = {"SMS_LANES": orjson.dumps(lanes).decode(), "SMS_ACCOUNT_DAILY_CAP": '{"messages": 20}'}
    with running(env, workers=2) as system:
        system.outbox.enqueue_many(_jobs(50), "otp")
        system.outbox.enqueue_many(_jobs(50, start=1000), "bulk")

        def both_paused() -> bool:
            return system.store.paused("otp") == "budget" and system.store.paused("bulk") == "budget"

        wait_until(both_paused, 20, "both lanes' budget pauses", interval_s=0.1)
        counted = system.store.account_spend_today(["default"])["default"].messages
        wait_until(lambda: system.stats()["messages_accepted"] == counted, 10, "the last batches' POSTs",
                   interval_s=0.1)
        sent = system.stats()["messages_accepted"]
        assert 20 <= sent < 25, sent
        outboxes = system.store.r.xlen(system.store.outbox("otp")) + system.store.r.xlen(system.store.outbox("bulk"))
        assert outboxes == 100 - sent
        assert {e["type"] for e in system.events()} == {"accepted"}
