"""The query strings of the two GETs (`/sms/3/reports`, `/sms/3/logs`), checked before any request is made.

A filter the API would refuse (a limit outside 1..1000, a joined filter over 2048 characters, an
mnc without its mcc, a naive datetime) is a ValueError here, so a bad one never costs a request
(the logs endpoint allows about two a second).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, Literal

from worker.provider.wire import drop_none
from worker.statuses import KNOWN_GROUPS, StatusGroup

REPORTS_PATH = "/sms/3/reports"
LOGS_PATH = "/sms/3/logs"
MAX_PAGE_SIZE = 1000  # reports and logs `limit`
MAX_FILTER_CHARS = 2048  # a comma-joined logs filter (`messageId`, `bulkId`, ...)
# The API's `generalStatus` filter: the names of worker.statuses.StatusGroup.
GeneralStatus = Literal["ACCEPTED", "PENDING", "UNDELIVERABLE", "DELIVERED", "EXPIRED", "REJECTED"]


def format_datetime(value: datetime) -> str:
    """`yyyy-MM-dd'T'HH:mm:ss.SSS+0000` in UTC; a naive datetime is refused rather than guessed."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"datetime {value.isoformat()} must be timezone-aware")
    value = value.astimezone(UTC)
    return f"{value:%Y-%m-%dT%H:%M:%S}.{value.microsecond // 1000:03d}+0000"


def reports_query(
    *,
    limit: int,
    bulk_id: str | None,
    message_id: str | None,
    entity_id: str | None,
    application_id: str | None,
    campaign_reference_id: str | None,
) -> dict[str, Any]:
    check_limit(limit)
    return drop_none(
        limit=limit, bulkId=bulk_id, messageId=message_id, entityId=entity_id,
        applicationId=application_id, campaignReferenceId=campaign_reference_id,
    )


def logs_query(
    *,
    message_id: Sequence[str],
    bulk_id: Sequence[str],
    campaign_reference_id: Sequence[str],
    mcc: str | None,
    mnc: str | None,
    sender: str | None,
    destination: str | None,
    general_status: GeneralStatus | None,
    sent_since: datetime | None,
    sent_until: datetime | None,
    limit: int | None,
    entity_id: str | None,
    application_id: str | None,
) -> dict[str, Any]:
    if mnc is not None and mcc is None:
        raise ValueError("the mnc filter requires mcc")
    if limit is not None:
        check_limit(limit)
    if general_status is not None and general_status not in KNOWN_GROUPS:
        raise ValueError(f"general_status must be one of {', '.join(StatusGroup)}")
    return drop_none(
        messageId=_joined("message_id", message_id), bulkId=_joined("bulk_id", bulk_id),
        campaignReferenceId=_joined("campaign_reference_id", campaign_reference_id),
        mcc=mcc, mnc=mnc, sender=sender, destination=destination, generalStatus=general_status,
        sentSince=None if sent_since is None else format_datetime(sent_since),
        sentUntil=None if sent_until is None else format_datetime(sent_until),
        limit=limit, entityId=entity_id, applicationId=application_id,
    )


def chunk_message_ids(ids: Sequence[str]) -> list[list[str]]:
    """Split ids so each comma-joined chunk is at most 2048 characters (the logs filter limit)."""
    chunks: list[list[str]] = []
    current: list[str] = []
    size = 0
    for message_id in ids:
        if not message_id or "," in message_id or len(message_id) > MAX_FILTER_CHARS:
            raise ValueError(f"message id {message_id[:40]!r} is empty, contains ',' or is too long for logs")
        added = len(message_id) + (1 if current else 0)
        if current and (size + added > MAX_FILTER_CHARS or len(current) >= MAX_PAGE_SIZE):
            chunks.append(current)
            current, size, added = [], 0, len(message_id)
        current.append(message_id)
        size += added
    if current:
        chunks.append(current)
    return chunks


def check_limit(limit: int) -> None:
    if not 1 <= limit <= MAX_PAGE_SIZE:
        raise ValueError(f"limit must be between 1 and {MAX_PAGE_SIZE}, got {limit}")


def _joined(name: str, values: Sequence[str]) -> str | None:
    if isinstance(values, str):  # a lone string is a Sequence[str] too; do not split it into letters
        values = [values]
    if not values:
        return None
    joined = ",".join(values)
    if len(joined) > MAX_FILTER_CHARS:
        raise ValueError(f"{name} filter is {len(joined)} characters joined, the API takes at most 2048")
    return joined
