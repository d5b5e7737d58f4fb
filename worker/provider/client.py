"""The pooled, thread-safe icomm API client `Provider`: its settings, its requests, and the healing of its pool.

Each call is one tenacity run (`retries.py`) of HTTP attempts; an attempt's failure becomes a
`worker.errors` class (`classify.py`), its 2xx body a typed answer (`responses.py`), and a send's
attempt asks the send fence at the socket (`fence.py`). Every error leaving here has the API key
scrubbed from its message and body.

Pool healing. httpcore 1.0's sync ConnectionPool leaks a connection slot when a request's pool wait
times out just as another thread (releasing or dropping a connection) assigns it a NEW connection:
the request leaves, the connection stays in the pool as "CONNECTING" forever, never connected, never
idle, never closed (the race described in encode/httpcore#550, still in 1.0.9; process pauses make
it likely: on resume every waiter's deadline and every connection's fate are decided at once). Once
max_connections slots have leaked, every request ends in PoolTimeout. The Provider counts the
requests that really hold a connection (the first trace event of an attempt comes only after the
pool wait); a PoolTimeout while fewer than max_connections do, or while no request got a connection
for longer than one whole attempt can last, means the pool is stuck, and the httpx.Client is
replaced by a fresh one (warning `provider_pool_reset`, metric `sms_provider_pool_resets_total`).
The old client is closed by the last request still using it, never under a request in flight.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from types import TracebackType
from typing import TYPE_CHECKING, Any, NamedTuple

import httpx
import orjson
import structlog
from tenacity import RetryCallState

from worker import metrics
from worker.errors import ProviderError, ProviderRateLimited, SendWindowClosed
from worker.provider.classify import classify_status, map_transport_error
from worker.provider.fence import AttemptTrace, FenceBeforeTransport, FenceClosed, ask_fence
from worker.provider.query import (
    LOGS_PATH,
    MAX_PAGE_SIZE,
    REPORTS_PATH,
    GeneralStatus,
    chunk_message_ids,
    logs_query,
    reports_query,
)
from worker.provider.responses import LogEntry, SendResponse, is_duplicate, parse_logs, parse_send
from worker.provider.retries import RetryPolicy, log_retry
from worker.provider.wire import SEND_PATH, WireRequest
from worker.settings import Settings

if TYPE_CHECKING:
    from worker.accounts import Account

# One logger name for the whole package, as when it was one module: log filters keep working.
log = structlog.get_logger("worker.provider")

# The clock of the pool's progress and of the fence's freshness. Tests replace it to play a pause
# without sleeping.
_now = time.monotonic


@dataclass(frozen=True, slots=True)
class ProviderConfig:
    """The settings a Provider reads: where the API is, its key, the timeouts, the pool size and
    the retry schedule."""

    api_key: str = field(repr=False)
    base_url: str
    connect_timeout_s: float
    read_timeout_s: float
    write_timeout_s: float
    pool_timeout_s: float
    max_connections: int
    send_retry_attempts: int
    retry_backoff_base_s: float
    retry_backoff_max_s: float

    @classmethod
    def from_settings(cls, settings: Settings, account: Account | None = None) -> ProviderConfig:
        """Raises ConfigError when ICOMM_API_KEY is unset: no Provider without a key. With `account`
        (worker.accounts), that account's URL and key (checked by Accounts.require_keys)."""
        return cls(
            api_key=account.api_key if account is not None else settings.require_api_key(),
            base_url=account.base_url if account is not None else settings.icomm_base_url,
            connect_timeout_s=settings.icomm_connect_timeout_s,
            read_timeout_s=settings.icomm_read_timeout_s,
            write_timeout_s=settings.icomm_write_timeout_s,
            pool_timeout_s=settings.icomm_pool_timeout_s,
            max_connections=settings.icomm_max_connections,
            send_retry_attempts=settings.icomm_send_retry_attempts,
            retry_backoff_base_s=settings.icomm_retry_backoff_base_s,
            retry_backoff_max_s=settings.icomm_retry_backoff_max_s,
        )

    @property
    def attempt_s(self) -> float:
        """The longest one attempt can take: the pool wait, then the connect, write and read."""
        return self.pool_timeout_s + self.connect_timeout_s + self.write_timeout_s + self.read_timeout_s


@dataclass(eq=False)
class _Generation:
    """One httpx.Client (one connection pool) and the attempts using it; guarded by Provider._lock."""

    client: httpx.Client
    number: int
    in_flight: int = 0  # attempts inside client.request, queued for a connection or not
    holding: int = 0  # attempts past the pool wait: they got a connection
    last_acquired: float = field(default_factory=lambda: _now())
    retired: bool = False  # replaced (or being replaced): closed when its last attempt leaves
    closed: bool = False


