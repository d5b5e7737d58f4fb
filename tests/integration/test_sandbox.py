"""The sandbox over real HTTP: auth, validation, statuses, reports, webhooks, logs, faults and counters.

One sandbox process serves the whole module; every test resets its state and config first. Every
JSON body the API endpoints return is validated against the contract's schemas by a response hook.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Callable, Iterator
from functools import cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from jsonschema import Draft202012Validator

from worker.devtools.sandbox import SandboxConfig, SandboxProcess
from worker.devtools.sandbox.validation import parse_datetime

API_KEY = "integration-key"
FORBIDDEN_KEY = "forbidden-key"
BASELINE: dict[str, Any] = {
    "report_delay_ms": 100,
    "outcome_mix": {"delivered": 1.0},
    "seed": 11,
    "latency_ms": 0,
    "jitter_ms": 0,
    "error_5xx_rate": 0,
    "error_5xx_codes": [500, 502, 503, 504],
    "rate_429": 0,
    "retry_after_share": 0,
    "retry_after_s": 1,
    "accept_then_timeout_rate": 0,
    "timeout_delay_ms": 30000,
    "drop_rate": 0,
    "html_body_rate": 0,
    "truncated_body_rate": 0,
    "partial_results_rate": 0,
    "unknown_status_rate": 0,
    "late_accept_rate": 0,
    "late_accept_delay_ms": 30000,
    "request_rate_limit": 0,
    "down": False,
    "logs_rate_per_min": 10000,
    "logs_lag_ms": 0,
    "reject_duplicate_ids": True,
    "webhook_max_attempts": 6,
    "webhook_retry_base_ms": 50,
}


def _schema_path() -> Path:
    shared = Path(__file__).parents[2].parent / "shared/api/sms-v3-schemas.json"
    return shared if shared.exists() else Path(__file__).parents[1] / "data/sms-v3-schemas.json"


@cache
def _document() -> dict[str, Any]:
    document: dict[str, Any] = json.loads(_schema_path().read_text())
    return document


@cache
def _validator(ref: str) -> Draft202012Validator:
    return Draft202012Validator({**_document(), "$ref": ref})


def _validate_response(response: httpx.Response) -> None:
    """Check an API response body against the schema the contract names for its status."""
    operation = f"{response.request.method} {response.request.url.path}"
    refs = _document()["x-operations"].get(operation)
    if refs is None or response.headers.get("content-type") != "application/json":
        return  # admin endpoints, and the HTML pages of 502/503/504
    response.read()
    # 429 is only declared for logs, but every ApiError body has the same schema.
    ref = refs.get(str(response.status_code), "#/$defs/ApiError")
    _validator(ref).validate(response.json())
    VALIDATED.append(operation)


VALIDATED: list[str] = []


def _client(url: str, key: str | None = API_KEY, **kwargs: Any) -> httpx.Client:
    headers = {"Authorization": f"App {key}"} if key is not None else {}
    return httpx.Client(
        base_url=url, headers=headers, trust_env=False, event_hooks={"response": [_validate_response]}, **kwargs
    )


def _wait_for(check: Callable[[], Any], timeout_s: float = 10.0) -> Any:
    """Poll `check` until it returns something truthy (bounded)."""
    deadline = time.monotonic() + timeout_s
    pause = 0.01
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s}s")
        time.sleep(pause)
        pause = min(pause * 2, 0.1)


def _send(client: httpx.Client, *destinations: dict[str, Any], **extra: Any) -> httpx.Response:
    message: dict[str, Any] = {"destinations": list(destinations), "content": {"text": "hello"}}
    request_options = extra.pop("request_options", None)
    message.update(extra)
    body: dict[str, Any] = {"messages": [message]}
    if request_options is not None:
        body["options"] = request_options
    return client.post("/sms/3/messages", json=body)


@pytest.fixture(scope="module")
def sandbox() -> Iterator[SandboxProcess]:
    config = SandboxConfig(forbidden_keys=(FORBIDDEN_KEY,))
    process = SandboxProcess(api_key=API_KEY, config=config)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("LOG_FORMAT", "json")  # its warning lines are parsed (test_webhook_failures_are_logged)
        process.start()
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture
def api(sandbox: SandboxProcess) -> Iterator[httpx.Client]:
    sandbox.configure(**BASELINE)
    sandbox.reset()
    with _client(sandbox.url) as client:
        yield client


@pytest.fixture
def raw(sandbox: SandboxProcess, api: httpx.Client) -> Iterator[httpx.Client]:
    """Like `api` but without the schema hook: for the faults whose 200 breaks the schema on purpose."""
    with httpx.Client(base_url=sandbox.url, headers=sandbox.auth_header, trust_env=False) as client:
        yield client


class Receiver:
    """A loopback webhook endpoint that records each push and fails the first `fail_first` with 500."""

    def __init__(self, fail_first: int = 0) -> None:
        self.pushes: list[tuple[dict[str, str], dict[str, Any]]] = []
        self.fail_first = fail_first
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                receiver.pushes.append(({k.lower(): v for k, v in self.headers.items()}, body))
                status = 500 if len(receiver.pushes) <= receiver.fail_first else 200
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def port(self) -> int:
        port: int = self.server.server_address[1]
        return port

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


# --- auth ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"), [("POST", "/sms/3/messages"), ("GET", "/sms/3/reports"), ("GET", "/sms/3/logs")]
)
def test_auth_errors_on_every_endpoint(sandbox: SandboxProcess, api: httpx.Client, method: str, path: str) -> None:
    """Missing, malformed or wrong keys get 401 E401; a key without permission gets 403 E403."""
    body = {"messages": [{"destinations": [{"to": "41793026727"}], "content": {"text": "x"}}]}
    kwargs: dict[str, Any] = {"json": body} if method == "POST" else {}
    with _client(sandbox.url, key=None) as anonymous:
        missing = anonymous.request(method, path, **kwargs)
        malformed = anonymous.request(method, path, headers={"Authorization": f"Bearer {API_KEY}"}, **kwargs)
    with _client(sandbox.url, key="wrong") as wrong, _client(sandbox.url, key=FORBIDDEN_KEY) as forbidden:
        bad_key = wrong.request(method, path, **kwargs)
        no_permission = forbidden.request(method, path, **kwargs)
    for response in (missing, malformed, bad_key):
        assert response.status_code == 401
        assert response.json() == {
            "errorCode": "E401",
            "description": "The request lacks valid authentication credentials for the requested resource.",
            "action": "Check the resources and adjust authentication credentials.",
            "violations": [],
            "resources": [
                {"name": "API Authentication", "url": "https://www.infobip.com/docs/essentials/api-authentication"}
            ],
        }
    assert no_permission.status_code == 403
    assert no_permission.json()["errorCode"] == "E403"
    assert no_permission.json()["resources"][0]["name"] == "API Scopes"
    assert sandbox.stats()["messages_accepted"] == 0


# --- sending ------------------------------------------------------------------------------


def test_validation_errors_are_400_with_property_paths(api: httpx.Client) -> None:
    """An invalid bulk is refused whole with E400 and one violation per offending property."""
    body = {
        "messages": [
            {"destinations": [{"to": "41793026727", "messageId": "fine"}], "content": {"text": "ok"}},
            {"destinations": [{"to": "4" * 65}], "content": {"text": "a", "hex": "61"}},
            {"destinations": [{"to": "41793026727"}], "content": {"text": "a", "transliteration": "ELVISH"}},
        ],
        "options": {"schedule": {"bulkId": "b" * 101, "sendAt": "tomorrow"}},
    }
    response = api.post("/sms/3/messages", json=body)
    assert response.status_code == 400
    error = response.json()
    assert error["errorCode"] == "E400"
    assert {v["property"] for v in error["violations"]} == {
        "messages[1].destinations[0].to",
        "messages[1].content",
        "messages[2].content.transliteration",
        "options.schedule.bulkId",
        "options.schedule.sendAt",
    }
    # Nothing of the refused bulk was accepted: the valid message can be sent afterwards.
    assert _send(api, {"to": "41793026727", "messageId": "fine"}).json()["messages"][0]["status"]["id"] == 26


def test_malformed_json_is_400(api: httpx.Client) -> None:
    """A body that is not JSON gets E400."""
    response = api.post("/sms/3/messages", content=b"{not json", headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    assert response.json()["errorCode"] == "E400"


def test_statuses_ids_and_counts(sandbox: SandboxProcess, api: httpx.Client) -> None:
    """Per-destination statuses, honoured client ids and bulkId, generated ids and messageCount."""
    body = {
        "messages": [
            {
                "destinations": [
                    {"to": "41793026727", "messageId": "client-1"},
                    {"to": "+41793026728"},
                    {"to": "12345", "messageId": "bad-number"},
                ],
                "content": {"text": "x" * 200},
            }
        ],
        "options": {"schedule": {"bulkId": "my-bulk"}},
    }
    first = api.post("/sms/3/messages", json=body).json()
    assert first["bulkId"] == "my-bulk"
    accepted, generated, rejected = first["messages"]
    assert accepted == {
        "messageId": "client-1",
        "status": {
            "groupId": 1,
            "groupName": "PENDING",
            "id": 26,
            "name": "PENDING_ACCEPTED",
            "description": "Message sent to next instance",
        },
        "destination": "41793026727",
        "details": {"messageCount": 2},
    }
    assert generated["messageId"] and generated["status"]["id"] == 26
    assert (rejected["status"]["groupName"], rejected["status"]["id"]) == ("REJECTED", 52)

    again = _send(api, {"to": "41793026727", "messageId": "client-1"}).json()
    assert again["bulkId"]  # generated when absent
    assert again["messages"][0]["status"]["name"] == "REJECTED_DUPLICATE_MESSAGE_ID"
    assert again["messages"][0]["status"]["id"] == 23
    too_long = _send(api, {"to": "41793026727"}, content={"text": "y" * 4000}).json()["messages"][0]
    assert too_long["status"]["id"] == 25

    stats = sandbox.stats(per_message=True)
    assert stats["messages_accepted"] == 2
    assert stats["duplicate_rejections"] == 1
    assert stats["duplicates"] == 0
    assert stats["accepted_per_message_id"]["client-1"] == 1
    assert stats["messages_rejected"] == {
        "REJECTED_DESTINATION": 1,
        "REJECTED_DUPLICATE_MESSAGE_ID": 1,
        "REJECTED_MESSAGE_TOO_LONG": 1,
    }


def test_duplicate_sends_are_counted_when_let_through(sandbox: SandboxProcess, api: httpx.Client) -> None:
    """With duplicate rejection off, the counters expose a messageId sent twice."""
    sandbox.configure(reject_duplicate_ids=False)
    for _ in range(2):
        assert _send(api, {"to": "41793026727", "messageId": "twice"}).json()["messages"][0]["status"]["id"] == 26
    stats = sandbox.stats(per_message=True)
    assert stats["duplicates"] == 1
    assert stats["accepted_per_message_id"] == {"twice": 2}
    assert sum(stats["accepted_by_second"].values()) == stats["messages_accepted"] == 2


# --- reports ------------------------------------------------------------------------------


def test_reports_come_once_with_filters(sandbox: SandboxProcess, api: httpx.Client) -> None:
    """Reports appear after the delay, each exactly once, selectable by bulkId/messageId/campaign/platform."""
    _send(
        api,
        {"to": "41793026727", "messageId": "r1"},
        {"to": "41793026728", "messageId": "r2"},
        sender="ACME",
        webhooks={"callbackData": "cb-1"},
        options={"campaignReferenceId": "camp", "platform": {"entityId": "ent", "applicationId": "app"}},
    )
    _send(api, {"to": "41793026729", "messageId": "r3"}, request_options={"schedule": {"bulkId": "bulk-3"}})
    _send(api, {"to": "41793026730", "messageId": "r4"})
    _wait_for(lambda: sandbox.stats()["reports"]["generated"] == 4)

    by_id = api.get("/sms/3/reports", params={"messageId": "r1"}).json()["results"]
    assert [r["messageId"] for r in by_id] == ["r1"]
    report = by_id[0]
    assert report["callbackData"] == "cb-1"
    assert report["sender"] == "ACME"
    assert report["campaignReferenceId"] == "camp"
    assert report["platform"] == {"entityId": "ent", "applicationId": "app"}
    assert report["status"]["name"] == "DELIVERED_TO_HANDSET"
    assert report["error"]["name"] == "NO_ERROR"
    assert report["price"] == {"pricePerMessage": 0.01, "currency": "EUR"}
    assert report["doneAt"] >= report["sentAt"]
    assert api.get("/sms/3/reports", params={"messageId": "r1"}).json()["results"] == []
    assert [r["messageId"] for r in api.get("/sms/3/reports", params={"entityId": "ent"}).json()["results"]] == ["r2"]
    assert [r["messageId"] for r in api.get("/sms/3/reports", params={"bulkId": "bulk-3"}).json()["results"]] == ["r3"]
    assert api.get("/sms/3/reports", params={"campaignReferenceId": "camp"}).json()["results"] == []
    assert [r["messageId"] for r in api.get("/sms/3/reports", params={"limit": 10}).json()["results"]] == ["r4"]
    assert api.get("/sms/3/reports").json()["results"] == []
    assert api.get("/sms/3/reports", params={"limit": 1001}).status_code == 400
    stats = sandbox.stats()["reports"]
    assert (stats["fetched"], stats["unfetched"], stats["pending"]) == (4, 0, 0)


def test_notify_false_means_no_report(sandbox: SandboxProcess, api: httpx.Client) -> None:
    """A message sent with notify=false never shows up in reports."""
    _send(api, {"to": "41793026727", "messageId": "quiet"}, webhooks={"delivery": {"notify": False}})
    _wait_for(lambda: sandbox.stats()["reports"]["suppressed"] == 1)
    assert api.get("/sms/3/reports").json()["results"] == []


def test_webhook_push_with_basic_auth_and_retry(sandbox: SandboxProcess, api: httpx.Client) -> None:
    """Reports for a webhook URL are POSTed there with Basic auth from the URL, retried after a 500."""
    with Receiver(fail_first=1) as receiver:
        url = f"http://hook:s3cret@127.0.0.1:{receiver.port}/dlr"
        _send(
            api,
            {"to": "41793026727", "messageId": "w1"},
            {"to": "41793026728", "messageId": "w2"},
            webhooks={"delivery": {"url": url}, "callbackData": "cb"},
        )
        _wait_for(lambda: sandbox.stats()["reports"]["pushed"] == 2)
    assert len(receiver.pushes) == 2  # one failure, one success
    headers, body = receiver.pushes[-1]
    assert headers["authorization"] == "Basic " + base64.b64encode(b"hook:s3cret").decode()
    assert headers["content-type"] == "application/json"
    _validator("#/$defs/DeliveryReports").validate(body)
    assert sorted(r["messageId"] for r in body["results"]) == ["w1", "w2"]
    assert {r["callbackData"] for r in body["results"]} == {"cb"}
    assert api.get("/sms/3/reports").json()["results"] == []  # pushed reports are not pulled too
    webhooks = sandbox.stats()["webhooks"]
    assert (webhooks["attempts"], webhooks["failures"]) == (2, 1)


def test_webhook_failures_are_logged(sandbox: SandboxProcess, api: httpx.Client) -> None:
    """Each failed push and each dropped report gives a structured warning without numbers or credentials."""
    sandbox.configure(webhook_max_attempts=2)
    with Receiver(fail_first=1000) as receiver:
        url = f"http://hook:s3cret@127.0.0.1:{receiver.port}/dlr-logged?token=t0ps3cret"
        _send(
            api,
            {"to": "41793026727", "messageId": "wf1"},
            {"to": "41793026728", "messageId": "wf2"},
            webhooks={"delivery": {"url": url}},
        )
        _send(api, {"to": "41793026729", "messageId": "wf3"}, webhooks={"delivery": {"url": "http://192.0.2.10/x"}})
        _wait_for(lambda: sandbox.stats()["webhooks"]["dropped"] == 2)
    assert sandbox.stats()["webhooks"]["refused"] == 1

    def warnings() -> list[dict[str, Any]]:
        found = []
        for line in sandbox.output().splitlines():
            if line.startswith("{") and "sandbox_webhook" in line and ('"wf' in line or "/dlr-logged" in line):
                found.append(json.loads(line))
        return found

    lines = _wait_for(lambda: (found := warnings()) and len(found) == 4 and found)
    failed = [line for line in lines if line["event"] == "sandbox_webhook_push_failed"]
    dropped = {line["target"]: line for line in lines if line["event"] == "sandbox_webhook_reports_dropped"}
    assert {line["level"] for line in lines} == {"warning"}
    assert [(f["attempt"], f["reason"], f["reports"]) for f in failed] == [(1, "HTTP 500", 2), (2, "HTTP 500", 2)]
    assert failed[0]["url"] == f"http://127.0.0.1:{receiver.port}/dlr-logged"
    assert (failed[0]["retry_in_ms"], failed[1]["retry_in_ms"]) == (50, None)
    gave_up, refused = dropped[failed[0]["url"]], dropped["192.0.2.10"]
    assert (sorted(gave_up["message_ids"]), gave_up["attempts"]) == (["wf1", "wf2"], 2)
    assert gave_up["reason"] == "gave up after 2 attempts (last: HTTP 500)"
    assert (refused["message_ids"], refused["reason"]) == (["wf3"], "not a loopback http(s) URL")
    text = json.dumps(lines)
    for secret in ("4179302672", "s3cret", "t0ps3cret", API_KEY):
        assert secret not in text


def test_webhook_to_other_hosts_is_refused(sandbox: SandboxProcess, api: httpx.Client) -> None:
    """A non-loopback webhook URL is never contacted; its reports are dropped and counted."""
    _send(api, {"to": "41793026727"}, webhooks={"delivery": {"url": "http://192.0.2.10/dlr"}})
    _wait_for(lambda: sandbox.stats()["webhooks"]["refused"] == 1)
    assert sandbox.stats()["webhooks"]["attempts"] == 0


# --- logs ---------------------------------------------------------------------------------


def test_logs_filters_and_status_progress(sandbox: SandboxProcess, api: httpx.Client) -> None:
    """Logs are re-readable, filterable (both array styles) and move from PENDING to the final status."""
    sandbox.configure(report_delay_ms=60_000)
    _send(api, {"to": "41793026727", "messageId": "l1"}, sender="ACME", request_options={"schedule": {"bulkId": "lb"}})
    _send(api, {"to": "447700900123", "messageId": "l2"}, options={"campaignReferenceId": "k"})
    _send(api, {"to": "41793026729", "messageId": "l3"})

    def ids(**params: Any) -> list[str]:
        response = api.get("/sms/3/logs", params=params)
        assert response.status_code == 200, response.text
        return sorted(log["messageId"] for log in response.json()["results"])

    assert ids() == ["l1", "l2", "l3"]
    assert ids(messageId="l1,l3") == ["l1", "l3"]
    assert ids(messageId=["l1", "l2"]) == ["l1", "l2"]
    assert ids(bulkId="lb") == ["l1"]
    assert ids(sender="ACME") == ["l1"]
    assert ids(destination="447700900123") == ["l2"]
    assert ids(campaignReferenceId="k,other") == ["l2"]
    assert ids(mcc="234") == ["l2"]
    assert ids(mcc="228", mnc="01") == ["l1", "l3"]
    assert ids(generalStatus="PENDING") == ["l1", "l2", "l3"]
    assert ids(limit=1) in (["l1"], ["l2"], ["l3"])
    assert ids(sentSince="2000-01-01T00:00:00.000+0000", sentUntil="2100-01-01T00:00:00.000+00:00") == [
        "l1",
        "l2",
        "l3",
    ]
    assert ids(sentSince="2100-01-01T00:00:00.000+00:00") == []
    assert api.get("/sms/3/logs", params={"mnc": "01"}).status_code == 400
    assert api.get("/sms/3/logs", params={"limit": 5000}).status_code == 400

    sandbox.configure(report_delay_ms=0)
    _send(api, {"to": "41793026730", "messageId": "l4"})
    _wait_for(lambda: api.get("/sms/3/logs", params={"messageId": "l4"}).json()["results"][0].get("doneAt"))
    log = api.get("/sms/3/logs", params={"messageId": "l4"}).json()["results"][0]
    assert log["status"]["name"] == "DELIVERED_TO_HANDSET"
    assert log["content"] == {"text": "hello"}
    assert ids(generalStatus="DELIVERED") == ["l4"]


def test_logs_rate_limit_answers_429(sandbox: SandboxProcess, api: httpx.Client) -> None:
    """Logs requests beyond logs_rate_per_min get 429 E429."""
    sandbox.configure(logs_rate_per_min=3)
    statuses = [api.get("/sms/3/logs").status_code for _ in range(5)]
    assert statuses == [200, 200, 200, 429, 429]
    assert api.get("/sms/3/logs").json()["errorCode"] == "E429"


# --- faults -------------------------------------------------------------------------------


def test_latency_fault(sandbox: SandboxProcess, api: httpx.Client) -> None:
    """latency_ms delays the send response without blocking other requests meanwhile."""
    sandbox.configure(latency_ms=1500)
    outcome: dict[str, Any] = {}

    def slow_send() -> None:
        with _client(sandbox.url) as own:
            started = time.monotonic()
            outcome["status"] = _send(own, {"to": "41793026727"}).status_code
            outcome["took"] = time.monotonic() - started

    sender = threading.Thread(target=slow_send)
    sender.start()
    _wait_for(lambda: sandbox.stats()["faults"].get("latency") == 1)
    assert api.get("/sms/3/logs").status_code == 200
    assert sender.is_alive()  # the logs request was served while the send was still held
    sender.join(timeout=10)
    assert outcome["status"] == 200
    assert outcome["took"] >= 1.5


def test_5xx_faults_accept_nothing(sandbox: SandboxProcess, api: httpx.Client) -> None:
    """A 500 carries the E500 body, 502/503/504 are gateway pages, and no message is accepted."""
    sandbox.configure(error_5xx_rate=1, error_5xx_codes=[500])
    response = _send(api, {"to": "41793026727"})
    assert response.status_code == 500
    assert response.json()["errorCode"] == "E500"
    for code in (502, 503, 504):
        sandbox.configure(error_5xx_codes=[code])
        response = _send(api, {"to": "41793026727"})
        assert response.status_code == code
        assert response.headers["content-type"] == "text/html"
    stats = sandbox.stats()
    assert stats["messages_accepted"] == 0
    assert stats["faults"] == {"5xx_500": 1, "5xx_502": 1, "5xx_503": 1, "5xx_504": 1}


def test_429_faults_with_and_without_retry_after(sandbox: SandboxProcess, api: httpx.Client) -> None:
    """rate_429 answers E429; retry_after_share decides whether Retry-After is set."""
    sandbox.configure(rate_429=1, retry_after_share=0)
    plain = _send(api, {"to": "41793026727"})
    assert plain.status_code == 429 and "retry-after" not in plain.headers
    assert plain.json()["errorCode"] == "E429"
    sandbox.configure(retry_after_share=1, retry_after_s=7)
    hinted = _send(api, {"to": "41793026727"})
    assert hinted.status_code == 429 and hinted.headers["retry-after"] == "7"
    stats = sandbox.stats()
    assert stats["messages_accepted"] == 0
    assert stats["faults"] == {"429": 2, "429_retry_after": 1}


def test_accept_then_timeout_fault(sandbox: SandboxProcess, api: httpx.Client) -> None:
    """The messages are accepted but the response comes too late: the client sees a read timeout."""
    sandbox.configure(accept_then_timeout_rate=1, timeout_delay_ms=1500)
    with _client(sandbox.url, timeout=httpx.Timeout(5.0, read=0.3)) as impatient, pytest.raises(httpx.ReadTimeout):
        _send(impatient, {"to": "41793026727", "messageId": "slow"})
    assert sandbox.stats()["faults"]["timeout"] == 1
    assert [log["messageId"] for log in api.get("/sms/3/logs", params={"messageId": "slow"}).json()["results"]] == [
        "slow"
    ]
    assert sandbox.stats()["messages_accepted"] == 1


def test_drop_fault(sandbox: SandboxProcess, api: httpx.Client) -> None:
    """The messages are accepted, then the connection is cut mid-response."""
    sandbox.configure(drop_rate=1)
    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
        _send(api, {"to": "41793026727", "messageId": "dropped"})
    sandbox.configure(drop_rate=0)
    assert api.get("/sms/3/logs", params={"messageId": "dropped"}).json()["results"][0]["messageId"] == "dropped"
    stats = sandbox.stats()
    assert stats["faults"]["drop"] == 1
    assert stats["messages_accepted"] == 1


def _logged_ids(api: httpx.Client, *message_ids: str) -> list[str]:
    response = api.get("/sms/3/logs", params={"messageId": ",".join(message_ids)})
    assert response.status_code == 200, response.text
    return sorted(log["messageId"] for log in response.json()["results"])


def _reported_ids(sandbox: SandboxProcess, api: httpx.Client, count: int) -> list[str]:
    """Wait until `count` reports were generated, then pull them all (each comes once)."""
    _wait_for(lambda: sandbox.stats()["reports"]["generated"] == count)
    return sorted(r["messageId"] for r in api.get("/sms/3/reports", params={"limit": 1000}).json()["results"])


def test_html_body_fault(sandbox: SandboxProcess, api: httpx.Client) -> None:
    """A 200 carrying a proxy's HTML page instead of JSON, yet the messages were accepted."""
    sandbox.configure(html_body_rate=1)
    response = _send(api, {"to": "41793026727", "messageId": "h1"}, {"to": "41793026728", "messageId": "h2"})
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/html"
    assert response.text.startswith("<!DOCTYPE html>")
    with pytest.raises(json.JSONDecodeError):
        response.json()
    assert _logged_ids(api, "h1", "h2") == ["h1", "h2"]
    assert _reported_ids(sandbox, api, 2) == ["h1", "h2"]
    stats = sandbox.stats()
    assert stats["faults"] == {"html_body": 1}
    assert stats["messages_accepted"] == 2
    assert stats["requests"]["POST /sms/3/messages"] == {"200": 1}


