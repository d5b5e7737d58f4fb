"""An outbox entry's job as the send path reads it: checked and normalised, or why it cannot be sent."""

from __future__ import annotations

from typing import Any

import orjson

from worker.errors import JobValidationError
from worker.models import encode_job, parse_send_at, plain_job, validate_job


def parse_job(raw: bytes, *, max_text_parts: int, metadata_max_bytes: int) -> tuple[dict[str, Any], str | None]:
    """The job of an entry, or why it cannot be sent. Every entry is checked, also those written
    by the Python API, which validates too: anyone can write to the outbox with plain Redis
    commands, and one bad job must not fail its whole batch. The fast path costs ~2 us a job."""
    try:
        job = orjson.loads(raw)
    except orjson.JSONDecodeError as error:
        return {}, f"job is not JSON: {error}"
    if not isinstance(job, dict):
        return {}, "job is not a JSON object"
    fast = plain_job(job, max_text_parts=max_text_parts, metadata_max_bytes=metadata_max_bytes, json_size=len(raw))
    if fast is not None:
        return fast, None
    try:
        valid = validate_job(job, max_text_parts=max_text_parts, metadata_max_bytes=metadata_max_bytes)
    except JobValidationError as error:
        return job, str(error)
    return orjson.loads(encode_job(valid)), None


def later_than(job: dict[str, Any], now_ms: int, horizon_s: int) -> tuple[int | None, str | None]:
    """(due ms, None) for a checked job whose send_at is after `now_ms`; (None, why) for one beyond
    the horizon; (None, None) for one to send now. A producer writing the outbox with plain XADD may
    set any send_at; the Python API holds future ones in the schedule itself."""
    send_at = job.get("send_at")
    if not isinstance(send_at, str):
        return None, None
    due = parse_send_at(send_at)  # checked already by parse_job
    if due - now_ms > horizon_s * 1000:
        return None, f"send_at is beyond SMS_SCHEDULE_HORIZON_S ({horizon_s} s ahead at most)"
    return (due, None) if due > now_ms else (None, None)