class _Stuck(NamedTuple):
    """Why a generation's pool is stuck, as the reset warning reports it."""

    reason: str
    holding: int
    in_flight: int
    starved_s: float


class Provider:
    """A thread-safe client for the three endpoints, with one keep-alive connection pool.

    The pool is replaced when it stops handing out connections (module docstring: pool healing).
    An injected `transport` is kept across replacements (it is the injector's, and only close()
    closes it), so only the default transport's pool is actually renewed."""

    def __init__(
        self,
        config: ProviderConfig,
        *,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._key = config.api_key
        self._base_url = config.base_url
        self._retries = RetryPolicy(
            attempts=config.send_retry_attempts, backoff_base_s=config.retry_backoff_base_s,
            backoff_max_s=config.retry_backoff_max_s, sleep=sleep,
        )
        self._timeout = httpx.Timeout(
            connect=config.connect_timeout_s, read=config.read_timeout_s,
            write=config.write_timeout_s, pool=config.pool_timeout_s,
        )
        self._max_connections = config.max_connections
        # No request got a connection for longer than a whole attempt can take (the pool wait, then
        # a holder's connect, write and read): the holders are not coming back.
        self._stuck_after_s = config.attempt_s
        # The default transport (and an injected HTTPTransport) consults the fence at the socket;
        # any other injected transport is asked just before it gets the request. An injected
        # transport is shared by every client generation and closed only by close().
        self._transport: httpx.BaseTransport | None
        if transport is None or isinstance(transport, httpx.HTTPTransport):
            self._transport = transport
        else:
            self._transport = FenceBeforeTransport(transport)
        self._owns_transport = transport is None
        self._lock = threading.Lock()
        self._closed = False
        self._generation = _Generation(self._new_client(), 1)

    def _new_client(self) -> httpx.Client:
        return httpx.Client(
            base_url=self._base_url,
            headers={
                "Authorization": f"App {self._key}",
                "Accept": "application/json",
                "Content-Type": "application/json",
            },
            timeout=self._timeout,
            limits=httpx.Limits(
                max_connections=self._max_connections, max_keepalive_connections=self._max_connections
            ),
            transport=self._transport,
        )

    def close(self) -> None:
        with self._lock:
            self._closed = True
            generation = self._generation
            generation.closed = True
        generation.client.close()

    def __enter__(self) -> Provider:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # --- the three endpoints ---------------------------------------------------------------------

    def send(
        self,
        request: WireRequest,
        *,
        on_rate_limited: Callable[[float | None], None] | None = None,
        fence: Callable[[], bool] | None = None,
    ) -> SendResponse:
        """POST one bulk; retried only while the provider certainly did not act on it.

        `fence`, when given, is called once per HTTP attempt immediately before the request's first
        byte is written (after the pool wait and the connect), and before each retry's backoff
        sleep; False or an exception means nothing more of the request is written and
        SendWindowClosed is raised, never retried (worker.provider.fence)."""
        endpoint = f"POST {SEND_PATH}"
        response, elapsed_s = self._call(
            "POST", SEND_PATH, None, orjson.dumps(request), on_rate_limited, fence
        )
        try:
            return parse_send(endpoint, response, elapsed_s)
        except ProviderError as error:
            raise self._scrubbed(error) from None

    def reports_raw(
        self,
        *,
        limit: int = MAX_PAGE_SIZE,
        bulk_id: str | None = None,
        message_id: str | None = None,
        entity_id: str | None = None,
        application_id: str | None = None,
        campaign_reference_id: str | None = None,
        on_rate_limited: Callable[[float | None], None] | None = None,
    ) -> bytes:
        """The raw 200 body of one reports page: store it durably before parsing, it never comes back."""
        params = reports_query(
            limit=limit, bulk_id=bulk_id, message_id=message_id, entity_id=entity_id,
            application_id=application_id, campaign_reference_id=campaign_reference_id,
        )
        response, _ = self._call("GET", REPORTS_PATH, params, None, on_rate_limited)
        return response.content

    def logs(
        self,
        *,
        message_id: Sequence[str] = (),
        bulk_id: Sequence[str] = (),
        campaign_reference_id: Sequence[str] = (),
        mcc: str | None = None,
        mnc: str | None = None,
        sender: str | None = None,
        destination: str | None = None,
        general_status: GeneralStatus | None = None,
        sent_since: datetime | None = None,
        sent_until: datetime | None = None,
        limit: int | None = None,
        entity_id: str | None = None,
        application_id: str | None = None,
        on_rate_limited: Callable[[float | None], None] | None = None,
    ) -> list[LogEntry]:
        """GET logs (re-readable for 48 h); filters are validated first so a bad one never costs a request."""
        params = logs_query(
            message_id=message_id, bulk_id=bulk_id, campaign_reference_id=campaign_reference_id,
            mcc=mcc, mnc=mnc, sender=sender, destination=destination, general_status=general_status,
            sent_since=sent_since, sent_until=sent_until, limit=limit, entity_id=entity_id,
            application_id=application_id,
        )
        response, _ = self._call("GET", LOGS_PATH, params, None, on_rate_limited)
        try:
            return parse_logs(f"GET {LOGS_PATH}", response)
        except ProviderError as error:
            raise self._scrubbed(error) from None

    def logs_for_message_ids(
        self,
        ids: Sequence[str],
        *,
        before_request: Callable[[], None] | None = None,
        on_rate_limited: Callable[[float | None], None] | None = None,
    ) -> dict[str, LogEntry]:
        """The log entry of every id the provider knows; `before_request` lets the caller rate-limit."""
        wanted = list(dict.fromkeys([ids] if isinstance(ids, str) else ids))
        wanted_set = set(wanted)
        found: dict[str, LogEntry] = {}
        for chunk in chunk_message_ids(wanted):
            if before_request is not None:
                before_request()
            for entry in self.logs(message_id=chunk, limit=MAX_PAGE_SIZE, on_rate_limited=on_rate_limited):
                if entry.message_id not in wanted_set:
                    continue
                # A resend rejected as a duplicate logs too; the original attempt is the answer.
                known = found.get(entry.message_id)
                if known is None or (is_duplicate(known) and not is_duplicate(entry)):
                    found[entry.message_id] = entry
        return found

    # --- one call: attempts and retries ----------------------------------------------------------

    def _call(
        self,
        method: str,
        path: str,
        params: dict[str, Any] | None,
        content: bytes | None,
        on_rate_limited: Callable[[float | None], None] | None,
        fence: Callable[[], bool] | None = None,
    ) -> tuple[httpx.Response, float]:
        retrying = self._retries.retrying(partial(self._before_retry, f"{method} {path}", fence))
        return retrying(self._attempt, method, path, params, content, on_rate_limited, fence)

    def _before_retry(self, endpoint: str, fence: Callable[[], bool] | None, state: RetryCallState) -> None:
        """Before a retry's backoff sleep: a closed fence ends the call now rather than after the sleep."""
        if fence is not None:
            exc = state.outcome.exception() if state.outcome is not None else None
            try:
                ask_fence(fence, "")
            except FenceClosed as closed:
                raise self._scrubbed(SendWindowClosed(
                    f"{endpoint} was not retried after attempt {state.attempt_number} "
                    f"({type(exc).__name__}): {closed}"
                )) from self._safe_cause(closed.__cause__)
        log_retry(endpoint, state)

    def _attempt(
        self,
        method: str,
        path: str,
        params: dict[str, Any] | None,
        content: bytes | None,
        on_rate_limited: Callable[[float | None], None] | None,
        fence: Callable[[], bool] | None = None,
    ) -> tuple[httpx.Response, float]:
        endpoint = f"{method} {path}"
        timer = metrics.PROVIDER_SECONDS.labels(path.rsplit("/", 1)[-1], "ok")
        generation = self._enter()
        trace = AttemptTrace(fence, partial(self._holding, generation), _now)
        started = time.perf_counter()
        try:
            response = generation.client.request(
                method, path, params=params, content=content, extensions={"trace": trace}
            )
        except FenceClosed as closed:
            window = self._scrubbed(SendWindowClosed(f"{endpoint} was not sent: {closed}"))
            _observe(path, window, time.perf_counter() - started)
            raise window from self._safe_cause(closed.__cause__)
        except httpx.RequestError as exc:
            if isinstance(exc, httpx.PoolTimeout):
                self._pool_timed_out(generation, trace.acquired)
            mapped = map_transport_error(endpoint, exc)
            _observe(path, mapped, time.perf_counter() - started)
            raise self._scrubbed(mapped) from self._safe_cause(exc)
        finally:
            self._leave(generation, trace.acquired)
        elapsed_s = time.perf_counter() - started
        if response.is_success:
            timer.observe(elapsed_s)
            return response, elapsed_s
        error = self._scrubbed(classify_status(endpoint, response))
        _observe(path, error, elapsed_s)
        if isinstance(error, ProviderRateLimited) and on_rate_limited is not None:
            on_rate_limited(error.retry_after_s)
        raise error

    # --- the connection pool's health (module docstring: pool healing) --------------------------

    def _enter(self) -> _Generation:
        with self._lock:
            if self._closed:
                raise RuntimeError("Cannot send a request, as the Provider has been closed.")
            generation = self._generation
            generation.in_flight += 1
            return generation

    def _holding(self, generation: _Generation) -> None:
        with self._lock:
            generation.holding += 1
            generation.last_acquired = _now()

    def _leave(self, generation: _Generation, acquired: bool) -> None:
        with self._lock:
            generation.in_flight -= 1
            if acquired:
                generation.holding -= 1
            close = self._retire_done(generation)
        if close:
            self._close_retired(generation)

    def _retire_done(self, generation: _Generation) -> bool:
        """Under the lock: whether a replaced generation has just lost its last attempt (the caller
        then closes it, outside the lock)."""
        if generation.retired and not generation.closed and generation.in_flight == 0 and (
            generation is not self._generation
        ):
            generation.closed = True
            return True
        return False

    def _close_retired(self, generation: _Generation) -> None:
        # An injected transport is shared with the new client: closing the old client would close it.
        if self._owns_transport:
            generation.client.close()

    def _pool_timed_out(self, generation: _Generation, acquired: bool) -> None:
        """A PoolTimeout on `generation`: replace its client if its pool can no longer hand out a
        connection (fewer holders than slots, or nobody got one for longer than an attempt lasts)."""
        with self._lock:
            stuck = self._stuck(generation, acquired)
            if stuck is None:
                return
            generation.retired = True  # claims the replacement: one thread builds the new client
        try:
            client = self._new_client()  # outside the lock: building the SSL context takes a while
        except Exception:
            with self._lock:
                generation.retired = False
            log.exception("provider_pool_reset_failed", generation=generation.number)
            return
        if not self._replace(generation, client):
            return
        metrics.PROVIDER_POOL_RESETS.labels(stuck.reason).inc()
        log.warning(
            "provider_pool_reset", reason=stuck.reason, generation=generation.number + 1,
            max_connections=self._max_connections, holding=stuck.holding, in_flight=stuck.in_flight,
            starved_s=round(stuck.starved_s, 3),
        )

    def _stuck(self, generation: _Generation, acquired: bool) -> _Stuck | None:
        """Under the lock: why the current generation's pool is stuck, or None when it is not (or
        is not this thread's to replace)."""
        if generation is not self._generation or generation.retired or self._closed:
            return None  # already replaced, being replaced, or closing
        holding = generation.holding - (1 if acquired else 0)
        starved_s = _now() - generation.last_acquired
        if holding < self._max_connections:
            reason = "leaked_slots"
        elif starved_s > self._stuck_after_s:
            reason = "no_progress"
        else:
            return None  # every slot is held by a request in flight: a busy pool, not a broken one
        return _Stuck(reason, holding, generation.in_flight, starved_s)

    def _replace(self, generation: _Generation, client: httpx.Client) -> bool:
        """Install `client` as the next generation; False (and `client` closed) when the Provider
        was closed meanwhile. The old generation is closed here if no attempt still uses it."""
        with self._lock:
            closed = self._closed
            if not closed:
                self._generation = _Generation(client, generation.number + 1)
            close_old = self._retire_done(generation)
        if closed:
            client.close()
        if close_old:
            self._close_retired(generation)
        return not closed

    # --- keeping the key out of errors and logs --------------------------------------------------

    def _safe_cause(self, exc: BaseException | None) -> BaseException | None:
        # Keep the cause for tracebacks unless its own text would carry the key into the logs.
        return None if exc is None or self._key in str(exc) else exc

    def _scrubbed(self, error: ProviderError) -> ProviderError:
        # Messages and bodies quote the provider's (or a proxy's) text, which might echo the key.
        if self._key in str(error):
            error.args = (str(error).replace(self._key, "***"),)
        if error.body is not None:
            encoded = orjson.dumps(error.body)
            if self._key.encode() in encoded:
                error.body = orjson.loads(encoded.replace(self._key.encode(), b"***"))
        return error


def _observe(path: str, error: ProviderError, elapsed_s: float) -> None:
    """Request duration by endpoint (messages, reports, logs) and outcome class."""
    metrics.PROVIDER_SECONDS.labels(path.rsplit("/", 1)[-1], type(error).__name__).observe(elapsed_s)
