"""The icomm SMS API client: the only module that knows URLs, the `App` key header and the wire JSON.

Foreign outcomes are mapped into `worker.errors` here and nowhere else:

    httpx exception / HTTP answer                      worker.errors                       retried here
    ─────────────────────────────────────────────────  ──────────────────────────────────  ────────────
    2xx, body parsed                                   (result)
    2xx whose body does not parse (send, logs)         ProviderAmbiguous                   no
    400 (ApiError or legacy requestError body)         ProviderBadRequest(.violations)     no
    401, 403                                           ProviderAuthError                   no
    429                                                ProviderRateLimited(.retry_after_s)  yes
    503                                                ProviderNotActedOn(.retry_after_s)   yes
    ConnectError, ConnectTimeout, PoolTimeout,         ProviderNotActedOn                  yes
      ProxyError
    ReadTimeout, WriteTimeout, ReadError, WriteError,  ProviderAmbiguous                   no
      RemoteProtocolError, any other RequestError,
      500, 502, 504 and every other 5xx
    UnsupportedProtocol, LocalProtocolError,           ProviderError                       no
      any other status (3xx, 4xx)
    the send fence said no (send only, see below)      SendWindowClosed                    no

Only `ProviderNotActedOn` is retried (tenacity, full-jitter exponential backoff, at least the
`Retry-After` the provider asked for), never its `SendWindowClosed`. Everything else is the caller's
decision: an ambiguous send is reconciled through `GET /sms/3/logs` before any resend, and an
ambiguous `GET /sms/3/reports` may have handed out a page that will never be returned again.

The send fence. `send(..., fence=f)` calls `f()` once per HTTP attempt, at the last moment: from
httpcore's `trace` extension on `send_request_headers.started`, i.e. after the pool handed out a
connection and after it connected, immediately before the first byte of the request is written.
False (or an exception) aborts the attempt there: httpcore writes nothing and closes that connection
(its request cycle did not complete, so it is never reused), and `send` raises `SendWindowClosed`.
Before each retry's backoff sleep the fence is asked again, so a retry never sleeps past a closed
window. Headers and body are two socket writes; if more than `FENCE_WRITE_GRACE_S` passed from the
fence call to `send_request_body.started` (the process was paused in between), the body is not
written either: the server got headers announcing a Content-Length and then the end of the
connection, an incomplete request it cannot act on, and `send` raises `SendWindowClosed`. A
transport that does not emit trace events (`httpx.MockTransport` in tests) is asked right before the
request is handed to it instead. Nothing can fence a pause inside a single socket write; the batch
lease covers the write and read timeouts for that.

Pool healing. httpcore 1.0's sync ConnectionPool leaks a connection slot when a request's pool wait
times out just as another thread (releasing or dropping a connection) assigns it a NEW connection:
the request leaves, the connection stays in the pool as "CONNECTING" forever, never connected, never
idle, never closed (the race described in encode/httpcore#550, still in 1.0.9; process pauses make
it likely: on resume every waiter's deadline and every connection's fate are decided at once). Once
max_connections slots have leaked, every request ends in PoolTimeout. The Provider counts the
requests that really hold a connection (the first trace event of an attempt comes only after the
pool wait); a PoolTimeout while fewer than max_connections do, or while no request got a connection
for longer than one whole attempt can last, means the pool is stuck, and the httpx.Client is
replaced by a fresh one (warning `provider_pool_reset`, metric `sms_provider_pool_resets_total`).
The old client is closed by the last request still using it, never under a request in flight.
"""

from __future__ import annotations

import email.utils
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from types import TracebackType
from typing import Any, Literal, NotRequired, TypedDict

import httpx
import orjson
import structlog
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    retry_if_not_exception_type,
    wait_random_exponential,
)

from worker import metrics
from worker.errors import (
    ProviderAmbiguous,
    ProviderAuthError,
    ProviderBadRequest,
    ProviderError,
    ProviderNotActedOn,
    ProviderRateLimited,
    SendWindowClosed,
    Violation,
)
from worker.models import Job
from worker.settings import Settings

log = structlog.get_logger(__name__)

SEND_PATH = "/sms/3/messages"
REPORTS_PATH = "/sms/3/reports"
LOGS_PATH = "/sms/3/logs"
MAX_PAGE_SIZE = 1000  # reports and logs `limit`
MAX_FILTER_CHARS = 2048  # a comma-joined logs filter (`messageId`, `bulkId`, ...)
RETRY_WAIT_CEILING_S = 60.0
# From the fence call to the body write: longer means the process was paused or starved between the
# header write and the body write, and the body is not written (see the module docstring). The gap
# is normally microseconds; keep this well below the margin the fence's owner leaves between its own
# deadline and a takeover (worker.store.FENCE_MARGIN_MS, 1 s).
FENCE_WRITE_GRACE_S = 0.5
_SNIPPET_CHARS = 500
_DUPLICATE = "REJECTED_DUPLICATE_MESSAGE_ID"
_STATUS_GROUPS = dict(enumerate(["ACCEPTED", "PENDING", "UNDELIVERABLE", "DELIVERED", "EXPIRED", "REJECTED"]))
_STATUS_GROUP_IDS = {name: group for group, name in _STATUS_GROUPS.items()}
GeneralStatus = Literal["ACCEPTED", "PENDING", "UNDELIVERABLE", "DELIVERED", "EXPIRED", "REJECTED"]


