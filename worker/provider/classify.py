"""What a failed request means: an HTTP status or an httpx transport error becomes one `worker.errors` class.

Foreign outcomes are mapped into `worker.errors` here and nowhere else:

    httpx exception / HTTP answer                      worker.errors                       retried
    ─────────────────────────────────────────────────  ──────────────────────────────────  ───────
    2xx, body parsed                                   (result)
    2xx whose body does not parse (send, logs)         ProviderAmbiguous (responses.py)    no
    400 (ApiError or legacy requestError body)         ProviderBadRequest(.violations)     no
    401, 403                                           ProviderAuthError                   no
    429                                                ProviderRateLimited(.retry_after_s)  yes
    503                                                ProviderNotActedOn(.retry_after_s)   yes
    ConnectError, ConnectTimeout, PoolTimeout,         ProviderNotActedOn                  yes
      ProxyError
    ReadTimeout, WriteTimeout, ReadError, WriteError,  ProviderAmbiguous                   no
      RemoteProtocolError, any other RequestError,
      500, 502, 504 and every other 5xx
    UnsupportedProtocol, LocalProtocolError,           ProviderError                       no
      any other status (3xx, 4xx)
    the send fence said no (send only, fence.py)       SendWindowClosed                    no

Only `ProviderNotActedOn` is retried (by the client, `worker.provider.retries`), never its
`SendWindowClosed`. Everything else is the caller's decision: an ambiguous send is reconciled
through `GET /sms/3/logs` before any resend, and an ambiguous `GET /sms/3/reports` may have handed
out a page that will never be returned again.
"""

from __future__ import annotations

import email.utils
import math
import time
from datetime import UTC
from typing import Any

import httpx
import orjson

from worker.errors import (
    ProviderAmbiguous,
    ProviderAuthError,
    ProviderBadRequest,
    ProviderError,
    ProviderNotActedOn,
    ProviderRateLimited,
    Violation,
)
from worker.provider.responses import snippet


def classify_status(endpoint: str, response: httpx.Response) -> ProviderError:
    """The error a non-2xx answer stands for, its body kept (parsed JSON, or a text snippet)."""
    status = response.status_code
    body = _error_body(response)
    said = f"{endpoint} answered {status}: {_summary(body)}"
    if status == 400:
        violations = _violations(body)
        listed = "; ".join(f"{v.property}: {v.violation}" for v in violations[:10])
        return ProviderBadRequest(f"{said} ({listed})" if listed else said, body=body, violations=violations)
    if status in (401, 403):
        return ProviderAuthError(f"{said}; check ICOMM_API_KEY and its scopes", status_code=status, body=body)
    if status == 429:
        return ProviderRateLimited(said, status_code=429, body=body, retry_after_s=retry_after_s(response))
    if status == 503:
        return ProviderNotActedOn(said, status_code=503, body=body, retry_after_s=retry_after_s(response))
    if status >= 500:
        return ProviderAmbiguous(f"{said}; the provider may have acted", status_code=status, body=body)
    return ProviderError(said, status_code=status, body=body)


def map_transport_error(endpoint: str, exc: httpx.RequestError) -> ProviderError:
    """Whether the request can have reached the provider decides: before the connection, not acted
    on; a request that could not even be built, a plain error; anything after, ambiguous."""
    what = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout | httpx.ProxyError):
        return ProviderNotActedOn(f"{endpoint} was not sent ({what})")
    if isinstance(exc, httpx.UnsupportedProtocol | httpx.LocalProtocolError):
        return ProviderError(f"{endpoint} could not be built ({what})")
    return ProviderAmbiguous(f"{endpoint} got no complete answer ({what}); the provider may have acted")


def retry_after_s(response: httpx.Response) -> float | None:
    """`Retry-After` in seconds from now (delta-seconds or an HTTP-date); None when absent or unreadable."""
    value = response.headers.get("Retry-After")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = when.timestamp() - time.time()
    return max(0.0, seconds) if math.isfinite(seconds) else None


def _error_body(response: httpx.Response) -> object:
    try:
        return orjson.loads(response.content) if response.content else None
    except orjson.JSONDecodeError:
        return snippet(response.content)


def _legacy_exception(body: dict[str, Any]) -> dict[str, Any] | None:
    request_error = body.get("requestError")
    exc = request_error.get("serviceException") if isinstance(request_error, dict) else None
    return exc if isinstance(exc, dict) else None


def _violations(body: object) -> tuple[Violation, ...]:
    if not isinstance(body, dict):
        return ()
    found = [
        Violation(str(item.get("property", "")), str(item.get("violation", "")))
        for item in body.get("violations") or ()
        if isinstance(item, dict)
    ]
    # The legacy v1/v2 shape, in case a gateway in front of v3 still answers with it.
    legacy = _legacy_exception(body)
    if legacy is not None and isinstance(legacy.get("validationErrors"), dict):
        for prop, messages in legacy["validationErrors"].items():
            for message in messages if isinstance(messages, list) else [messages]:
                found.append(Violation(str(prop), str(message)))
    return tuple(found)


def _summary(body: object) -> str:
    if isinstance(body, dict):
        if "errorCode" in body or "description" in body:
            return f"{body.get('errorCode', '')} {body.get('description', '')}".strip()
        if (legacy := _legacy_exception(body)) is not None:
            return f"{legacy.get('messageId', '')} {legacy.get('text', '')}".strip()
    if isinstance(body, str):
        return body[:200]
    return "no error body"