def test_truncated_body_fault(sandbox: SandboxProcess, api: httpx.Client, raw: httpx.Client) -> None:
    """A complete 200 whose JSON stops half-way (Content-Length matches), yet the messages were accepted."""
    sandbox.configure(truncated_body_rate=1)
    response = _send(raw, {"to": "41793026727", "messageId": "t1"}, {"to": "41793026728", "messageId": "t2"})
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert int(response.headers["content-length"]) == len(response.content)
    assert response.content.startswith(b'{"bulkId":')
    with pytest.raises(json.JSONDecodeError):
        response.json()
    assert _logged_ids(api, "t1", "t2") == ["t1", "t2"]
    stats = sandbox.stats()
    assert stats["faults"] == {"truncated_body": 1}
    assert stats["messages_accepted"] == 2


def test_partial_results_fault(sandbox: SandboxProcess, api: httpx.Client) -> None:
    """The 200 lists fewer results than destinations sent; the left-out ones are accepted, logged and reported."""
    sandbox.configure(partial_results_rate=1)
    ids = [f"p{i}" for i in range(10)]

    def send_all() -> list[str]:
        response = _send(api, *({"to": f"4179302670{i}", "messageId": mid} for i, mid in enumerate(ids)))
        assert response.status_code == 200
        listed = [result["messageId"] for result in response.json()["messages"]]
        assert len(listed) < len(ids) and set(listed) <= set(ids)
        return listed

    listed = send_all()
    assert _logged_ids(api, *ids) == sorted(ids)
    assert _reported_ids(sandbox, api, 10) == sorted(ids)
    stats = sandbox.stats()
    assert stats["messages_accepted"] == 10
    assert stats["faults"] == {"partial_results": 1, "partial_results_dropped": 10 - len(listed)}
    sandbox.reset()  # same seed, same traffic: the same results are left out
    assert send_all() == listed