# --- wire JSON (camelCase, as the API spells it) ---------------------------------------------------


class WireDestination(TypedDict):
    to: str
    messageId: str


class WireLanguage(TypedDict):
    languageCode: str
    singleShift: bool
    lockingShift: bool


class WireTextContent(TypedDict):
    text: str
    transliteration: NotRequired[str]
    language: NotRequired[WireLanguage]


class WireBinaryContent(TypedDict):
    hex: str
    dataCoding: int
    esmClass: int


class WireMessageOptions(TypedDict, total=False):
    platform: dict[str, str]
    validityPeriod: dict[str, Any]
    deliveryTimeWindow: dict[str, Any]
    campaignReferenceId: str
    regional: dict[str, dict[str, Any]]
    flash: bool


class WireDelivery(TypedDict, total=False):
    url: str
    intermediateReport: bool
    notify: bool


class WireWebhooks(TypedDict, total=False):
    delivery: WireDelivery
    contentType: str
    callbackData: str


class WireMessage(TypedDict):
    destinations: list[WireDestination]
    content: WireTextContent | WireBinaryContent
    sender: NotRequired[str]
    options: NotRequired[WireMessageOptions]
    webhooks: NotRequired[WireWebhooks]


class WireRequestOptions(TypedDict, total=False):
    schedule: dict[str, Any]
    tracking: dict[str, Any]
    includeSmsCountInResponse: bool
    conversionTracking: dict[str, Any]


class WireRequest(TypedDict):
    messages: list[WireMessage]
    options: NotRequired[WireRequestOptions]


@dataclass(frozen=True, slots=True)
class SendingSpeedLimit:
    amount: int
    time_unit: Literal["MINUTE", "HOUR", "DAY"] | None = None


@dataclass(frozen=True, slots=True)
class UrlTracking:
    shorten_url: bool | None = None
    track_clicks: bool | None = None
    tracking_url: str | None = None
    remove_protocol: bool | None = None
    custom_domain: str | None = None


@dataclass(frozen=True, slots=True)
class ConversionTracking:
    use_conversion_tracking: bool | None = None
    conversion_tracking_name: str | None = None


@dataclass(frozen=True, slots=True)
class RequestOptions:
    """Every top-level `options` field of a send request; None means "leave it to the API"."""

    bulk_id: str | None = None
    send_at: datetime | None = None
    sending_speed_limit: SendingSpeedLimit | None = None
    tracking: UrlTracking | None = None
    include_sms_count_in_response: bool | None = None
    conversion_tracking: ConversionTracking | None = None


