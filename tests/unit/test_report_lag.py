"""The report-lag histogram: the provider's doneAt (its own date format) to the moment we applied it."""

from __future__ import annotations

from datetime import UTC, datetime

from worker import metrics
from worker.reports.process import _observe_lag


def _count_and_sum() -> tuple[float, float]:
    samples = {s.name: s.value for m in metrics.REPORT_LAG.collect() for s in m.samples}
    return samples["sms_report_lag_seconds_count"], samples["sms_report_lag_seconds_sum"]


def test_the_api_date_format_is_read_and_the_lag_observed() -> None:
    count, total = _count_and_sum()
    now = datetime(2026, 11, 27, 10, 0, 2, 500_000, tzinfo=UTC).timestamp()
    _observe_lag("2026-11-27T10:00:00.000+0000", now)
    _observe_lag("2026-11-27T11:00:00.000+0100", now)  # the same instant in another zone
    new_count, new_total = _count_and_sum()
    assert new_count == count + 2
    assert abs((new_total - total) - 5.0) < 1e-6


def test_unreadable_or_zoneless_dates_are_skipped() -> None:
    count, _ = _count_and_sum()
    for value in ("yesterday", "2026-11-27T10:00:00.000", None, 17):
        _observe_lag(value, 0.0)
    assert _count_and_sum()[0] == count