def test_unknown_status_fault(sandbox: SandboxProcess, api: httpx.Client, raw: httpx.Client) -> None:
    """Accepted destinations answered with a status group the client does not know still get their reports."""
    sandbox.configure(unknown_status_rate=0.5)
    ids = [f"u{i}" for i in range(20)]
    destinations = [{"to": f"417930267{i:02d}", "messageId": mid} for i, mid in enumerate(ids)]
    destinations.append({"to": "12345", "messageId": "u-bad"})  # rejected: its status stays REJECTED

    def send_all() -> list[str]:
        results = _send(raw, *destinations).json()["messages"]
        assert results[-1]["status"]["groupName"] == "REJECTED"
        assert {r["status"]["groupName"] for r in results[:-1]} == {"PENDING", "SCHEDULED"}
        unknown = [r for r in results if r["status"]["groupName"] == "SCHEDULED"]
        assert unknown[0]["status"] == {
            "groupId": 7,
            "groupName": "SCHEDULED",
            "id": 99,
            "name": "SCHEDULED_ACCEPTED",
            "description": "Message accepted and scheduled",
        }
        return [r["messageId"] for r in unknown]

    unknown = send_all()
    # The unknown-status ones are reported like the others (outcome mix: all delivered).
    assert _reported_ids(sandbox, api, 20) == sorted(ids)
    stats = sandbox.stats()
    assert stats["messages_accepted"] == 20
    assert stats["faults"] == {"unknown_status": len(unknown)}
    sandbox.reset()  # same seed, same traffic: the same destinations get the unknown status
    assert send_all() == unknown


