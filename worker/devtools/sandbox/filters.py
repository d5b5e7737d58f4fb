"""The filters of GET /sms/3/reports and GET /sms/3/logs, as tests on a record.

A query gets one test per filter it gives. The state picks the candidate records (from an index
when the query names ids) and keeps those that pass every test; a query with no filter has no tests.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from worker.devtools.sandbox import codes
from worker.devtools.sandbox import records as rec
from worker.devtools.sandbox.codes import mcc_mnc_for
from worker.devtools.sandbox.records import MESSAGE_ID, STATUS, TO, Record
from worker.devtools.sandbox.validation import LogsQuery, ReportsQuery

Check = Callable[[Record], bool]


def passes(record: Record, checks: Iterable[Check]) -> bool:
    """True when the record passes every test."""
    return all(check(record) for check in checks)


def _platform_checks(entity_id: str | None, application_id: str | None) -> list[Check]:
    """options.platform's entityId and applicationId, both filters of either endpoint."""
    checks: list[Check] = []
    if entity_id is not None:
        checks.append(lambda record: rec.platform(record).get("entityId") == entity_id)
    if application_id is not None:
        checks.append(lambda record: rec.platform(record).get("applicationId") == application_id)
    return checks


def report_checks(query: ReportsQuery) -> list[Check]:
    """The tests of a reports query; an empty list when it filters nothing."""
    bulk_id, message_id, campaign = query.bulk_id, query.message_id, query.campaign_reference_id
    checks: list[Check] = []
    if bulk_id is not None:
        checks.append(lambda record: rec.bulk_id(record) == bulk_id)
    if message_id is not None:
        checks.append(lambda record: record[MESSAGE_ID] == message_id)
    checks += _platform_checks(query.entity_id, query.application_id)
    if campaign is not None:
        checks.append(lambda record: rec.campaign_reference_id(record) == campaign)
    return checks


def _sent_between(since: float, until: float | None) -> Check:
    if until is None:
        return lambda record: rec.sent_at(record) >= since
    return lambda record: since <= rec.sent_at(record) <= until


def _network_check(mcc: str, mnc: str | None) -> Check:
    """The destination's network: its MCC, and its MNC too when one is given (an MNC alone filters nothing)."""
    if mnc is None:
        return lambda record: mcc_mnc_for(record[TO])[:3] == mcc
    return lambda record: (mcc_mnc := mcc_mnc_for(record[TO]))[:3] == mcc and mcc_mnc[3:] == mnc


def log_checks(query: LogsQuery, since: float) -> list[Check]:
    """The tests of a logs query, sent at `since` or later included (the query's messageIds pick the
    candidates, so they are no test here)."""
    bulk_ids, campaigns = set(query.bulk_ids), set(query.campaign_reference_ids)
    sender, destination, general_status = query.sender, query.destination, query.general_status
    checks = [_sent_between(since, query.sent_until)]
    if bulk_ids:
        checks.append(lambda record: rec.bulk_id(record) in bulk_ids)
    if campaigns:
        checks.append(lambda record: rec.campaign_reference_id(record) in campaigns)
    if sender is not None:
        checks.append(lambda record: rec.sender(record) == sender)
    if destination is not None:
        checks.append(lambda record: record[TO] == destination)
    checks += _platform_checks(query.entity_id, query.application_id)
    if general_status is not None:
        # A send without its outcome yet is PENDING, as its Log entry says.
        checks.append(lambda record: (record[STATUS] or codes.PENDING_ACCEPTED)["groupName"] == general_status)
    if query.mcc is not None:
        checks.append(_network_check(query.mcc, query.mnc))
    return checks
