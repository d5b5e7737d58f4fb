"""Settings: every variable documented, and every mistake named with an example of a right value."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from worker.errors import ConfigError
from worker.settings import EXAMPLES, Settings, load_settings, settings_from_env

EXAMPLE_ENV = Path(__file__).parents[2] / "config" / "example.env"


def _example_vars() -> dict[str, str]:
    pairs = re.findall(r"^([A-Z][A-Z0-9_]+)=(.*)$", EXAMPLE_ENV.read_text(), flags=re.M)
    return dict(pairs)


def test_example_env_documents_every_setting_and_nothing_else() -> None:
    """config/example.env lists exactly the variables Settings reads, each with a comment."""
    documented = set(_example_vars())
    assert documented == {name.upper() for name in Settings.model_fields}
    assert documented == set(EXAMPLES)


def test_example_env_values_are_valid() -> None:
    """The example file, as written (with an API key added), loads without error."""
    values = {k: v for k, v in _example_vars().items() if v != ""}
    settings = settings_from_env({**values, "ICOMM_API_KEY": "k" * 20})
    assert settings.sms_lanes["bulk"].batch_size == 1000


def test_each_wrong_value_is_named_with_an_example(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two wrong variables give two lines, each naming the variable, the problem and an example."""
    monkeypatch.setenv("ICOMM_READ_TIMEOUT_S", "soon")
    monkeypatch.setenv("REDIS_URL", "localhost:6379")
    with pytest.raises(ConfigError) as caught:
        load_settings()
    lines = str(caught.value).splitlines()
    assert len(lines) == 2, lines  # one line per mistake, nothing else
    [timeout] = [line for line in lines if line.startswith("ICOMM_READ_TIMEOUT_S='soon'")]
    assert "example: ICOMM_READ_TIMEOUT_S=15" in timeout
    [url] = [line for line in lines if line.startswith("REDIS_URL='localhost:6379'")]
    assert "redis://" in url


