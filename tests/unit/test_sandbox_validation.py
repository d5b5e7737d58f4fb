"""Unit tests of the sandbox's pure parts: validation, part counting, outcomes, report shapes, config."""

from __future__ import annotations

import argparse
import base64
import json
import random
from datetime import UTC, datetime, timedelta
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from worker.devtools.sandbox import codes
from worker.devtools.sandbox.config import (
    SandboxConfig,
    add_arguments,
    apply_updates,
    config_from_args,
    config_to_args,
    parse_outcome_mix,
)
from worker.devtools.sandbox.records import STATE, STATUS, UNFETCHED
from worker.devtools.sandbox.reports import OutcomePicker, log_of, report_of
from worker.devtools.sandbox.segments import binary_parts, text_parts, text_too_long
from worker.devtools.sandbox.state import SandboxState
from worker.devtools.sandbox.validation import (
    format_datetime,
    parse_datetime,
    parse_logs_query,
    parse_reports_query,
    valid_destination,
    validate_send_request,
)
from worker.devtools.sandbox.webhooks import parse_target

NOW = datetime(2026, 1, 15, 12, 0, tzinfo=UTC).timestamp()


def _schema_path() -> Path:
    shared = Path(__file__).parents[2].parent / "shared/api/sms-v3-schemas.json"
    return shared if shared.exists() else Path(__file__).parents[1] / "data/sms-v3-schemas.json"


@cache
def _validator(name: str) -> Draft202012Validator:
    document = json.loads(_schema_path().read_text())
    return Draft202012Validator({**document, "$ref": f"#/$defs/{name}"})


def _body(**message: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"destinations": [{"to": "41793026727"}], "content": {"text": "hi"}}
    base.update(message)
    return {"messages": [base]}


def _properties(body: Any) -> set[str]:
    return {prop for prop, _ in validate_send_request(body, NOW)}


# --- validate_send_request ----------------------------------------------------------------


def test_minimal_request_is_valid() -> None:
    """One destination and a text is a complete, valid request."""
    assert validate_send_request(_body(), NOW) == []


def test_full_request_with_every_option_is_valid() -> None:
    """A request using every documented option correctly has no violations, and unknown fields are ignored."""
    body = _body(
        sender="ACME",
        destinations=[{"to": "+41793026727", "messageId": "m-1", "networkId": 5}],
        content={"text": "hi", "transliteration": "TURKISH", "language": {"languageCode": "TR"}},
        options={
            "platform": {"entityId": "e", "applicationId": "a"},
            "validityPeriod": {"amount": 720, "timeUnit": "HOURS"},
            "deliveryTimeWindow": {
                "days": ["MONDAY", "FRIDAY"],
                "from": {"hour": 22, "minute": 0},
                "to": {"hour": 2, "minute": 30},
            },
            "campaignReferenceId": "c" * 255,
            "regional": {
                "indiaDlt": {"principalEntityId": "p"},
                "turkeyIys": {"recipientType": "TACIR", "brandCode": 1},
                "southKorea": {"title": "t" * 66},
            },
            "flash": True,
        },
        webhooks={"delivery": {"url": "http://127.0.0.1/x", "notify": True}, "callbackData": "d" * 4000},
        somethingNew={"ignored": True},
    )
    body["options"] = {
        "schedule": {
            "bulkId": "b" * 100,
            "sendAt": "2026-01-16T10:00:00.000+0000",
            "sendingSpeedLimit": {"amount": 10, "timeUnit": "HOUR"},
        },
        "includeSmsCountInResponse": True,
    }
    assert validate_send_request(body, NOW) == []


