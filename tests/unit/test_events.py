"""Status events: the timestamp every event carries."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import pytest

from worker import events


@pytest.mark.parametrize("ms", [1764234513000, 1764234513001, 1764234513886, 1764234513999])
def test_now_iso_is_the_millisecond_in_utc(monkeypatch: pytest.MonkeyPatch, ms: int) -> None:
    """Exact to the millisecond (no float rounding), and a cached value never outlives its ms."""
    monkeypatch.setattr(time, "time_ns", lambda: ms * 1_000_000 + 999_999)
    expected = datetime.fromtimestamp(ms // 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S") + f".{ms % 1000:03d}Z"
    assert events.now_iso() == expected
    monkeypatch.setattr(time, "time_ns", lambda: (ms + 1) * 1_000_000)
    assert events.now_iso() != expected
