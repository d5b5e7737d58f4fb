"""The typed answers of a send and of a logs GET, and the parsing of their 2xx bodies.

A 2xx body that does not parse is `ProviderAmbiguous`: the provider answered, so it may have acted
(for a send, the bulk may have been accepted; reconcile before any resend). Delivery reports are not
parsed here: their pages are stored raw and parsed by `worker.reports`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final

import httpx
import orjson

from worker.errors import ProviderAmbiguous
from worker.statuses import DUPLICATE_MESSAGE_ID, GROUP_BY_ID

_SNIPPET_CHARS = 500
# worker.statuses' table as plain strings both ways: a parsed status carries the provider's spelling.
_NAME_BY_ID: Final[dict[int, str]] = {group_id: group.value for group_id, group in GROUP_BY_ID.items()}
_ID_BY_NAME: Final[dict[str, int]] = {name: group_id for group_id, name in _NAME_BY_ID.items()}


@dataclass(frozen=True, slots=True)
class MessageStatus:
    group_id: int
    group_name: str
    id: int | None
    name: str
    description: str
    action: str | None = None

    def to_wire(self) -> dict[str, Any]:
        """The API's camelCase status object (what status events carry); built by hand, as it
        runs once per message sent."""
        wire: dict[str, Any] = {"groupId": self.group_id, "groupName": self.group_name}
        if self.id is not None:
            wire["id"] = self.id
        wire["name"] = self.name
        wire["description"] = self.description
        if self.action is not None:
            wire["action"] = self.action
        return wire


@dataclass(frozen=True, slots=True)
class MessageError:
    group_id: int | None
    group_name: str | None
    id: int | None
    name: str | None
    description: str | None
    permanent: bool | None


@dataclass(frozen=True, slots=True)
class MessagePrice:
    price_per_message: float | None
    currency: str | None


@dataclass(frozen=True, slots=True)
class PlatformIds:
    entity_id: str | None
    application_id: str | None


@dataclass(frozen=True, slots=True)
class SendResult:
    message_id: str | None
    destination: str | None
    status: MessageStatus
    message_count: int | None


@dataclass(frozen=True, slots=True)
class SendResponse:
    bulk_id: str | None
    messages: list[SendResult]
    elapsed_s: float  # of the attempt that succeeded, not of the waits before it


@dataclass(frozen=True, slots=True)
class LogEntry:
    message_id: str
    bulk_id: str | None
    destination: str | None
    sender: str | None
    sent_at: str | None  # the provider's strings: their offset style varies
    done_at: str | None
    status: MessageStatus | None  # a log without a readable status still proves the send happened
    error: MessageError | None
    price: MessagePrice | None
    mcc_mnc: str | None
    message_count: int | None
    platform: PlatformIds | None
    campaign_reference_id: str | None
    raw: dict[str, Any] = field(repr=False)


def is_duplicate(entry: LogEntry) -> bool:
    """A resend the provider rejected because it had seen the message id before."""
    return entry.status is not None and entry.status.name == DUPLICATE_MESSAGE_ID


def snippet(raw: bytes | str) -> str:
    """The start of a body, for an error to quote."""
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    return text[:_SNIPPET_CHARS]


def parse_send(endpoint: str, response: httpx.Response, elapsed_s: float) -> SendResponse:
    try:
        data = orjson.loads(response.content)
        results = []
        for item in data["messages"]:
            status = _status(item.get("status"))
            if status is None:
                raise ValueError("a message has no readable status")
            details = item.get("details")
            count = _int(details, "messageCount") if isinstance(details, dict) else None
            results.append(SendResult(_str(item, "messageId"), _str(item, "destination"), status, count))
        bulk_id = _str(data, "bulkId")
    except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError, ValueError) as exc:
        raise ProviderAmbiguous(
            f"{endpoint} answered {response.status_code} with an unreadable body ({type(exc).__name__}); "
            "the provider may have acted",
            status_code=response.status_code, body=snippet(response.content),
        ) from None
    return SendResponse(bulk_id, results, elapsed_s)


def parse_logs(endpoint: str, response: httpx.Response) -> list[LogEntry]:
    try:
        data = orjson.loads(response.content)
        results = data["results"]
        if not isinstance(results, list):
            raise TypeError("results is not a list")
    except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
        raise ProviderAmbiguous(
            f"{endpoint} answered {response.status_code} with an unreadable body ({type(exc).__name__})",
            status_code=response.status_code, body=snippet(response.content),
        ) from None
    entries = []
    for item in results:
        # Reconciliation looks logs up by messageId; an entry without one answers nothing.
        if not isinstance(item, dict) or not (message_id := _str(item, "messageId")):
            continue
        entries.append(
            LogEntry(
                message_id=message_id, bulk_id=_str(item, "bulkId"), destination=_str(item, "destination"),
                sender=_str(item, "sender"), sent_at=_str(item, "sentAt"), done_at=_str(item, "doneAt"),
                status=_status(item.get("status")), error=_error(item.get("error")),
                price=_price(item.get("price")), mcc_mnc=_str(item, "mccMnc"),
                message_count=_int(item, "messageCount"), platform=_platform(item.get("platform")),
                campaign_reference_id=_str(item, "campaignReferenceId"), raw=item,
            )
        )
    return entries


def _str(data: dict[str, Any], key: str) -> str | None:
    value = data.get(key)
    return value if isinstance(value, str) else None


def _int(data: dict[str, Any], key: str) -> int | None:
    value = data.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _status(value: object) -> MessageStatus | None:
    if not isinstance(value, dict):
        return None
    group_id, group_name = _int(value, "groupId"), _str(value, "groupName")
    # Either half of the group identifies it; fill the other from the documented table. A name this
    # code does not know is kept as the provider spelt it (it is quoted, never decided on, here).
    if group_name is None and group_id is not None:
        group_name = _NAME_BY_ID.get(group_id)
    if group_id is None and group_name is not None:
        group_id = _ID_BY_NAME.get(group_name)
    if group_id is None or group_name is None:
        return None
    return MessageStatus(
        group_id, group_name, _int(value, "id"), _str(value, "name") or "", _str(value, "description") or "",
        _str(value, "action"),
    )


def _error(value: object) -> MessageError | None:
    if not isinstance(value, dict):
        return None
    permanent = value.get("permanent")
    return MessageError(
        _int(value, "groupId"), _str(value, "groupName"), _int(value, "id"), _str(value, "name"),
        _str(value, "description"), permanent if isinstance(permanent, bool) else None,
    )


def _price(value: object) -> MessagePrice | None:
    if not isinstance(value, dict):
        return None
    amount = value.get("pricePerMessage")
    number = float(amount) if isinstance(amount, int | float) and not isinstance(amount, bool) else None
    return MessagePrice(number, _str(value, "currency"))


def _platform(value: object) -> PlatformIds | None:
    if not isinstance(value, dict):
        return None
    return PlatformIds(_str(value, "entityId"), _str(value, "applicationId"))
