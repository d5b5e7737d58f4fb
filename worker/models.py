"""The job a producer enqueues (wire format v1) and the message states; plain typed data.

A job is JSON in the `job` field of an outbox stream entry. Keys are snake_case; unknown keys are
refused so a typo in an option never silently sends something other than what was meant.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from worker.errors import JobValidationError, Problem

JOB_FORMAT_VERSION = 1

# E.164 without formatting: optional '+', 7 to 15 digits, no leading zero.
_PHONE = re.compile(r"^\+?[1-9][0-9]{6,14}$")
_HEX = re.compile(r"^[0-9A-Fa-f]{2}( [0-9A-Fa-f]{2})*$")
_GSM7_BASIC = set(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§"
    "¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
_GSM7_EXTENDED = set("^{}\\[~]|€\f")


class State(StrEnum):
    """Where one message is; see docs/architecture.md for the transitions."""

    QUEUED = "QUEUED"
    SUBMITTING = "SUBMITTING"
    AMBIGUOUS = "AMBIGUOUS"
    ACCEPTED = "ACCEPTED"
    DELIVERED = "DELIVERED"
    UNDELIVERABLE = "UNDELIVERABLE"
    EXPIRED = "EXPIRED"
    REJECTED = "REJECTED"
    FAILED = "FAILED"


TERMINAL_STATES = frozenset(
    {State.DELIVERED, State.UNDELIVERABLE, State.EXPIRED, State.REJECTED, State.FAILED}
)


def sms_parts(text: str) -> int:
    """How many SMS parts the platform bills for `text` (GSM-7 160/153, otherwise UCS-2 70/67)."""
    if all(ch in _GSM7_BASIC or ch in _GSM7_EXTENDED for ch in text):
        septets = sum(2 if ch in _GSM7_EXTENDED else 1 for ch in text)
        return 1 if septets <= 160 else -(-septets // 153)
    units = len(text.encode("utf-16-le")) // 2
    return 1 if units <= 70 else -(-units // 67)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Binary(_Strict):
    hex: str
    data_coding: int = 0
    esm_class: int = 0

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
    amount: Annotated[int, Field(ge=1)]
    time_unit: Literal["SECONDS", "MINUTES", "HOURS"] = "MINUTES"

    def seconds(self) -> int:
        # The API clamps anything above 48 h to 48 h.
        factor = {"SECONDS": 1, "MINUTES": 60, "HOURS": 3600}[self.time_unit]
        return min(self.amount * factor, 48 * 3600)


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

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

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
    telemarketer_id: int | None = None


class TurkeyIys(_Strict):
    recipient_type: Literal["BIREYSEL", "TACIR"]
    brand_code: int | None = None


class SouthKorea(_Strict):
    title: Annotated[str, Field(max_length=66)] | None = None
    reseller_code: int | None = None


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
    v: Literal[1] = 1

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
    try:
        job = Job.model_validate_json(data) if isinstance(data, bytes | str) else Job.model_validate(data)
    except ValidationError as error:
        raise JobValidationError(_problems(error), index) from None
    problems = []
    if job.text is not None:
        parts = sms_parts(job.text)
        if parts > max_text_parts or len(job.text.encode()) > 4000:
            problems.append(
                Problem("text", f"too long: {parts} SMS parts, the platform accepts at most {max_text_parts}")
            )
    if job.metadata is not None:
        size = len(orjson.dumps(job.metadata))
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
    if type(data) is not dict or not data.keys() <= _FAST_KEYS:
        return None
    to, text = data.get("to"), data.get("text")
    if type(to) is not str or type(text) is not str or not _PHONE.match(to) or not text.strip():
        return None
    producer_id, sender, metadata = data.get("id"), data.get("sender"), data.get("metadata")
    if producer_id is not None and (type(producer_id) is not str or not 0 < len(producer_id) <= 200):
        return None
    if sender is not None and (type(sender) is not str or not 0 < len(sender) <= 64):
        return None
    if data.get("v", 1) != 1:
        return None
    # 70 characters fit one part in any encoding; longer texts are counted properly.
    if len(text) > 70 and (sms_parts(text) > max_text_parts or len(text.encode()) > 4000):
        return None
    if metadata is not None and type(metadata) is not dict:
        return None
    # The whole job bounds its metadata: only a large job needs the metadata measured alone.
    if metadata is not None and json_size > metadata_max_bytes and len(orjson.dumps(metadata)) > metadata_max_bytes:
        return None
    return {**data, "to": to[1:]} if to[0] == "+" else data


def encode_plain_job(data: Any, *, max_text_parts: int, metadata_max_bytes: int) -> bytes | None:
    """The wire form of a plain job (see `plain_job`), or None."""
    if type(data) is not dict:
        return None
    try:
        encoded = orjson.dumps(data)
    except TypeError:
        return None
    job = plain_job(data, max_text_parts=max_text_parts, metadata_max_bytes=metadata_max_bytes,
                    json_size=len(encoded))
    if job is None:
        return None
    return encoded if job is data else orjson.dumps(job)