def test_late_accept_fault(sandbox: SandboxProcess, api: httpx.Client) -> None:
    """The send is held past the client's read timeout and accepted at the end of the hold, client gone or not."""
    sandbox.configure(late_accept_rate=1, late_accept_delay_ms=1500)
    started = time.time()
    with _client(sandbox.url, timeout=httpx.Timeout(5.0, read=0.3)) as impatient, pytest.raises(httpx.ReadTimeout):
        _send(impatient, {"to": "41793026727", "messageId": "late"})
    # The client has given up and closed its connection; nothing is accepted yet.
    stats = sandbox.stats()
    assert (stats["faults"], stats["messages_accepted"]) == ({"late_accept": 1}, 0)
    assert _logged_ids(api, "late") == []
    _wait_for(lambda: sandbox.stats()["messages_accepted"] == 1)
    log = api.get("/sms/3/logs", params={"messageId": "late"}).json()["results"][0]
    assert parse_datetime(log["sentAt"]) >= started + 1.4  # accepted at the end of the hold
    assert _reported_ids(sandbox, api, 1) == ["late"]
    # A client that waits long enough gets the ordinary answer.
    sandbox.configure(late_accept_delay_ms=300)
    began = time.monotonic()
    response = _send(api, {"to": "41793026727", "messageId": "late-2"})
    assert time.monotonic() - began >= 0.3
    assert response.json()["messages"][0]["status"]["name"] == "PENDING_ACCEPTED"
    assert sandbox.stats()["faults"] == {"late_accept": 2}


