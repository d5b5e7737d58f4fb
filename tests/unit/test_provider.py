"""Unit tests of worker.provider over httpx.MockTransport: wire JSON, errors, retries, reports, logs."""

from __future__ import annotations

import email.utils
import itertools
import json
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from jsonschema import Draft202012Validator
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

import worker.provider.client as provider_module
from worker.errors import (
    ConfigError,
    ProviderAmbiguous,
    ProviderAuthError,
    ProviderBadRequest,
    ProviderError,
    ProviderNotActedOn,
    ProviderRateLimited,
    SendWindowClosed,
    Violation,
)
from worker.models import Job, encode_job
from worker.provider import (
    MAX_FILTER_CHARS,
    REPORTS_PATH,
    MessageStatus,
    Provider,
    ProviderConfig,
    WireMessage,
    chunk_message_ids,
    format_datetime,
    wire_message_from_dict,
    wire_request,
)
from worker.reports.parse import FinalReport, Page, parse_page
from worker.settings import Settings

API_KEY = "test-key-123"
PHONE = "41793026727"
PENDING = {
    "groupId": 1, "groupName": "PENDING", "id": 26, "name": "PENDING_ACCEPTED",
    "description": "Message sent to next instance",
}
DELIVERED = {
    "groupId": 3, "groupName": "DELIVERED", "id": 5, "name": "DELIVERED_TO_HANDSET",
    "description": "Message delivered to handset",
}
DUPLICATE = {
    "groupId": 5, "groupName": "REJECTED", "id": 23, "name": "REJECTED_DUPLICATE_MESSAGE_ID",
    "description": "Duplicate message id",
}
NO_ERROR = {
    "groupId": 0, "groupName": "OK", "id": 0, "name": "NO_ERROR", "description": "No Error",
    "permanent": False,
}

Reply = httpx.Response | Exception | Callable[[httpx.Request], httpx.Response]


def _schema_path() -> Path:
    local = Path(__file__).parents[2] / "tests/data/sms-v3-schemas.json"
    return local if local.exists() else Path(__file__).parents[3] / "shared/api/sms-v3-schemas.json"


@pytest.fixture(scope="module")
def request_schema() -> Draft202012Validator:
    """The SmsRequest envelope component of the contract's JSON Schema, as a validator."""
    schema = json.loads(_schema_path().read_text())
    assert "SmsRequest" in schema["$defs"]
    return Draft202012Validator({**schema, "$ref": "#/$defs/SmsRequest"})


def make_settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "icomm_base_url": "http://127.0.0.1:9",
        "icomm_api_key": API_KEY,
        "icomm_send_retry_attempts": 3,
        "icomm_retry_backoff_base_s": 0.1,
        "icomm_retry_backoff_max_s": 5.0,
        "sms_lease_s": 600.0,
    }
    values.update(overrides)
    return Settings(**values)


class Api:
    """A scripted MockTransport handler: replies in order (the last one repeats), every request kept."""

    def __init__(self, replies: list[Reply]) -> None:
        self.replies = replies or [ok({"messages": []})]
        self.requests: list[httpx.Request] = []
        self._lock = threading.Lock()

    def __call__(self, request: httpx.Request) -> httpx.Response:
        with self._lock:
            self.requests.append(request)
            reply = self.replies[min(len(self.requests), len(self.replies)) - 1]
        if isinstance(reply, Exception):
            raise reply
        if isinstance(reply, httpx.Response):
            return reply
        return reply(request)

    @property
    def calls(self) -> int:
        return len(self.requests)


@dataclass
class Harness:
    provider: Provider
    api: Api
    sleeps: list[float]
    rate_limited: list[float | None] = field(default_factory=list)


@pytest.fixture
def make(request_schema: Draft202012Validator) -> Iterator[Callable[..., Harness]]:
    """Build a Provider over a scripted Api; afterwards every POST body must match the schema."""
    made: list[Harness] = []

    def factory(*replies: Reply, **overrides: Any) -> Harness:
        api = Api(list(replies))
        sleeps: list[float] = []
        transport = httpx.MockTransport(api)
        config = ProviderConfig.from_settings(make_settings(**overrides))
        provider = Provider(config, transport=transport, sleep=sleeps.append)
        harness = Harness(provider, api, sleeps)
        made.append(harness)
        return harness

    yield factory
    for harness in made:
        harness.provider.close()
        for sent in harness.api.requests:
            if sent.method == "POST":
                request_schema.validate(orjson.loads(sent.content))


def ok(body: object, status: int = 200) -> httpx.Response:
    return httpx.Response(status, content=orjson.dumps(body))


def api_error(
    status: int, violations: list[dict[str, str]] | None = None, *, retry_after: str | None = None
) -> httpx.Response:
    body = {
        "errorCode": f"E{status}", "description": "Something.", "action": "Act.",
        "violations": violations or [], "resources": [],
    }
    headers = {} if retry_after is None else {"Retry-After": retry_after}
    return httpx.Response(status, content=orjson.dumps(body), headers=headers)


def accepted(*ids: str, bulk_id: str | None = "B-1", details: bool = True) -> httpx.Response:
    messages = []
    for message_id in ids:
        item: dict[str, Any] = {"messageId": message_id, "status": PENDING, "destination": PHONE}
        if details:
            item["details"] = {"messageCount": 1}
        messages.append(item)
    body: dict[str, Any] = {"messages": messages}
    if bulk_id is not None:
        body["bulkId"] = bulk_id
    return ok(body)


def text_job(**extra: Any) -> Job:
    return Job.model_validate({"to": "+" + PHONE, "text": "Hello", **extra})


def wire_message(job: Job, message_id: str, **kwargs: Any) -> WireMessage:
    """A job's SmsMessage built as dispatch builds it: from the job's stored form (`encode_job`)."""
    return wire_message_from_dict(orjson.loads(encode_job(job)), message_id, **kwargs)


def one_request(job: Job | None = None, message_id: str = "sw-1") -> Any:
    message = wire_message(job or text_job(), message_id, default_sender="ACME", webhook_url=None)
    return wire_request([message])


