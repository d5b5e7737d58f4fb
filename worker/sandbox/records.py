"""What the sandbox remembers about each accepted message, and lazy readers of its request fields."""

from __future__ import annotations

from typing import Any, Final

# One accepted destination is a plain list indexed by the constants below, not an object:
# the sandbox creates ~150k of them per second, and a list display costs ~80 ns where a
# slotted class's __init__ costs ~420 ns (measured on the 2-core target box).
# Request-message fields (sender, platform, webhooks...) are not copied: the record keeps the
# parsed message dict and reads them when a report or log is built.
Record = list[Any]

MESSAGE_ID: Final = 0  # str
TO: Final = 1  # str
MESSAGE: Final = 2  # the parsed SmsMessage dict of the request
BULK: Final = 3  # (bulkId, sentAt unix seconds), shared by the request's records
COUNT: Final = 4  # messageCount (SMS parts)
STATE: Final = 5  # one of the lifecycle states below
STATUS: Final = 6  # final MessageStatus dict, None while pending
ERROR: Final = 7  # final MessageError dict, None while pending
DONE_AT: Final = 8  # unix seconds the outcome happened (0.0 while pending)
PREV: Final = 9  # earlier record with the same messageId (only when duplicates are let through)

# Report lifecycle (record[STATE]).
SCHEDULED: Final = 0  # waiting for its report to be generated
UNFETCHED: Final = 1  # report waits in the GET /sms/3/reports queue
FETCHED: Final = 2  # report was returned by GET /sms/3/reports
WEBHOOK: Final = 3  # report waits to be pushed to webhooks.delivery.url
PUSHED: Final = 4  # report was pushed (answered 200)
SILENT: Final = 5  # webhooks.delivery.notify was false: no report at all
DROPPED: Final = 6  # push refused (non-loopback URL) or gave up after retries


def new_record(
    message_id: str, to: str, message: dict[str, Any], bulk: tuple[str, float], count: int
) -> Record:
    """A freshly accepted destination (the hot path inlines this list display)."""
    return [message_id, to, message, bulk, count, SCHEDULED, None, None, 0.0, None]


def bulk_id(record: Record) -> str:
    """The record's bulkId."""
    result: str = record[BULK][0]
    return result


def sent_at(record: Record) -> float:
    """When the message was (or is scheduled to be) sent, unix seconds."""
    result: float = record[BULK][1]
    return result


def _options(record: Record) -> dict[str, Any]:
    options = record[MESSAGE].get("options")
    return options if options else {}


def sender(record: Record) -> str | None:
    """The message's sender, if given."""
    result: str | None = record[MESSAGE].get("sender")
    return result


def platform(record: Record) -> dict[str, Any]:
    """The message's options.platform ({} when absent)."""
    found = _options(record).get("platform")
    return found if found else {}


def campaign_reference_id(record: Record) -> str | None:
    """The message's options.campaignReferenceId."""
    result: str | None = _options(record).get("campaignReferenceId")
    return result


def _webhooks(record: Record) -> dict[str, Any]:
    webhooks = record[MESSAGE].get("webhooks")
    return webhooks if webhooks else {}


def callback_data(record: Record) -> str | None:
    """The message's webhooks.callbackData."""
    result: str | None = _webhooks(record).get("callbackData")
    return result


def delivery(record: Record) -> tuple[str | None, bool]:
    """(webhooks.delivery.url, notify) where notify is False only when explicitly false."""
    found = _webhooks(record).get("delivery")
    if not found:
        return None, True
    return found.get("url"), found.get("notify") is not False


def content(record: Record) -> dict[str, Any]:
    """The message's content object as sent."""
    result: dict[str, Any] = record[MESSAGE]["content"]
    return result