def test_logs_lag_fault(sandbox: SandboxProcess, api: httpx.Client) -> None:
    """An accepted message shows in the logs only logs_lag_ms after acceptance; reports are not delayed."""
    sandbox.configure(logs_lag_ms=1500)
    began = time.monotonic()
    assert _send(api, {"to": "41793026727", "messageId": "lagging"}).status_code == 200
    assert _logged_ids(api, "lagging") == []
    assert api.get("/sms/3/logs").json()["results"] == []
    assert _reported_ids(sandbox, api, 1) == ["lagging"]  # the report is already out
    lagged = sandbox.stats()["faults"]["logs_lag"]
    assert lagged >= 2  # one entry held back from each logs answer so far
    _wait_for(lambda: _logged_ids(api, "lagging") == ["lagging"])
    assert time.monotonic() - began >= 1.45
    assert sandbox.stats()["faults"]["logs_lag"] >= lagged


def test_new_fault_flags_on_the_command_line() -> None:
    """Each new knob has a flag; a sandbox started with them has them on from the first request."""
    flags = [
        "--seed", "5",
        "--html-body-rate", "1",
        "--truncated-body-rate", "0.25",
        "--partial-results-rate", "0.5",
        "--unknown-status-rate", "0.125",
        "--late-accept-rate", "0.75",
        "--late-accept-delay-ms", "10",
        "--logs-lag-ms", "250",
    ]  # fmt: skip
    with SandboxProcess(api_key=API_KEY, extra_args=flags) as process, _client(process.url) as api:
        config = process.config()
        expected = {
            "html_body_rate": 1.0,
            "truncated_body_rate": 0.25,
            "partial_results_rate": 0.5,
            "unknown_status_rate": 0.125,
            "late_accept_rate": 0.75,
            "late_accept_delay_ms": 10.0,
            "logs_lag_ms": 250.0,
        }
        assert {name: config[name] for name in expected} == expected
        assert _send(api, {"to": "41793026727"}).headers["content-type"] == "text/html"
        assert process.stats()["faults"]["html_body"] == 1


