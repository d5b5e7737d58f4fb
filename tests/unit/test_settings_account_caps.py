"""An account's daily cap (SMS_ACCOUNT_DAILY_CAP for `default`, `daily_cap` in SMS_ACCOUNTS): the
shape and validation of a lane's `daily_cap`, resolved onto every lane of the account at start-up,
and each mistake named on one line with an example."""

from __future__ import annotations

import json
from typing import Any

import pytest

from worker.errors import ConfigError
from worker.policy import LanePolicy
from worker.settings import DailyCap, Settings, settings_from_env

EXAMPLE = 'example: SMS_ACCOUNT_DAILY_CAP={"messages":100000,"parts":150000}'
CAP_EXAMPLE = 'example: "daily_cap":{"messages":100000,"parts":150000}'
LANES = json.dumps({"otp": {"max_wait_ms": 0}, "bulk": {"account": "marketing"}, "alerts": {}})


def _accounts(cap: Any = None) -> str:
    spec: dict[str, Any] = {"base_url": "https://apisms.trx.icommarketing.com", "api_key_env": "MARKETING_KEY"}
    if cap is not None:
        spec["daily_cap"] = cap
    return json.dumps({"marketing": spec})


def _one_line(env: dict[str, str]) -> str:
    with pytest.raises(ConfigError) as caught:
        settings_from_env(env)
    lines = str(caught.value).splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_without_an_account_cap_nothing_changes() -> None:
    settings = settings_from_env({})
    assert settings.sms_account_daily_cap is None
    assert all(cfg.account_cap is None for cfg in settings.sms_lanes.values())
    assert LanePolicy.of("bulk", settings.sms_lanes["bulk"]).suppression_only  # its hot path stays one SMISMEMBER


def test_the_default_account_s_cap_reaches_every_lane_of_it_and_only_those() -> None:
    settings = settings_from_env({"SMS_ACCOUNT_DAILY_CAP": '{"messages": 50, "parts": 80}',
                                  "SMS_ACCOUNTS": _accounts(), "SMS_LANES": LANES})
    assert settings.sms_account_daily_cap == DailyCap(messages=50, parts=80)
    assert settings.sms_lanes["otp"].account_cap == DailyCap(messages=50, parts=80)
    assert settings.sms_lanes["alerts"].account_cap == DailyCap(messages=50, parts=80)
    assert settings.sms_lanes["bulk"].account_cap is None  # marketing has no cap
    alerts = LanePolicy.of("alerts", settings.sms_lanes["alerts"])
    assert alerts.counted and alerts.needs_text and alerts.account == "default"
    limits = alerts.limits()
    assert (limits.account, limits.account_cap_messages, limits.account_cap_parts) == ("default", 50, 80)
    assert alerts.describe()["account_daily_cap"] == "default: 50 messages, 80 parts"


def test_an_account_of_sms_accounts_carries_its_own_cap() -> None:
    settings = settings_from_env({"SMS_ACCOUNTS": _accounts({"parts": 300}), "SMS_LANES": LANES})
    assert settings.account_daily_cap("marketing") == DailyCap(parts=300)
    assert settings.account_daily_cap("default") is None
    bulk = LanePolicy.of("bulk", settings.sms_lanes["bulk"])
    assert (bulk.account, bulk.account_cap_messages, bulk.account_cap_parts) == ("marketing", 0, 300)
    assert not LanePolicy.of("alerts", settings.sms_lanes["alerts"]).counted


def test_a_settings_built_directly_resolves_the_cap_too() -> None:
    settings = Settings.model_validate({"sms_account_daily_cap": {"messages": 7}})
    assert settings.sms_lanes["bulk"].account_cap == DailyCap(messages=7)


