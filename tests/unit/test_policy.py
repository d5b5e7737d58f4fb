"""The traffic policy's pure part (worker.policy): a lane's options -> rules with the name-dependent
defaults, the static rules per job, and the plan from the store's answers; the lane options'
validation; a policy rejection's event against the event schema."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from jsonschema import Draft202012Validator

from worker import schemas
from worker.dispatch.classify import POLICY_GUARD, policy_rejected
from worker.errors import ConfigError
from worker.models import State
from worker.policy import (
    HoldReason,
    LanePolicy,
    Reason,
    Rejection,
    examine,
    plan_counted,
    plan_static,
    plan_unguarded,
    suppression_numbers,
)
from worker.settings import LaneConfig, settings_from_env
from worker.store import GUARD_ANSWERS, Entry, SubmitAnswer
from worker.store.policy import Spend

SWISS_MOBILE = "41791234567"
GERMAN_MOBILE = "4915112345678"
SWISS_PREMIUM = "41900123456"


def _policy(lane: str = "custom", **options: Any) -> LanePolicy:
    return LanePolicy.of(lane, LaneConfig.model_validate(options))


def _job(to: str = SWISS_MOBILE, text: str = "hello", **extra: Any) -> dict[str, Any]:
    return {"to": to, "text": text, **extra}


# --- defaults -------------------------------------------------------------------------------------
def test_the_lanes_named_otp_and_bulk_get_their_defaults_and_other_lanes_none() -> None:
    otp, bulk, other = _policy("otp"), _policy("bulk"), _policy("alerts")
    assert otp.block_types == {"PREMIUM_RATE", "SHARED_COST"} and not otp.suppression and otp.fail_open
    assert bulk.block_types == frozenset() and bulk.suppression and not bulk.fail_open
    assert not other.active and not other.fail_open  # an unnamed lane runs exactly as before
    assert not _policy("otp", block_number_types=[]).active  # every default can be turned off
    assert not _policy("bulk", suppression=False).active


def test_explicit_options_win_over_the_name_defaults() -> None:
    p = _policy("otp", block_number_types=["TOLL_FREE"], suppression=True, on_guard_error="closed")
    assert p.block_types == {"TOLL_FREE"} and p.suppression and not p.fail_open


def test_counted_only_with_velocity_or_caps() -> None:
    assert not _policy("bulk").counted
    assert _policy(velocity={"per_number": {"limit": 5, "window_s": 3600}}).counted
    assert _policy(daily_cap={"parts": 10}).counted
    assert _policy(campaign_daily_cap=3).counted


def test_a_lane_of_a_capped_account_is_counted_and_reads_parts() -> None:
    """The account's cap comes from the settings (resolved onto each lane of the account); a lane
    without rules of its own is then counted, and the bulk lane leaves its suppression-only path."""
    lanes = {"bulk": {}, "alerts": {}, "other": {"account": "m"}}
    settings = settings_from_env({"SMS_LANES": orjson.dumps(lanes).decode(), "SMS_DEFAULT_LANE": "bulk",
                                  "SMS_ACCOUNT_DAILY_CAP": '{"parts": 30}', "SMS_ACCOUNTS": orjson.dumps(
                                      {"m": {"base_url": "https://x.example", "api_key_env": "M_KEY"}}).decode()})
    bulk, alerts, other = (LanePolicy.of(lane, settings.sms_lanes[lane]) for lane in lanes)
    assert alerts.active and alerts.counted and alerts.needs_text and alerts.account_capped
    assert bulk.counted and not bulk.suppression_only
    assert not other.active and other.limits().account == ""  # its account has no cap: nothing counted for it
    limits = alerts.limits()
    assert (limits.account, limits.account_cap_messages, limits.account_cap_parts) == ("default", 0, 30)
    assert examine(alerts, _job(text="x" * 400)).parts == 3  # parts counted for the account's cap


def test_a_spend_is_at_a_cap_as_the_guards_decide() -> None:
    assert not Spend(1, 9, 20, 0).at_cap(10, 0)
    assert Spend(1, 10, 20, 0).at_cap(10, 0)
    assert not Spend(1, 10, 20, 5).at_cap(10, 0)  # resume --extra 5
    assert Spend(1, 1, 20, 0).at_cap(0, 20) and not Spend(1, 50, 50, 0).at_cap(0, 0)


# --- static rules ---------------------------------------------------------------------------------
def test_an_allow_list_lets_only_its_countries_through() -> None:
    p = _policy(countries={"allow": ["CH"]})
    assert examine(p, _job(SWISS_MOBILE)).rejection is None
    assert examine(p, _job(GERMAN_MOBILE)).rejection == Rejection(Reason.COUNTRY_BLOCKED, "countries.allow")


def test_a_block_list_stops_only_its_countries() -> None:
    p = _policy(countries={"block": ["DE"]})
    assert examine(p, _job(SWISS_MOBILE)).rejection is None
    assert examine(p, _job(GERMAN_MOBILE)).rejection == Rejection(Reason.COUNTRY_BLOCKED, "countries.block")


def test_premium_rate_numbers_are_refused_on_otp_by_default() -> None:
    seen = examine(_policy("otp"), _job(SWISS_PREMIUM))
    assert seen.rejection == Rejection(Reason.NUMBER_TYPE_BLOCKED, "block_number_types:PREMIUM_RATE")
    assert examine(_policy("otp"), _job(SWISS_MOBILE)).rejection is None
    assert examine(_policy("bulk"), _job(SWISS_PREMIUM)).rejection is None


def test_parts_and_ucs2_rules() -> None:
    long_text, emoji = "x" * 161, "code 1234 \U0001f600"
    assert examine(_policy(max_parts=1), _job(text=long_text)).rejection == Rejection(
        Reason.TOO_MANY_PARTS, "max_parts:1")
    assert examine(_policy(max_parts=2), _job(text=long_text)).rejection is None
    assert examine(_policy(max_parts=2), _job(text=long_text)).parts == 2
    assert examine(_policy(allow_ucs2=False), _job(text=emoji)).rejection == Rejection(
        Reason.UCS2_REFUSED, "allow_ucs2:false")
    assert examine(_policy(allow_ucs2=False), _job(text="plain GSM")).rejection is None


def test_the_prefix_drops_the_configured_digits_and_the_number_is_normalised() -> None:
    p = _policy(velocity={"per_prefix": {"digits_dropped": 3, "limit": 20, "window_s": 60}})
    seen = examine(p, _job("+" + SWISS_MOBILE, campaign_reference_id="spring"))
    assert (seen.number, seen.prefix, seen.campaign) == (SWISS_MOBILE, SWISS_MOBILE[:-3], "spring")


# --- plans ----------------------------------------------------------------------------------------
def test_suppressed_jobs_are_rejected_and_only_statically_allowed_numbers_are_looked_up() -> None:
    p = _policy("bulk", countries={"allow": ["CH"]})
    items = ["a", "b", "c"]
    examined = [examine(p, _job(n)) for n in (SWISS_MOBILE, GERMAN_MOBILE, "41791234568")]
    assert suppression_numbers(examined) == [SWISS_MOBILE, "41791234568"]
    plan, rest = plan_static(p, items, examined, [True, False])
    assert plan.rejected == [("a", Rejection(Reason.SUPPRESSED, "suppression")),
                             ("b", Rejection(Reason.COUNTRY_BLOCKED, "countries.allow"))]
    assert [item for item, _ in rest] == ["c"]


def test_what_submit_s_guards_stopped_becomes_rejections_naming_the_rule_or_holds_by_why() -> None:
    p = _policy(velocity={"per_number": {"limit": 5, "window_s": 3600},
                          "per_prefix": {"digits_dropped": 2, "limit": 20, "window_s": 60}})
    plan = plan_counted(p, [("b", SubmitAnswer.NUMBER), ("c", SubmitAnswer.PREFIX), ("d", SubmitAnswer.CAMPAIGN),
                            ("e", SubmitAnswer.BUDGET), ("f", SubmitAnswer.GUARD_ERROR), ("g", SubmitAnswer.BUDGET)])
    assert plan.send == []
    assert plan.rejected == [("b", Rejection(Reason.VELOCITY, "velocity.per_number:5/3600s")),
                             ("c", Rejection(Reason.VELOCITY, "velocity.per_prefix:20/60s:-2"))]
    assert plan.held == {HoldReason.CAMPAIGN_CAP: ["d"], HoldReason.BUDGET: ["e", "g"],
                         HoldReason.GUARD_UNAVAILABLE: ["f"]}


def test_every_answer_submit_s_guards_give_is_one_the_dispatcher_hands_to_the_policy() -> None:
    """A new guard answer in SubmitAnswer that plan_submitted did not route would leave its message
    neither sent nor settled."""
    stopped = {SubmitAnswer.NUMBER, SubmitAnswer.PREFIX, SubmitAnswer.CAMPAIGN, SubmitAnswer.BUDGET,
               SubmitAnswer.GUARD_ERROR}
    assert stopped == GUARD_ANSWERS
    plan_counted(_policy(), [("x", answer) for answer in stopped])  # each one planned, none a KeyError


@pytest.mark.parametrize(("fail_open", "sent", "held"), [(True, ["a"], {}),
                                                         (False, [], {HoldReason.GUARD_UNAVAILABLE: ["a"]})])
def test_unreadable_guards_fail_in_the_lanes_direction(fail_open: bool, sent: list[str],
                                                       held: dict[HoldReason, list[str]]) -> None:
    p = _policy(velocity={"per_number": {"limit": 1, "window_s": 60}})
    plan, rest = plan_static(p, ["a"], [examine(p, _job())], None)
    plan_unguarded(plan, rest, fail_open=fail_open)
    assert (plan.send, plan.held) == (sent, held)


# --- configuration --------------------------------------------------------------------------------
@pytest.mark.parametrize(("lane", "needle"), [
    ({"velocity": {"per_number": {"limit": 0, "window_s": 60}}}, "velocity.per_number.limit=0"),
    ({"velocity": {"per_number": {"limit": True, "window_s": 60}}}, "not true or false"),
    ({"countries": {"allow": ["CH"], "block": ["DE"]}}, 'give either "allow" or "block"'),
    ({"countries": {"allow": ["ch"]}}, "countries.allow.0='ch'"),
    ({"block_number_types": ["PREMIUM"]}, "'PREMIUM' is no phonenumbers PhoneNumberType"),
    ({"daily_cap": {}}, 'give "messages", "parts" or both'),
    ({"on_guard_error": "maybe"}, "on_guard_error='maybe'"),
    ({"max_parts": 0}, "max_parts=0"),
])
def test_a_wrong_lane_option_is_one_line_naming_it(lane: dict[str, Any], needle: str) -> None:
    with pytest.raises(ConfigError) as caught:
        settings_from_env({"SMS_LANES": orjson.dumps({"otp": lane, "bulk": {}}).decode()})
    lines = str(caught.value).splitlines()
    assert len(lines) == 1 and needle in lines[0] and "lane 'otp'" in lines[0], lines


def test_existing_configurations_load_unchanged() -> None:
    settings = settings_from_env({"SMS_LANES": '{"otp":{"batch_size":100,"max_wait_ms":0},"bulk":{}}'})
    assert settings.sms_lanes["bulk"].daily_cap is None and settings.sms_lanes["otp"].velocity is None


# --- the outcome and its event --------------------------------------------------------------------
def test_a_policy_rejection_is_guarded_recorded_under_its_campaign_and_its_event_validates() -> None:
    job = _job(campaign_reference_id="spring", id="p-1")
    entry = Entry("1-0", "sw-otp-1-0", orjson.dumps(job))
    outcome = policy_rejected("otp", entry, job, Reason.VELOCITY, "velocity.per_number:5/3600s")
    assert outcome.state == State.REJECTED and outcome.ack and outcome.guard == POLICY_GUARD
    assert outcome.campaign == "0spring"
    event = orjson.loads(outcome.event)
    assert (event["type"], event["reason"], event["rule"], event["status"]) == (
        "rejected", "velocity", "velocity.per_number:5/3600s", None)
    check = Draft202012Validator(schemas.load("event"))
    assert not list(check.iter_errors(event))
    # The schema holds the two kinds of rejection apart: a policy reason needs its rule ...
    assert list(check.iter_errors({k: v for k, v in event.items() if k != "rule"}))
    # ... and no other event type carries a rule.
    assert list(check.iter_errors({**event, "type": "accepted", "reason": None, "status": {}}))


# --- the fast number paths agree with worker.numbers ----------------------------------------------
def test_the_fast_number_paths_agree_with_worker_numbers() -> None:
    """normal_number and region_of answer without a parse where they can: on random numbers of every
    country code (any length a job may have) they say what worker.numbers says."""
    import random

    import phonenumbers

    from worker import numbers
    from worker.numbers import normal_or_raw as normal_number
    from worker.numbers import region_of

    rng = random.Random(15)
    codes = sorted(phonenumbers.COUNTRY_CODE_TO_REGION_CODE)
    for _ in range(20_000):
        code = str(rng.choice(codes))
        rest = rng.randint(max(1, 7 - len(code)), 15 - len(code))
        number = code + "".join(rng.choice("0123456789") for _ in range(rest))
        assert normal_number(number) == (numbers.normalise(number) or number), number
        assert region_of(number) == numbers.facts(number).region, number