def format_datetime(value: datetime) -> str:
    """`yyyy-MM-dd'T'HH:mm:ss.SSS+0000` in UTC; a naive datetime is refused rather than guessed."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"datetime {value.isoformat()} must be timezone-aware")
    value = value.astimezone(UTC)
    return f"{value:%Y-%m-%dT%H:%M:%S}.{value.microsecond // 1000:03d}+0000"


def _drop_none(**fields: Any) -> dict[str, Any]:
    return {key: value for key, value in fields.items() if value is not None}


def _wire_regional(regional: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    wire: dict[str, dict[str, Any]] = {}
    if (dlt := regional.get("india_dlt")) is not None:
        # The job takes an int (what producers have); the API schema says string.
        telemarketer = dlt.get("telemarketer_id")
        wire["indiaDlt"] = _drop_none(
            principalEntityId=dlt["principal_entity_id"],
            contentTemplateId=dlt.get("content_template_id"),
            telemarketerId=None if telemarketer is None else str(telemarketer),
        )
    if (iys := regional.get("turkey_iys")) is not None:
        wire["turkeyIys"] = _drop_none(recipientType=iys["recipient_type"], brandCode=iys.get("brand_code"))
    if (korea := regional.get("south_korea")) is not None:
        wire["southKorea"] = _drop_none(title=korea.get("title"), resellerCode=korea.get("reseller_code"))
    return wire


def _time_of_day(value: Mapping[str, Any]) -> dict[str, int]:
    return {"hour": value["hour"], "minute": value["minute"]}


def wire_message_from_dict(
    job: Mapping[str, Any],
    message_id: str,
    *,
    default_sender: str | None,
    webhook_url: str | None,
    notify: bool | None = None,
) -> WireMessage:
    """One `SmsMessage` from a validated job in its stored form (`encode_job`: snake_case, `from`).

    Plain dict building, no pydantic: dispatch calls this for up to ~50k messages a second.
    """
    content: WireTextContent | WireBinaryContent
    if (text := job.get("text")) is not None:
        wire_text: WireTextContent = {"text": text}
        if (transliteration := job.get("transliteration")) is not None:
            wire_text["transliteration"] = transliteration
        if (lang := job.get("language")) is not None:
            wire_text["language"] = {
                "languageCode": lang["language_code"],
                "singleShift": lang.get("single_shift", False),
                "lockingShift": lang.get("locking_shift", False),
            }
        content = wire_text
    elif (binary := job.get("binary")) is not None:
        content = {
            "hex": binary["hex"],
            "dataCoding": binary.get("data_coding", 0),
            "esmClass": binary.get("esm_class", 0),
        }
    else:
        raise ValueError("job has neither text nor binary content")
    to: str = job["to"]
    destination: WireDestination = {"to": to.removeprefix("+"), "messageId": message_id}
    message: WireMessage = {"destinations": [destination], "content": content}
    sender = job.get("sender")
    if sender is None:
        sender = default_sender
    if sender is not None:
        message["sender"] = sender

    options: WireMessageOptions = {}
    if (platform := job.get("platform")) is not None:
        wire_platform = _drop_none(
            entityId=platform.get("entity_id"), applicationId=platform.get("application_id")
        )
        if wire_platform:
            options["platform"] = wire_platform
    if (validity := job.get("validity_period")) is not None:
        options["validityPeriod"] = {
            "amount": validity["amount"], "timeUnit": validity.get("time_unit", "MINUTES"),
        }
    if (window := job.get("delivery_time_window")) is not None:
        wire_window: dict[str, Any] = {"days": list(window["days"])}
        if (start := window.get("from")) is not None:
            wire_window["from"] = _time_of_day(start)
        if (stop := window.get("to")) is not None:
            wire_window["to"] = _time_of_day(stop)
        options["deliveryTimeWindow"] = wire_window
    if (campaign := job.get("campaign_reference_id")) is not None:
        options["campaignReferenceId"] = campaign
    if (regional := job.get("regional")) is not None and (wire_regional := _wire_regional(regional)):
        options["regional"] = wire_regional
    if (flash := job.get("flash")) is not None:
        options["flash"] = flash
    if options:
        message["options"] = options

    webhooks: WireWebhooks = {}
    delivery: WireDelivery = {}
    if webhook_url is not None:
        delivery["url"] = webhook_url
        webhooks["contentType"] = "application/json"  # the webhook parser reads JSON only
    if notify is not None:
        delivery["notify"] = notify
    if delivery:
        webhooks["delivery"] = delivery
    if (callback_data := job.get("callback_data")) is not None:
        webhooks["callbackData"] = callback_data
    if webhooks:
        message["webhooks"] = webhooks
    return message


def wire_message(
    job: Job,
    message_id: str,
    *,
    default_sender: str | None,
    webhook_url: str | None,
    notify: bool | None = None,
) -> WireMessage:
    """One `SmsMessage` for one `Job` model (one `model_dump`, then the dict path)."""
    return wire_message_from_dict(
        job.model_dump(exclude_none=True, by_alias=True), message_id,
        default_sender=default_sender, webhook_url=webhook_url, notify=notify,
    )


def wire_request(messages: list[WireMessage], options: RequestOptions | None = None) -> WireRequest:
    """The `SmsRequestEnvelope` for one bulk POST."""
    request: WireRequest = {"messages": messages}
    if options is None:
        return request
    wire: WireRequestOptions = {}
    if options.bulk_id is not None and len(options.bulk_id) > 100:
        raise ValueError(f"bulk_id is {len(options.bulk_id)} characters, the API takes at most 100")
    speed = options.sending_speed_limit
    schedule = _drop_none(
        bulkId=options.bulk_id,
        sendAt=None if options.send_at is None else format_datetime(options.send_at),
        sendingSpeedLimit=None if speed is None else _drop_none(
            amount=speed.amount, timeUnit=speed.time_unit
        ),
    )
    if schedule:
        wire["schedule"] = schedule
    if (url := options.tracking) is not None:
        wire["tracking"] = _drop_none(
            shortenUrl=url.shorten_url,
            trackClicks=url.track_clicks,
            trackingUrl=url.tracking_url,
            removeProtocol=url.remove_protocol,
            customDomain=url.custom_domain,
        )
    if options.include_sms_count_in_response is not None:
        wire["includeSmsCountInResponse"] = options.include_sms_count_in_response
    if (conversion := options.conversion_tracking) is not None:
        wire["conversionTracking"] = _drop_none(
            useConversionTracking=conversion.use_conversion_tracking,
            conversionTrackingName=conversion.conversion_tracking_name,
        )
    if wire:
        request["options"] = wire
    return request


def encode_request(request: WireRequest) -> bytes:
    """The exact bytes `send` POSTs (batching uses it to respect a byte cap)."""
    return orjson.dumps(request)


# --- typed answers --------------------------------------------------------------------------------


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
class DeliveryReport:
    message_id: str
    status: MessageStatus
    bulk_id: str | None
    to: str | None
    sender: str | None
    sent_at: str | None  # the provider's strings: their offset style varies
    done_at: str | None
    message_count: int | None
    mcc_mnc: str | None
    callback_data: str | None
    price: MessagePrice | None
    error: MessageError | None
    platform: PlatformIds | None
    campaign_reference_id: str | None
    raw: dict[str, Any] = field(repr=False)


@dataclass(frozen=True, slots=True)
class ReportReject:
    """A report item that cannot be processed; the caller dead-letters it with the reason."""

    item: object
    reason: str


@dataclass(frozen=True, slots=True)
class ReportsPage:
    reports: list[DeliveryReport]
    rejects: list[ReportReject]


@dataclass(frozen=True, slots=True)
class LogEntry:
    message_id: str
    bulk_id: str | None
    destination: str | None
    sender: str | None
    sent_at: str | None
    done_at: str | None
    status: MessageStatus | None  # a log without a readable status still proves the send happened
    error: MessageError | None
    price: MessagePrice | None
    mcc_mnc: str | None
    message_count: int | None
    platform: PlatformIds | None
    campaign_reference_id: str | None
    raw: dict[str, Any] = field(repr=False)


def _str(data: dict[str, Any], key: str) -> str | None:
    value = data.get(key)
    return value if isinstance(value, str) else None


def _int(data: dict[str, Any], key: str) -> int | None:
    value = data.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _parse_status(value: object) -> MessageStatus | None:
    if not isinstance(value, dict):
        return None
    group_id, group_name = _int(value, "groupId"), _str(value, "groupName")
    # Either half of the group identifies it; fill the other from the documented table.
    if group_name is None and group_id is not None:
        group_name = _STATUS_GROUPS.get(group_id)
    if group_id is None and group_name is not None:
        group_id = _STATUS_GROUP_IDS.get(group_name)
    if group_id is None or group_name is None:
        return None
    return MessageStatus(
        group_id, group_name, _int(value, "id"), _str(value, "name") or "", _str(value, "description") or "",
        _str(value, "action"),
    )


def _parse_error(value: object) -> MessageError | None:
    if not isinstance(value, dict):
        return None
    permanent = value.get("permanent")
    return MessageError(
        _int(value, "groupId"), _str(value, "groupName"), _int(value, "id"), _str(value, "name"),
        _str(value, "description"), permanent if isinstance(permanent, bool) else None,
    )


def _parse_price(value: object) -> MessagePrice | None:
    if not isinstance(value, dict):
        return None
    amount = value.get("pricePerMessage")
    number = float(amount) if isinstance(amount, int | float) and not isinstance(amount, bool) else None
    return MessagePrice(number, _str(value, "currency"))


def _parse_platform(value: object) -> PlatformIds | None:
    if not isinstance(value, dict):
        return None
    return PlatformIds(_str(value, "entityId"), _str(value, "applicationId"))


def _snippet(raw: bytes | str) -> str:
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    return text[:_SNIPPET_CHARS]


def parse_reports(raw: bytes) -> ReportsPage:
    """Parse a `{results: [...]}` page (the reports GET and the webhook share it); bad items are rejects."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ProviderError(f"delivery reports page is not JSON: {exc}", body=_snippet(raw)) from None
    results = data.get("results") if isinstance(data, dict) else None
    if not isinstance(results, list):
        raise ProviderError("delivery reports page has no 'results' list", body=_snippet(raw))
    reports: list[DeliveryReport] = []
    rejects: list[ReportReject] = []
    for item in results:
        if not isinstance(item, dict):
            rejects.append(ReportReject(item, "report is not a JSON object"))
            continue
        message_id = _str(item, "messageId")
        if not message_id:
            rejects.append(ReportReject(item, "report has no messageId"))
            continue
        status = _parse_status(item.get("status"))
        if status is None:
            rejects.append(ReportReject(item, "report has no readable status"))
            continue
        reports.append(
            DeliveryReport(
                message_id=message_id, status=status, bulk_id=_str(item, "bulkId"), to=_str(item, "to"),
                sender=_str(item, "sender"), sent_at=_str(item, "sentAt"), done_at=_str(item, "doneAt"),
                message_count=_int(item, "messageCount"), mcc_mnc=_str(item, "mccMnc"),
                callback_data=_str(item, "callbackData"), price=_parse_price(item.get("price")),
                error=_parse_error(item.get("error")), platform=_parse_platform(item.get("platform")),
                campaign_reference_id=_str(item, "campaignReferenceId"), raw=item,
            )
        )
    return ReportsPage(reports, rejects)


