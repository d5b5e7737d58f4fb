"""Pure request validation: send bodies -> violations, query strings -> typed filters, datetimes."""

from __future__ import annotations

import functools
import math
import re
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, Final
from urllib.parse import parse_qsl

from worker.devtools.sandbox.errors import Violation
from worker.devtools.sandbox.segments import is_hex

MAX_SCHEDULE_AHEAD_S: Final = 180 * 86400
MAX_PAGE: Final = 1000
DEFAULT_PAGE: Final = 50
MAX_ARRAY_PARAM_CHARS: Final = 2048

TRANSLITERATIONS: Final = frozenset(
    [
        "NONE",
        "TURKISH",
        "GREEK",
        "CYRILLIC",
        "SERBIAN_CYRILLIC",
        "CENTRAL_EUROPEAN",
        "BALTIC",
        "NON_UNICODE",
        "PORTUGUESE",
        "COLOMBIAN",
        "BULGARIAN_CYRILLIC",
        "ALL",
    ]
)
LANGUAGE_CODES: Final = frozenset(["NONE", "TR", "ES", "PT", "AUTODETECT"])
VALIDITY_UNITS: Final = frozenset(["SECONDS", "MINUTES", "HOURS"])
SPEED_UNITS: Final = frozenset(["MINUTE", "HOUR", "DAY"])
DAYS: Final = frozenset(["MONDAY", "TUESDAY", "WEDNESDAY", "THURSDAY", "FRIDAY", "SATURDAY", "SUNDAY"])
RECIPIENT_TYPES: Final = frozenset(("BIREYSEL", "TACIR"))
GENERAL_STATUSES: Final = frozenset(["ACCEPTED", "PENDING", "UNDELIVERABLE", "DELIVERED", "EXPIRED", "REJECTED"])

NOT_NULL: Final = "must not be null"
NOT_EMPTY: Final = "must not be empty"

# yyyy-MM-dd'T'HH:mm:ss[.S...](Z|+HHMM|+HH:MM): the documented format plus the ISO offset style. The
# schema's InfobipDateTime pattern, read as ECMA-262 (what JSON Schema patterns are): [0-9], not \d,
# which in Python also matches other scripts' digits (and int() reads them).
_DATETIME: Final = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})T([0-9]{2}):([0-9]{2}):([0-9]{2})(?:\.([0-9]{1,9}))?(Z|[+-][0-9]{2}:?[0-9]{2})"
)


def _instant(match: re.Match[str] | None, value: str) -> float:
    if match is None:
        raise ValueError(value)
    year, month, day, hour, minute, second, fraction, offset = match.groups()
    if offset == "Z":
        tz = UTC
    else:
        sign = -1 if offset[0] == "-" else 1
        digits = offset[1:].replace(":", "")
        tz = timezone(sign * timedelta(hours=int(digits[:2]), minutes=int(digits[2:])))
    micros = int((fraction or "0").ljust(6, "0")[:6])
    moment = datetime(int(year), int(month), int(day), int(hour), int(minute), int(second), micros, tzinfo=tz)
    return moment.timestamp()


def parse_datetime(value: str) -> float:
    """Infobip timestamp in a query string -> unix seconds; raises ValueError when malformed."""
    # Surrounding blanks are dropped, and an unencoded '+' in a query string arrives as a space.
    return _instant(_DATETIME.fullmatch(value.strip().replace(" ", "+")), value)


def parse_body_datetime(value: str) -> float:
    """Infobip timestamp in a JSON body -> unix seconds; raises ValueError unless it is exactly the
    pattern (no blanks around it, no space for '+') and a real date, time and offset."""
    return _instant(_DATETIME.fullmatch(value), value)


@functools.lru_cache(maxsize=4096)
def _second_prefix(second: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))


@functools.lru_cache(maxsize=1024)
def format_datetime(unix_s: float) -> str:
    """Unix seconds -> `yyyy-MM-dd'T'HH:mm:ss.SSS+0000`, the format the API emits."""
    # Cached twice over: a batch of reports shares its sentAt/doneAt values, and timestamps
    # share their second, so strftime (a few microseconds here) runs rarely.
    second = math.floor(unix_s)
    return f"{_second_prefix(second)}.{int((unix_s - second) * 1000):03d}+0000"


