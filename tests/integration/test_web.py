"""The web app (webhook, /healthz, /readyz) served by a real uvicorn on loopback, against real Redis."""

from __future__ import annotations

import base64
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import orjson
import pytest
import uvicorn
from starlette.applications import Starlette
from structlog.testing import capture_logs

from worker.reports import ProcessConfig, Processor
from worker.settings import Settings
from worker.store import Store, connect
from worker.web import create_app

SECRET = "webhook-secret-3c1f9a7e5b"
PATH = "/webhooks/icomm/delivery"
REPORT = {
    "bulkId": "bulk-1", "messageId": "m-1", "to": "41793026727", "sentAt": "2026-11-27T10:00:00.000+0000",
    "doneAt": "2026-11-27T10:00:02.000+0000", "messageCount": 1, "price": {"pricePerMessage": 0.01, "currency": "EUR"},
    "status": {"groupId": 3, "groupName": "DELIVERED", "id": 5, "name": "DELIVERED_TO_HANDSET",
               "description": "Message delivered to handset"},
    "error": {"groupId": 0, "groupName": "OK", "id": 0, "name": "NO_ERROR", "description": "No Error",
              "permanent": False},
    "mccMnc": "22801",
}
BODY = orjson.dumps({"results": [REPORT]})
JSON = {"content-type": "application/json"}