def _parse_send(endpoint: str, response: httpx.Response, elapsed_s: float) -> SendResponse:
    try:
        data = orjson.loads(response.content)
        results = []
        for item in data["messages"]:
            status = _parse_status(item.get("status"))
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
            status_code=response.status_code, body=_snippet(response.content),
        ) from None
    return SendResponse(bulk_id, results, elapsed_s)


def _parse_logs(endpoint: str, response: httpx.Response) -> list[LogEntry]:
    try:
        data = orjson.loads(response.content)
        results = data["results"]
        if not isinstance(results, list):
            raise TypeError("results is not a list")
    except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
        raise ProviderAmbiguous(
            f"{endpoint} answered {response.status_code} with an unreadable body ({type(exc).__name__})",
            status_code=response.status_code, body=_snippet(response.content),
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
                status=_parse_status(item.get("status")), error=_parse_error(item.get("error")),
                price=_parse_price(item.get("price")), mcc_mnc=_str(item, "mccMnc"),
                message_count=_int(item, "messageCount"), platform=_parse_platform(item.get("platform")),
                campaign_reference_id=_str(item, "campaignReferenceId"), raw=item,
            )
        )
    return entries


# --- error classification -------------------------------------------------------------------------


def _error_body(response: httpx.Response) -> object:
    try:
        return orjson.loads(response.content) if response.content else None
    except orjson.JSONDecodeError:
        return _snippet(response.content)


def _legacy_exception(body: dict[str, Any]) -> dict[str, Any] | None:
    request_error = body.get("requestError")
    exc = request_error.get("serviceException") if isinstance(request_error, dict) else None
    return exc if isinstance(exc, dict) else None


def _violations(body: object) -> tuple[Violation, ...]:
    if not isinstance(body, dict):
        return ()
    found = [
        Violation(str(item.get("property", "")), str(item.get("violation", "")))
        for item in body.get("violations") or ()
        if isinstance(item, dict)
    ]
    # The legacy v1/v2 shape, in case a gateway in front of v3 still answers with it.
    legacy = _legacy_exception(body)
    if legacy is not None and isinstance(legacy.get("validationErrors"), dict):
        for prop, messages in legacy["validationErrors"].items():
            for message in messages if isinstance(messages, list) else [messages]:
                found.append(Violation(str(prop), str(message)))
    return tuple(found)


