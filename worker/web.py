"""The web process: owns the delivery-report webhook, /healthz, /readyz and /metrics (a Starlette ASGI app).

    POST {SMS_WEBHOOK_PATH}            reports from the provider, authenticated by `header` or `basic`
    POST {SMS_WEBHOOK_PATH}/{secret}   the same, authenticated by the path token (`path`)
    GET  /healthz                      the process is alive
    GET  /readyz                       Redis answers and no lane is paused for an auth failure

A webhook call is answered 200 only once what it brought is in Redis (the provider retries
anything else), so every refusal stores nothing: 503 no secret configured or Redis down,
401 unauthenticated, 415 not JSON, 413 too big (SMS_WEBHOOK_MAX_BODY_BYTES), 400 not JSON, not
`{results: [...]}` or nested deeper than 32 levels (worker.reports.MAX_DEPTH: orjson reads 1,024
levels but writes only 254, so a deeper body accepted here could never be published). A malformed
report inside a good envelope does not refuse the body (the provider would retry it whole, then
give up on the good reports with it): it goes to the dead letters with its reason, the others to
the raw reports stream, both in one transaction before the 200 (`{"accepted": n, "dead_lettered": k}`).
Nothing here reads or changes jobs. The secret is compared in constant time and never logged
(uvicorn's access log is off: in `path` mode the URL itself is the secret).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Literal

import structlog
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from worker import metrics, redis_health
from worker.errors import ConfigError, SmsWorkerError, StoreError
from worker.producer import connect_store, connect_triggers
from worker.reports import WebhookBodyError, ingest_webhook
from worker.settings import Settings
from worker.store import Store, redis_errors
from worker.triggers import Triggers

log = structlog.get_logger(__name__)

SECRET_HEADER = "x-webhook-secret"  # noqa: S105 -- a header name, not a secret


@dataclass(frozen=True, slots=True)
class WebConfig:
    """The settings the webhook reads (the lifespan, /readyz and /metrics get the whole Settings:
    they build a producer, check the Redis server and render the gauges)."""

    path: str
    auth: Literal["header", "basic", "path"]
    secret: str | None = field(repr=False)
    max_body_bytes: int
    lanes: tuple[str, ...]
    # (page source, secret) per account with a webhook secret of its own (SMS_ACCOUNTS'
    # webhook_secret_env); a call authenticated by one is stored as `webhook:{account}`.
    account_secrets: tuple[tuple[str, str], ...] = field(default=(), repr=False)

    @classmethod
    def from_settings(cls, settings: Settings) -> WebConfig:
        """Raises ConfigError when a webhook_secret_env of SMS_ACCOUNTS names an unset variable."""
        account_secrets, missing = [], []
        for name, spec in settings.sms_accounts.items():
            if spec.webhook_secret_env is None:
                continue
            value = settings.named_secret(spec.webhook_secret_env)
            if value is None:
                missing.append(f"{spec.webhook_secret_env} is not set: it holds the webhook secret of account "
                               f"{name!r} (its webhook_secret_env in SMS_ACCOUNTS)")
            else:
                account_secrets.append((f"webhook:{name}", value))
        if missing:
            raise ConfigError("\n".join(missing))
        return cls(
            path=settings.sms_webhook_path,
            auth=settings.sms_webhook_auth,
            secret=settings.webhook_secret(),
            max_body_bytes=settings.sms_webhook_max_body_bytes,
            lanes=tuple(settings.sms_lanes),
            account_secrets=tuple(account_secrets),
        )

    def secrets(self) -> list[tuple[str, str]]:
        """(page source, secret) of every secret a webhook call may carry: SMS_WEBHOOK_SECRET's
        calls keep the source `webhook`."""
        return ([("webhook", self.secret)] if self.secret else []) + list(self.account_secrets)


@dataclass
class WebState:
    """What the handlers share; built by the lifespan unless a test passes it in."""

    store: Store | None = None
    wake: Callable[[], None] | None = None


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _basic_password(header: str | None) -> str | None:
    if not header or header[:6].lower() != "basic ":
        return None
    try:
        decoded = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    _, sep, password = decoded.partition(":")
    return password if sep else None


def _same(given: str | None, secret: str) -> bool:
    # compare_digest on bytes: constant time for equal lengths, and it takes any characters.
    return given is not None and hmac.compare_digest(given.encode("utf-8"), secret.encode("utf-8"))


def create_app(
    settings: Settings, *, store: Store | None = None, wake: Callable[[], None] | None = None
) -> Starlette:
    """The ASGI app; without `store`, the lifespan connects to Redis and a Dramatiq broker."""
    state = WebState(store, wake)
    web = WebConfig.from_settings(settings)
    secrets = web.secrets()
    mode = web.auth
    max_body = web.max_body_bytes
    if not secrets:
        log.warning("webhook_disabled", reason="SMS_WEBHOOK_SECRET is not set; the webhook answers 503",
                    path=web.path)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        triggers: Triggers | None = None
        if state.store is None:
            state.store = connect_store(settings)
            triggers = connect_triggers(settings, state.store)
            state.wake = triggers.process_reports
        log.info("web_started", webhook_path=web.path, webhook_auth=mode,
                 webhook_enabled=bool(secrets), max_body_bytes=max_body)
        try:
            yield
        finally:
            if triggers is not None:  # only what the lifespan opened: a test's store is the test's
                state.store.close()
                triggers.broker.close()

    def authenticated(request: Request) -> str | None:
        """The page source of the secret the call carries (`webhook` for SMS_WEBHOOK_SECRET,
        `webhook:{account}` for an account's own), or None. Every secret is compared, in constant
        time, whichever matches: the time taken says nothing about which one is close."""
        if mode == "header":
            given = request.headers.get(SECRET_HEADER)
        elif mode == "basic":
            given = _basic_password(request.headers.get("authorization"))
        else:
            given = request.path_params.get("token")
        matched = [source for source, secret in secrets if _same(given, secret)]
        return matched[0] if matched else None

    async def read_body(request: Request) -> bytes | None:
        """The body, or None once it exceeds the cap (counted as it streams, whatever it claims)."""
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body:
                return None
            chunks.append(chunk)
        return b"".join(chunks)

    async def webhook(request: Request) -> Response:
        started = time.perf_counter()

        def refuse(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
            log.warning("webhook_refused", status=status, reason=message,
                        duration_ms=round((time.perf_counter() - started) * 1000, 1))
            return _error(status, message, headers)

        if not secrets:
            return refuse(503, "the webhook is not configured (no shared secret)")
        source = authenticated(request)
        if source is None:
            challenge = {"WWW-Authenticate": 'Basic realm="icomm-webhook"'} if mode == "basic" else None
            return refuse(401, "unauthenticated", challenge)
        media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if media != "application/json":
            return refuse(415, "content type must be application/json")
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                return refuse(400, "invalid Content-Length")
            if int(declared) > max_body:
                return refuse(413, f"body larger than {max_body} bytes")
        body = await read_body(request)
        if body is None:
            return refuse(413, f"body larger than {max_body} bytes")
        store = state.store
        if store is None:
            return refuse(503, "not ready")
        try:
            ingested = await run_in_threadpool(ingest_webhook, store, body, source)
        except WebhookBodyError as error:
            return refuse(400, str(error))
        except StoreError as error:
            log.error("webhook_store_failed", error=str(error))
            return refuse(503, "storage unavailable, retry later")
        reports, dead = ingested.reports, len(ingested.dead)
        if reports and state.wake is not None:
            try:
                await run_in_threadpool(state.wake)
            except SmsWorkerError as error:
                # Stored durably already: the clock wakes the processor every second anyway.
                log.warning("webhook_wake_failed", error=str(error))
        log.info("webhook_received", reports=reports, dead_lettered=dead, bytes=len(body),
                 duration_ms=round((time.perf_counter() - started) * 1000, 1))
        return JSONResponse({"accepted": reports, "dead_lettered": dead} if dead else {"accepted": reports})

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    def readiness() -> tuple[bool, dict[str, object]]:
        store = state.store
        if store is None:
            return False, {"redis": "not connected"}
        try:
            with redis_errors():
                store.ping()
            paused = {lane: store.paused(lane) for lane in web.lanes}
            # A Redis that may evict keys (or a replica) is not ready; no persistence is only reported.
            config_ok, config, config_error = redis_health.readiness(settings, store)
        except StoreError:
            return False, {"redis": "unreachable"}
        auth = sorted(lane for lane, reason in paused.items() if reason == "auth")
        detail: dict[str, object] = {"redis": "ok", "paused": {k: v for k, v in paused.items() if v},
                                     "redis_config": config}
        if auth:
            detail["error"] = f"lane(s) paused by a provider auth failure: {', '.join(auth)}"
        elif config_error:
            detail["error"] = config_error
        return not auth and config_ok, detail

    async def readyz(request: Request) -> Response:
        ready, detail = await run_in_threadpool(readiness)
        return JSONResponse({"ready": ready, **detail}, status_code=200 if ready else 503)

    async def metrics_endpoint(request: Request) -> Response:
        # The web process's own counters (webhook reports) and the Redis gauges.
        if state.store is None:
            return Response(status_code=503)
        body, content_type = await run_in_threadpool(metrics.render, metrics.registries(settings, state.store))
        return Response(body, media_type=content_type)

    path = web.path.rstrip("/") or "/"
    routes = [
        Route(path, webhook, methods=["POST"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
    ]
    if mode == "path":
        routes.insert(1, Route(f"{path.rstrip('/')}/{{token}}", webhook, methods=["POST"]))
    return Starlette(routes=routes, lifespan=lifespan)
