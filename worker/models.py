"""The job a producer enqueues (wire format v1) and the message states; plain typed data.

A job is JSON in the `job` field of an outbox stream entry. Keys are snake_case; unknown keys are
refused so a typo in an option never silently sends something other than what was meant.
"""

from __future__ import annotations

import re
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from worker.errors import JobValidationError, Problem
from worker.sms_text import analyse
from worker.sms_text import sms_parts as sms_parts  # how many SMS parts the platform bills for a text

JOB_FORMAT_VERSION = 1

# E.164 without formatting: optional '+', 7 to 15 digits, no leading zero. \Z, not $: $ also matches
# before a trailing newline, and "41793026727\n" is no number (worker/schemas/job-v1.schema.json agrees).
_PHONE = re.compile(r"^\+?[1-9][0-9]{6,14}\Z")
_HEX = re.compile(r"^[0-9A-Fa-f]{2}( [0-9A-Fa-f]{2})*\Z")
# A sanity cap on a text's UTF-8 size, far above anything the parts limit lets through: at most
# 255 parts (SMS_MAX_TEXT_PARTS' maximum) x 153 septets x 2 bytes (a GSM-7 letter such as 'é' is
# one septet, two bytes) = 78,030 bytes; UCS-2 is at most 255 x 67 units x 3 bytes = 51,255 bytes.
TEXT_MAX_BYTES = 100_000
_SURROGATE = re.compile("[\ud800-\udfff]")


class State(StrEnum):
    """Where one message is; docs/architecture.md draws the transitions, worker.transitions lists
    which script makes each."""

    QUEUED = "QUEUED"
    SUBMITTING = "SUBMITTING"
    AMBIGUOUS = "AMBIGUOUS"
    ACCEPTED = "ACCEPTED"
    DELIVERED = "DELIVERED"
    UNDELIVERABLE = "UNDELIVERABLE"
    EXPIRED = "EXPIRED"
    REJECTED = "REJECTED"
    FAILED = "FAILED"
    SCHEDULED = "SCHEDULED"  # held in the lane's schedule until its send_at (worker.store.schedule)
    CANCELLED = "CANCELLED"  # cancelled before any attempt: never sent (worker.cancel)


TERMINAL_STATES = frozenset(
    {State.DELIVERED, State.UNDELIVERABLE, State.EXPIRED, State.REJECTED, State.FAILED, State.CANCELLED}
)


def text_size(text: str) -> tuple[int, str, int]:
    """(SMS parts, encoding, units) of `text` as the platform bills it: worker.sms_text says how."""
    info = analyse(text)
    return info.parts, info.encoding, info.units


def text_problem(text: str, max_parts: int) -> str | None:
    """Why `text` cannot be sent (too many parts, or absurdly large), or None."""
    # n characters need at most ceil(n / 33) parts (33 surrogate pairs fill a UCS-2 part; GSM-7 and
    # other UCS-2 parts hold more), and at most one when n <= 35: shorter texts are not counted.
    if len(text) <= 33 * max_parts or len(text) <= 35:
        return None
    # A character is at most 4 bytes in UTF-8, so texts of up to a quarter of the cap skip the encode.
    if len(text) * 4 > TEXT_MAX_BYTES and (size := len(text.encode("utf-8", "surrogatepass"))) > TEXT_MAX_BYTES:
        return f"too long: {size:,} bytes as UTF-8, at most {TEXT_MAX_BYTES:,} accepted"
    info = analyse(text)
    if info.parts <= max_parts:
        return None
    return (f"too long: {info.parts} SMS parts ({info.units} {info.unit_name} in {info.encoding}, "
            f"{info.per_part} per part), at most {max_parts} allowed (SMS_MAX_TEXT_PARTS)")


def _lone_surrogate(value: str) -> str | None:
    """Where a string holds a lone surrogate (then it has no UTF-8 form), or None."""
    found = None if value.isascii() else _SURROGATE.search(value)
    if found is None:
        return None
    return f"lone surrogate U+{ord(found.group()):04X} at character {found.start()}"


def _surrogate_problems(value: Any, field: str, problems: list[Problem]) -> None:
    """A problem for every string (and dict key) in `value` that holds a lone surrogate."""
    if isinstance(value, str):
        if (what := _lone_surrogate(value)) is not None:
            problems.append(Problem(field or "(job)", f"not valid Unicode text: {what}"))
    elif isinstance(value, dict):
        for key, item in value.items():
            name = str(key)
            if isinstance(key, str) and (what := _lone_surrogate(key)) is not None:
                name = ascii(key)
                problems.append(Problem(field or "(job)", f"key {name} is not valid Unicode text: {what}"))
            _surrogate_problems(item, f"{field}.{name}" if field else name, problems)
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            _surrogate_problems(item, f"{field}.{index}" if field else str(index), problems)