FULL_JOB: dict[str, Any] = {
    "to": "+41793026727",
    "text": "Merhaba",
    "sender": "Shop",
    "id": "producer-1",
    "metadata": {"order": 7},
    "transliteration": "TURKISH",
    "language": {"language_code": "TR", "single_shift": True},
    "validity_period": {"amount": 720, "time_unit": "HOURS"},
    "platform": {"entity_id": "ent-1", "application_id": "app-1"},
    "delivery_time_window": {
        "days": ["MONDAY", "FRIDAY"], "from": {"hour": 8, "minute": 30}, "to": {"hour": 18, "minute": 0},
    },
    "campaign_reference_id": "spring",
    "regional": {
        "india_dlt": {"principal_entity_id": "pe-1", "content_template_id": "ct-1", "telemarketer_id": 42},
        "turkey_iys": {"recipient_type": "TACIR", "brand_code": 7},
        "south_korea": {"title": "Notice", "reseller_code": 9},
    },
    "flash": True,
    "callback_data": "cb-1",
}


# --- wire JSON ------------------------------------------------------------------------------------


def test_headers_carry_app_key_and_json(make: Callable[..., Harness]) -> None:
    """Every request carries `Authorization: App <key>` and JSON Accept/Content-Type to the right path."""
    h = make(accepted("sw-1"))
    h.provider.send(one_request())
    sent = h.api.requests[0]
    assert sent.headers["Authorization"] == f"App {API_KEY}"
    assert sent.headers["Accept"] == "application/json"
    assert sent.headers["Content-Type"] == "application/json"
    assert (sent.method, sent.url.path, sent.url.host) == ("POST", "/sms/3/messages", "127.0.0.1")


def test_wire_message_with_every_option_is_exact(make: Callable[..., Harness]) -> None:
    """A job using every option becomes exactly the camelCase SmsMessage the contract describes."""
    job = Job.model_validate(FULL_JOB)
    message = wire_message(job, "sw-abc", default_sender="ACME", webhook_url="https://hook/x", notify=True)
    assert message == {
        "sender": "Shop",
        "destinations": [{"to": PHONE, "messageId": "sw-abc"}],
        "content": {
            "text": "Merhaba",
            "transliteration": "TURKISH",
            "language": {"languageCode": "TR", "singleShift": True, "lockingShift": False},
        },
        "options": {
            "platform": {"entityId": "ent-1", "applicationId": "app-1"},
            "validityPeriod": {"amount": 720, "timeUnit": "HOURS"},
            "deliveryTimeWindow": {
                "days": ["MONDAY", "FRIDAY"],
                "from": {"hour": 8, "minute": 30},
                "to": {"hour": 18, "minute": 0},
            },
            "campaignReferenceId": "spring",
            "regional": {
                # telemarketerId is a string in the API schema, an int in the job.
                "indiaDlt": {
                    "principalEntityId": "pe-1", "contentTemplateId": "ct-1", "telemarketerId": "42",
                },
                "turkeyIys": {"recipientType": "TACIR", "brandCode": 7},
                "southKorea": {"title": "Notice", "resellerCode": 9},
            },
            "flash": True,
        },
        "webhooks": {
            "delivery": {"url": "https://hook/x", "notify": True},
            "contentType": "application/json",
            "callbackData": "cb-1",
        },
    }
    h = make(accepted("sw-abc"))
    h.provider.send(wire_request([message]))
    assert orjson.loads(h.api.requests[0].content) == {"messages": [message]}


def test_wire_message_binary_content(make: Callable[..., Harness]) -> None:
    """Binary content becomes {hex, dataCoding, esmClass} and nothing of the text branch."""
    job = Job.model_validate({"to": PHONE, "binary": {"hex": "0f c2 4a", "data_coding": 8, "esm_class": 64}})
    message = wire_message(job, "sw-bin", default_sender=None, webhook_url=None)
    assert message == {
        "destinations": [{"to": PHONE, "messageId": "sw-bin"}],
        "content": {"hex": "0f c2 4a", "dataCoding": 8, "esmClass": 64},
    }
    make(accepted("sw-bin")).provider.send(wire_request([message]))


def test_wire_message_minimal_omits_absent_fields() -> None:
    """A plain text job gets the default sender and no options or webhooks keys at all."""
    message = wire_message(text_job(), "sw-1", default_sender="ACME", webhook_url=None)
    assert message == {
        "sender": "ACME", "destinations": [{"to": PHONE, "messageId": "sw-1"}], "content": {"text": "Hello"},
    }
    assert "sender" not in wire_message(text_job(), "sw-1", default_sender=None, webhook_url=None)


def test_wire_message_from_stored_job_matches_the_model_path() -> None:
    """The dict path over `encode_job`'s stored form builds exactly what the Job path builds."""
    binary = {"to": PHONE, "binary": {"hex": "0f c2", "data_coding": 8}}
    for data in (FULL_JOB, binary, {"to": PHONE, "text": "x"}):
        job = Job.model_validate(data)
        stored = orjson.loads(encode_job(job))
        kwargs: dict[str, Any] = {"default_sender": "ACME", "webhook_url": "https://hook/x", "notify": True}
        dumped = job.model_dump(exclude_none=True, by_alias=True)
        assert wire_message_from_dict(stored, "sw-1", **kwargs) == wire_message_from_dict(dumped, "sw-1", **kwargs)


def test_wire_message_from_dict_fills_api_defaults() -> None:
    """A stored job without the optional defaults still gets complete sub-objects and a bare number."""
    stored = {
        "to": "+" + PHONE, "text": "Hi", "language": {"language_code": "ES"},
        "validity_period": {"amount": 5}, "delivery_time_window": {"days": ["SUNDAY"]}, "sender": None,
    }
    message = wire_message_from_dict(stored, "sw-1", default_sender="ACME", webhook_url=None)
    assert message == {
        "sender": "ACME",
        "destinations": [{"to": PHONE, "messageId": "sw-1"}],
        "content": {
            "text": "Hi", "language": {"languageCode": "ES", "singleShift": False, "lockingShift": False},
        },
        "options": {
            "validityPeriod": {"amount": 5, "timeUnit": "MINUTES"},
            "deliveryTimeWindow": {"days": ["SUNDAY"]},
        },
    }
    with pytest.raises(ValueError, match="neither text nor binary"):
        wire_message_from_dict({"to": PHONE}, "sw-1", default_sender=None, webhook_url=None)