def _summary(body: object) -> str:
    if isinstance(body, dict):
        if "errorCode" in body or "description" in body:
            return f"{body.get('errorCode', '')} {body.get('description', '')}".strip()
        if (legacy := _legacy_exception(body)) is not None:
            return f"{legacy.get('messageId', '')} {legacy.get('text', '')}".strip()
    if isinstance(body, str):
        return body[:200]
    return "no error body"


def _retry_after_s(response: httpx.Response) -> float | None:
    value = response.headers.get("Retry-After")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = when.timestamp() - time.time()
    return max(0.0, seconds) if math.isfinite(seconds) else None


def _classify_status(endpoint: str, response: httpx.Response) -> ProviderError:
    status = response.status_code
    body = _error_body(response)
    said = f"{endpoint} answered {status}: {_summary(body)}"
    if status == 400:
        violations = _violations(body)
        listed = "; ".join(f"{v.property}: {v.violation}" for v in violations[:10])
        return ProviderBadRequest(f"{said} ({listed})" if listed else said, body=body, violations=violations)
    if status in (401, 403):
        return ProviderAuthError(f"{said}; check ICOMM_API_KEY and its scopes", status_code=status, body=body)
    if status == 429:
        return ProviderRateLimited(said, status_code=429, body=body, retry_after_s=_retry_after_s(response))
    if status == 503:
        return ProviderNotActedOn(said, status_code=503, body=body, retry_after_s=_retry_after_s(response))
    if status >= 500:
        return ProviderAmbiguous(f"{said}; the provider may have acted", status_code=status, body=body)
    return ProviderError(said, status_code=status, body=body)


def _map_transport_error(endpoint: str, exc: httpx.RequestError) -> ProviderError:
    what = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout | httpx.ProxyError):
        return ProviderNotActedOn(f"{endpoint} was not sent ({what})")
    if isinstance(exc, httpx.UnsupportedProtocol | httpx.LocalProtocolError):
        return ProviderError(f"{endpoint} could not be built ({what})")
    return ProviderAmbiguous(f"{endpoint} got no complete answer ({what}); the provider may have acted")


# --- the client -----------------------------------------------------------------------------------


def _last_retry_after(state: RetryCallState) -> float | None:
    exc = state.outcome.exception() if state.outcome is not None else None
    return exc.retry_after_s if isinstance(exc, ProviderNotActedOn) else None


def _observe(path: str, error: ProviderError, elapsed_s: float) -> None:
    """Request duration by endpoint (messages, reports, logs) and outcome class."""
    metrics.PROVIDER_SECONDS.labels(path.rsplit("/", 1)[-1], type(error).__name__).observe(elapsed_s)