@pytest.mark.parametrize(("value", "expected"), [
    ('{"messages": 0}', "SMS_ACCOUNT_DAILY_CAP: messages=0: Input should be greater than or equal to 1"),
    ('{"parts": -5}', "SMS_ACCOUNT_DAILY_CAP: parts=-5: Input should be greater than or equal to 1"),
    ('{"messages": true}', "SMS_ACCOUNT_DAILY_CAP: messages=True: must be a number, not true or false"),
    ('{"messages": "many"}', "SMS_ACCOUNT_DAILY_CAP: messages='many': Input should be a valid integer"),
    ('{"messages": 1.5}', "SMS_ACCOUNT_DAILY_CAP: messages=1.5:"),
    ('{"mesages": 5}', "SMS_ACCOUNT_DAILY_CAP: unknown key 'mesages' (did you mean messages? a daily cap has "
                       "messages, parts)"),
    ("{}", 'SMS_ACCOUNT_DAILY_CAP={}: give "messages", "parts" or both'),
    ("100", "SMS_ACCOUNT_DAILY_CAP=100: must be a JSON object with messages and/or parts"),
    ("[1]", "SMS_ACCOUNT_DAILY_CAP=[1]: must be a JSON object with messages and/or parts"),
    ('{"messages": 5', "SMS_ACCOUNT_DAILY_CAP='{\"messages\": 5': is not valid JSON"),
])
def test_each_mistake_in_the_default_account_s_cap_is_one_line_with_an_example(value: str, expected: str) -> None:
    line = _one_line({"SMS_ACCOUNT_DAILY_CAP": value})
    assert line.startswith(expected), line
    assert EXAMPLE in line


@pytest.mark.parametrize(("cap", "expected"), [
    ({"messages": 0}, "SMS_ACCOUNTS: account 'marketing': daily_cap.messages=0: Input should be greater than"),
    ({"parts": False}, "SMS_ACCOUNTS: account 'marketing': daily_cap.parts=False: must be a number"),
    ({"part": 5}, "SMS_ACCOUNTS: account 'marketing': daily_cap has an unknown key 'part' (did you mean parts?"),
    ({}, "SMS_ACCOUNTS: account 'marketing': daily_cap={}: give \"messages\", \"parts\" or both"),
    (5, "SMS_ACCOUNTS: account 'marketing': daily_cap=5: must be a JSON object with messages and/or parts"),
])
def test_each_mistake_in_an_account_s_cap_is_one_line_with_an_example(cap: Any, expected: str) -> None:
    line = _one_line({"SMS_ACCOUNTS": _accounts(cap), "SMS_LANES": LANES})
    assert line.startswith(expected), line
    assert CAP_EXAMPLE in line


def test_a_value_under_an_unknown_cap_key_is_never_shown() -> None:
    """It might be a key pasted into the JSON; the line names the key only."""
    line = _one_line({"SMS_ACCOUNTS": _accounts({"messages": 5, "api": "secret-looking-value-123"}),
                      "SMS_LANES": LANES})
    assert "secret-looking-value-123" not in line and "'api'" in line


def test_an_unknown_account_key_lists_daily_cap_among_the_keys() -> None:
    spec = {"base_url": "https://x.example", "api_key_env": "K", "dailycap": {"messages": 5}}
    line = _one_line({"SMS_ACCOUNTS": json.dumps({"m": spec})})
    assert "did you mean daily_cap?" in line


def test_a_cap_on_an_account_no_lane_sends_through_is_refused_at_start_up() -> None:
    """A cap that caps nothing is a mistake whoever set it would not see: named on one line."""
    lanes = json.dumps({"otp": {"account": "marketing"}, "bulk": {"account": "marketing"}})
    line = _one_line({"SMS_ACCOUNT_DAILY_CAP": '{"messages": 50}', "SMS_ACCOUNTS": _accounts(),
                      "SMS_LANES": lanes, "MARKETING_KEY": "k"})
    assert "SMS_ACCOUNT_DAILY_CAP caps account 'default', which no lane of SMS_LANES sends through" in line, line
    assert "otp -> marketing, bulk -> marketing" in line
    line = _one_line({"SMS_ACCOUNTS": _accounts({"messages": 10}), "MARKETING_KEY": "k"})
    assert "account 'marketing' has a daily_cap, but it caps nothing" in line, line