def test_message_status_to_wire_round_trips(make: Callable[..., Harness]) -> None:
    """A parsed status renders back to the API's camelCase object, without absent fields."""
    response = make(ok({"messages": [{"messageId": "a", "status": DELIVERED}]})).provider.send(one_request())
    assert response.messages[0].status.to_wire() == DELIVERED
    assert MessageStatus(5, "REJECTED", None, "", "").to_wire() == {
        "groupId": 5, "groupName": "REJECTED", "name": "", "description": "",
    }


def test_wire_message_notify_false_without_url() -> None:
    """notify=False alone asks the provider to send no report; no URL or contentType appears."""
    message = wire_message(text_job(), "sw-1", default_sender=None, webhook_url=None, notify=False)
    assert message["webhooks"] == {"delivery": {"notify": False}}


def test_format_datetime_pads_milliseconds() -> None:
    """Whole seconds still carry `.000` and UTC is spelled `+0000`."""
    assert format_datetime(datetime(2021, 8, 24, 15, 0, tzinfo=UTC)) == "2021-08-24T15:00:00.000+0000"


# --- send responses -------------------------------------------------------------------------------


def test_send_parses_full_response(make: Callable[..., Harness]) -> None:
    """bulkId, per-destination status and details.messageCount come back typed."""
    h = make(accepted("sw-1", "sw-2"))
    response = h.provider.send(one_request())
    assert response.bulk_id == "B-1"
    assert [m.message_id for m in response.messages] == ["sw-1", "sw-2"]
    first = response.messages[0]
    expected = MessageStatus(1, "PENDING", 26, "PENDING_ACCEPTED", "Message sent to next instance")
    assert first.status == expected
    assert (first.destination, first.message_count) == (PHONE, 1)
    assert response.elapsed_s >= 0


def test_send_tolerates_missing_bulk_id_and_details(make: Callable[..., Harness]) -> None:
    """A response without bulkId or details parses with None in their place."""
    response = make(accepted("sw-1", bulk_id=None, details=False)).provider.send(one_request())
    assert response.bulk_id is None
    assert response.messages[0].message_count is None


@pytest.mark.parametrize(
    "body", [b"<html>oops</html>", b"{}", b'{"messages": 3}', b'{"messages": [{"messageId": "x"}]}', b""]
)
def test_send_unreadable_200_is_ambiguous(make: Callable[..., Harness], body: bytes) -> None:
    """A 200 whose body cannot be read may still mean the bulk was accepted: ambiguous, not retried."""
    h = make(httpx.Response(200, content=body))
    with pytest.raises(ProviderAmbiguous) as caught:
        h.provider.send(one_request())
    assert caught.value.status_code == 200
    assert h.api.calls == 1


# --- classification and retries -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "expected", "calls"),
    [
        (400, ProviderBadRequest, 1),
        (401, ProviderAuthError, 1),
        (403, ProviderAuthError, 1),
        (429, ProviderRateLimited, 3),
        (503, ProviderNotActedOn, 3),
        (500, ProviderAmbiguous, 1),
        (502, ProviderAmbiguous, 1),
        (504, ProviderAmbiguous, 1),
        (599, ProviderAmbiguous, 1),
        (404, ProviderError, 1),
        (409, ProviderError, 1),
        (302, ProviderError, 1),
    ],
)
def test_status_classes_map_to_the_error_tree(
    make: Callable[..., Harness], status: int, expected: type[ProviderError], calls: int
) -> None:
    """Each HTTP status class raises exactly its error type, retried only when not acted on."""
    h = make(api_error(status))
    with pytest.raises(ProviderError) as caught:
        h.provider.send(one_request())
    assert type(caught.value) is expected
    assert caught.value.status_code == status
    assert isinstance(caught.value.body, dict)
    assert caught.value.body["errorCode"] == f"E{status}"
    assert h.api.calls == calls
    assert len(h.sleeps) == calls - 1


def test_bad_request_carries_violations(make: Callable[..., Harness]) -> None:
    """A 400 ApiError lists its violations on the exception and in its message."""
    violations = [{"property": "messages[0].destinations[0].to", "violation": "must not be blank"}]
    h = make(api_error(400, violations))
    with pytest.raises(ProviderBadRequest) as caught:
        h.provider.send(one_request())
    assert caught.value.violations == (Violation("messages[0].destinations[0].to", "must not be blank"),)
    assert "messages[0].destinations[0].to: must not be blank" in str(caught.value)


def test_bad_request_legacy_request_error_shape(make: Callable[..., Harness]) -> None:
    """The legacy requestError/serviceException body yields one violation per validation message."""
    body = {
        "requestError": {
            "serviceException": {
                "messageId": "BAD_REQUEST", "text": "Bad request",
                "validationErrors": {"messages[0].content.text": ["must not be null", "too long"]},
            }
        }
    }
    h = make(ok(body, status=400))
    with pytest.raises(ProviderBadRequest) as caught:
        h.provider.send(one_request())
    assert caught.value.violations == (
        Violation("messages[0].content.text", "must not be null"),
        Violation("messages[0].content.text", "too long"),
    )
    assert "BAD_REQUEST Bad request" in str(caught.value)


def test_non_json_error_body_is_kept_as_text(make: Callable[..., Harness]) -> None:
    """A gateway's HTML error page is kept as a text snippet on the exception."""
    h = make(httpx.Response(502, content=b"<html>Bad Gateway</html>"))
    with pytest.raises(ProviderAmbiguous) as caught:
        h.provider.send(one_request())
    assert caught.value.body == "<html>Bad Gateway</html>"


@pytest.mark.parametrize(
    "error", [httpx.ConnectError("refused"), httpx.ConnectTimeout("slow"), httpx.PoolTimeout("busy")]
)
def test_connect_errors_retry_then_reraise_not_acted_on(
    make: Callable[..., Harness], error: Exception
) -> None:
    """Errors before the request left retry N times with growing jittered waits, then re-raise."""
    h = make(error)
    with pytest.raises(ProviderNotActedOn) as caught:
        h.provider.send(one_request())
    assert type(caught.value) is ProviderNotActedOn
    assert caught.value.__cause__ is error
    assert h.api.calls == 3
    assert len(h.sleeps) == 2
    assert all(0 <= s <= 0.1 * 2**i for i, s in enumerate(h.sleeps))


