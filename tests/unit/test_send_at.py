"""A job's `send_at`: RFC 3339 with an offset, parsed to the same instant whatever its zone; both
job paths (pydantic and the plain fast path) agree on it."""

from __future__ import annotations

import pytest

from worker.errors import JobValidationError
from worker.models import encode_plain_job, parse_send_at, plain_job, validate_job

LIMITS = {"max_text_parts": 25, "metadata_max_bytes": 2048}
NOON_UTC = 1_796_126_400_000  # 2026-12-01T12:00:00Z


@pytest.mark.parametrize(("text", "ms"), [
    ("2026-12-01T12:00:00Z", NOON_UTC),
    ("2026-12-01t12:00:00z", NOON_UTC),
    ("2026-12-01 13:00:00+01:00", NOON_UTC),
    ("2026-12-01T06:30:00-05:30", NOON_UTC),
    ("2026-12-01T12:00:00.5Z", NOON_UTC + 500),
    ("2026-12-01T12:00:00.123456789+00:00", NOON_UTC + 123),
])
def test_the_same_instant_in_any_offset(text: str, ms: int) -> None:
    assert parse_send_at(text) == ms


@pytest.mark.parametrize(("text", "says"), [
    ("2026-12-01T12:00:00", "no UTC offset"),
    ("2026-12-01T12:00:00.25", "no UTC offset"),
    ("2026-12-01T12:00Z", "RFC 3339"),
    ("2026-12-01", "RFC 3339"),
    ("2026-12-01T12:00:00Z\n", "RFC 3339"),
    ("2026-12-01T12:00:00+0100", "RFC 3339"),
    ("2026-12-01T12:00:00 UTC", "RFC 3339"),
    ("in 5 minutes", "RFC 3339"),
    ("2026-02-29T12:00:00Z", "not a valid date-time"),
    ("2026-12-01T24:00:00Z", "not a valid date-time"),
    ("2026-12-01T12:00:00+24:00", "not a valid date-time"),
])
def test_malformed_or_naive_times_are_refused_saying_why(text: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        parse_send_at(text)
    with pytest.raises(JobValidationError) as refused:
        validate_job({"to": "41790000001", "text": "x", "send_at": text}, **LIMITS)
    [problem] = refused.value.problems
    assert problem.field == "send_at" and says in problem.message


def test_a_job_with_send_at_takes_the_pydantic_path_and_keeps_it() -> None:
    job = {"to": "+41790000001", "text": "x", "send_at": "2026-12-01T12:00:00Z"}
    assert plain_job(job, json_size=80, **LIMITS) is None
    assert encode_plain_job(job, **LIMITS) is None
    valid = validate_job(job, **LIMITS)
    assert valid.send_at == "2026-12-01T12:00:00Z" and valid.to == "41790000001"
    assert validate_job({"to": "41790000001", "text": "x", "send_at": None}, **LIMITS).send_at is None