def _has_lone_surrogate(value: Any) -> bool:
    """True when a string (or dict key) anywhere in `value` holds a lone surrogate; the fast path's
    check (no paths, no messages)."""
    kind = type(value)
    if kind is str:
        return not value.isascii() and _SURROGATE.search(value) is not None
    if kind is dict:
        for key, item in value.items():
            if (type(key) is str and not key.isascii() and _SURROGATE.search(key) is not None) or (
                    type(item) is not int and _has_lone_surrogate(item)):
                return True
    elif kind is list or kind is tuple:
        for item in value:
            if type(item) is not int and _has_lone_surrogate(item):
                return True
    return False


# An integer option within 64 bits: JSON has no limit, but a bigger one has no JSON form in orjson
# (encode_job raised TypeError after validation) nor in most producers' languages.
Int64 = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]


class _Strict(BaseModel):
    # strict: a value of the wrong JSON type is refused, not coerced ("5" is no integer, "yes" no
    # boolean), as the published schema says (tests/unit/test_schemas.py checks they agree).
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class Binary(_Strict):
    hex: str
    data_coding: Int64 = 0
    esm_class: Int64 = 0

    @field_validator("hex")
    @classmethod
    def _hex(cls, value: str) -> str:
        if not _HEX.match(value):
            raise ValueError("must be two hex digits per byte separated by spaces, e.g. '0f c2 4a'")
        return value


class Language(_Strict):
    language_code: Literal["NONE", "TR", "ES", "PT", "AUTODETECT"]
    single_shift: bool = False
    locking_shift: bool = False


class ValidityPeriod(_Strict):
    amount: Annotated[int, Field(ge=1, le=2**63 - 1)]
    time_unit: Literal["SECONDS", "MINUTES", "HOURS"] = "MINUTES"

    def seconds(self) -> int:
        return validity_seconds(self.amount, self.time_unit)


class Platform(_Strict):
    entity_id: Annotated[str, Field(max_length=255)] | None = None
    application_id: Annotated[str, Field(max_length=255)] | None = None


class TimeOfDay(_Strict):
    hour: Annotated[int, Field(ge=0, le=23)]
    minute: Annotated[int, Field(ge=0, le=59)]


Weekday = Literal["MONDAY", "TUESDAY", "WEDNESDAY", "THURSDAY", "FRIDAY", "SATURDAY", "SUNDAY"]


class DeliveryTimeWindow(_Strict):
    days: Annotated[list[Weekday], Field(min_length=1)]
    from_: Annotated[TimeOfDay | None, Field(alias="from")] = None
    to: TimeOfDay | None = None

    # By alias only: the wire key is "from"; "from_" is an unknown key like any other.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    @model_validator(mode="after")
    def _window(self) -> DeliveryTimeWindow:
        if (self.from_ is None) != (self.to is None):
            raise ValueError("'from' and 'to' go together")
        if self.from_ and self.to:
            start = self.from_.hour * 60 + self.from_.minute
            end = self.to.hour * 60 + self.to.minute
            if (end - start) % (24 * 60) < 60:
                raise ValueError("'from' and 'to' must be at least 1 hour apart")
        return self


class IndiaDlt(_Strict):
    principal_entity_id: str
    content_template_id: str | None = None
    telemarketer_id: Int64 | None = None


class TurkeyIys(_Strict):
    recipient_type: Literal["BIREYSEL", "TACIR"]
    brand_code: Int64 | None = None


class SouthKorea(_Strict):
    title: Annotated[str, Field(max_length=66)] | None = None
    reseller_code: Int64 | None = None


class Regional(_Strict):
    india_dlt: IndiaDlt | None = None
    turkey_iys: TurkeyIys | None = None
    south_korea: SouthKorea | None = None


Transliteration = Literal[
    "NONE", "TURKISH", "GREEK", "CYRILLIC", "SERBIAN_CYRILLIC", "CENTRAL_EUROPEAN", "BALTIC",
    "NON_UNICODE", "PORTUGUESE", "COLOMBIAN", "BULGARIAN_CYRILLIC", "ALL",
]