def test_retry_recovers_when_the_provider_comes_back(make: Callable[..., Harness]) -> None:
    """A 503 followed by a 200 returns the 200's result."""
    h = make(api_error(503), accepted("sw-1"))
    assert h.provider.send(one_request()).messages[0].message_id == "sw-1"
    assert h.api.calls == 2


@pytest.mark.parametrize(
    "reply",
    [
        httpx.ReadTimeout("read timed out"),
        httpx.WriteTimeout("write timed out"),
        httpx.RemoteProtocolError("Server disconnected without sending a response."),
        httpx.ReadError("reset"),
        httpx.WriteError("broken pipe"),
        api_error(500),
        api_error(502),
        api_error(504),
    ],
    ids=lambda r: type(r).__name__ if isinstance(r, Exception) else f"http{r.status_code}",
)
def test_ambiguous_outcomes_are_never_retried(make: Callable[..., Harness], reply: Reply) -> None:
    """After a send may have been acted on, the client raises ProviderAmbiguous after exactly one call."""
    h = make(reply)
    with pytest.raises(ProviderAmbiguous):
        h.provider.send(one_request())
    assert h.api.calls == 1
    assert h.sleeps == []


@pytest.mark.parametrize("status", [400, 401, 403])
def test_caller_errors_are_never_retried(make: Callable[..., Harness], status: int) -> None:
    """Bad request and auth errors cannot improve by retrying: one call, no sleep."""
    h = make(api_error(status))
    with pytest.raises(ProviderError):
        h.provider.send(one_request())
    assert (h.api.calls, h.sleeps) == (1, [])


def test_retry_after_seconds_is_honoured_and_reported(make: Callable[..., Harness]) -> None:
    """A 429 with Retry-After: 2 waits at least 2 s and tells the caller before sleeping."""
    h = make(api_error(429, retry_after="2"), accepted("sw-1"))
    pushed: list[float | None] = []

    def on_rate_limited(retry_after_s: float | None) -> None:
        assert h.sleeps == []  # called before the sleep
        pushed.append(retry_after_s)

    h.provider.send(one_request(), on_rate_limited=on_rate_limited)
    assert pushed == [2.0]
    assert len(h.sleeps) == 1
    assert 2.0 <= h.sleeps[0] <= 5.0


def test_retry_after_http_date_is_honoured(make: Callable[..., Harness]) -> None:
    """A Retry-After HTTP-date a few seconds ahead becomes a wait of about that many seconds."""
    when = email.utils.format_datetime(datetime.now(UTC) + timedelta(seconds=4), usegmt=True)
    h = make(api_error(429, retry_after=when), accepted("sw-1"))
    pushed: list[float | None] = []
    h.provider.send(one_request(), on_rate_limited=pushed.append)
    assert pushed[0] is not None
    assert 2.0 <= pushed[0] <= 4.0
    assert h.sleeps[0] >= pushed[0]


def test_every_429_is_reported_and_the_last_one_reraised(make: Callable[..., Harness]) -> None:
    """Three 429s call on_rate_limited three times and re-raise ProviderRateLimited, not RetryError."""
    h = make(api_error(429))
    pushed: list[float | None] = []
    with pytest.raises(ProviderRateLimited) as caught:
        h.provider.send(one_request(), on_rate_limited=pushed.append)
    assert pushed == [None, None, None]
    assert caught.value.retry_after_s is None
    assert h.api.calls == 3


def test_retry_after_beyond_the_ceiling_is_left_to_the_caller(make: Callable[..., Harness]) -> None:
    """A Retry-After longer than the backoff ceiling stops retrying at once, keeping retry_after_s."""
    h = make(api_error(429, retry_after="120"))
    pushed: list[float | None] = []
    with pytest.raises(ProviderRateLimited) as caught:
        h.provider.send(one_request(), on_rate_limited=pushed.append)
    assert caught.value.retry_after_s == 120.0
    assert pushed == [120.0]
    assert (h.api.calls, h.sleeps) == (1, [])


def test_503_retry_after_is_kept(make: Callable[..., Harness]) -> None:
    """A 503 with Retry-After waits at least that long and exposes it on the final error."""
    h = make(api_error(503, retry_after="3"))
    with pytest.raises(ProviderNotActedOn) as caught:
        h.provider.send(one_request())
    assert caught.value.retry_after_s == 3.0
    assert all(s >= 3.0 for s in h.sleeps)


def test_unparseable_retry_after_is_ignored(make: Callable[..., Harness]) -> None:
    """A Retry-After that is neither seconds nor an HTTP-date leaves retry_after_s unset."""
    h = make(api_error(429, retry_after="soon"), accepted("sw-1"))
    pushed: list[float | None] = []
    h.provider.send(one_request(), on_rate_limited=pushed.append)
    assert pushed == [None]


def test_retries_are_logged_without_secrets_or_numbers(make: Callable[..., Harness]) -> None:
    """Each retry logs endpoint, attempt, error class and status; never the key or a phone number."""
    h = make(api_error(503), api_error(429), accepted("sw-1"))
    with capture_logs() as logs:
        h.provider.send(one_request())
    retries = [entry for entry in logs if entry["event"] == "provider_retry"]
    assert [(r["attempt"], r["error"], r["status_code"]) for r in retries] == [
        (1, "ProviderNotActedOn", 503), (2, "ProviderRateLimited", 429),
    ]
    assert all(r["endpoint"] == "POST /sms/3/messages" for r in retries)
    assert API_KEY not in repr(logs)
    assert PHONE not in repr(logs)


@pytest.mark.parametrize(
    "reply",
    [
        ok({"errorCode": "E400", "description": f"bad header App {API_KEY}", "violations": []}, status=400),
        httpx.Response(401, content=f"Authorization: App {API_KEY} rejected".encode()),
        api_error(403),
        api_error(429),
        api_error(503),
        httpx.Response(500, content=f"echo {API_KEY}".encode()),
        httpx.Response(200, content=f"not json {API_KEY}".encode()),
        httpx.ConnectError(f"proxy refused App {API_KEY}"),
        httpx.ReadTimeout(f"timed out App {API_KEY}"),
        api_error(404),
    ],
)
def test_api_key_never_appears_in_errors(make: Callable[..., Harness], reply: Reply) -> None:
    """No error's str or repr contains the API key, even when the provider echoes it."""
    h = make(reply)
    with pytest.raises(ProviderError) as caught:
        h.provider.send(one_request())
    assert API_KEY not in str(caught.value)
    assert API_KEY not in repr(caught.value)
    assert API_KEY not in repr(caught.value.body)
    assert API_KEY not in str(caught.value.__cause__)