@pytest.mark.parametrize(
    ("body", "prop"),
    [
        ({}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": "x"}, "messages"),
        ({"messages": ["x"]}, "messages[0]"),
        ({"messages": [{"content": {"text": "hi"}}]}, "messages[0].destinations"),
        (_body(destinations=[]), "messages[0].destinations"),
        (_body(destinations=[{}]), "messages[0].destinations[0].to"),
        (_body(destinations=[{"to": 41793026727}]), "messages[0].destinations[0].to"),
        (_body(destinations=[{"to": "4" * 65}]), "messages[0].destinations[0].to"),
        (_body(destinations=[{"to": "41793026727", "messageId": "m" * 201}]), "messages[0].destinations[0].messageId"),
        (_body(content={"text": "a", "hex": "61"}), "messages[0].content"),
        (_body(content={}), "messages[0].content"),
        ({"messages": [{"destinations": [{"to": "41793026727"}]}]}, "messages[0].content"),
        (_body(content={"hex": "6"}), "messages[0].content.hex"),
        (_body(content={"text": "a", "transliteration": "KLINGON"}), "messages[0].content.transliteration"),
        (_body(content={"text": "a", "language": {"languageCode": "DE"}}), "messages[0].content.language.languageCode"),
        (_body(sender=5), "messages[0].sender"),
        (
            _body(options={"validityPeriod": {"amount": 1, "timeUnit": "DAYS"}}),
            "messages[0].options.validityPeriod.timeUnit",
        ),
        (_body(options={"validityPeriod": {}}), "messages[0].options.validityPeriod.amount"),
        (_body(options={"deliveryTimeWindow": {"days": []}}), "messages[0].options.deliveryTimeWindow.days"),
        (_body(options={"deliveryTimeWindow": {"days": ["FUNDAY"]}}), "messages[0].options.deliveryTimeWindow.days[0]"),
        (
            _body(options={"deliveryTimeWindow": {"days": ["MONDAY"], "from": {"hour": 9, "minute": 0}}}),
            "messages[0].options.deliveryTimeWindow",
        ),
        (
            _body(
                options={
                    "deliveryTimeWindow": {
                        "days": ["MONDAY"],
                        "from": {"hour": 9, "minute": 0},
                        "to": {"hour": 9, "minute": 59},
                    }
                }
            ),
            "messages[0].options.deliveryTimeWindow",
        ),
        (
            _body(
                options={
                    "deliveryTimeWindow": {
                        "days": ["MONDAY"],
                        "from": {"hour": 24, "minute": 0},
                        "to": {"hour": 9, "minute": 0},
                    }
                }
            ),
            "messages[0].options.deliveryTimeWindow.from.hour",
        ),
        (_body(options={"campaignReferenceId": "c" * 256}), "messages[0].options.campaignReferenceId"),
        (_body(options={"platform": {"entityId": "e" * 256}}), "messages[0].options.platform.entityId"),
        (_body(options={"platform": {"applicationId": "a" * 256}}), "messages[0].options.platform.applicationId"),
        (
            _body(options={"regional": {"southKorea": {"title": "t" * 67}}}),
            "messages[0].options.regional.southKorea.title",
        ),
        (
            _body(options={"regional": {"turkeyIys": {"recipientType": "X"}}}),
            "messages[0].options.regional.turkeyIys.recipientType",
        ),
        (_body(webhooks={"callbackData": "d" * 4001}), "messages[0].webhooks.callbackData"),
        (_body(webhooks={"delivery": {"notify": "no"}}), "messages[0].webhooks.delivery.notify"),
        ({**_body(), "options": {"schedule": {"bulkId": "b" * 101}}}, "options.schedule.bulkId"),
        ({**_body(), "options": {"schedule": {"sendAt": "2026-01-16 10:00"}}}, "options.schedule.sendAt"),
        ({**_body(), "options": {"schedule": {"sendAt": "2026-08-01T10:00:00.000+0000"}}}, "options.schedule.sendAt"),
        (
            {**_body(), "options": {"schedule": {"sendingSpeedLimit": {"amount": 1, "timeUnit": "WEEK"}}}},
            "options.schedule.sendingSpeedLimit.timeUnit",
        ),
    ],
)
def test_violation_is_reported_at_its_property_path(body: Any, prop: str) -> None:
    """Each schema breach yields a violation whose property is the JSON path of the offending field."""
    assert prop in _properties(body)


def test_violations_are_collected_across_messages() -> None:
    """All violations of a request come back together, each with its own index."""
    body = {
        "messages": [
            {"destinations": [{"to": "1" * 65}], "content": {"text": "a"}},
            {"destinations": [{"to": "41793026727"}, {}], "content": {"text": "a", "hex": "00"}},
        ]
    }
    assert _properties(body) == {
        "messages[0].destinations[0].to",
        "messages[1].destinations[1].to",
        "messages[1].content",
    }


def test_non_object_body_is_one_violation() -> None:
    """A JSON array body is rejected as a whole."""
    assert validate_send_request([], NOW) == [("", "request body must be a JSON object")]


@pytest.mark.parametrize(
    "send_at", ["2026-01-16T10:00:00.000+0000", "2026-01-16T10:00:00.000+00:00", "2026-01-16T10:00:00Z"]
)
def test_send_at_accepts_both_offset_styles(send_at: str) -> None:
    """sendAt accepts +0000, +00:00 and Z offsets."""
    assert validate_send_request({**_body(), "options": {"schedule": {"sendAt": send_at}}}, NOW) == []


# Every integer of the send request, as (path in the violation, body holding `value` there).
_INTEGER_FIELDS: list[tuple[str, Any]] = [
    ("messages[0].destinations[0].networkId", lambda v: _body(destinations=[{"to": "41793026727", "networkId": v}])),
    ("messages[0].content.dataCoding", lambda v: _body(content={"hex": "48 69", "dataCoding": v})),
    ("messages[0].content.esmClass", lambda v: _body(content={"hex": "48 69", "esmClass": v})),
    ("messages[0].options.validityPeriod.amount", lambda v: _body(options={"validityPeriod": {"amount": v}})),
    (
        "messages[0].options.regional.turkeyIys.brandCode",
        lambda v: _body(options={"regional": {"turkeyIys": {"recipientType": "TACIR", "brandCode": v}}}),
    ),
    (
        "messages[0].options.regional.southKorea.resellerCode",
        lambda v: _body(options={"regional": {"southKorea": {"resellerCode": v}}}),
    ),
    (
        "options.schedule.sendingSpeedLimit.amount",
        lambda v: {**_body(), "options": {"schedule": {"sendingSpeedLimit": {"amount": v}}}},
    ),
]


@pytest.mark.parametrize(("prop", "build"), _INTEGER_FIELDS, ids=[prop for prop, _ in _INTEGER_FIELDS])
def test_integer_fields_take_json_integers_in_the_int32_range(prop: str, build: Any) -> None:
    """JSON Schema integers: 3.0 and 1e2 are integers, 3.5 and true are not; `format: int32` bounds them."""
    for value in (3, 3.0, 100.0, -0.0, 2**31 - 1, -(2**31), float(2**31 - 1)):
        assert validate_send_request(build(value), NOW) == [], value
    for value in (3.5, True, "3"):
        assert validate_send_request(build(value), NOW) == [(prop, "must be an integer")], value
    for value in (2**31, -(2**31) - 1, 2.0**31, 2**64, 1e300):
        assert validate_send_request(build(value), NOW) == [(prop, "must be between -2147483648 and 2147483647")]


def test_delivery_window_times_take_integral_floats() -> None:
    """hour/minute accept 22.0 and 30.0, still within 0-23/0-59, and the 1-hour rule still applies."""
    window = {"days": ["MONDAY"], "from": {"hour": 22.0, "minute": 0.0}, "to": {"hour": 2, "minute": 30.0}}
    assert validate_send_request(_body(options={"deliveryTimeWindow": window}), NOW) == []
    window["to"] = {"hour": 22.0, "minute": 59.0}
    assert _properties(_body(options={"deliveryTimeWindow": window})) == {"messages[0].options.deliveryTimeWindow"}
    window["to"] = {"hour": 24.0, "minute": 0}
    assert _properties(_body(options={"deliveryTimeWindow": window})) == {
        "messages[0].options.deliveryTimeWindow.to.hour"
    }


@pytest.mark.parametrize(
    ("options", "prop"),
    [
        ({"tracking": {"shortenUrl": "yes"}}, "options.tracking.shortenUrl"),
        ({"tracking": {"trackClicks": 1}}, "options.tracking.trackClicks"),
        ({"tracking": {"trackingUrl": 5}}, "options.tracking.trackingUrl"),
        ({"tracking": {"removeProtocol": "false"}}, "options.tracking.removeProtocol"),
        ({"tracking": {"customDomain": ["d"]}}, "options.tracking.customDomain"),
        ({"conversionTracking": {"useConversionTracking": 0}}, "options.conversionTracking.useConversionTracking"),
        ({"conversionTracking": {"conversionTrackingName": 7}}, "options.conversionTracking.conversionTrackingName"),
    ],
)
def test_tracking_options_are_typed(options: dict[str, Any], prop: str) -> None:
    """The fields inside options.tracking (UrlOptions) and options.conversionTracking (Tracking) are checked."""
    assert _properties({**_body(), "options": options}) == {prop}


def test_tracking_options_valid() -> None:
    """Every tracking field with its schema type is accepted."""
    body = {
        **_body(),
        "options": {
            "tracking": {
                "shortenUrl": True,
                "trackClicks": False,
                "trackingUrl": "https://example.com/clicks",
                "removeProtocol": True,
                "customDomain": "s.example.com",
            },
            "conversionTracking": {"useConversionTracking": True, "conversionTrackingName": "ONE_TIME_PIN"},
        },
    }
    assert validate_send_request(body, NOW) == []


@pytest.mark.parametrize(
    ("body", "prop"),
    [
        (_body(sender=None), "messages[0].sender"),
        (_body(options=None), "messages[0].options"),
        (_body(webhooks=None), "messages[0].webhooks"),
        (_body(webhooks={"delivery": {"notify": None}}), "messages[0].webhooks.delivery.notify"),
        (_body(content={"text": "a", "transliteration": None}), "messages[0].content.transliteration"),
        (_body(content={"text": None}), "messages[0].content.text"),
        (_body(destinations=[{"to": "41793026727", "networkId": None}]), "messages[0].destinations[0].networkId"),
        (
            _body(options={"deliveryTimeWindow": {"days": ["MONDAY"], "from": None, "to": {"hour": 1, "minute": 0}}}),
            "messages[0].options.deliveryTimeWindow.from",
        ),
        ({**_body(), "options": None}, "options"),
        ({**_body(), "options": {"schedule": {"bulkId": None}}}, "options.schedule.bulkId"),
    ],
)
def test_explicit_null_is_a_violation(body: Any, prop: str) -> None:
    """No schema field is nullable: an optional field may be absent, not null (the worker omits them)."""
    violations = validate_send_request(body, NOW)
    assert violations == [(prop, "must not be null")]
    response, problems = _state().accept(body, NOW)  # the app's path too, fast path included
    assert response is None and problems == violations


def test_null_hex_beside_text_is_text_content() -> None:
    """{"text": "a", "hex": null} is valid text content (oneOf: the binary branch fails), and logged as text."""
    state = _state()
    response, problems = state.accept(_body(content={"text": "a", "hex": None}), NOW)
    assert problems == [] and response is not None
    log = log_of(state.log[0], 0.01, "EUR")
    assert log["content"] == {"text": "a"}
    _validator("Log").validate(log)


def test_binary_log_echoes_integral_floats_as_ints() -> None:
    """dataCoding 8.0 is accepted and echoed as 8, as the platform's int32 field would."""
    state = _state()
    response, _ = state.accept(_body(content={"hex": "48 69", "dataCoding": 8.0, "esmClass": 64.0}), NOW)
    assert response is not None
    content = log_of(state.log[0], 0.01, "EUR")["content"]
    assert content == {"hex": "48 69", "dataCoding": 8, "esmClass": 64}
    assert type(content["dataCoding"]) is int


@pytest.mark.parametrize(
    "send_at",
    [
        " 2026-01-16T10:00:00.000+0000",
        "2026-01-16T10:00:00.000+0000 ",
        "2026-01-16T10:00:00.000+0000\n",
        "2026-01-16T10:00:00.000 0000",  # the query-string '+' repair does not apply to a JSON body
        "\u0662026-01-16T10:00:00.000+0000",  # an Arabic-Indic digit: the schema pattern is ASCII
        "2026-02-30T10:00:00.000+0000",
    ],
)
def test_send_at_in_a_body_must_match_exactly(send_at: str) -> None:
    """sendAt is the schema's pattern, with no blanks, no space for '+' and ASCII digits, and a real date."""
    body = {**_body(), "options": {"schedule": {"sendAt": send_at}}}
    assert validate_send_request(body, NOW) == [("options.schedule.sendAt", "must match yyyy-MM-dd'T'HH:mm:ss.SSSZ")]


# --- datetimes, destinations, parts ------------------------------------------------------


def test_parse_datetime_styles_agree() -> None:
    """Colon and no-colon offsets, short fractions and Z denote the same instants."""
    expected = datetime(2020, 2, 22, 16, 42, 5, 390000, tzinfo=UTC).timestamp()
    assert parse_datetime("2020-02-22T17:42:05.390+01:00") == pytest.approx(expected)
    assert parse_datetime("2020-02-22T17:42:05.39+0100") == pytest.approx(expected)
    assert parse_datetime("2020-02-22T16:42:05.390Z") == pytest.approx(expected)
    assert parse_datetime("2020-02-22T17:42:05.390 01:00") == pytest.approx(expected)  # unencoded '+'
    with pytest.raises(ValueError, match="2020"):
        parse_datetime("2020-02-22")


def test_format_datetime_is_the_api_format() -> None:
    """Timestamps are emitted as yyyy-MM-dd'T'HH:mm:ss.SSS+0000."""
    assert format_datetime(datetime(2019, 11, 9, 16, 0, 0, 123456, tzinfo=UTC).timestamp()) == (
        "2019-11-09T16:00:00.123+0000"
    )


@pytest.mark.parametrize(
    ("to", "valid"),
    [
        ("41793026727", True),
        ("+41793026727", True),
        ("1234567", True),
        ("123456", False),
        ("1" * 16, False),
        ("4179302672a", False),
        ("++41793026727", False),
        ("", False),
        ("٤١٧٩٣٠٢٦٧٢٧", False),
    ],
)
def test_valid_destination(to: str, valid: bool) -> None:
    """A destination is 7 to 15 ASCII digits after an optional '+', both in the helper and in accept()."""
    assert valid_destination(to) is valid
    response, _ = _state().accept(_body(destinations=[{"to": to}]), NOW)
    assert response is not None
    expected = 26 if valid else (51 if not to else 52)
    assert response["messages"][0]["status"]["id"] == expected


@pytest.mark.parametrize(
    ("text", "parts"),
    [
        ("", 1),
        ("a" * 160, 1),
        ("a" * 161, 2),
        ("a" * 306, 2),
        ("a" * 307, 3),
        ("[" * 80, 1),  # extension characters take two septets
        ("[" * 81, 2),
        ("é" * 160, 1),  # é is in the GSM basic table
        ("`" + "a" * 69, 1),  # a backtick is not GSM: UCS-2
        ("`" + "a" * 70, 2),
        ("ж" * 134, 2),
        ("ж" * 135, 3),
        ("😀" * 35, 1),  # outside the BMP: two UTF-16 units each
        ("😀" * 36, 2),
    ],
)
def test_text_parts(text: str, parts: int) -> None:
    """GSM-7 texts split at 160/153 septets, UCS-2 texts at 70/67 units."""
    assert text_parts(text) == parts


@given(st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789 .,!?", max_size=2000))
def test_gsm_text_parts_match_the_formula(text: str) -> None:
    """For plain GSM text, parts are 1 up to 160 characters, then ceil(n / 153)."""
    expected = 1 if len(text) <= 160 else -(-len(text) // 153)
    assert text_parts(text) == expected


def test_text_too_long_limits() -> None:
    """More than 25 parts or more than 4000 UTF-8 bytes is too long."""
    assert not text_too_long("a" * 3825, text_parts("a" * 3825))
    assert text_too_long("a" * 3826, text_parts("a" * 3826))
    assert text_too_long("ж" * 2001, 1)


def test_the_byte_limit_counts_the_sms_encoding_not_utf8() -> None:
    """25 parts of euro signs (3,800 septets, 5,700 bytes of UTF-8: 76 a part, an escape never split
    from its character) or of CJK (1,675 UCS-2 units) are sent; the 26th part is too long."""
    for text in ("€" * 1900, "漢" * 1675):
        assert text_parts(text) == 25 and not text_too_long(text, 25)
    for text in ("€" * 1901, "漢" * 1676):
        assert text_parts(text) == 26 and text_too_long(text, 26)


def test_binary_parts() -> None:
    """Binary payloads split at 140 bytes, then 134 per part."""
    assert binary_parts(" ".join(["00"] * 140)) == 1
    assert binary_parts(" ".join(["00"] * 141)) == 2
    assert binary_parts("48656c6c6f") == 1


# --- query strings ------------------------------------------------------------------------


def test_logs_query_accepts_both_array_styles() -> None:
    """Array filters take repeated keys and comma-separated values alike."""
    query, problems = parse_logs_query(b"messageId=a,b&messageId=c&bulkId=x&campaignReferenceId=k1,k2")
    assert problems == []
    assert query.message_ids == ["a", "b", "c"]
    assert query.bulk_ids == ["x"]
    assert query.campaign_reference_ids == ["k1", "k2"]


def test_logs_query_violations() -> None:
    """Bad logs parameters are 400 violations named after the parameter."""
    cases = {
        b"limit=1001": "limit",
        b"limit=0": "limit",
        b"limit=x": "limit",
        b"mnc=01": "mnc",
        b"generalStatus=LOST": "generalStatus",
        b"sentSince=yesterday": "sentSince",
        b"messageId=" + b"a" * 2049: "messageId",
    }
    for raw, prop in cases.items():
        _, problems = parse_logs_query(raw)
        assert [p for p, _ in problems] == [prop], raw


def test_logs_query_datetimes_in_both_styles() -> None:
    """sentSince/sentUntil accept both offset styles, URL-encoded or not."""
    query, problems = parse_logs_query(
        b"sentSince=2020-02-22T17:42:05.390%2B01:00&sentUntil=2020-02-23T17:42:05.39+0100"
    )
    assert problems == []
    assert query.sent_until is not None and query.sent_since is not None
    assert query.sent_until - query.sent_since == pytest.approx(86400)


def test_reports_query_limit() -> None:
    """Reports default to 50 per page, allow 1000 and reject more."""
    assert parse_reports_query(b"")[0].limit == 50
    assert parse_reports_query(b"limit=1000")[1] == []
    assert parse_reports_query(b"limit=1001")[1][0][0] == "limit"


# --- outcomes, reports and logs -----------------------------------------------------------


def test_outcome_picker_is_deterministic_for_a_seed() -> None:
    """The same seed gives the same outcome sequence."""
    mix = parse_outcome_mix("delivered=0.5,undeliverable=0.2,expired=0.2,rejected=0.1")
    first = [OutcomePicker(mix, random.Random(3)).pick() for _ in range(1)]
    a = OutcomePicker(mix, random.Random(3))
    b = OutcomePicker(mix, random.Random(3))
    assert [a.pick() for _ in range(200)] == [b.pick() for _ in range(200)]
    assert first


def test_outcome_picker_follows_the_mix() -> None:
    """Outcome kinds appear roughly in the configured proportions, and zero-weight kinds never."""
    picker = OutcomePicker(parse_outcome_mix("delivered=0.8,rejected=0.2"), random.Random(1))
    groups = [picker.pick()[0]["groupName"] for _ in range(5000)]
    assert set(groups) == {"DELIVERED", "REJECTED"}
    assert 0.75 < groups.count("DELIVERED") / len(groups) < 0.85


def _state(**settings: Any) -> SandboxState:
    return SandboxState(SandboxConfig(seed=1, **settings), NOW)


def test_report_and_log_shapes_validate_against_the_schemas() -> None:
    """Reports and logs built from a record carry every field and match DeliveryReport and Log."""
    state = _state(report_delay_ms=0)
    body = _body(
        sender="ACME",
        options={"platform": {"entityId": "e1", "applicationId": "a1"}, "campaignReferenceId": "camp"},
        webhooks={"callbackData": "cb"},
    )
    response, problems = state.accept(body, NOW)
    assert problems == []
    assert response is not None
    _validator("SmsResponse").validate(response)
    record = state.log[0]
    pending_log = log_of(record, 0.01, "EUR")
    _validator("Log").validate(pending_log)
    assert pending_log["status"] == codes.PENDING_ACCEPTED
    assert "doneAt" not in pending_log
    state.generate_due(NOW + 1, 100)
    report = report_of(record, 0.01, "EUR")
    _validator("DeliveryReport").validate(report)
    assert report["callbackData"] == "cb"
    assert report["platform"] == {"entityId": "e1", "applicationId": "a1"}
    assert report["campaignReferenceId"] == "camp"
    assert report["sender"] == "ACME"
    assert report["mccMnc"] == "22801"
    assert report["sentAt"].endswith("+0000")
    _validator("Log").validate(log_of(record, 0.01, "EUR"))


def test_accept_statuses_per_destination() -> None:
    """Valid, malformed, missing, too-long and duplicate destinations get their documented statuses."""
    state = _state()
    body = {
        "messages": [
            {
                "destinations": [
                    {"to": "41793026727", "messageId": "ok"},
                    {"to": "12", "messageId": "bad"},
                    {"to": "", "messageId": "none"},
                    {"to": "41793026728", "messageId": "ok"},
                ],
                "content": {"text": "hi"},
            },
            {"destinations": [{"to": "41793026729"}], "content": {"text": "a" * 3826}},
        ],
        "options": {"schedule": {"bulkId": "B1"}},
    }
    response, _ = state.accept(body, NOW)
    assert response is not None
    assert response["bulkId"] == "B1"
    names = [m["status"]["name"] for m in response["messages"]]
    assert names == [
        "PENDING_ACCEPTED",
        "REJECTED_DESTINATION",
        "MISSING_TO",
        "REJECTED_DUPLICATE_MESSAGE_ID",
        "REJECTED_MESSAGE_TOO_LONG",
    ]
    assert response["messages"][4]["details"]["messageCount"] == 26
    assert response["messages"][4]["messageId"]  # generated
    assert state.messages_accepted == 1
    assert state.duplicate_rejections == 1


def test_accept_takes_the_slow_path_for_unusual_but_valid_shapes() -> None:
    """Messages with options, extra content fields, networkIds or unknown fields are validated fully and accepted."""
    state = _state()
    body = {
        "messages": [
            {
                "sender": "ACME",
                "destinations": [{"to": "41793026727", "networkId": 3}, {"to": "41793026728", "messageId": "n2"}],
                "content": {"text": "hi", "transliteration": "GREEK"},
                "options": {"flash": True},
                "somethingNew": 1,
            },
            {"destinations": [{"to": "41793026729"}], "content": {"hex": "48 69"}},
        ]
    }
    response, problems = state.accept(body, NOW)
    assert problems == []
    assert response is not None
    assert [m["status"]["id"] for m in response["messages"]] == [26, 26, 26]
    assert state.messages_accepted == 3


def test_invalid_request_records_nothing() -> None:
    """A request with a violation in a later message leaves no trace of its earlier, valid messages."""
    state = _state()
    body = {
        "messages": [
            {"destinations": [{"to": "41793026727", "messageId": "first"}], "content": {"text": "hi"}},
            {"destinations": [{"to": "41793026727", "messageId": "x" * 201}], "content": {"text": "hi"}},
        ]
    }
    response, problems = state.accept(body, NOW)
    assert response is None
    assert [p for p, _ in problems] == ["messages[1].destinations[0].messageId"]
    assert state.by_message_id == {}
    assert state.messages_accepted == 0
    again, _ = state.accept({"messages": body["messages"][:1]}, NOW)
    assert again is not None and again["messages"][0]["status"]["name"] == "PENDING_ACCEPTED"


def test_duplicates_counted_when_let_through() -> None:
    """With duplicate rejection off, a re-sent messageId is accepted and counted as a duplicate send."""
    state = _state(reject_duplicate_ids=False)
    for _ in range(3):
        state.accept(_body(destinations=[{"to": "41793026727", "messageId": "same"}]), NOW)
    stats = state.stats(per_message=True)
    assert stats["duplicates"] == 1
    assert stats["accepted_per_message_id"] == {"same": 3}


def test_reports_are_generated_after_the_delay_and_fetched_once() -> None:
    """A report appears once its delay passed and GET-style fetching returns it exactly once."""
    state = _state(report_delay_ms=500)
    state.accept(_body(), NOW)
    assert state.generate_due(NOW + 0.4, 100) == 0
    assert state.generate_due(NOW + 0.6, 100) == 1
    record = state.log[0]
    assert record[STATE] == UNFETCHED and record[STATUS] is not None
    query, _ = parse_reports_query(b"")
    assert state.fetch_reports(query, NOW + 1) == [record]
    assert state.fetch_reports(query, NOW + 1) == []


def test_scheduled_send_delays_the_report() -> None:
    """A future sendAt postpones report generation until then."""
    state = _state(report_delay_ms=0)
    send_at = format_datetime(NOW + 3600)
    state.accept({**_body(), "options": {"schedule": {"sendAt": send_at}}}, NOW)
    assert state.generate_due(NOW + 3599, 100) == 0
    assert state.generate_due(NOW + 3600, 100) == 1


def test_notify_false_suppresses_the_report() -> None:
    """A message with webhooks.delivery.notify=false never produces a report."""
    state = _state(report_delay_ms=0)
    state.accept(_body(webhooks={"delivery": {"notify": False}}), NOW)
    state.generate_due(NOW, 100)
    assert state.fetch_reports(parse_reports_query(b"")[0], NOW) == []
    assert state.stats(False)["reports"]["suppressed"] == 1


def test_seeded_states_generate_identical_outcomes() -> None:
    """Two sandboxes with the same seed and traffic produce the same report outcomes."""
    results = []
    for _ in range(2):
        state = _state(report_delay_ms=0, outcome_mix=parse_outcome_mix("delivered=1,rejected=1"))
        state.accept({"messages": [_body()["messages"][0]] * 50}, NOW)
        state.generate_due(NOW, 1000)
        results.append([record[STATUS]["name"] for record in state.log])
    assert results[0] == results[1]
    assert len(set(results[0])) > 1


# --- config and webhook targets -----------------------------------------------------------


def test_outcome_mix_parsing() -> None:
    """The mix normalises weights, and unknown kinds or zero totals are errors."""
    assert parse_outcome_mix("delivered=3,rejected=1") == {
        "delivered": 0.75,
        "undeliverable": 0.0,
        "expired": 0.0,
        "rejected": 0.25,
    }
    with pytest.raises(ValueError, match="unknown outcome"):
        parse_outcome_mix("lost=1")
    with pytest.raises(ValueError, match="more than 0"):
        parse_outcome_mix({"delivered": 0})


def test_apply_updates_is_all_or_nothing() -> None:
    """One bad setting rejects the whole update and names the problem."""
    config = SandboxConfig()
    problems = apply_updates(config, {"latency_ms": 5, "drop_rate": 2, "nope": 1})
    assert dict(problems).keys() == {"drop_rate", "nope"}
    assert config.latency_ms == 0
    assert apply_updates(config, {"reports_delay_ms": 10, "down": True}) == []
    assert config.report_delay_ms == 10 and config.down is True


def test_cli_flags_round_trip() -> None:
    """config_to_args produces flags that add_arguments/config_from_args turn back into the same config."""
    original = SandboxConfig(
        report_delay_ms=50,
        outcome_mix=parse_outcome_mix("delivered=1,expired=1"),
        seed=9,
        rate_429=0.5,
        error_5xx_codes=(503,),
        down=True,
        forbidden_keys=("a", "b"),
        reject_duplicate_ids=False,
    )
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    rebuilt = config_from_args(parser.parse_args(config_to_args(original)))
    assert rebuilt == original
    with pytest.raises(ValueError, match="--drop-rate"):
        config_from_args(parser.parse_args(["--drop-rate", "7"]))


def test_webhook_targets_are_loopback_only() -> None:
    """Only loopback http(s) URLs are pushed to, and URL userinfo becomes a Basic header."""
    target = parse_target("http://user:p%40ss@127.0.0.1:8080/hook?x=1")
    assert target is not None
    assert target.url == "http://127.0.0.1:8080/hook?x=1"
    assert target.authorization == "Basic " + base64.b64encode(b"user:p@ss").decode()
    assert parse_target("http://localhost/x") is not None
    assert parse_target("http://[::1]:9/x") is not None
    assert parse_target("http://10.0.0.1/x") is None
    assert parse_target("http://example.com/x") is None
    assert parse_target("ftp://127.0.0.1/x") is None


def test_retention_prunes_old_sends_but_keeps_their_ids_as_duplicates() -> None:
    """Sends older than 48 h leave the logs, yet their messageIds are still rejected as duplicates."""
    state = _state(report_delay_ms=0)
    state.accept(_body(destinations=[{"to": "41793026727", "messageId": "old"}]), NOW)
    state.generate_due(NOW, 10)
    later = NOW + timedelta(hours=49).total_seconds()
    state.prune(later)
    assert state.query_logs(parse_logs_query(b"")[0], later) == []
    response, _ = state.accept(_body(destinations=[{"to": "41793026727", "messageId": "old"}]), later)
    assert response is not None
    assert response["messages"][0]["status"]["name"] == "REJECTED_DUPLICATE_MESSAGE_ID"
    assert "old" not in state.by_message_id
