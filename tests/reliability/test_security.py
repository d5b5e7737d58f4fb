"""Secrets and phone numbers stay out of the logs on every path, and the webhook lets nothing in.

One short system with the web process and provider faults on (5xx, 429 with Retry-After, timeouts,
dropped connections, a spell of 403 for the API key, bad outbox entries), so the error paths log,
at DEBUG level, with the webhook secret in the URL path (`SMS_WEBHOOK_AUTH=path`, the mode where the
URL itself is the secret). Then every process log and every Redis key is searched.
"""

from __future__ import annotations

import base64
import re
from pathlib import Path
from typing import Any

import httpx
import orjson

from tests.reliability.harness import (
    API_KEY,
    Row,
    Size,
    System,
    assert_promises,
    jobs,
    running,
    verify,
    wait_settled,
)
from worker.devtools.devstack import wait_until
from worker.web import create_app

SECRET = "whsec-8e3b1f0a7c6d2954"
FAULTS = ("--error-5xx-rate", "0.15", "--rate-429", "0.05", "--retry-after-share", "0.5", "--retry-after-s", "1",
          "--accept-then-timeout-rate", "0.05", "--timeout-delay-ms", "1500", "--drop-rate", "0.05")
MAX_BODY = 65536
# A full (unmasked) number as the jobs use them; masked ones look like 41*******27.
UNMASKED = re.compile(r"(?<![0-9])\+?4179[0-9]{7}(?![0-9])")


def _report(message_id: str, group: str = "UNDELIVERABLE") -> dict[str, Any]:
    return {"bulkId": "b-1", "messageId": message_id, "to": "41790000001", "sentAt": "2026-11-27T10:00:00.000+0000",
            "doneAt": "2026-11-27T10:00:02.000+0000", "messageCount": 1,
            "price": {"pricePerMessage": 0.01, "currency": "EUR"},
            "status": {"groupId": 2, "groupName": group, "id": 9, "name": f"{group}_NOT_DELIVERED",
                       "description": "forged"},
            "error": {"groupId": 0, "groupName": "OK", "id": 0, "name": "NO_ERROR", "description": "",
                      "permanent": False}}


def _redis_text(system: System) -> bytes:
    """Every key and value in Redis, as bytes to search (streams, hashes, strings, lists, sets)."""
    r = system.client
    out = []
    for key in r.scan_iter(count=1000):
        kind = r.type(key)
        out.append(key)
        if kind == b"string":
            out.append(r.get(key) or b"")
        elif kind == b"hash":
            out += [x for kv in r.hgetall(key).items() for x in kv]
        elif kind == b"stream":
            out += [x for _, fields in r.xrange(key) for kv in fields.items() for x in kv]
        elif kind == b"list":
            out += r.lrange(key, 0, -1)
        elif kind == b"zset":
            out += r.zrange(key, 0, -1)
        elif kind == b"set":
            out += list(r.smembers(key))
    return b"\n".join(out)


def _state(system: System) -> tuple[int, ...]:
    """What a webhook or web call could change: events, dead letters, raw and parked reports, outboxes."""
    r, store = system.client, system.store
    return (int(r.xlen(store.events)), int(r.xlen(store.dlq)), int(r.xlen(store.reports_raw)),
            int(r.hlen(store.reports_parked)),
            system.outbox_left(), len(list(r.scan_iter(match=f"{store.p}:msg:*", count=1000))))