def test_missing_api_key_is_a_config_error() -> None:
    """A Provider cannot be built without ICOMM_API_KEY, and says which variable is missing."""
    with pytest.raises(ConfigError, match="ICOMM_API_KEY"):
        Provider(ProviderConfig.from_settings(make_settings(icomm_api_key="")))


def test_provider_config_reads_its_settings_and_never_shows_the_key() -> None:
    """ProviderConfig holds what the Provider reads from Settings; its repr leaves the key out."""
    config = ProviderConfig.from_settings(make_settings(icomm_max_connections=7))
    assert (config.api_key, config.base_url, config.max_connections) == (API_KEY, "http://127.0.0.1:9", 7)
    assert (config.send_retry_attempts, config.retry_backoff_base_s, config.retry_backoff_max_s) == (3, 0.1, 5.0)
    assert config.attempt_s == 5.0 + 3.0 + 10.0 + 15.0  # the default pool, connect, write and read timeouts
    assert API_KEY not in repr(config)


def test_closed_provider_refuses_to_send() -> None:
    """Leaving the context manager closes the shared client."""
    api = Api([accepted("sw-1")])
    config = ProviderConfig.from_settings(make_settings())
    with Provider(config, transport=httpx.MockTransport(api), sleep=lambda s: None) as provider:
        provider.send(one_request())
    with pytest.raises(RuntimeError, match="closed"):
        provider.send(one_request())


def test_one_provider_serves_many_threads(make: Callable[..., Harness]) -> None:
    """Concurrent sends from several threads through one Provider all succeed."""
    def echo(request: httpx.Request) -> httpx.Response:
        return accepted(orjson.loads(request.content)["messages"][0]["destinations"][0]["messageId"])

    h = make(echo)

    def send(n: int) -> str | None:
        return h.provider.send(one_request(message_id=f"sw-{n}")).messages[0].message_id

    with ThreadPoolExecutor(max_workers=8) as pool:
        got = list(pool.map(send, range(200)))
    assert got == [f"sw-{n}" for n in range(200)]


# --- the send fence (MockTransport: asked right before the transport gets the request) --------------


class Fence:
    """A scripted fence: answers in order (the last one repeats), noting how many requests the Api
    had received at each call."""

    def __init__(self, api: Api, *answers: bool | Exception) -> None:
        self.api = api
        self.answers = list(answers)
        self.seen: list[int] = []

    def __call__(self) -> bool:
        self.seen.append(self.api.calls)
        answer = self.answers[min(len(self.seen), len(self.answers)) - 1]
        if isinstance(answer, Exception):
            raise answer
        return answer


def test_open_fence_is_asked_once_per_attempt_and_before_each_retry(make: Callable[..., Harness]) -> None:
    """Two 503s then a 200: the fence is asked right before each of the 3 requests, and once more
    before each of the 2 backoff sleeps; the send succeeds."""
    h = make(api_error(503), api_error(503), accepted("sw-1"))
    fence = Fence(h.api, True)
    assert h.provider.send(one_request(), fence=fence).messages[0].message_id == "sw-1"
    # attempt 1 (0 requests so far), before sleep 1 and attempt 2 (1), before sleep 2 and attempt 3 (2)
    assert fence.seen == [0, 1, 1, 2, 2]
    assert (h.api.calls, len(h.sleeps)) == (3, 2)


def test_closed_fence_sends_nothing_and_is_not_retried(make: Callable[..., Harness]) -> None:
    """A fence that says no: nothing reaches the transport, SendWindowClosed, no retry, no sleep."""
    h = make(accepted("sw-1"))
    fence = Fence(h.api, False)
    with capture_logs() as logs, pytest.raises(SendWindowClosed) as caught:
        h.provider.send(one_request(), fence=fence)
    assert isinstance(caught.value, ProviderNotActedOn)
    assert "was not sent" in str(caught.value)
    assert "nothing was written" in str(caught.value)
    assert (fence.seen, h.api.calls, h.sleeps) == ([0], 0, [])
    assert not [entry for entry in logs if entry["event"] == "provider_retry"]


def test_fence_that_raises_counts_as_closed_and_keeps_no_secret(make: Callable[..., Harness]) -> None:
    """A fence that fails (e.g. Redis unreachable) is a closed fence; its error is the cause unless
    its text carries the API key."""
    h = make(accepted("sw-1"))
    failure = ConnectionError("redis down")
    with pytest.raises(SendWindowClosed) as caught:
        h.provider.send(one_request(), fence=Fence(h.api, failure))
    assert caught.value.__cause__ is failure
    assert "ConnectionError" in str(caught.value)
    leaky = RuntimeError(f"fence saw App {API_KEY}")
    with pytest.raises(SendWindowClosed) as caught:
        h.provider.send(one_request(), fence=Fence(h.api, leaky))
    assert caught.value.__cause__ is None
    assert API_KEY not in str(caught.value)
    assert API_KEY not in repr(caught.value)
    assert h.api.calls == 0


def test_fence_closed_before_a_retry_stops_without_sleeping(make: Callable[..., Harness]) -> None:
    """After a 503 the fence is asked before the backoff sleep: closed, the call ends at once with
    SendWindowClosed (not the 503) and never sleeps through the deadline."""
    h = make(api_error(503, retry_after="3"), accepted("sw-1"))
    fence = Fence(h.api, True, False)
    with pytest.raises(SendWindowClosed, match=r"not retried after attempt 1 \(ProviderNotActedOn\)"):
        h.provider.send(one_request(), fence=fence)
    assert (fence.seen, h.api.calls, h.sleeps) == ([0, 1], 1, [])