def test_secrets_are_never_echoed_in_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bad webhook secret value is not printed back."""
    monkeypatch.setenv("SMS_WEBHOOK_AUTH", "carrier-pigeon")
    monkeypatch.setenv("ICOMM_API_KEY", "super-secret-key-value")
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert "super-secret-key-value" not in str(caught.value)
    assert "SMS_WEBHOOK_AUTH" in str(caught.value)
    assert "super-secret-key-value" not in repr(load_settings(sms_webhook_auth="header"))


def test_a_lease_shorter_than_a_send_is_refused() -> None:
    """A lease that could expire during a POST would let another worker send the batch twice."""
    with pytest.raises(ConfigError, match="SMS_LEASE_S=10 must exceed"):
        load_settings(sms_lease_s=10)


def test_unknown_default_lane_is_refused() -> None:
    """The default lane must be one of the configured lanes."""
    with pytest.raises(ConfigError, match="SMS_DEFAULT_LANE='sms'"):
        load_settings(sms_default_lane="sms")


# --- every setting, every shape of mistake: one line naming the variable, never a traceback ----------
# A wrong value for each setting; the test below checks the table covers every one of them.
BAD_VALUES: dict[str, str] = {
    "ICOMM_BASE_URL": "ftp://apisms.example.com",
    "ICOMM_API_KEY": "two words",
    "ICOMM_CONNECT_TIMEOUT_S": "0",
    "ICOMM_READ_TIMEOUT_S": "soon",
    "ICOMM_WRITE_TIMEOUT_S": "-1",
    "ICOMM_POOL_TIMEOUT_S": "nan",
    "ICOMM_MAX_CONNECTIONS": "1.5",
    "ICOMM_SEND_RETRY_ATTEMPTS": "0",
    "ICOMM_RETRY_BACKOFF_BASE_S": "inf",
    "ICOMM_RETRY_BACKOFF_MAX_S": "five",
    "REDIS_URL": "localhost:6379",
    "SMS_KEY_PREFIX": "two words",
    "SMS_REDIS_ALLOW_VOLATILE": "maybe",
    "SMS_MESSAGE_ID_PREFIX": "x" * 41,
    "SMS_LANES": '{"otp":',
    "SMS_DEFAULT_LANE": "sms",
    "SMS_DEFAULT_SENDER": "x" * 65,
    "SMS_RATE_LIMIT_MPS": "-5",
    "SMS_RATE_LIMIT_RPS": "inf",
    "SMS_RATE_LIMIT_BURST_S": "0",
    "SMS_LEASE_S": "10",
    "SMS_MAX_ATTEMPTS": "0",
    "SMS_RETRY_HORIZON_S": "inf",
    "SMS_RECONCILE_DELAY_S": "-1",
    "SMS_SEND_WINDOW_S": "0",
    "SMS_RECONCILE_WINDOW_S": "1",
    "SMS_RECONCILE_CHECKS": "21",
    "SMS_AUTH_PAUSE_S": "0",
    "SMS_OUTAGE_PAUSE_S": "ten",
    "SMS_LOGS_RATE_PER_MIN": "0",
    "SMS_IDEMPOTENCY_TTL_S": "59",
    "SMS_STATE_TTL_S": "10",
    "SMS_METADATA_MAX_BYTES": "-1",
    "SMS_MAX_TEXT_PARTS": "256",
    "SMS_DISPATCH_TICK_MS": "5",
    "SMS_SCHEDULE_HORIZON_S": "30",
    "SMS_EVENTS_STREAM_MAXLEN": "10",
    "SMS_EVENTS_DRAMATIQ_QUEUE": "two words",
    "SMS_EVENTS_DRAMATIQ_ACTOR": "handle_sms_status",  # without its queue
    "SMS_REPORTS_DRAIN_INTERVAL_S": "0",
    "SMS_REPORTS_ENTITY_ID": "x" * 256,
    "SMS_REPORTS_APPLICATION_ID": "x" * 256,
    "SMS_REPORTS_CAMPAIGN_REFERENCE_ID": "x" * 256,
    "SMS_REPORT_PARK_TIMEOUT_S": "inf",
    "SMS_UNKNOWN_REPORTS": "keep",
    "SMS_NO_REPORT_GRACE_S": "-1",
    "SMS_REPORT_LOOKUP_AFTER_S": "inf",
    "SMS_REPORT_LOOKUP_BATCH": "-1",
    "SMS_WEBHOOK_PUBLIC_URL": "sms-worker.example.com",
    "SMS_WEBHOOK_PATH": "webhooks",
    "SMS_WEBHOOK_SECRET": "short",
    "SMS_ACCOUNTS": '{"marketing": {"api_key_env": "MARKETING_ICOMM_API_KEY"}}',
    "SMS_ACCOUNT_DAILY_CAP": '{"messages": 0}',
    "SMS_WEBHOOK_AUTH": "carrier-pigeon",
    "SMS_WEBHOOK_MAX_BODY_BYTES": "10",
    "SMS_SHUTDOWN_TIMEOUT_S": "0",
    "SMS_METRICS_PORT": "70000",
    "LOG_FORMAT": "xml",
    "LOG_LEVEL": "LOUD",
}

# Each shape a mistake in SMS_LANES can take, and what its one line must say.
BAD_LANES: list[tuple[str, str]] = [
    ('{"otp":', "is not valid JSON"),
    ("otp=100", "is not valid JSON"),
    ("[1, 2]", "must be a JSON object of lanes"),
    ('"otp"', "must be a JSON object of lanes"),
    ("5", "must be a JSON object of lanes"),
    ("{}", "at least one lane is needed"),
    ('{"otp": 5}', "lane 'otp' must be a JSON object"),
    ('{"otp": null}', "lane 'otp' must be a JSON object"),
    ('{"otp": {"batch_size": "many"}}', "lane 'otp': batch_size='many'"),
    ('{"otp": {"batch_size": 0}}', "lane 'otp': batch_size=0"),
    ('{"otp": {"batch_size": 1.5}}', "lane 'otp': batch_size=1.5"),
    ('{"otp": {"concurrency": true}}', "not true or false"),
    ('{"otp": {"rate_share": NaN}}', "finite number"),
    ('{"otp": {"rate_share": 1e999}}', "finite number"),
    ('{"otp": {"batchsize": 10}}', "unknown key 'batchsize' (did you mean batch_size?"),
    ('{"OTP!": {}}', "lane name 'OTP!'"),
    ('{"alerts": {}}', "SMS_DEFAULT_LANE='bulk' is not one of SMS_LANES (alerts)"),
]


def test_the_table_has_a_mistake_for_every_setting() -> None:
    assert set(BAD_VALUES) == {name.upper() for name in Settings.model_fields}


@pytest.mark.parametrize(("variable", "value"), sorted(BAD_VALUES.items()))
def test_each_setting_s_mistake_is_one_line_naming_it(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    [line] = str(caught.value).splitlines()
    assert line.startswith(variable), line
    if variable in {"ICOMM_API_KEY", "SMS_WEBHOOK_SECRET"}:
        assert value not in line  # a secret is never echoed


@pytest.mark.parametrize(("value", "said"), BAD_LANES)
def test_each_shape_of_a_wrong_sms_lanes_is_one_line(monkeypatch: pytest.MonkeyPatch, value: str, said: str) -> None:
    monkeypatch.setenv("SMS_LANES", value)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    [line] = str(caught.value).splitlines()
    assert "SMS_LANES" in line and said in line, line


def test_two_mistakes_in_one_lane_are_two_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SMS_LANES", '{"otp": {"batch_size": 0, "max_wait": 5}, "bulk": {}}')
    with pytest.raises(ConfigError) as caught:
        load_settings()
    lines = str(caught.value).splitlines()
    assert len(lines) == 2 and all(line.startswith("SMS_LANES: lane 'otp'") for line in lines), lines
    assert "did you mean max_wait_ms?" in lines[1]


def test_settings_from_env_names_a_broken_json_too() -> None:
    """The mapping form (demo, tests, tools) reports SMS_LANES like the environment does, not as a JSONDecodeError."""
    with pytest.raises(ConfigError, match=r"^SMS_LANES='\{\"otp\":': is not valid JSON"):
        settings_from_env({"SMS_LANES": '{"otp":'})


def test_a_redis_password_is_not_echoed_in_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://user:hunter2-secret@127.0.0.1:port/0")
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert "hunter2-secret" not in str(caught.value) and "REDIS_URL='redis://user:***@" in str(caught.value)


@pytest.mark.parametrize("url", ["redis://127.0.0.1:99999/0", "redis://127.0.0.1:6379/zero", "redis://", "unix://"])
def test_a_redis_url_redis_py_would_misread_is_refused(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    """redis-py ignores a database that is no number and fails only at connect on a bad port."""
    monkeypatch.setenv("REDIS_URL", url)
    with pytest.raises(ConfigError, match=r"^REDIS_URL="):
        load_settings()


def test_a_public_webhook_url_needs_a_secret_and_a_url_secret_must_be_url_safe() -> None:
    with pytest.raises(ConfigError, match="SMS_WEBHOOK_PUBLIC_URL is set, so SMS_WEBHOOK_SECRET is needed"):
        load_settings(sms_webhook_public_url="https://sms.example.com")
    with pytest.raises(ConfigError, match="SMS_WEBHOOK_AUTH=path puts SMS_WEBHOOK_SECRET in the webhook URL"):
        load_settings(sms_webhook_secret="slash/and?query#0123456789", sms_webhook_auth="path")
    assert load_settings(sms_webhook_secret="base64+secret/value==", sms_webhook_auth="header").webhook_secret()


def test_empty_values_mean_unset_and_log_level_takes_any_case(monkeypatch: pytest.MonkeyPatch) -> None:
    """`SMS_SEND_WINDOW_S=` (as config/example.env writes it) is the default, not a parse error."""
    for name in ("SMS_SEND_WINDOW_S", "SMS_DEFAULT_SENDER", "SMS_LANES", "SMS_WEBHOOK_PUBLIC_URL"):
        monkeypatch.setenv(name, "")
    monkeypatch.setenv("LOG_LEVEL", "warning")
    settings = load_settings()
    assert settings.sms_send_window_s is None and settings.sms_default_sender is None
    assert set(settings.sms_lanes) == {"otp", "bulk"} and settings.log_level == "WARNING"