def _refusals(system: System, message_id: str, row: Row) -> list[str]:
    """Webhook calls that must be refused and change nothing; returns what went wrong."""
    assert system.web_url is not None
    path = system.settings.sms_webhook_path
    body = orjson.dumps({"results": [_report(message_id)]})
    json = {"content-type": "application/json"}
    big = orjson.dumps({"results": [_report(message_id)], "pad": "x" * MAX_BODY})
    calls: list[tuple[str, str, bytes | list[bytes], dict[str, str], int]] = [
        ("no secret", path, body, json, 401),
        ("wrong secret", f"{path}/not-the-secret", body, json, 401),
        ("secret in a header instead of the path", path, body, {**json, "x-webhook-secret": SECRET}, 401),
        ("secret as basic auth instead of the path", path, body,
         {**json, "authorization": "Basic " + base64.b64encode(f"icomm:{SECRET}".encode()).decode()}, 401),
        ("oversized, declared", f"{path}/{SECRET}", big, json, 413),
        ("oversized, streamed", f"{path}/{SECRET}", [big[: MAX_BODY // 2], big[MAX_BODY // 2 :]], json, 413),
        ("not JSON", f"{path}/{SECRET}", b"{results: [", json, 400),
        ("not JSON by content type", f"{path}/{SECRET}", body, {"content-type": "text/plain"}, 415),
    ]
    problems = []
    with httpx.Client(base_url=system.web_url, timeout=10, trust_env=False) as client:
        for what, url, content, headers, expected in calls:
            before = _state(system)
            stream = iter(content) if isinstance(content, list) else content
            status = client.post(url, content=stream, headers=headers).status_code
            row.fault("webhook calls refused")
            if status != expected:
                problems.append(f"{what}: answered {status}, expected {expected}")
            if _state(system) != before:
                problems.append(f"{what}: changed Redis {before} -> {_state(system)}")
    return problems


def _replays(system: System, message_id: str, row: Row) -> list[str]:
    """An authenticated replay of a report (and a forged later verdict) for a final message adds no event."""
    assert system.web_url is not None
    raw = system.store.reports_raw
    events_before = system.events_len()
    state_before = system.store.message(message_id)["state"]
    url = f"{system.web_url}{system.settings.sms_webhook_path}/{SECRET}"
    problems = []
    for body in ({"results": [_report(message_id, "DELIVERED")]}, {"results": [_report(message_id)]}):
        for _ in range(2):
            status = httpx.post(url, content=orjson.dumps(body), headers={"content-type": "application/json"},
                                timeout=10).status_code
            row.fault("webhook replays")
            if status != 200:
                problems.append(f"replay answered {status}")
    # Stored before each 200, deleted once processed: an empty raw stream means all four were applied.
    wait_until(lambda: int(system.client.xlen(raw)) == 0, 20, "the replays to be processed", interval_s=0.1)
    if system.events_len() != events_before:
        problems.append(f"a replay published events: {system.events()[events_before:]}")
    if system.store.message(message_id)["state"] != state_before:
        problems.append(f"a replay changed the message state from {state_before}")
    return problems


def _routes() -> set[tuple[str, frozenset[str]]]:
    from worker.settings import Settings

    settings = Settings(icomm_api_key=API_KEY, sms_webhook_secret=SECRET, sms_webhook_auth="path")
    app = create_app(settings)
    return {(route.path, frozenset(route.methods or ())) for route in app.routes}  # type: ignore[attr-defined]


def test_no_secret_or_phone_number_leaks_and_the_webhook_refuses_strangers(
    size: Size, record: Row, tmp_path: Path
) -> None:
    """Logs and Redis never hold the key or secret, logs mask numbers, refused calls change nothing."""
    record.suite = "security"
    n = size.security_sms
    env = {"SMS_WEBHOOK_SECRET": SECRET, "SMS_WEBHOOK_AUTH": "path", "SMS_WEBHOOK_MAX_BODY_BYTES": str(MAX_BODY),
           "LOG_LEVEL": "DEBUG"}
    with running(env, FAULTS, web=True, seed=size.seed, log_dir=tmp_path) as system:
        queued = system.outbox.enqueue_many(jobs(n // 2), "bulk")
        for lane in ("bulk", "otp"):  # error paths of bad input, numbers inside
            system.client.xadd(system.store.outbox(lane), {"job": orjson.dumps({"to": "41791234567", "text": " "})})
            system.client.xadd(system.store.outbox(lane), {"job": b'{"to": "41791234568", "text": "hi", "x": 1}'})
            # An unknown option named like a number: its name is in the dead letter's detail, which is logged.
            system.client.xadd(system.store.outbox(lane), {"job": b'{"to": "41791234567", "text": "hi", '
                                                                  b'"41791234569": 1}'})
        wait_until(lambda: system.stats()["messages_accepted"] >= n // 8, 60, "the run to be under way")
        system.configure(forbidden_keys=[API_KEY])  # 403 for sends, drains and logs
        queued += system.outbox.enqueue_many(jobs(n - n // 2, n // 2), "otp")
        wait_until(lambda: system.store.paused("otp") == "auth", 30, "the otp lane to pause for the 403")
        system.configure(forbidden_keys=[])
        took = wait_settled(system, 120)
        verdict = verify(system, [r.message_id for r in queued])
        record.add(verdict)
        record.fault("403 spell")
        final = next(e["message_id"] for e in system.events() if e["type"] == "delivered")
        problems = _refusals(system, final, record) + _replays(system, final, record)
        with httpx.Client(base_url=system.web_url, timeout=10, trust_env=False) as client:
            before = _state(system)
            for method in ("GET", "POST", "PUT", "PATCH", "DELETE"):
                for probe in ("/jobs", "/outbox", "/dlq", "/events", "/messages", "/status", "/admin", "/",
                              "/sms/3/messages", "/_sandbox/stats", f"/metrics/{SECRET}"):
                    status = client.request(method, probe, content=b"{}", headers={"content-type": "application/json"})
                    if status.status_code not in (404, 405):
                        problems.append(f"{method} {probe} answered {status.status_code}")
            metrics = client.get("/metrics").text
            if _state(system) != before:
                problems.append("probing the web process changed Redis")
        logs = {p.name: p.read_text(errors="replace") for p in sorted(Path(system.stack.log_dir).glob("*.log"))}
        stored = _redis_text(system)
        crashed = system.dead_processes()
    secret_forms = {SECRET, base64.b64encode(f"icomm:{SECRET}".encode()).decode()}
    for name, text in {**logs, "web /metrics": metrics}.items():
        for secret in (API_KEY, *secret_forms):
            if secret in text:
                problems.append(f"{name} holds {'the API key' if secret == API_KEY else 'the webhook secret'}")
        numbers = UNMASKED.findall(text)
        if numbers:
            problems.append(f"{name} holds {len(numbers)} unmasked phone numbers, e.g. {numbers[:3]}")
    for secret in (API_KEY, *secret_forms):
        if secret.encode() in stored:
            problems.append(f"Redis holds {'the API key' if secret == API_KEY else 'the webhook secret'}")
    routes = _routes()
    path = "/webhooks/icomm/delivery"
    allowed = {path: {"POST"}, f"{path}/{{token}}": {"POST"}, "/healthz": {"GET", "HEAD"}, "/readyz": {"GET", "HEAD"},
               "/metrics": {"GET", "HEAD"}}
    record.note = (f"logs searched: {', '.join(logs)} ({sum(len(t) for t in logs.values()) // 1024} KiB, DEBUG); "
                   f"web routes: {sorted(r for r, _ in routes)}")
    assert took is not None, f"the run did not settle: {verdict.summary()}"
    assert not crashed, crashed
    assert {route: set(methods) for route, methods in routes} == allowed
    assert not problems, "\n".join(problems)
    assert_promises(verdict)
    # The error paths ran, so their log lines were among those searched.
    logged = "\n".join(logs.values())
    missing = [event for event in ("provider_auth_failed", "dead_lettered", "webhook_refused", "webhook_received",
                                   "send_ambiguous", "reconciled", "reports_processed") if f'"{event}"' not in logged]
    assert not missing, f"these paths left no log line to search: {missing}"
    assert "41*******69" in logged, "the number in a dead letter's detail was not logged masked"