def test_fence_closing_during_the_sleep_stops_the_next_attempt(make: Callable[..., Harness]) -> None:
    """Open before the sleep, closed after it: the retry's own check stops it before the transport."""
    h = make(httpx.ConnectError("refused"), accepted("sw-1"))
    fence = Fence(h.api, True, True, False)
    with pytest.raises(SendWindowClosed, match="was not sent"):
        h.provider.send(one_request(), fence=fence)
    assert (fence.seen, h.api.calls, len(h.sleeps)) == ([0, 1, 1], 1, 1)


def test_fence_is_not_asked_for_an_attempt_that_never_gets_to_write(make: Callable[..., Harness]) -> None:
    """Rate limited twice with a Retry-After beyond the ceiling: one request, one fence call, and the
    caller gets the ProviderRateLimited (the fence was open, the provider said later)."""
    h = make(api_error(429, retry_after="120"))
    fence = Fence(h.api, True)
    with pytest.raises(ProviderRateLimited):
        h.provider.send(one_request(), fence=fence)
    assert (fence.seen, h.api.calls) == ([0], 1)


def test_concurrent_fenced_sends_each_ask_their_own_fence(make: Callable[..., Harness]) -> None:
    """Threads sharing one Provider: each send asks its own fence exactly once."""
    h = make(accepted("sw-1"))
    asked: list[int] = []
    lock = threading.Lock()

    def send(n: int) -> None:
        def fence() -> bool:
            with lock:
                asked.append(n)
            return n % 3 != 0

        try:
            h.provider.send(one_request(), fence=fence)
        except SendWindowClosed:
            assert n % 3 == 0

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(send, range(60)))
    assert sorted(asked) == list(range(60))
    assert h.api.calls == 40


# --- pool healing with an injected transport ------------------------------------------------------


def _resets(reason: str) -> float:
    return REGISTRY.get_sample_value("sms_provider_pool_resets_total", {"reason": reason}) or 0.0


def test_pool_timeout_with_no_holder_replaces_the_client(make: Callable[..., Harness]) -> None:
    """A PoolTimeout while no request holds a connection means leaked slots: the client is replaced
    (warning and metric), the retry goes through the new client, the injected transport is kept."""
    h = make(httpx.PoolTimeout("busy"), accepted("sw-1"))
    old = h.provider._generation.client
    before = _resets("leaked_slots")
    with capture_logs() as logs:
        assert h.provider.send(one_request()).messages[0].message_id == "sw-1"
    resets = [entry for entry in logs if entry["event"] == "provider_pool_reset"]
    assert [(r["log_level"], r["reason"], r["generation"], r["holding"]) for r in resets] == [
        ("warning", "leaked_slots", 2, 0),
    ]
    assert _resets("leaked_slots") == before + 1
    assert h.provider._generation.client is not old
    assert h.api.calls == 2
    assert API_KEY not in repr(logs)