# --- POST /sms/3/messages ---------------------------------------------------------------
#
# The checks follow the vendor's JSON Schemas (SmsRequestEnvelope and what it references), with
# JSON Schema's meaning of each keyword; tests/unit/test_sandbox_schema_walk.py compares them with a
# JSON Schema validator property by property. In particular:
# - an optional property may be absent, but an explicit null is a violation: no schema declares a
#   nullable field (callers pass `obj.get(key, _ABSENT)` to tell the two apart);
# - an `integer` is any JSON number without a fractional part (3.0 and 1e2 are integers), and every
#   request integer is `format: int32`.
# On top of the schemas the platform refuses a few things contract.md documents (empty arrays where
# it wants at least one item, the delivery-window and sendAt rules, hex digit pairs, text and hex
# together); the walk test lists them.

INT32_MIN: Final = -(2**31)
INT32_MAX: Final = 2**31 - 1
_ABSENT: Final[Any] = object()  # a key missing from its object (None is an explicit JSON null)


def _type_name(expected: type) -> str:
    return {str: "a string", int: "an integer", bool: "a boolean", dict: "an object", list: "an array"}[expected]


def _check(value: Any, expected: type, path: str, out: list[Violation], required: bool = False) -> bool:
    """True when `value` is of `expected` type; records a violation otherwise, except for an absent
    optional property (`value is _ABSENT`)."""
    if type(value) is expected:
        return True
    if value is _ABSENT:
        if required:
            out.append((path, NOT_NULL))
    elif value is None:
        out.append((path, NOT_NULL))
    else:
        out.append((path, f"must be {_type_name(expected)}"))
    return False


def _check_int(
    value: Any, path: str, out: list[Violation], required: bool = False, low: int = INT32_MIN, high: int = INT32_MAX
) -> bool:
    """True when `value` is an integer (an int, or a float with no fractional part) in [low, high]."""
    kind = type(value)
    if kind is int or (kind is float and value.is_integer()):
        if low <= value <= high:
            return True
        out.append((path, f"must be between {low} and {high}"))
    elif value is not _ABSENT or required:
        _check(value, int, path, out, required)  # records why (a bool is not an int here either)
    return False


def _check_len(value: Any, limit: int, path: str, out: list[Violation], required: bool = False) -> None:
    if _check(value, str, path, out, required) and len(value) > limit:
        out.append((path, f"size must be between 0 and {limit}"))


def _check_enum(value: Any, allowed: frozenset[str], path: str, out: list[Violation], required: bool = False) -> None:
    if _check(value, str, path, out, required) and value not in allowed:
        out.append((path, f"must be one of [{', '.join(sorted(allowed))}]"))


def _validate_content(content: Any, path: str, out: list[Violation]) -> None:
    if not _check(content, dict, path, out, required=True):
        return
    text = content.get("text")
    hex_data = content.get("hex")
    if text is not None and hex_data is not None:
        out.append((path, "must contain either text or hex, not both"))
        return
    if text is not None:
        _check(text, str, path + ".text", out)
        _check_enum(content.get("transliteration", _ABSENT), TRANSLITERATIONS, path + ".transliteration", out)
        language = content.get("language", _ABSENT)
        if _check(language, dict, path + ".language", out):
            _check_enum(language.get("languageCode", _ABSENT), LANGUAGE_CODES, path + ".language.languageCode", out)
            _check(language.get("singleShift", _ABSENT), bool, path + ".language.singleShift", out)
            _check(language.get("lockingShift", _ABSENT), bool, path + ".language.lockingShift", out)
    elif hex_data is not None:
        if _check(hex_data, str, path + ".hex", out) and not is_hex(hex_data):
            out.append((path + ".hex", "must be hex digit pairs separated by spaces"))
        _check_int(content.get("dataCoding", _ABSENT), path + ".dataCoding", out)
        _check_int(content.get("esmClass", _ABSENT), path + ".esmClass", out)
    elif "text" in content:
        out.append((path + ".text", NOT_NULL))
    elif "hex" in content:
        out.append((path + ".hex", NOT_NULL))
    else:
        out.append((path, "must contain either text or hex"))


