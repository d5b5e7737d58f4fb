"""Report pushes to `webhooks.delivery.url`: batches, Basic auth from the URL, retries, loopback only."""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final
from urllib.parse import unquote, urlsplit, urlunsplit

import httpx
import orjson

from worker.devtools.sandbox import records as rec
from worker.devtools.sandbox.records import DROPPED, MESSAGE_ID, PUSHED, STATE, Record
from worker.devtools.sandbox.reports import report_of
from worker.devtools.sandbox.state import SandboxState

BATCH_SIZE: Final = 100  # the provider's default maxBucketSize
MAX_IN_FLIGHT: Final = 8

# Warnings only, one line per failed push and per batch of dropped reports, with fields as
# structured data (`extra`). They name reports by messageId and targets by scheme, host, port and
# path: never a destination number, the URL's userinfo or its query string.
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Target:
    """Where a push goes: the URL without userinfo, plus the Authorization header built from it."""

    url: str
    authorization: str | None

    @property
    def shown(self) -> str:
        """The URL as logs show it: without its query string (it may carry a token)."""
        return self.url.partition("?")[0]


def parse_target(url: str) -> Target | None:
    """The push target of a webhook URL, or None when it is not an http(s) loopback URL."""
    try:
        parts = urlsplit(url)
        host = parts.hostname
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not host:
        return None
    if host != "localhost":
        try:
            if not ipaddress.ip_address(host).is_loopback:
                return None
        except ValueError:
            return None  # any other DNS name could leave the machine
    authorization = None
    if parts.username is not None or parts.password is not None:
        userinfo = f"{unquote(parts.username or '')}:{unquote(parts.password or '')}"
        authorization = "Basic " + base64.b64encode(userinfo.encode()).decode("ascii")
    netloc = f"[{host}]" if ":" in host else host
    if port is not None:
        netloc += f":{port}"
    return Target(urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, "")), authorization)


class WebhookPusher:
    """Takes generated reports off the state's webhook queue and POSTs them as `{results: [...]}`."""

    def __init__(self, current_state: Callable[[], SandboxState]) -> None:
        self._current_state = current_state
        self._wake = asyncio.Event()
        self._in_flight = asyncio.Semaphore(MAX_IN_FLIGHT)
        self._tasks: set[asyncio.Task[None]] = set()
        self._client = httpx.AsyncClient(trust_env=False, follow_redirects=False)

    def kick(self) -> None:
        """Tell the pusher that the webhook queue has work."""
        self._wake.set()

    async def run(self) -> None:
        """Drain the queue whenever kicked; runs until cancelled."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            self._drain(self._current_state())

    async def close(self) -> None:
        """Cancel pending pushes and close the HTTP client."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._client.aclose()

    def _drain(self, state: SandboxState) -> None:
        by_url: dict[str, list[Record]] = {}
        queue = state.webhook_queue
        while queue:
            record = queue.popleft()
            by_url.setdefault(rec.delivery(record)[0] or "", []).append(record)
        for url, records in by_url.items():
            target = parse_target(url)
            if target is None:
                # Never contact a host that is not this machine: drop, and count it.
                state.webhook_refused += len(records)
                for record in records:
                    record[STATE] = DROPPED
                for start in range(0, len(records), BATCH_SIZE):
                    _log_dropped(records[start : start + BATCH_SIZE], "not a loopback http(s) URL", _host_of(url), 0)
                continue
            for start in range(0, len(records), BATCH_SIZE):
                task = asyncio.create_task(self._deliver(state, target, records[start : start + BATCH_SIZE]))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _deliver(self, state: SandboxState, target: Target, batch: list[Record]) -> None:
        config = state.config
        body = orjson.dumps(
            {"results": [report_of(record, config.price_per_message, config.currency) for record in batch]}
        )
        headers = {"content-type": "application/json", "user-agent": "icomm-sms-sandbox"}
        if target.authorization is not None:
            headers["authorization"] = target.authorization
        attempt = 0
        while True:
            attempt += 1
            state.webhook_attempts += 1
            try:
                async with self._in_flight:
                    response = await self._client.post(
                        target.url, content=body, headers=headers, timeout=config.webhook_timeout_ms / 1000.0
                    )
                delivered = response.status_code == 200
                reason = f"HTTP {response.status_code}"
            except httpx.HTTPError as exc:
                delivered = False
                reason = type(exc).__name__  # not str(exc): it may quote the request
            if delivered:
                for record in batch:
                    record[STATE] = PUSHED
                state.reports_pushed += len(batch)
                return
            state.webhook_failures += 1
            last = attempt >= config.webhook_max_attempts
            # The provider backs off (1 min + 1 min * n^2); the sandbox keeps the shape, scaled down.
            retry_in_s = config.webhook_retry_base_ms / 1000.0 * 2 ** (attempt - 1)
            log.warning(
                "sandbox_webhook_push_failed",
                extra={
                    "url": target.shown,
                    "reason": reason,
                    "attempt": attempt,
                    "max_attempts": config.webhook_max_attempts,
                    "reports": len(batch),
                    "retry_in_ms": None if last else round(retry_in_s * 1000),
                },
            )
            if last:
                for record in batch:
                    record[STATE] = DROPPED
                state.webhook_dropped += len(batch)
                _log_dropped(batch, f"gave up after {attempt} attempts (last: {reason})", target.shown, attempt)
                return
            await asyncio.sleep(retry_in_s)


def _host_of(url: str) -> str | None:
    """The host a refused webhook URL names (no userinfo, path or query), if it parses."""
    try:
        return urlsplit(url).hostname
    except ValueError:
        return None


def _log_dropped(batch: list[Record], reason: str, target: str | None, attempts: int) -> None:
    """One warning for a batch of reports the sandbox will never deliver, naming each by messageId."""
    log.warning(
        "sandbox_webhook_reports_dropped",
        extra={
            "reason": reason,
            "target": target,
            "attempts": attempts,
            "reports": len(batch),
            "message_ids": [record[MESSAGE_ID] for record in batch],
        },
    )