def test_busy_pool_is_not_reset_until_nobody_gets_a_connection_for_too_long(
    make: Callable[..., Harness], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every slot held by a request in flight is a busy pool: PoolTimeouts then are not a reason to
    reset. Only when no request got a connection for longer than a whole attempt can take (pool +
    connect + write + read timeouts) is the client replaced (`no_progress`)."""
    now = [1000.0]
    monkeypatch.setattr(provider_module, "_now", lambda: now[0])
    release = threading.Event()
    holder_in = threading.Event()

    def reply(request: httpx.Request) -> httpx.Response:
        if request.url.path == REPORTS_PATH:
            request.extensions["trace"]("connection.connect_tcp.started", {})  # as httpcore would
            holder_in.set()
            assert release.wait(10)
            return ok({"results": []})
        raise httpx.PoolTimeout("busy")

    h = make(reply, icomm_max_connections=1, icomm_send_retry_attempts=1)
    with ThreadPoolExecutor(max_workers=1) as pool:
        holder = pool.submit(h.provider.reports_raw)
        assert holder_in.wait(10)
        with pytest.raises(ProviderNotActedOn):
            h.provider.send(one_request())
        assert h.provider._generation.number == 1  # busy, not broken
        now[0] += 5.0 + 3.0 + 10.0 + 15.0 + 0.1  # the default pool, connect, write and read timeouts
        with capture_logs() as logs, pytest.raises(ProviderNotActedOn):
            h.provider.send(one_request())
        assert [e["reason"] for e in logs if e["event"] == "provider_pool_reset"] == ["no_progress"]
        assert h.provider._generation.number == 2
        release.set()
        assert holder.result() == b'{"results":[]}'  # the request in flight on the old client finished


# --- reports --------------------------------------------------------------------------------------

REPORT = {
    "bulkId": "B-1", "messageId": "sw-1", "to": PHONE, "sender": "ACME",
    "sentAt": "2019-11-09T16:00:00.000+0100", "doneAt": "2019-11-09T16:00:00.000+0100",
    "messageCount": 1, "mccMnc": "22801", "callbackData": "cb-1",
    "price": {"pricePerMessage": 0.01, "currency": "EUR"}, "status": DELIVERED, "error": NO_ERROR,
    "platform": {"entityId": "ent-1", "applicationId": "app-1"}, "campaignReferenceId": "spring",
}


def test_reports_raw_returns_the_exact_bytes_and_query(make: Callable[..., Harness]) -> None:
    """reports_raw GETs /sms/3/reports with the given filters and hands back the body untouched."""
    body = orjson.dumps({"results": [REPORT]}) + b"\n"
    h = make(httpx.Response(200, content=body))
    raw = h.provider.reports_raw(entity_id="ent-1", application_id="app-1", campaign_reference_id="spring")
    assert raw == body
    sent = h.api.requests[0]
    assert (sent.method, sent.url.path) == ("GET", "/sms/3/reports")
    assert dict(sent.url.params) == {
        "limit": "1000", "entityId": "ent-1", "applicationId": "app-1", "campaignReferenceId": "spring",
    }
    h.provider.reports_raw(limit=5, bulk_id="B-1", message_id="sw-1")
    assert dict(h.api.requests[1].url.params) == {"limit": "5", "bulkId": "B-1", "messageId": "sw-1"}


@pytest.mark.parametrize("limit", [0, 1001])
def test_reports_limit_is_checked_locally(make: Callable[..., Harness], limit: int) -> None:
    """A reports limit outside 1..1000 is refused without a request."""
    h = make()
    with pytest.raises(ValueError, match="limit"):
        h.provider.reports_raw(limit=limit)
    assert h.api.calls == 0


@pytest.mark.parametrize(
    "reply", [httpx.ReadTimeout("read timed out"), httpx.RemoteProtocolError("dropped"), api_error(500)]
)
def test_reports_lost_answer_is_ambiguous_and_not_retried(
    make: Callable[..., Harness], reply: Reply
) -> None:
    """A reports page may have been handed out, so a lost answer is ambiguous and never re-fetched here."""
    h = make(reply)
    with pytest.raises(ProviderAmbiguous):
        h.provider.reports_raw()
    assert h.api.calls == 1


@pytest.mark.parametrize("reply", [httpx.ConnectError("refused"), api_error(429), api_error(503)])
def test_reports_not_acted_on_is_retried(make: Callable[..., Harness], reply: Reply) -> None:
    """Connect errors, 429 and 503 on reports are retried and then succeed."""
    h = make(reply, ok({"results": []}))
    assert h.provider.reports_raw() == b'{"results":[]}'
    assert h.api.calls == 2


def test_reports_auth_error(make: Callable[..., Harness]) -> None:
    """A 401 on reports raises ProviderAuthError."""
    with pytest.raises(ProviderAuthError):
        make(api_error(401)).provider.reports_raw()


def page_of(raw: bytes) -> Page:
    """A reports page as the drain stores it, parsed by the one report parser (worker.reports.parse)."""
    return parse_page("1-0", {b"src": b"drain", b"page": raw})


def test_parse_reports_good_page() -> None:
    """A final report is filed with its group and status name, every field kept as it came (the
    provider's time strings untouched); an intermediate one is counted; nothing is dead-lettered."""
    page = page_of(orjson.dumps({"results": [REPORT, {"messageId": "sw-2", "status": PENDING}]}))
    assert page.dead == []
    assert page.finals == [FinalReport("sw-1", "DELIVERED", "DELIVERED_TO_HANDSET", REPORT, "drain")]
    assert page.finals[0].item["sentAt"] == "2019-11-09T16:00:00.000+0100"
    assert page.intermediate == 1


@pytest.mark.parametrize("raw", [b"", b"not json", b"[]", b'{"results": {}}', b'{"result": []}'])
def test_parse_reports_malformed_page(raw: bytes) -> None:
    """A page that is not JSON or has no results list is one dead letter with a clear reason, never
    an exception (the page was handed out once: it must not be lost)."""
    page = page_of(raw)
    assert (page.finals, page.intermediate) == ([], 0)
    [(message_id, letter)] = page.dead
    dead = orjson.loads(letter)
    assert (message_id, dead["kind"], dead["reason"]) == ("", "report", "report_page_malformed")
    assert dead["detail"].startswith("not JSON") or dead["detail"] == "no 'results' list"
    assert dead["page"] == raw.decode()


def test_parse_reports_partial_page_returns_rejects() -> None:
    """Items that are not objects, lack messageId or lack a status are dead-lettered with the item."""
    items: list[Any] = [
        REPORT, 5, {"status": DELIVERED}, {"messageId": "sw-9"}, {"messageId": "", "status": {}},
    ]
    page = page_of(orjson.dumps({"results": items}))
    assert [r.message_id for r in page.finals] == ["sw-1"]
    dead = [orjson.loads(letter) for _, letter in page.dead]
    assert [(d["item"], d["detail"]) for d in dead] == [
        (5, "report is not a JSON object"),
        ({"status": DELIVERED}, "report has no messageId"),
        ({"messageId": "sw-9"}, "report has no readable status"),
        ({"messageId": "", "status": {}}, "report has no messageId"),
    ]
    assert [message_id for message_id, _ in page.dead] == ["", "", "sw-9", ""]


def test_parse_reports_fills_status_group_from_either_half(make: Callable[..., Harness]) -> None:
    """A status with only groupName or only groupId still yields both from the documented table
    (a logs entry's status), and the report parser files it by that group."""
    results = [
        {"messageId": "a", "status": {"groupName": "REJECTED", "name": "REJECTED_NETWORK"}},
        {"messageId": "b", "status": {"groupId": 2}},
    ]
    entries = make(ok({"results": results})).provider.logs()
    groups = [(e.status.group_id, e.status.group_name) for e in entries if e.status is not None]
    assert groups == [(5, "REJECTED"), (2, "UNDELIVERABLE")]
    page = page_of(orjson.dumps({"results": results}))
    assert [(r.message_id, r.group) for r in page.finals] == [("a", "REJECTED"), ("b", "UNDELIVERABLE")]


# --- logs -----------------------------------------------------------------------------------------


def log_item(message_id: str, status: dict[str, Any] = DELIVERED) -> dict[str, Any]:
    return {
        "destination": PHONE, "bulkId": "B-1", "messageId": message_id,
        "sentAt": "2020-02-22T17:42:05.390+0000", "doneAt": "2020-02-22T17:42:06.000+0000",
        "messageCount": 1, "price": {"pricePerMessage": 0, "currency": "EUR"}, "status": status,
        "error": NO_ERROR, "content": {"text": "This is a sample message"}, "mccMnc": "22801",
    }


def test_logs_query_encoding(make: Callable[..., Harness]) -> None:
    """Arrays are comma-joined, datetimes UTC `.SSS+0000` ('+' percent-encoded), names camelCase."""
    h = make(ok({"results": [log_item("a")]}))
    since = datetime(2024, 1, 2, 3, 4, 5, 678901, tzinfo=timezone(timedelta(hours=2)))
    entries = h.provider.logs(
        message_id=["a", "b"], bulk_id=("B-1", "B-2"), campaign_reference_id=["c1"], mcc="228", mnc="01",
        sender="ACME", destination=PHONE, general_status="DELIVERED", sent_since=since,
        sent_until=since + timedelta(hours=1), limit=10, entity_id="ent", application_id="app",
    )
    sent = h.api.requests[0]
    assert (sent.method, sent.url.path) == ("GET", "/sms/3/logs")
    assert dict(sent.url.params) == {
        "messageId": "a,b", "bulkId": "B-1,B-2", "campaignReferenceId": "c1", "mcc": "228", "mnc": "01",
        "sender": "ACME", "destination": PHONE, "generalStatus": "DELIVERED",
        "sentSince": "2024-01-02T01:04:05.678+0000", "sentUntil": "2024-01-02T02:04:05.678+0000",
        "limit": "10", "entityId": "ent", "applicationId": "app",
    }
    assert "sentSince=2024-01-02T01%3A04%3A05.678%2B0000" in sent.url.query.decode()
    assert [e.message_id for e in entries] == ["a"]
    entry = entries[0]
    assert entry.status is not None
    assert (entry.status.name, entry.destination, entry.mcc_mnc, entry.message_count) == (
        "DELIVERED_TO_HANDSET", PHONE, "22801", 1,
    )
    assert entry.raw["content"] == {"text": "This is a sample message"}


def test_logs_without_filters_sends_no_query(make: Callable[..., Harness]) -> None:
    """logs() with no filters sends a bare GET and skips entries without a messageId."""
    h = make(ok({"results": [log_item("a"), {"destination": PHONE}, "junk"]}))
    assert [e.message_id for e in h.provider.logs()] == ["a"]
    assert h.api.requests[0].url.query == b""


def test_logs_single_string_is_one_id(make: Callable[..., Harness]) -> None:
    """A lone string passed as message_id is one id, not a sequence of characters."""
    h = make(ok({"results": []}))
    h.provider.logs(message_id="sw-12")
    assert h.api.requests[0].url.params["messageId"] == "sw-12"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mnc": "01"}, "mnc filter requires mcc"),
        ({"limit": 0}, "limit"),
        ({"limit": 1001}, "limit"),
        ({"message_id": ["x" * 1000, "y" * 1000, "z" * 100]}, "message_id filter is 2102"),
        ({"bulk_id": ["b" * 2049]}, "bulk_id filter"),
        ({"campaign_reference_id": ["c" * 2049]}, "campaign_reference_id filter"),
        ({"sent_since": datetime(2024, 1, 1)}, "timezone-aware"),
        ({"general_status": "LOST"}, "general_status"),
    ],
)
def test_logs_filters_are_validated_locally(
    make: Callable[..., Harness], kwargs: dict[str, Any], match: str
) -> None:
    """Invalid logs filters raise ValueError with a clear message and cost no request."""
    h = make()
    with pytest.raises(ValueError, match=match):
        h.provider.logs(**kwargs)
    assert h.api.calls == 0