def _validate_time_window(window: Any, path: str, out: list[Violation]) -> None:
    if not _check(window, dict, path, out):
        return
    days = window.get("days", _ABSENT)
    if _check(days, list, path + ".days", out, required=True):
        if not days:
            out.append((path + ".days", NOT_EMPTY))
        for k, day in enumerate(days):
            _check_enum(day, DAYS, f"{path}.days[{k}]", out, required=True)
    start, end = window.get("from", _ABSENT), window.get("to", _ABSENT)
    if (start is _ABSENT) != (end is _ABSENT):
        out.append((path, "from and to must be given together or both omitted"))
        return
    minutes: list[int] = []
    for name, moment in (("from", start), ("to", end)):
        if not _check(moment, dict, f"{path}.{name}", out):
            continue
        before = len(out)
        _check_int(moment.get("hour", _ABSENT), f"{path}.{name}.hour", out, True, 0, 23)
        _check_int(moment.get("minute", _ABSENT), f"{path}.{name}.minute", out, True, 0, 59)
        if len(out) == before:
            minutes.append(int(moment["hour"]) * 60 + int(moment["minute"]))
    # The window may wrap past midnight; either way it must span at least one hour.
    if len(minutes) == 2 and (minutes[1] - minutes[0]) % 1440 < 60:
        out.append((path, "from and to must be at least 1 hour apart"))


def _validate_message_options(options: Any, path: str, out: list[Violation]) -> None:
    if not _check(options, dict, path, out):
        return
    platform = options.get("platform", _ABSENT)
    if _check(platform, dict, path + ".platform", out):
        _check_len(platform.get("entityId", _ABSENT), 255, path + ".platform.entityId", out)
        _check_len(platform.get("applicationId", _ABSENT), 255, path + ".platform.applicationId", out)
    validity = options.get("validityPeriod", _ABSENT)
    if _check(validity, dict, path + ".validityPeriod", out):
        _check_int(validity.get("amount", _ABSENT), path + ".validityPeriod.amount", out, required=True)
        _check_enum(validity.get("timeUnit", _ABSENT), VALIDITY_UNITS, path + ".validityPeriod.timeUnit", out)
    _validate_time_window(options.get("deliveryTimeWindow", _ABSENT), path + ".deliveryTimeWindow", out)
    _check_len(options.get("campaignReferenceId", _ABSENT), 255, path + ".campaignReferenceId", out)
    _check(options.get("flash", _ABSENT), bool, path + ".flash", out)
    regional = options.get("regional", _ABSENT)
    if _check(regional, dict, path + ".regional", out):
        india = regional.get("indiaDlt", _ABSENT)
        if _check(india, dict, path + ".regional.indiaDlt", out):
            _check(
                india.get("principalEntityId", _ABSENT), str, path + ".regional.indiaDlt.principalEntityId", out, True
            )
            _check(india.get("contentTemplateId", _ABSENT), str, path + ".regional.indiaDlt.contentTemplateId", out)
            _check(india.get("telemarketerId", _ABSENT), str, path + ".regional.indiaDlt.telemarketerId", out)
        turkey = regional.get("turkeyIys", _ABSENT)
        if _check(turkey, dict, path + ".regional.turkeyIys", out):
            _check_int(turkey.get("brandCode", _ABSENT), path + ".regional.turkeyIys.brandCode", out)
            _check_enum(
                turkey.get("recipientType", _ABSENT),
                RECIPIENT_TYPES,
                path + ".regional.turkeyIys.recipientType",
                out,
                True,
            )
        korea = regional.get("southKorea", _ABSENT)
        if _check(korea, dict, path + ".regional.southKorea", out):
            _check_len(korea.get("title", _ABSENT), 66, path + ".regional.southKorea.title", out)
            _check_int(korea.get("resellerCode", _ABSENT), path + ".regional.southKorea.resellerCode", out)


def _validate_webhooks(webhooks: Any, path: str, out: list[Violation]) -> None:
    if not _check(webhooks, dict, path, out):
        return
    delivery = webhooks.get("delivery", _ABSENT)
    if _check(delivery, dict, path + ".delivery", out):
        _check(delivery.get("url", _ABSENT), str, path + ".delivery.url", out)
        _check(delivery.get("intermediateReport", _ABSENT), bool, path + ".delivery.intermediateReport", out)
        _check(delivery.get("notify", _ABSENT), bool, path + ".delivery.notify", out)
    _check(webhooks.get("contentType", _ABSENT), str, path + ".contentType", out)
    _check_len(webhooks.get("callbackData", _ABSENT), 4000, path + ".callbackData", out)


