"""The send request's wire JSON: the camelCase `SmsRequestEnvelope` types and their building from a stored job.

Jobs are stored snake_case (`worker.models.encode_job`, `from` for the sender); the API spells
everything camelCase. `wire_message_from_dict` is the one translation, one small step per part of
the message (content, sender, options, webhooks), each leaving out what the job left out so the API
applies its own defaults. Plain dict building, no pydantic: dispatch calls it for up to ~50k
messages a second.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NotRequired, TypedDict

SEND_PATH = "/sms/3/messages"


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


class WireRequest(TypedDict):
    # The API also takes top-level `options` (schedule, tracking, conversion tracking); the worker
    # sends none of them, so the envelope has no field for them until a lane can ask for one.
    messages: list[WireMessage]


def drop_none(**fields: Any) -> dict[str, Any]:
    """The fields that are set: an absent field lets the API apply its default."""
    return {key: value for key, value in fields.items() if value is not None}


def wire_message_from_dict(
    job: Mapping[str, Any],
    message_id: str,
    *,
    default_sender: str | None,
    webhook_url: str | None,
    notify: bool | None = None,
) -> WireMessage:
    """One `SmsMessage` from a validated job in its stored form (`encode_job`: snake_case, `from`)."""
    content = _content(job)
    to: str = job["to"]
    destination: WireDestination = {"to": to.removeprefix("+"), "messageId": message_id}
    message: WireMessage = {"destinations": [destination], "content": content}
    sender = job.get("sender")
    if sender is None:
        sender = default_sender
    if sender is not None:
        message["sender"] = sender
    if options := _options(job):
        message["options"] = options
    if webhooks := _webhooks(job, webhook_url, notify):
        message["webhooks"] = webhooks
    return message


def wire_request(messages: list[WireMessage]) -> WireRequest:
    """The `SmsRequestEnvelope` for one bulk POST."""
    return {"messages": messages}


def _content(job: Mapping[str, Any]) -> WireTextContent | WireBinaryContent:
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
        return wire_text
    if (binary := job.get("binary")) is not None:
        return {
            "hex": binary["hex"],
            "dataCoding": binary.get("data_coding", 0),
            "esmClass": binary.get("esm_class", 0),
        }
    raise ValueError("job has neither text nor binary content")


def _options(job: Mapping[str, Any]) -> WireMessageOptions:
    options: WireMessageOptions = {}
    if (platform := job.get("platform")) is not None:
        wire_platform = drop_none(entityId=platform.get("entity_id"), applicationId=platform.get("application_id"))
        if wire_platform:
            options["platform"] = wire_platform
    if (validity := job.get("validity_period")) is not None:
        options["validityPeriod"] = {
            "amount": validity["amount"], "timeUnit": validity.get("time_unit", "MINUTES"),
        }
    if (window := job.get("delivery_time_window")) is not None:
        options["deliveryTimeWindow"] = _delivery_time_window(window)
    if (campaign := job.get("campaign_reference_id")) is not None:
        options["campaignReferenceId"] = campaign
    if (regional := job.get("regional")) is not None and (wire_regional := _regional(regional)):
        options["regional"] = wire_regional
    if (flash := job.get("flash")) is not None:
        options["flash"] = flash
    return options


def _delivery_time_window(window: Mapping[str, Any]) -> dict[str, Any]:
    wire: dict[str, Any] = {"days": list(window["days"])}
    if (start := window.get("from")) is not None:
        wire["from"] = _time_of_day(start)
    if (stop := window.get("to")) is not None:
        wire["to"] = _time_of_day(stop)
    return wire


def _time_of_day(value: Mapping[str, Any]) -> dict[str, int]:
    return {"hour": value["hour"], "minute": value["minute"]}


def _regional(regional: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    wire: dict[str, dict[str, Any]] = {}
    if (dlt := regional.get("india_dlt")) is not None:
        # The job takes an int (what producers have); the API schema says string.
        telemarketer = dlt.get("telemarketer_id")
        wire["indiaDlt"] = drop_none(
            principalEntityId=dlt["principal_entity_id"],
            contentTemplateId=dlt.get("content_template_id"),
            telemarketerId=None if telemarketer is None else str(telemarketer),
        )
    if (iys := regional.get("turkey_iys")) is not None:
        wire["turkeyIys"] = drop_none(recipientType=iys["recipient_type"], brandCode=iys.get("brand_code"))
    if (korea := regional.get("south_korea")) is not None:
        wire["southKorea"] = drop_none(title=korea.get("title"), resellerCode=korea.get("reseller_code"))
    return wire


def _webhooks(job: Mapping[str, Any], webhook_url: str | None, notify: bool | None) -> WireWebhooks:
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
    return webhooks
