"""Log redaction: secrets never reach a log line, phone numbers are masked, ids are left alone."""

from __future__ import annotations

import json
import logging

import pytest
import structlog

from worker import logs
from worker.logs import Redactor, mask_phone


@pytest.mark.parametrize(
    ("number", "masked"),
    [("41793026727", "41*******27"), ("+14155550123", "+1********23"), ("358401234567", "358*******67")],
)
def test_phone_numbers_keep_country_code_and_last_two_digits(number: str, masked: str) -> None:
    """Masking keeps the country code and the last two digits only."""
    assert mask_phone(number) == masked


def test_redactor_removes_secrets_and_masks_numbers_everywhere() -> None:
    """Secrets inside nested values and free text are replaced; numbers in text are masked."""
    redact = Redactor(["api-key-0123456789", "hook-secret-xyz"])
    event = redact(None, "info", {
        "event": "sent to 41793026727 with App api-key-0123456789",
        "to": "41793026727",
        "nested": {"url": "http://icomm:hook-secret-xyz@127.0.0.1/x", "destination": "+41793026727"},
        "message_id": "sw-bulk-1764230000000-0",
        "entry": "1764230000000-0",
    })
    text = json.dumps(event)
    assert "api-key-0123456789" not in text and "hook-secret-xyz" not in text
    assert "41793026727" not in text
    assert event["to"] == "41*******27"
    assert event["message_id"] == "sw-bulk-1764230000000-0"
    assert event["entry"] == "1764230000000-0"


def test_stdlib_records_and_exceptions_are_redacted_in_json(capsys: pytest.CaptureFixture[str]) -> None:
    """A foreign library's record and a traceback that quote the key come out redacted, as JSON."""
    # Not cached: cached loggers would keep this chain for the session, out of later capture_logs' reach.
    logs.configure(fmt="json", level="INFO", secrets=["api-key-0123456789"], cache=False)
    logging.getLogger("dramatiq.worker").warning("auth header App api-key-0123456789 for 41793026727")
    try:
        raise RuntimeError("request failed: Authorization: App api-key-0123456789")
    except RuntimeError:
        structlog.get_logger("t").exception("send_failed")
    err = capsys.readouterr().err
    lines = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert len(lines) == 2
    assert "api-key-0123456789" not in err
    assert "41793026727" not in err
    assert lines[0]["logger"] == "dramatiq.worker"
    assert "[REDACTED]" in lines[1]["exception"]