def validate_request_options(options: Any, now: float, out: list[Violation]) -> None:
    """Append the violations of the request-level `options` (a present value, null included) to `out`."""
    if not _check(options, dict, "options", out):
        return
    schedule = options.get("schedule", _ABSENT)
    if _check(schedule, dict, "options.schedule", out):
        _check_len(schedule.get("bulkId", _ABSENT), 100, "options.schedule.bulkId", out)
        send_at = schedule.get("sendAt", _ABSENT)
        if _check(send_at, str, "options.schedule.sendAt", out):
            try:
                when = parse_body_datetime(send_at)
            except ValueError:
                out.append(("options.schedule.sendAt", "must match yyyy-MM-dd'T'HH:mm:ss.SSSZ"))
            else:
                if when > now + MAX_SCHEDULE_AHEAD_S:
                    out.append(("options.schedule.sendAt", "must be no later than 180 days in advance"))
        speed = schedule.get("sendingSpeedLimit", _ABSENT)
        if _check(speed, dict, "options.schedule.sendingSpeedLimit", out):
            _check_int(speed.get("amount", _ABSENT), "options.schedule.sendingSpeedLimit.amount", out, required=True)
            _check_enum(speed.get("timeUnit", _ABSENT), SPEED_UNITS, "options.schedule.sendingSpeedLimit.timeUnit", out)
    tracking = options.get("tracking", _ABSENT)
    if _check(tracking, dict, "options.tracking", out):
        _check(tracking.get("shortenUrl", _ABSENT), bool, "options.tracking.shortenUrl", out)
        _check(tracking.get("trackClicks", _ABSENT), bool, "options.tracking.trackClicks", out)
        _check(tracking.get("trackingUrl", _ABSENT), str, "options.tracking.trackingUrl", out)
        _check(tracking.get("removeProtocol", _ABSENT), bool, "options.tracking.removeProtocol", out)
        _check(tracking.get("customDomain", _ABSENT), str, "options.tracking.customDomain", out)
    _check(options.get("includeSmsCountInResponse", _ABSENT), bool, "options.includeSmsCountInResponse", out)
    conversion = options.get("conversionTracking", _ABSENT)
    if _check(conversion, dict, "options.conversionTracking", out):
        _check(
            conversion.get("useConversionTracking", _ABSENT),
            bool,
            "options.conversionTracking.useConversionTracking",
            out,
        )
        _check(
            conversion.get("conversionTrackingName", _ABSENT),
            str,
            "options.conversionTracking.conversionTrackingName",
            out,
        )


def validate_message(message: Any, i: int, out: list[Violation]) -> None:
    """Append the violations of `messages[i]` to `out`."""
    if type(message) is not dict:
        out.append((f"messages[{i}]", "must be an object"))
        return
    destinations = message.get("destinations", _ABSENT)
    if type(destinations) is list and destinations:
        for j, destination in enumerate(destinations):
            if type(destination) is not dict:
                out.append((f"messages[{i}].destinations[{j}]", "must be an object"))
                continue
            prefix = f"messages[{i}].destinations[{j}]"
            _check_len(destination.get("to", _ABSENT), 64, prefix + ".to", out, required=True)
            _check_len(destination.get("messageId", _ABSENT), 200, prefix + ".messageId", out)
            _check_int(destination.get("networkId", _ABSENT), prefix + ".networkId", out)
    elif _check(destinations, list, f"messages[{i}].destinations", out, required=True):
        out.append((f"messages[{i}].destinations", NOT_EMPTY))
    _validate_content(message.get("content", _ABSENT), f"messages[{i}].content", out)
    _check(message.get("sender", _ABSENT), str, f"messages[{i}].sender", out)
    if "options" in message:
        _validate_message_options(message["options"], f"messages[{i}].options", out)
    if "webhooks" in message:
        _validate_webhooks(message["webhooks"], f"messages[{i}].webhooks", out)


def validate_send_request(body: Any, now: float) -> list[Violation]:
    """Every violation in a POST /sms/3/messages body (empty: valid); unknown fields are ignored."""
    out: list[Violation] = []
    if type(body) is not dict:
        return [("", "request body must be a JSON object")]
    messages = body.get("messages", _ABSENT)
    if _check(messages, list, "messages", out, required=True) and not messages:
        out.append(("messages", NOT_EMPTY))
    for i, message in enumerate(messages if type(messages) is list else ()):
        validate_message(message, i, out)
    if "options" in body:
        validate_request_options(body["options"], now, out)
    return out


def valid_destination(to: str) -> bool:
    """7 to 15 ASCII digits after an optional leading '+' (E.164 shape)."""
    digits = to[1:] if to[:1] == "+" else to
    return 7 <= len(digits) <= 15 and digits.isascii() and digits.isdigit()


# --- GET /sms/3/reports and /sms/3/logs query strings -------------------------------------