class Wakes:
    """Records processor wake-ups instead of sending Dramatiq messages."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


def _settings(settings: Settings, **changes: Any) -> Settings:
    return Settings.model_validate({**settings.model_dump(), "sms_webhook_secret": SECRET, **changes})


def _stored(store: Store) -> int:
    return int(store.r.xlen(store.reports_raw))


class Served:
    """The app under uvicorn in a thread, on a socket bound here (no free-port race); a context manager."""

    def __init__(self, app: Starlette) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        port = self.sock.getsockname()[1]
        config = uvicorn.Config(app, loop="asyncio", http="httptools", lifespan="on", log_config=None,
                                access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10, trust_env=False)

    def __enter__(self) -> httpx.Client:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)
        return self.client

    def __exit__(self, *exc: object) -> None:
        self.client.close()
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


@pytest.fixture
def wakes() -> Wakes:
    return Wakes()


@pytest.fixture
def client_for(settings: Settings, store: Store, wakes: Wakes) -> Iterator[Callable[..., httpx.Client]]:
    served: list[Served] = []

    def make(**changes: Any) -> httpx.Client:
        server = Served(create_app(_settings(settings, **changes), store=store, wake=wakes))
        served.append(server)
        return server.__enter__()

    yield make
    for server in served:
        server.__exit__()


def _basic(password: str, user: str = "icomm") -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"authorization": f"Basic {token}"}


# (mode, url, headers) for a good call, a call without credentials, and one with the wrong secret.
AUTH_CASES: dict[str, tuple[tuple[str, dict[str, str]], ...]] = {
    "header": ((PATH, {"x-webhook-secret": SECRET}), (PATH, {}), (PATH, {"x-webhook-secret": "wrong"})),
    "basic": ((PATH, _basic(SECRET)), (PATH, {}), (PATH, _basic("wrong"))),
    "path": ((f"{PATH}/{SECRET}", {}), (PATH, {}), (f"{PATH}/wrong", {})),
}


@pytest.mark.parametrize("mode", sorted(AUTH_CASES))
def test_each_auth_mode_accepts_the_secret_and_refuses_everything_else(
    client_for: Callable[..., httpx.Client], store: Store, wakes: Wakes, mode: str
) -> None:
    """Good credentials store the body and wake the processor; missing or wrong ones get 401, store nothing."""
    client = client_for(sms_webhook_auth=mode)
    good, missing, wrong = AUTH_CASES[mode]
    for url, headers in (missing, wrong):
        response = client.post(url, content=BODY, headers={**JSON, **headers})
        assert response.status_code == 401, (url, headers)
        assert _stored(store) == 0 and wakes.count == 0

    response = client.post(good[0], content=BODY, headers={**JSON, **good[1]})

    assert response.status_code == 200 and response.json() == {"accepted": 1}
    assert _stored(store) == 1 and wakes.count == 1
    [(_, fields)] = store.r.xrange(store.reports_raw)
    assert fields[b"page"] == BODY and fields[b"src"] == b"webhook"


def test_basic_mode_asks_for_credentials(client_for: Callable[..., httpx.Client]) -> None:
    """A 401 in basic mode carries a Basic challenge."""
    response = client_for(sms_webhook_auth="basic").post(PATH, content=BODY, headers=JSON)
    assert response.status_code == 401 and response.headers["www-authenticate"].startswith("Basic")


def test_a_token_route_does_not_exist_outside_path_mode(client_for: Callable[..., httpx.Client], store: Store) -> None:
    """With header auth, a secret in the path is not a way in."""
    client = client_for(sms_webhook_auth="header")
    assert client.post(f"{PATH}/{SECRET}", content=BODY, headers=JSON).status_code == 404
    assert _stored(store) == 0


@pytest.mark.parametrize(
    ("body", "headers"),
    [
        (b"x" * 2000, {"content-length": "2000"}),  # declared too big
        (b"x" * 2000, {}),  # streamed too big
    ],
)
def test_oversized_bodies_get_413_and_store_nothing(
    client_for: Callable[..., httpx.Client], store: Store, body: bytes, headers: dict[str, str]
) -> None:
    """The body cap holds for the declared length and for what actually streams in."""
    client = client_for(sms_webhook_max_body_bytes=1024)
    auth = {**JSON, "x-webhook-secret": SECRET}
    if headers:
        response = client.post(PATH, content=body, headers={**auth, **headers})
    else:
        response = client.post(PATH, content=iter([body[:1000], body[1000:]]), headers=auth)  # chunked
    assert response.status_code == 413
    assert _stored(store) == 0


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b"[]",
        b"{}",
        b'"results"',
        b'{"results": {"messageId": "m-1"}}',
        b'{"results": "m-1"}',
        b'{"results": null}',
    ],
)
def test_malformed_bodies_get_400_and_store_nothing(
    client_for: Callable[..., httpx.Client], store: Store, wakes: Wakes, body: bytes
) -> None:
    """A body that is not {results: [...]} at all is refused with the reason."""
    response = client_for().post(PATH, content=body, headers={**JSON, "x-webhook-secret": SECRET})
    assert response.status_code == 400 and response.json()["error"]
    assert _stored(store) == 0 and _dead(store) == [] and wakes.count == 0


def _dead(store: Store) -> list[tuple[str, dict[str, Any]]]:
    return [(f[b"message_id"].decode(), orjson.loads(f[b"entry"])) for _, f in store.r.xrange(store.dlq)]


def _accepted(store: Store, *mids: str) -> None:
    for mid in mids:
        store.r.hset(store.msg(mid), mapping={"state": "ACCEPTED", "lane": "otp", "job": b'{"to":"41793026727"}'})


def test_one_malformed_report_among_100_is_dead_lettered_and_the_99_others_are_kept(
    client_for: Callable[..., httpx.Client], settings: Settings, store: Store, wakes: Wakes
) -> None:
    """A 400 would make the provider retry the whole body and then give up on it, good reports and all:
    the good ones are stored, the malformed one goes to the dead letters as it came, with its reason,
    and the call gets its 200."""
    mids = [f"m-{i}" for i in range(100)]
    _accepted(store, *mids)
    results: list[Any] = [{**REPORT, "messageId": mid} for mid in mids]
    results[42] = {**REPORT, "messageId": "m-42", "price": "free"}
    response = client_for().post(PATH, content=orjson.dumps({"results": results}),
                                 headers={**JSON, "x-webhook-secret": SECRET})

    assert response.status_code == 200, response.text
    assert response.json() == {"accepted": 99, "dead_lettered": 1}
    assert _stored(store) == 1 and wakes.count == 1
    [(mid, dead)] = _dead(store)
    assert mid == "m-42" and dead["reason"] == "report_malformed" and dead["source"] == "webhook"
    assert dead["detail"] == "results[42].price must be an object"
    assert dead["item"] == results[42]  # the report as it came

    Processor(ProcessConfig.from_settings(settings), store).process()

    events = [orjson.loads(f[b"event"]) for _, f in store.r.xrange(store.events)]
    assert sorted(e["message_id"] for e in events) == sorted(m for m in mids if m != "m-42")
    assert store.message("m-42")["state"] == "ACCEPTED"
    assert len(_dead(store)) == 1  # the processor found nothing more to dead-letter


@pytest.mark.parametrize(
    ("item", "problem"),
    [
        ("m-1", "results[0] must be an object"),
        ({"status": {"groupName": "DELIVERED"}}, "results[0].messageId must be a non-empty string"),
        ({"messageId": 7}, "results[0].messageId must be a non-empty string"),
        ({"messageId": "m-1", "status": "DELIVERED"}, "results[0].status must be an object"),
        ({"messageId": "m-1", "messageCount": "1"}, "results[0].messageCount must be an integer"),
        ({"messageId": "m-1", "to": 41793026727}, "results[0].to must be a string"),
    ],
)
def test_a_malformed_report_is_dead_lettered_with_its_reason_and_answered_200(
    client_for: Callable[..., httpx.Client], store: Store, wakes: Wakes, item: Any, problem: str
) -> None:
    """Retrying a report the provider got wrong cannot make it right: it is kept in the dead letters
    (`sms-worker dlq list`), and nothing else is stored or woken."""
    body = orjson.dumps({"results": [item]})
    response = client_for().post(PATH, content=body, headers={**JSON, "x-webhook-secret": SECRET})

    assert response.status_code == 200 and response.json() == {"accepted": 0, "dead_lettered": 1}
    assert _stored(store) == 0 and wakes.count == 0
    [(_, dead)] = _dead(store)
    assert (dead["reason"], dead["detail"], dead["item"]) == ("report_malformed", problem, item)


def test_a_partly_malformed_body_gets_200_only_once_both_parts_are_in_redis(
    client_for: Callable[..., httpx.Client], store: Store, wakes: Wakes
) -> None:
    """The good reports and the dead letter are written together or not at all: a Redis that refuses
    writes (out of memory) gets the call a 503, the provider retries, and the retry is kept whole."""
    body = orjson.dumps({"results": [REPORT, {**REPORT, "messageId": 7}]})
    client = client_for()
    store.r.config_set("maxmemory-policy", "noeviction")
    store.r.config_set("maxmemory", 1)
    try:
        refused = client.post(PATH, content=body, headers={**JSON, "x-webhook-secret": SECRET})
    finally:
        store.r.config_set("maxmemory", 0)
    assert refused.status_code == 503
    assert _stored(store) == 0 and _dead(store) == [] and wakes.count == 0

    retried = client.post(PATH, content=body, headers={**JSON, "x-webhook-secret": SECRET})

    assert retried.status_code == 200 and retried.json() == {"accepted": 1, "dead_lettered": 1}
    assert _stored(store) == 1 and len(_dead(store)) == 1


def _nested_body(depth: int, field: str = "price", opener: bytes = b'{"a": ', closer: bytes = b"}") -> bytes:
    """A webhook body exactly `depth` levels deep: {results: [{..., field: <depth - 3 levels>}]}."""
    levels = depth - 3
    inner = opener * levels + b"1" + closer * levels
    report = orjson.dumps({**REPORT, field: None})
    return b'{"results": [' + report.replace(f'"{field}":null'.encode(), f'"{field}":'.encode() + inner) + b"]}"


@pytest.mark.parametrize(
    "body",
    [
        _nested_body(33),
        _nested_body(300),  # valid JSON that orjson reads (1,024 levels) but cannot write (254)
        _nested_body(300, "extra", b"[", b"]"),
        _nested_body(2000),  # deeper than orjson reads at all
    ],
    ids=["price-33", "price-300", "list-300", "price-2000"],
)
def test_bodies_nested_too_deep_get_400_and_store_nothing(
    client_for: Callable[..., httpx.Client], store: Store, wakes: Wakes, body: bytes
) -> None:
    """A body nested deeper than 32 levels is refused at the door: stored, it could never be published."""
    response = client_for().post(PATH, content=body, headers={**JSON, "x-webhook-secret": SECRET})
    assert response.status_code == 400, response.text
    assert _stored(store) == 0 and wakes.count == 0


def test_a_body_nested_32_deep_is_accepted_and_processed(
    client_for: Callable[..., httpx.Client], settings: Settings, store: Store
) -> None:
    """The bound is 32 levels: a body exactly that deep is a delivery report like any other."""
    store.r.hset(store.msg("m-1"), mapping={"state": "ACCEPTED", "lane": "otp", "job": b'{"to":"41793026727"}'})
    body = _nested_body(32)
    response = client_for().post(PATH, content=body, headers={**JSON, "x-webhook-secret": SECRET})
    assert response.status_code == 200 and _stored(store) == 1

    Processor(ProcessConfig.from_settings(settings), store).process()

    [event] = [orjson.loads(f[b"event"]) for _, f in store.r.xrange(store.events)]
    assert event["event_id"] == "m-1:delivered" and event["price"] == orjson.loads(body)["results"][0]["price"]


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/xml"])
def test_a_body_that_is_not_json_by_content_type_gets_415(
    client_for: Callable[..., httpx.Client], store: Store, content_type: str | None
) -> None:
    """Only application/json is accepted (the worker asks the provider for JSON)."""
    headers = {"x-webhook-secret": SECRET}
    if content_type:
        headers["content-type"] = content_type
    assert client_for().post(PATH, content=BODY, headers=headers).status_code == 415
    assert _stored(store) == 0


def test_charset_parameter_is_fine(client_for: Callable[..., httpx.Client], store: Store) -> None:
    """`application/json; charset=utf-8` is JSON too."""
    headers = {"content-type": "application/json; charset=utf-8", "x-webhook-secret": SECRET}
    assert client_for().post(PATH, content=BODY, headers=headers).status_code == 200
    assert _stored(store) == 1


def test_the_same_delivery_replayed_gives_one_event(
    client_for: Callable[..., httpx.Client], settings: Settings, store: Store
) -> None:
    """The provider retrying a call we already stored (or both paths) still yields one event."""
    store.r.hset(store.msg("m-1"), mapping={"state": "ACCEPTED", "lane": "otp", "job": b'{"to":"41793026727"}'})
    client = client_for()
    for _ in range(2):
        assert client.post(PATH, content=BODY, headers={**JSON, "x-webhook-secret": SECRET}).status_code == 200
    assert _stored(store) == 2

    Processor(ProcessConfig.from_settings(settings), store).process()

    events = [orjson.loads(f[b"event"]) for _, f in store.r.xrange(store.events)]
    assert [e["event_id"] for e in events] == ["m-1:delivered"]


def test_an_empty_results_list_is_accepted_and_stores_nothing(
    client_for: Callable[..., httpx.Client], store: Store, wakes: Wakes
) -> None:
    """`{results: []}` is valid; there is nothing to keep."""
    response = client_for().post(PATH, content=b'{"results": []}', headers={**JSON, "x-webhook-secret": SECRET})
    assert response.status_code == 200 and response.json() == {"accepted": 0}
    assert _stored(store) == 0 and wakes.count == 0


def test_without_a_secret_the_webhook_refuses_everything(settings: Settings, store: Store) -> None:
    """No SMS_WEBHOOK_SECRET: 503 for every call, logged once at start."""
    with capture_logs() as logs:
        app = create_app(settings, store=store, wake=Wakes())
        with Served(app) as client:
            for headers in ({}, {"x-webhook-secret": ""}, {"x-webhook-secret": "anything"}):
                assert client.post(PATH, content=BODY, headers={**JSON, **headers}).status_code == 503
    assert _stored(store) == 0
    assert [e["event"] for e in logs].count("webhook_disabled") == 1


@pytest.mark.parametrize("mode", ["header", "basic", "path"])
def test_the_secret_never_reaches_the_logs(client_for: Callable[..., httpx.Client], mode: str) -> None:
    """Neither accepted nor refused calls log the secret (nor a wrong guess at it)."""
    good, _, wrong = AUTH_CASES[mode]
    with capture_logs() as logs:
        client = client_for(sms_webhook_auth=mode)
        client.post(good[0], content=BODY, headers={**JSON, **good[1]})
        client.post(wrong[0], content=BODY, headers={**JSON, **wrong[1]})
        client.post(good[0], content=b"{bad", headers={**JSON, **good[1]})
    text = repr(logs)
    assert "webhook_received" in text and "webhook_refused" in text
    assert SECRET not in text and base64.b64encode(f"icomm:{SECRET}".encode()).decode() not in text


def test_healthz_and_readyz(client_for: Callable[..., httpx.Client], store: Store) -> None:
    """healthz is always 200; readyz is 503 while a lane is paused for an auth failure, not for other pauses."""
    client = client_for()
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").status_code == 200

    store.pause("bulk", "provider_unavailable", 30)
    assert client.get("/readyz").status_code == 200
    store.pause("otp", "auth", 30)
    response = client.get("/readyz")
    assert response.status_code == 503 and "otp" in response.json()["error"]
    store.resume("otp")
    assert client.get("/readyz").status_code == 200


def test_readyz_is_503_when_redis_is_unreachable(settings: Settings) -> None:
    """A web process that cannot reach Redis is not ready (and the webhook would answer 503)."""
    client_redis = connect("redis://127.0.0.1:1/0")
    store = Store(client_redis)
    app = create_app(_settings(settings), store=store, wake=Wakes())
    with Served(app) as client:
        assert client.get("/healthz").status_code == 200
        response = client.get("/readyz")
        assert response.status_code == 503 and response.json()["redis"] == "unreachable"
        webhook = client.post(PATH, content=BODY, headers={**JSON, "x-webhook-secret": SECRET})
        assert webhook.status_code == 503
    client_redis.close()


def test_no_route_reads_or_changes_jobs(client_for: Callable[..., httpx.Client]) -> None:
    """The web process has exactly the webhook and the two probes; everything else is 404/405."""
    client = client_for()
    assert client.get(PATH).status_code == 405
    for path in ("/jobs", "/outbox", "/dlq", "/sms/3/messages", "/metrics/../jobs"):
        assert client.get(path).status_code == 404
        assert client.post(path, content=b"{}", headers=JSON).status_code == 404