def test_request_rate_limit(sandbox: SandboxProcess, api: httpx.Client) -> None:
    """Sends above request_rate_limit per second are answered 429 and not accepted."""
    sandbox.configure(request_rate_limit=0.2)  # a one-token bucket refilled every 5 s
    statuses = [_send(api, {"to": "41793026727"}).status_code for _ in range(10)]
    assert statuses[0] == 200
    assert statuses.count(429) >= 8
    stats = sandbox.stats()
    assert stats["faults"]["rate_limit"] == statuses.count(429)
    assert stats["messages_accepted"] == statuses.count(200)
    assert sum(stats["accepted_by_second"].values()) == statuses.count(200)


def test_down_answers_503_everywhere(sandbox: SandboxProcess, api: httpx.Client) -> None:
    """During an outage every API endpoint answers 503 and nothing is accepted."""
    sandbox.configure(down=True)
    assert _send(api, {"to": "41793026727"}).status_code == 503
    assert api.get("/sms/3/reports").status_code == 503
    assert api.get("/sms/3/logs").status_code == 503
    sandbox.configure(down=False)
    assert _send(api, {"to": "41793026727"}).status_code == 200
    stats = sandbox.stats()
    assert stats["faults"]["down"] == 3
    assert stats["requests"]["POST /sms/3/messages"] == {"200": 1, "503": 1}


# --- admin --------------------------------------------------------------------------------


def test_config_endpoint_rejects_bad_settings(sandbox: SandboxProcess) -> None:
    """Unknown keys or out-of-range values are refused with a 400 naming them; the config is unchanged."""
    with httpx.Client(base_url=sandbox.url, trust_env=False) as admin:
        response = admin.post("/_sandbox/config", json={"drop_rate": 3, "bogus": 1})
        assert response.status_code == 400
        assert set(response.json()["problems"]) == {"drop_rate", "bogus"}
        assert admin.get("/_sandbox/config").json()["drop_rate"] == 0


def test_every_api_response_was_schema_checked() -> None:
    """The response hook validated bodies from all three operations during this module."""
    assert {"POST /sms/3/messages", "GET /sms/3/reports", "GET /sms/3/logs"} <= set(VALIDATED)