@dataclass
class ReportsQuery:
    """Filters of GET /sms/3/reports."""

    limit: int = DEFAULT_PAGE
    bulk_id: str | None = None
    message_id: str | None = None
    entity_id: str | None = None
    application_id: str | None = None
    campaign_reference_id: str | None = None


@dataclass
class LogsQuery:
    """Filters of GET /sms/3/logs; list filters match any of their values."""

    limit: int = DEFAULT_PAGE
    mcc: str | None = None
    mnc: str | None = None
    sender: str | None = None
    destination: str | None = None
    bulk_ids: list[str] = field(default_factory=list)
    message_ids: list[str] = field(default_factory=list)
    campaign_reference_ids: list[str] = field(default_factory=list)
    general_status: str | None = None
    sent_since: float | None = None
    sent_until: float | None = None
    entity_id: str | None = None
    application_id: str | None = None


def _query_pairs(query_string: bytes) -> list[tuple[str, str]]:
    return parse_qsl(query_string.decode("latin-1"), keep_blank_values=True)


def _parse_limit(raw: str | None, out: list[Violation]) -> int:
    if raw is None or raw == "":
        return DEFAULT_PAGE
    try:
        limit = int(raw)
    except ValueError:
        out.append(("limit", "must be an integer"))
        return DEFAULT_PAGE
    if limit > MAX_PAGE:
        out.append(("limit", f"must be less than or equal to {MAX_PAGE}"))
    elif limit < 1:
        out.append(("limit", "must be greater than or equal to 1"))
    return limit


def _last(pairs: list[tuple[str, str]], name: str) -> str | None:
    found = None
    for key, value in pairs:
        if key == name:
            found = value
    return found or None


def parse_reports_query(query_string: bytes) -> tuple[ReportsQuery, list[Violation]]:
    """Query string of GET /sms/3/reports -> filters and violations."""
    pairs = _query_pairs(query_string)
    out: list[Violation] = []
    query = ReportsQuery(
        limit=_parse_limit(_last(pairs, "limit"), out),
        bulk_id=_last(pairs, "bulkId"),
        message_id=_last(pairs, "messageId"),
        entity_id=_last(pairs, "entityId"),
        application_id=_last(pairs, "applicationId"),
        campaign_reference_id=_last(pairs, "campaignReferenceId"),
    )
    return query, out


def _array(pairs: list[tuple[str, str]], name: str, out: list[Violation]) -> list[str]:
    """Repeated keys and comma-separated values both build the list."""
    values: list[str] = []
    for key, raw in pairs:
        if key != name:
            continue
        if len(raw) > MAX_ARRAY_PARAM_CHARS:
            out.append((name, f"size must be between 0 and {MAX_ARRAY_PARAM_CHARS}"))
            continue
        values.extend(item.strip() for item in raw.split(",") if item.strip())
    return values


def _parse_time(pairs: list[tuple[str, str]], name: str, out: list[Violation]) -> float | None:
    raw = _last(pairs, name)
    if raw is None:
        return None
    try:
        return parse_datetime(raw)
    except ValueError:
        out.append((name, "must match yyyy-MM-dd'T'HH:mm:ss.SSSZ"))
        return None


def parse_logs_query(query_string: bytes) -> tuple[LogsQuery, list[Violation]]:
    """Query string of GET /sms/3/logs -> filters and violations."""
    pairs = _query_pairs(query_string)
    out: list[Violation] = []
    query = LogsQuery(
        limit=_parse_limit(_last(pairs, "limit"), out),
        mcc=_last(pairs, "mcc"),
        mnc=_last(pairs, "mnc"),
        sender=_last(pairs, "sender"),
        destination=_last(pairs, "destination"),
        bulk_ids=_array(pairs, "bulkId", out),
        message_ids=_array(pairs, "messageId", out),
        campaign_reference_ids=_array(pairs, "campaignReferenceId", out),
        general_status=_last(pairs, "generalStatus"),
        sent_since=_parse_time(pairs, "sentSince", out),
        sent_until=_parse_time(pairs, "sentUntil", out),
        entity_id=_last(pairs, "entityId"),
        application_id=_last(pairs, "applicationId"),
    )
    if query.mnc is not None and query.mcc is None:
        out.append(("mnc", "mnc requires mcc"))
    if query.general_status is not None and query.general_status not in GENERAL_STATUSES:
        out.append(("generalStatus", f"must be one of [{', '.join(sorted(GENERAL_STATUSES))}]"))
    return query, out