def _log_retry(endpoint: str, state: RetryCallState) -> None:
    exc = state.outcome.exception() if state.outcome is not None else None
    metrics.RETRIES.labels(endpoint, type(exc).__name__).inc()
    log.debug(
        "provider_retry", endpoint=endpoint, attempt=state.attempt_number, error=type(exc).__name__,
        status_code=getattr(exc, "status_code", None),
        wait_s=round(state.next_action.sleep, 3) if state.next_action is not None else None,
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


def _joined(name: str, values: Sequence[str]) -> str | None:
    if isinstance(values, str):  # a lone string is a Sequence[str] too; do not split it into letters
        values = [values]
    if not values:
        return None
    joined = ",".join(values)
    if len(joined) > MAX_FILTER_CHARS:
        raise ValueError(f"{name} filter is {len(joined)} characters joined, the API takes at most 2048")
    return joined


def _check_limit(limit: int) -> None:
    if not 1 <= limit <= MAX_PAGE_SIZE:
        raise ValueError(f"limit must be between 1 and {MAX_PAGE_SIZE}, got {limit}")


# Tests replace it to play a pause without sleeping.
_now = time.monotonic


class _FenceClosed(Exception):
    """Raised from httpcore's trace callback to abort an attempt before (more of) it is written."""


def _ask_fence(fence: Callable[[], bool], consequence: str) -> None:
    """Raise _FenceClosed unless the fence says yes; its own exception is kept as the cause."""
    try:
        still_open = fence()
    except Exception as exc:
        raise _FenceClosed(f"the send fence failed ({type(exc).__name__}){consequence}") from exc
    if not still_open:
        raise _FenceClosed(f"the send window is closed{consequence}")


@dataclass(eq=False)
class _Generation:
    """One httpx.Client (one connection pool) and the attempts using it; guarded by Provider._lock."""

    client: httpx.Client
    number: int
    in_flight: int = 0  # attempts inside client.request, queued for a connection or not
    holding: int = 0  # attempts past the pool wait: they got a connection
    last_acquired: float = field(default_factory=lambda: _now())
    retired: bool = False  # replaced (or being replaced): closed when its last attempt leaves
    closed: bool = False


class _AttemptTrace:
    """httpcore's `trace` callback for one HTTP attempt.

    httpcore calls it only once the pool handed the request a connection, so its first event marks
    the attempt as holding one; on `send_request_headers.started` it consults the send fence (once)
    and on `send_request_body.started` it checks that the fence's answer is still fresh. Raising
    here aborts the request before that write, and httpcore closes the connection."""

    __slots__ = ("_fence", "_generation", "_provider", "acquired", "fence_asked_at")

    def __init__(self, provider: Provider, generation: _Generation, fence: Callable[[], bool] | None) -> None:
        self._provider = provider
        self._generation = generation
        self._fence = fence
        self.acquired = False
        self.fence_asked_at: float | None = None

    def __call__(self, event: str, info: Mapping[str, Any]) -> None:
        if not self.acquired:
            self.acquired = True
            self._provider._holding(self._generation)
        if event.endswith("send_request_headers.started"):
            self.admit()
        elif event.endswith("send_request_body.started"):
            self.check_fresh("the headers were written, the body was not: the server got an incomplete request")

    def admit(self) -> None:
        """Ask the fence, once per attempt; a second call (a transport that both takes the request
        and traces it) only checks that the first answer is still fresh."""
        if self._fence is None:
            return
        if self.fence_asked_at is not None:
            self.check_fresh("nothing was written")
            return
        self.fence_asked_at = _now()
        _ask_fence(self._fence, "; nothing was written")

    def check_fresh(self, written: str) -> None:
        if self.fence_asked_at is None:
            return
        waited_s = _now() - self.fence_asked_at
        if waited_s > FENCE_WRITE_GRACE_S:
            raise _FenceClosed(f"{waited_s:.3f} s passed since the send fence said yes; {written}")


class _FenceBeforeTransport(httpx.BaseTransport):
    """Wraps an injected transport that does not emit httpcore trace events (httpx.MockTransport):
    the fence is consulted right before the request is handed to it. The real transport consults
    it at the socket, from the trace callback."""

    def __init__(self, inner: httpx.BaseTransport) -> None:
        self._inner = inner

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        trace = request.extensions.get("trace")
        if isinstance(trace, _AttemptTrace):
            trace.admit()
        return self._inner.handle_request(request)

    def close(self) -> None:
        self._inner.close()


class Provider:
    """A thread-safe client for the three endpoints, with one keep-alive connection pool.

    The pool is replaced when it stops handing out connections (module docstring: pool healing).
    An injected `transport` is kept across replacements (it is the injector's, and only close()
    closes it), so only the default transport's pool is actually renewed."""

    def __init__(
        self,
        settings: Settings,
        *,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._key = settings.require_api_key()
        self._sleep = sleep
        self._attempts = settings.icomm_send_retry_attempts
        self._jitter = wait_random_exponential(
            multiplier=settings.icomm_retry_backoff_base_s, max=settings.icomm_retry_backoff_max_s
        )
        # Settings sizes the batch lease with icomm_retry_backoff_max_s per wait: a longer sleep
        # could let another worker take the batch over while this one still means to send it.
        self._wait_ceiling_s = min(RETRY_WAIT_CEILING_S, settings.icomm_retry_backoff_max_s)
        self._base_url = settings.icomm_base_url
        self._timeout = httpx.Timeout(
            connect=settings.icomm_connect_timeout_s,
            read=settings.icomm_read_timeout_s,
            write=settings.icomm_write_timeout_s,
            pool=settings.icomm_pool_timeout_s,
        )
        self._max_connections = settings.icomm_max_connections
        # No request got a connection for longer than a whole attempt can take (the pool wait, then
        # a holder's connect, write and read): the holders are not coming back.
        self._stuck_after_s = (
            settings.icomm_pool_timeout_s + settings.icomm_connect_timeout_s
            + settings.icomm_write_timeout_s + settings.icomm_read_timeout_s
        )
        # The default transport (and an injected HTTPTransport) consults the fence at the socket;
        # any other injected transport is asked just before it gets the request. An injected
        # transport is shared by every client generation and closed only by close().
        self._transport: httpx.BaseTransport | None
        if transport is None or isinstance(transport, httpx.HTTPTransport):
            self._transport = transport
        else:
            self._transport = _FenceBeforeTransport(transport)
        self._owns_transport = transport is None
        self._lock = threading.Lock()
        self._closed = False
        self._generation = _Generation(self._new_client(), 1)

    def _new_client(self) -> httpx.Client:
        return httpx.Client(
            base_url=self._base_url,
            headers={
                "Authorization": f"App {self._key}",
                "Accept": "application/json",
                "Content-Type": "application/json",
            },
            timeout=self._timeout,
            limits=httpx.Limits(
                max_connections=self._max_connections, max_keepalive_connections=self._max_connections
            ),
            transport=self._transport,
        )

    def close(self) -> None:
        with self._lock:
            self._closed = True
            generation = self._generation
            generation.closed = True
        generation.client.close()

    def __enter__(self) -> Provider:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def send(
        self,
        request: WireRequest,
        *,
        on_rate_limited: Callable[[float | None], None] | None = None,
        fence: Callable[[], bool] | None = None,
    ) -> SendResponse:
        """POST one bulk; retried only while the provider certainly did not act on it.

        `fence`, when given, is called once per HTTP attempt immediately before the request's first
        byte is written (after the pool wait and the connect), and before each retry's backoff
        sleep; False or an exception means nothing more of the request is written and
        SendWindowClosed is raised, never retried (module docstring: the send fence)."""
        endpoint = f"POST {SEND_PATH}"
        response, elapsed_s = self._call(
            "POST", SEND_PATH, None, orjson.dumps(request), on_rate_limited, fence
        )
        try:
            return _parse_send(endpoint, response, elapsed_s)
        except ProviderError as error:
            raise self._scrubbed(error) from None

    def reports_raw(
        self,
        *,
        limit: int = MAX_PAGE_SIZE,
        bulk_id: str | None = None,
        message_id: str | None = None,
        entity_id: str | None = None,
        application_id: str | None = None,
        campaign_reference_id: str | None = None,
        on_rate_limited: Callable[[float | None], None] | None = None,
    ) -> bytes:
        """The raw 200 body of one reports page: store it durably before parsing, it never comes back."""
        _check_limit(limit)
        params = _drop_none(
            limit=limit, bulkId=bulk_id, messageId=message_id, entityId=entity_id,
            applicationId=application_id, campaignReferenceId=campaign_reference_id,
        )
        response, _ = self._call("GET", REPORTS_PATH, params, None, on_rate_limited)
        return response.content

    def logs(
        self,
        *,
        message_id: Sequence[str] = (),
        bulk_id: Sequence[str] = (),
        campaign_reference_id: Sequence[str] = (),
        mcc: str | None = None,
        mnc: str | None = None,
        sender: str | None = None,
        destination: str | None = None,
        general_status: GeneralStatus | None = None,
        sent_since: datetime | None = None,
        sent_until: datetime | None = None,
        limit: int | None = None,
        entity_id: str | None = None,
        application_id: str | None = None,
        on_rate_limited: Callable[[float | None], None] | None = None,
    ) -> list[LogEntry]:
        """GET logs (re-readable for 48 h); filters are validated here so a bad one never costs a request."""
        if mnc is not None and mcc is None:
            raise ValueError("the mnc filter requires mcc")
        if limit is not None:
            _check_limit(limit)
        if general_status is not None and general_status not in _STATUS_GROUP_IDS:
            raise ValueError(f"general_status must be one of {', '.join(_STATUS_GROUP_IDS)}")
        params = _drop_none(
            messageId=_joined("message_id", message_id), bulkId=_joined("bulk_id", bulk_id),
            campaignReferenceId=_joined("campaign_reference_id", campaign_reference_id),
            mcc=mcc, mnc=mnc, sender=sender, destination=destination, generalStatus=general_status,
            sentSince=None if sent_since is None else format_datetime(sent_since),
            sentUntil=None if sent_until is None else format_datetime(sent_until),
            limit=limit, entityId=entity_id, applicationId=application_id,
        )
        response, _ = self._call("GET", LOGS_PATH, params, None, on_rate_limited)
        try:
            return _parse_logs(f"GET {LOGS_PATH}", response)
        except ProviderError as error:
            raise self._scrubbed(error) from None

    def logs_for_message_ids(
        self,
        ids: Sequence[str],
        *,
        before_request: Callable[[], None] | None = None,
        on_rate_limited: Callable[[float | None], None] | None = None,
    ) -> dict[str, LogEntry]:
        """The log entry of every id the provider knows; `before_request` lets the caller rate-limit."""
        wanted = list(dict.fromkeys([ids] if isinstance(ids, str) else ids))
        wanted_set = set(wanted)
        found: dict[str, LogEntry] = {}
        for chunk in chunk_message_ids(wanted):
            if before_request is not None:
                before_request()
            for entry in self.logs(message_id=chunk, limit=MAX_PAGE_SIZE, on_rate_limited=on_rate_limited):
                if entry.message_id not in wanted_set:
                    continue
                # A resend rejected as a duplicate logs too; the original attempt is the answer.
                known = found.get(entry.message_id)
                if known is None or (_is_duplicate(known) and not _is_duplicate(entry)):
                    found[entry.message_id] = entry
        return found

    def _call(
        self,
        method: str,
        path: str,
        params: dict[str, Any] | None,
        content: bytes | None,
        on_rate_limited: Callable[[float | None], None] | None,
        fence: Callable[[], bool] | None = None,
    ) -> tuple[httpx.Response, float]:
        # A fresh controller per call: tenacity keeps per-run state on it, and threads share self.
        endpoint = f"{method} {path}"
        retrying = Retrying(
            sleep=self._sleep,
            stop=self._stop,
            wait=self._wait,
            # SendWindowClosed is a ProviderNotActedOn (nothing was sent) that must never be resent.
            retry=retry_if_exception_type(ProviderNotActedOn) & retry_if_not_exception_type(SendWindowClosed),
            before_sleep=partial(self._before_retry, endpoint, fence),
            reraise=True,
        )
        return retrying(self._attempt, method, path, params, content, on_rate_limited, fence)

    def _before_retry(self, endpoint: str, fence: Callable[[], bool] | None, state: RetryCallState) -> None:
        """Before a retry's backoff sleep: a closed fence ends the call now rather than after the sleep."""
        if fence is not None:
            exc = state.outcome.exception() if state.outcome is not None else None
            try:
                _ask_fence(fence, "")
            except _FenceClosed as closed:
                fence_error = closed.__cause__
                cause = None if fence_error is None or self._key in str(fence_error) else fence_error
                raise self._scrubbed(SendWindowClosed(
                    f"{endpoint} was not retried after attempt {state.attempt_number} "
                    f"({type(exc).__name__}): {closed}"
                )) from cause
        _log_retry(endpoint, state)

    def _attempt(
        self,
        method: str,
        path: str,
        params: dict[str, Any] | None,
        content: bytes | None,
        on_rate_limited: Callable[[float | None], None] | None,
        fence: Callable[[], bool] | None = None,
    ) -> tuple[httpx.Response, float]:
        endpoint = f"{method} {path}"
        timer = metrics.PROVIDER_SECONDS.labels(path.rsplit("/", 1)[-1], "ok")
        generation = self._enter()
        trace = _AttemptTrace(self, generation, fence)
        started = time.perf_counter()
        try:
            response = generation.client.request(
                method, path, params=params, content=content, extensions={"trace": trace}
            )
        except _FenceClosed as closed:
            fence_error = closed.__cause__
            cause = None if fence_error is None or self._key in str(fence_error) else fence_error
            window = self._scrubbed(SendWindowClosed(f"{endpoint} was not sent: {closed}"))
            _observe(path, window, time.perf_counter() - started)
            raise window from cause
        except httpx.RequestError as exc:
            if isinstance(exc, httpx.PoolTimeout):
                self._pool_timed_out(generation, trace.acquired)
            # Keep the cause for tracebacks unless its own text would carry the key into the logs.
            cause = None if self._key in str(exc) else exc
            mapped = _map_transport_error(endpoint, exc)
            _observe(path, mapped, time.perf_counter() - started)
            raise self._scrubbed(mapped) from cause
        finally:
            self._leave(generation, trace.acquired)
        elapsed_s = time.perf_counter() - started
        if response.is_success:
            timer.observe(elapsed_s)
            return response, elapsed_s
        error = self._scrubbed(_classify_status(endpoint, response))
        _observe(path, error, elapsed_s)
        if isinstance(error, ProviderRateLimited) and on_rate_limited is not None:
            on_rate_limited(error.retry_after_s)
        raise error

    # --- the connection pool's health (module docstring: pool healing) --------------------------

    def _enter(self) -> _Generation:
        with self._lock:
            if self._closed:
                raise RuntimeError("Cannot send a request, as the Provider has been closed.")
            generation = self._generation
            generation.in_flight += 1
            return generation

    def _holding(self, generation: _Generation) -> None:
        with self._lock:
            generation.holding += 1
            generation.last_acquired = _now()

    def _leave(self, generation: _Generation, acquired: bool) -> None:
        with self._lock:
            generation.in_flight -= 1
            if acquired:
                generation.holding -= 1
            close = self._retire_done(generation)
        if close:
            self._close_retired(generation)

    def _retire_done(self, generation: _Generation) -> bool:
        """Under the lock: whether a replaced generation has just lost its last attempt (the caller
        then closes it, outside the lock)."""
        if generation.retired and not generation.closed and generation.in_flight == 0 and (
            generation is not self._generation
        ):
            generation.closed = True
            return True
        return False

    def _close_retired(self, generation: _Generation) -> None:
        # An injected transport is shared with the new client: closing the old client would close it.
        if self._owns_transport:
            generation.client.close()

    def _pool_timed_out(self, generation: _Generation, acquired: bool) -> None:
        """A PoolTimeout on `generation`: replace its client if its pool can no longer hand out a
        connection (fewer holders than slots, or nobody got one for longer than an attempt lasts)."""
        with self._lock:
            if generation is not self._generation or generation.retired or self._closed:
                return  # already replaced, being replaced, or closing
            holding = generation.holding - (1 if acquired else 0)
            starved_s = _now() - generation.last_acquired
            if holding < self._max_connections:
                reason = "leaked_slots"
            elif starved_s > self._stuck_after_s:
                reason = "no_progress"
            else:
                return  # every slot is held by a request in flight: a busy pool, not a broken one
            generation.retired = True  # claims the replacement: one thread builds the new client
            in_flight = generation.in_flight
        try:
            client = self._new_client()  # outside the lock: building the SSL context takes a while
        except Exception:
            with self._lock:
                generation.retired = False
            log.exception("provider_pool_reset_failed", generation=generation.number)
            return
        with self._lock:
            closing: list[httpx.Client] = []
            if self._closed:
                closing.append(client)
            else:
                self._generation = _Generation(client, generation.number + 1)
            close_old = self._retire_done(generation)
        for stale in closing:
            stale.close()
        if close_old:
            self._close_retired(generation)
        if closing:
            return
        metrics.PROVIDER_POOL_RESETS.labels(reason).inc()
        log.warning(
            "provider_pool_reset", reason=reason, generation=generation.number + 1,
            max_connections=self._max_connections, holding=holding, in_flight=in_flight,
            starved_s=round(starved_s, 3),
        )

    def _stop(self, state: RetryCallState) -> bool:
        if state.attempt_number >= self._attempts:
            return True
        # A Retry-After beyond the ceiling belongs to the slower retry owner (the dispatcher).
        retry_after = _last_retry_after(state)
        return retry_after is not None and retry_after > self._wait_ceiling_s

    def _wait(self, state: RetryCallState) -> float:
        wait_s = self._jitter(state)
        retry_after = _last_retry_after(state)
        if retry_after is not None:
            wait_s = max(wait_s, retry_after)
        return min(wait_s, self._wait_ceiling_s)

    def _scrubbed(self, error: ProviderError) -> ProviderError:
        # Messages and bodies quote the provider's (or a proxy's) text, which might echo the key.
        if self._key in str(error):
            error.args = (str(error).replace(self._key, "***"),)
        if error.body is not None:
            encoded = orjson.dumps(error.body)
            if self._key.encode() in encoded:
                error.body = orjson.loads(encoded.replace(self._key.encode(), b"***"))
        return error


def _is_duplicate(entry: LogEntry) -> bool:
    return entry.status is not None and entry.status.name == _DUPLICATE