class Job(_Strict):
    """One SMS to one destination, as a producer hands it over (wire format v1)."""

    to: str
    text: str | None = None
    binary: Binary | None = None
    sender: Annotated[str, Field(min_length=1, max_length=64)] | None = None
    id: Annotated[str, Field(min_length=1, max_length=200)] | None = None
    metadata: dict[str, Any] | None = None
    transliteration: Transliteration | None = None
    language: Language | None = None
    validity_period: ValidityPeriod | None = None
    platform: Platform | None = None
    delivery_time_window: DeliveryTimeWindow | None = None
    campaign_reference_id: Annotated[str, Field(max_length=255)] | None = None
    regional: Regional | None = None
    flash: bool | None = None
    callback_data: Annotated[str, Field(max_length=4000)] | None = None
    send_at: Annotated[str, Field(max_length=64)] | None = None
    v: Literal[1] = 1

    @field_validator("send_at")
    @classmethod
    def _send_at(cls, value: str | None) -> str | None:
        if value is not None:
            parse_send_at(value)  # raises ValueError naming what is wrong
        return value

    @field_validator("v", mode="before")
    @classmethod
    def _version(cls, value: object) -> object:
        if value is True:  # Literal[1] compares by equality, and True == 1
            raise ValueError("must be the integer 1")
        return value

    @field_validator("text")
    @classmethod
    def _text(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("is empty")
        return value

    @field_validator("to")
    @classmethod
    def _phone(cls, value: str) -> str:
        if not _PHONE.match(value):
            raise ValueError("must be an international number: 7 to 15 digits, optional leading '+', e.g. 41793026727")
        return value.removeprefix("+")

    @model_validator(mode="after")
    def _content(self) -> Job:
        if (self.text is None) == (self.binary is None):
            raise ValueError("exactly one of 'text' or 'binary' is required")
        return self


# RFC 3339 date-time: seconds required, fraction optional, an offset ('Z' or +hh:mm) required, so
# a time is never read in whatever zone the worker happens to run in.
_RFC3339 = re.compile(r"(\d{4}-\d{2}-\d{2})[Tt ](\d{2}:\d{2}:\d{2})(?:\.(\d{1,9}))?([Zz]|[+-]\d{2}:\d{2})")
_NO_OFFSET = re.compile(r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?")


def parse_send_at(value: str) -> int:
    """A job's `send_at` (RFC 3339 with an offset) as Unix milliseconds; ValueError says what is wrong."""
    found = _RFC3339.fullmatch(value)  # fullmatch: `$` would let a trailing newline through
    if found is None:
        if _NO_OFFSET.fullmatch(value):
            raise ValueError("has no UTC offset: add 'Z' or '+hh:mm', e.g. 2026-12-01T09:30:00+01:00")
        raise ValueError("must be an RFC 3339 date-time with an offset, e.g. 2026-12-01T09:30:00Z")
    date, clock, fraction, offset = found.groups()
    micros = f".{fraction[:6].ljust(6, '0')}" if fraction else ""  # Python keeps microseconds
    try:
        moment = datetime.fromisoformat(f"{date}T{clock}{micros}{'+00:00' if offset in 'Zz' else offset}")
    except ValueError as error:
        raise ValueError(f"is not a valid date-time: {error}") from None
    return int(moment.timestamp() * 1000)


def _problems(error: ValidationError) -> list[Problem]:
    problems = []
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"]) or "(job)"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown option"
        problems.append(Problem(field, message))
    return problems


def validate_job(data: object, *, max_text_parts: int, metadata_max_bytes: int, index: int | None = None) -> Job:
    """Parse one job from a dict (or JSON bytes/str); raise JobValidationError listing every problem."""
    # A string with a lone surrogate (e.g. "\ud800") has no UTF-8 form: pydantic takes it in a
    # plain `str` field, and encoding it later would raise UnicodeEncodeError.
    unicode: list[Problem] = []
    _surrogate_problems(data, "", unicode)
    try:
        job = Job.model_validate_json(data) if isinstance(data, bytes | str) else Job.model_validate(data)
    except ValidationError as error:
        flagged = {p.field for p in unicode}
        problems = [p for p in _problems(error) if p.field not in flagged]  # pydantic: "not a unicode string"
        raise JobValidationError(unicode + problems, index) from None
    if unicode:
        raise JobValidationError(unicode, index)
    problems = []
    if job.text is not None and (problem := text_problem(job.text, max_text_parts)) is not None:
        problems.append(Problem("text", problem))
    if job.metadata is not None:
        try:
            size = len(orjson.dumps(job.metadata))
        except orjson.JSONEncodeError as error:  # a producer's dict: an int beyond 64 bits, a set...
            problems.append(Problem("metadata", f"not JSON: {error}"))
            size = 0
        if size > metadata_max_bytes:
            problems.append(Problem("metadata", f"{size} bytes as JSON, at most {metadata_max_bytes} allowed"))
    if problems:
        raise JobValidationError(problems, index)
    return job


def encode_job(job: Job) -> bytes:
    """The wire form of a job: compact JSON without the fields left at their defaults."""
    return orjson.dumps(job.model_dump(mode="json", exclude_none=True, by_alias=True))


_FAST_KEYS = frozenset({"to", "text", "id", "sender", "metadata", "v"})


def plain_job(data: Any, *, max_text_parts: int, metadata_max_bytes: int, json_size: int) -> dict[str, Any] | None:
    """The common job (to, text, optional id/sender/metadata) checked without pydantic, with `to`
    normalised; None for anything unusual or wrong (the caller then takes `validate_job`, which
    names every problem). `json_size` is the length of the job as JSON, a bound on its metadata's.

    Producers enqueue and dispatchers check these by the hundred thousand; pydantic costs ~10 us a job.
    """
    return _plain_job(data, max_text_parts, metadata_max_bytes, json_size, False)


def _plain_job(data: Any, max_text_parts: int, metadata_max_bytes: int, json_size: int,
               utf8_checked: bool) -> dict[str, Any] | None:
    """plain_job; every string (and metadata key) is checked for lone surrogates unless
    `utf8_checked` says orjson encoded the job already (it refuses a string holding one)."""
    if type(data) is not dict or not data.keys() <= _FAST_KEYS:
        return None
    to, text = data.get("to"), data.get("text")
    if type(to) is not str or type(text) is not str or not _PHONE.match(to) or not text.strip():
        return None
    producer_id, sender, metadata = data.get("id"), data.get("sender"), data.get("metadata")
    if not _plain_options(producer_id, sender, metadata, data.get("v", 1)):
        return None
    # A lone surrogate anywhere (no UTF-8 form) is named by validate_job. (JSON parsed by orjson
    # never holds one, but a producer's dict may.)
    if not utf8_checked and _plain_has_lone_surrogate(text, producer_id, sender, metadata):
        return None
    # Counting parts costs ~1 us: only texts that may have too many are counted (see text_problem).
    if len(text) > 33 * max_text_parts and text_problem(text, max_text_parts) is not None:
        return None
    # The whole job bounds its metadata: only a large job needs the metadata measured alone. (Last:
    # orjson raises on metadata that is not JSON; the checks above may turn the job away first.)
    if metadata is not None and json_size > metadata_max_bytes and len(orjson.dumps(metadata)) > metadata_max_bytes:
        return None
    return {**data, "to": to[1:]} if to[0] == "+" else data


def _plain_options(producer_id: Any, sender: Any, metadata: Any, version: Any) -> bool:
    """A plain job's id and sender are short strings (or absent), metadata a dict (or absent), v 1."""
    if producer_id is not None and (type(producer_id) is not str or not 0 < len(producer_id) <= 200):
        return False
    if sender is not None and (type(sender) is not str or not 0 < len(sender) <= 64):
        return False
    return version == 1 and version is not True and (metadata is None or type(metadata) is dict)


def _plain_has_lone_surrogate(text: str, producer_id: str | None, sender: str | None,
                              metadata: dict[str, Any] | None) -> bool:
    """True when a plain job's text, id, sender or metadata holds a lone surrogate."""
    # One check of the strings joined finds one in any of them (joining makes or hides no surrogate).
    strings = text + (producer_id or "") + (sender or "")
    if not strings.isascii() and _SURROGATE.search(strings) is not None:
        return True
    return metadata is not None and _has_lone_surrogate(metadata)


def encode_plain_job(data: Any, *, max_text_parts: int, metadata_max_bytes: int) -> bytes | None:
    """The wire form of a plain job (see `plain_job`), or None."""
    if type(data) is not dict:
        return None
    try:
        encoded = orjson.dumps(data)
    except TypeError:  # not JSON, or a string with a lone surrogate: validate_job says which
        return None
    job = _plain_job(data, max_text_parts, metadata_max_bytes, len(encoded), True)
    if job is None:
        return None
    return encoded if job is data else orjson.dumps(job)


# The API clamps a validity period above 48 h to 48 h; a job without one gets the 48 h.
MAX_VALIDITY_S = 48 * 3600
_UNIT_SECONDS = {"SECONDS": 1, "MINUTES": 60, "HOURS": 3600}


def validity_seconds(amount: int, time_unit: str = "MINUTES") -> int:
    """How long the platform keeps trying a message with this validity period, in seconds: the one
    place the unit and the 48 h cap are applied (ValidityPeriod and the dispatcher's report
    deadline). An unknown unit counts as minutes, the API's default."""
    return min(amount * _UNIT_SECONDS.get(time_unit, 60), MAX_VALIDITY_S)


def lenient_job(raw: bytes) -> dict[str, Any]:
    """A job's JSON as far as it parses, for the event of one that will
    never be sent (or is cancelled before it is)."""
    try:
        job = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return {}
    return job if isinstance(job, dict) else {}
