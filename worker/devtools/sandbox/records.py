"""What the sandbox remembers about each accepted message, and lazy readers of its request fields."""

from __future__ import annotations

from typing import Any, Final

# One accepted destination is a plain list indexed by the constants below, not an object:
# the sandbox creates ~150k of them per second, and a list display costs ~80 ns where a
# slotted class's __init__ costs ~420 ns (measured on the 2-core target box). It keeps only
# what reports and logs need, so most of the parsed request is freed with the request (less
# memory per message); a message with options or webhooks keeps its whole dict in EXTRA.
Record = list[Any]

MESSAGE_ID: Final = 0  # str
TO: Final = 1  # str
SENDER: Final = 2  # str | None
CONTENT: Final = 3  # the content dict as sent
EXTRA: Final = 4  # the SmsMessage dict when it has options or webhooks, else None
BULK: Final = 5  # (bulkId, sentAt, acceptedAt; unix seconds), shared by the request's records
COUNT: Final = 6  # messageCount (SMS parts)
STATE: Final = 7  # one of the lifecycle states below
STATUS: Final = 8  # final MessageStatus dict, None while pending
ERROR: Final = 9  # final MessageError dict, None while pending
DONE_AT: Final = 10  # unix seconds the outcome happened (0.0 while pending)
PREV: Final = 11  # earlier record with the same messageId (only when duplicates are let through)

# Report lifecycle (record[STATE]).
SCHEDULED: Final = 0  # waiting for its report to be generated
UNFETCHED: Final = 1  # report waits in the GET /sms/3/reports queue
FETCHED: Final = 2  # report was returned by GET /sms/3/reports
WEBHOOK: Final = 3  # report waits to be pushed to webhooks.delivery.url
PUSHED: Final = 4  # report was pushed (answered 200)
SILENT: Final = 5  # webhooks.delivery.notify was false: no report at all
DROPPED: Final = 6  # push refused (non-loopback URL) or gave up after retries


def bulk_id(record: Record) -> str:
    """The record's bulkId."""
    result: str = record[BULK][0]
    return result


def sent_at(record: Record) -> float:
    """When the message was (or is scheduled to be) sent, unix seconds."""
    result: float = record[BULK][1]
    return result


def accepted_at(record: Record) -> float:
    """When the sandbox accepted the message, unix seconds (before sentAt for a scheduled send)."""
    result: float = record[BULK][2]
    return result


def sender(record: Record) -> str | None:
    """The message's sender, if given."""
    result: str | None = record[SENDER]
    return result


def _part(record: Record, name: str) -> dict[str, Any]:
    extra = record[EXTRA]
    found = extra.get(name) if extra is not None else None
    return found if found else {}


def platform(record: Record) -> dict[str, Any]:
    """The message's options.platform ({} when absent)."""
    found = _part(record, "options").get("platform")
    return found if found else {}


def campaign_reference_id(record: Record) -> str | None:
    """The message's options.campaignReferenceId."""
    result: str | None = _part(record, "options").get("campaignReferenceId")
    return result


def callback_data(record: Record) -> str | None:
    """The message's webhooks.callbackData."""
    result: str | None = _part(record, "webhooks").get("callbackData")
    return result


def delivery(record: Record) -> tuple[str | None, bool]:
    """(webhooks.delivery.url, notify) where notify is False only when explicitly false."""
    found = _part(record, "webhooks").get("delivery")
    if not found:
        return None, True
    return found.get("url"), found.get("notify") is not False