def test_logs_at_exactly_2048_chars_is_allowed(make: Callable[..., Harness]) -> None:
    """A joined filter of exactly 2048 characters is sent."""
    h = make(ok({"results": []}))
    h.provider.logs(message_id=["x" * 1000, "y" * 1047])
    assert len(h.api.requests[0].url.params["messageId"]) == MAX_FILTER_CHARS


def test_logs_unreadable_200_is_ambiguous(make: Callable[..., Harness]) -> None:
    """A 200 logs answer that does not parse raises ProviderAmbiguous (the caller asks again later)."""
    with pytest.raises(ProviderAmbiguous):
        make(httpx.Response(200, content=b"{")).provider.logs()


def test_logs_429_is_retried(make: Callable[..., Harness]) -> None:
    """The documented logs 429 is retried like any not-acted-on answer."""
    h = make(api_error(429, retry_after="1"), ok({"results": []}))
    assert h.provider.logs(limit=1) == []
    assert h.api.calls == 2


def test_logs_for_message_ids_chunks_requests(make: Callable[..., Harness]) -> None:
    """Many ids are split into requests of at most 2048 characters with limit=1000, and merged."""
    ids = [f"sw-{n:026d}" for n in range(300)]
    missing = set(ids[::7])

    def answer(request: httpx.Request) -> httpx.Response:
        asked = request.url.params["messageId"].split(",")
        return ok({"results": [log_item(i) for i in asked if i not in missing] + [log_item("stranger")]})

    h = make(answer)
    throttled: list[int] = []
    found = h.provider.logs_for_message_ids(ids + ids[:5], before_request=lambda: throttled.append(1))
    assert set(found) == set(ids) - missing
    assert h.api.calls == len(throttled) > 1
    asked: list[str] = []
    for sent in h.api.requests:
        assert len(sent.url.params["messageId"]) <= MAX_FILTER_CHARS
        assert sent.url.params["limit"] == "1000"
        asked += sent.url.params["messageId"].split(",")
    assert asked == ids


def test_logs_for_message_ids_prefers_the_original_over_a_duplicate(make: Callable[..., Harness]) -> None:
    """When a resend was rejected as a duplicate, the original attempt's log entry is returned."""
    results = [log_item("sw-1", DUPLICATE), log_item("sw-1", PENDING), log_item("sw-2", DUPLICATE)]
    h = make(ok({"results": results}))
    found = h.provider.logs_for_message_ids(["sw-1", "sw-2"])
    assert found["sw-1"].status is not None
    assert found["sw-1"].status.name == "PENDING_ACCEPTED"
    assert found["sw-2"].status is not None
    assert found["sw-2"].status.name == "REJECTED_DUPLICATE_MESSAGE_ID"


def test_logs_for_no_ids_sends_nothing(make: Callable[..., Harness]) -> None:
    """An empty id list makes no request."""
    h = make()
    assert h.provider.logs_for_message_ids([]) == {}
    assert h.api.calls == 0


@pytest.mark.parametrize("bad", ["", "a,b", "x" * 2049])
def test_chunk_message_ids_refuses_unusable_ids(bad: str) -> None:
    """Empty ids, ids containing a comma and ids longer than the filter cap are refused."""
    with pytest.raises(ValueError, match="message id"):
        chunk_message_ids(["ok", bad])


@given(st.lists(st.text(alphabet="abcdef0123456789-", min_size=1, max_size=300), max_size=400))
def test_chunk_message_ids_properties(ids: list[str]) -> None:
    """Chunks keep order, cover every id, and each joins to at most 2048 characters and 1000 ids."""
    chunks = chunk_message_ids(ids)
    assert [i for chunk in chunks for i in chunk] == ids
    assert all(chunk and len(",".join(chunk)) <= MAX_FILTER_CHARS and len(chunk) <= 1000 for chunk in chunks)
    # Greedy: the next chunk's first id would not have fitted into the previous one.
    for before, after in itertools.pairwise(chunks):
        assert len(",".join([*before, after[0]])) > MAX_FILTER_CHARS or len(before) == 1000
