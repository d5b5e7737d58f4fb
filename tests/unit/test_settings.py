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
    text = str(caught.value)
    assert "2 configuration problem(s)" in text
    assert "ICOMM_READ_TIMEOUT_S='soon'" in text and "example: ICOMM_READ_TIMEOUT_S=15" in text
    assert "REDIS_URL='localhost:6379'" in text and "redis://" in text


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
