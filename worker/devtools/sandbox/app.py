"""The raw ASGI app: routing, App-key auth, fault application, and the /_sandbox admin endpoints."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hmac
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Final, TypeVar

import orjson

from worker.devtools.sandbox import errors
from worker.devtools.sandbox.codes import JsonObj
from worker.devtools.sandbox.config import SandboxConfig, apply_updates, config_as_dict
from worker.devtools.sandbox.faults import After, Before, reshape_results
from worker.devtools.sandbox.reports import log_of, report_of
from worker.devtools.sandbox.state import SandboxState
from worker.devtools.sandbox.validation import parse_logs_query, parse_reports_query
from worker.devtools.sandbox.webhooks import WebhookPusher

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
_T = TypeVar("_T")

SEND: Final = "POST /sms/3/messages"
REPORTS: Final = "GET /sms/3/reports"
LOGS: Final = "GET /sms/3/logs"
_API_PATHS: Final = {"/sms/3/messages": SEND, "/sms/3/reports": REPORTS, "/sms/3/logs": LOGS}
_ADMIN_PATHS: Final = frozenset(("/_sandbox/stats", "/_sandbox/config", "/_sandbox/reset"))

_JSON: Final = b"application/json"
_HTML: Final = b"text/html"
_TICK_S: Final = 0.01
_GENERATE_PER_TICK: Final = 50_000  # bounds how long one tick holds the loop
_PRUNE_EVERY_S: Final = 10.0
_GC_EVERY_S: Final = 1.0
_FREEZE_AT_MESSAGES: Final = 100


async def _read_body(receive: Receive) -> bytes | None:
    """The whole request body, or None when the client went away first."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def _respond(
    send: Send,
    status: int,
    body: bytes,
    content_type: bytes = _JSON,
    extra: list[tuple[bytes, bytes]] | None = None,
) -> None:
    headers = [(b"content-type", content_type), (b"content-length", b"%d" % len(body))]
    if extra:
        headers += extra
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class SandboxApp:
    """One sandbox account behind an ASGI callable; background tasks start with the lifespan."""

    def __init__(self, api_key: str, config: SandboxConfig, manage_gc: bool = False) -> None:
        self.config = config
        self._manage_gc = manage_gc
        self._api_key = api_key.encode()
        self.state = SandboxState(config, time.time())
        self._pusher: WebhookPusher | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._held: set[asyncio.Task[Any]] = set()  # late acceptances under way (see _detached)

    # --- lifecycle -----------------------------------------------------------------------

    def _start(self) -> None:
        if self._manage_gc:
            # Accepted messages live for the whole run. Left to itself, the cyclic GC walks each
            # of them again and again as they age through the generations (each walk a string
            # of cache misses): the benchmark ran at 68k msg/s that way, 126k with freezing.
            # So: a big bulk freezes its records right after acceptance (O(1); they are never
            # walked), and _tick() collects the young generation once a second (short-lived
            # cycles are still freed) and freezes the survivors. The price: a cycle alive at a
            # freeze and dropped later is never freed, a few KB per big bulk, negligible next to
            # the messages the sandbox keeps anyway. Only a dedicated sandbox process opts in
            # (server.run), so importing the app into another process changes nothing there.
            gc.disable()
        self._pusher = WebhookPusher(lambda: self.state)
        self._tasks = [asyncio.create_task(self._tick()), asyncio.create_task(self._pusher.run())]

    async def _stop(self) -> None:
        for task in [*self._tasks, *self._held]:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._held, return_exceptions=True)
        if self._pusher is not None:
            await self._pusher.close()
        if self._manage_gc:
            gc.enable()

    async def _tick(self) -> None:
        """Generate due reports and hand webhook reports to the pusher."""
        next_prune = time.time() + _PRUNE_EVERY_S
        next_gc = time.time() + _GC_EVERY_S
        while True:
            state = self.state
            now = time.time()
            generated = state.generate_due(now, _GENERATE_PER_TICK)
            if state.webhook_queue and self._pusher is not None:
                self._pusher.kick()
            if now >= next_prune:
                state.prune(now)
                next_prune = now + _PRUNE_EVERY_S
            if self._manage_gc and now >= next_gc:
                gc.collect(0)
                gc.freeze()
                next_gc = now + _GC_EVERY_S
            # A full tick means more is due: yield to requests, then continue at once.
            await asyncio.sleep(0 if generated >= _GENERATE_PER_TICK else _TICK_S)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                if not self._tasks:
                    self._start()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self._stop()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            if not self._tasks:
                self._start()  # served without lifespan support
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)

    # --- routing -------------------------------------------------------------------------

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        method: str = scope["method"]
        endpoint = _API_PATHS.get(path)
        if endpoint is not None:
            if endpoint.startswith(method + " "):
                await self._api(endpoint, scope, receive, send)
            else:
                await _respond(send, 405, errors.METHOD_NOT_ALLOWED)
        elif path in _ADMIN_PATHS:
            await self._admin(path, method, scope, receive, send)
        else:
            await _respond(send, 404, errors.NOT_FOUND)

    def _auth_error(self, scope: Scope) -> tuple[int, bytes] | None:
        header = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                header = value
                break
        if header is None or header[:4] != b"App ":
            return 401, errors.UNAUTHORIZED
        key = header[4:].strip()
        # Forbidden first: tests revoke the valid key's permission at run time with it.
        if key.decode("latin-1") in self.config.forbidden_keys:
            return 403, errors.FORBIDDEN
        if hmac.compare_digest(key, self._api_key):
            return None
        return 401, errors.UNAUTHORIZED

    async def _api(self, endpoint: str, scope: Scope, receive: Receive, send: Send) -> None:
        state = self.state
        if self.config.down:
            state.faults_injected["down"] += 1
            state.requests[endpoint, 503] += 1
            await _respond(send, 503, errors.gateway_page(503), _HTML)
            return
        failure = self._auth_error(scope)
        if failure is not None:
            state.requests[endpoint, failure[0]] += 1
            await _respond(send, failure[0], failure[1])
            return
        if endpoint == SEND:
            await self._send_messages(receive, send)
            return
        now = time.time()
        if endpoint == REPORTS:
            status, body = self._get_reports(scope, now)
        elif state.logs_limiter.allow(now):
            status, body = self._get_logs(scope, now)
        else:
            status, body = 429, errors.TOO_MANY_REQUESTS
        state.requests[endpoint, status] += 1
        await _respond(send, status, body)

    # --- the three API operations ---------------------------------------------------------

    async def _send_messages(self, receive: Receive, send: Send) -> None:
        raw = await _read_body(receive)
        if raw is None:
            return
        faults = self.state.faults.draw_send(time.time())
        if faults.delay_s > 0:
            self.state.faults_injected["latency"] += 1
            await asyncio.sleep(faults.delay_s)
        state = self.state  # re-read: a reset may have happened during the sleep
        if faults.before is not None:
            await self._refuse(state, faults.before, faults.status, faults.retry_after_s, send)
            return
        if faults.hold_s > 0:
            state.faults_injected["late_accept"] += 1
            # The provider acts late, whether or not the client still waits: the acceptance runs
            # in a task of the app's own, which a cancelled or abandoned request does not stop.
            state, response, refusal = await asyncio.shield(self._detached(self._accept_late(raw, faults.hold_s)))
        else:
            state, response, refusal = self._accept(raw)
        if response is None:
            state.requests[SEND, 400] += 1
            await _respond(send, 400, refusal)
            return
        reshape_results(response, faults, self.config, state.faults_injected)
        await self._answer(state, faults.after, orjson.dumps(response), send)

    def _accept(self, raw: bytes) -> tuple[SandboxState, JsonObj | None, bytes]:
        """Accept a send body now: (state, SmsResponse, b"") or (state, None, the 400 body)."""
        state = self.state
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return state, None, errors.bad_request([("", "request body is not valid JSON")])
        poisoned = _poisoned(body, self.config.reject_text_containing)
        if poisoned:
            state.faults_injected["reject_text"] += 1
            return state, None, errors.bad_request(poisoned)
        response, violations = state.accept(body, time.time())
        if response is None:
            return state, None, errors.bad_request(violations)
        if self._manage_gc and len(response["messages"]) >= _FREEZE_AT_MESSAGES:
            gc.freeze()  # the new records are never walked by the GC (see _start)
        return state, response, b""

    async def _accept_late(self, raw: bytes, hold_s: float) -> tuple[SandboxState, JsonObj | None, bytes]:
        """The late-accept fault: accept only once `hold_s` has passed (into the state current then)."""
        await asyncio.sleep(hold_s)
        return self._accept(raw)

    def _detached(self, work: Coroutine[Any, Any, _T]) -> asyncio.Task[_T]:
        """Run `work` as a task the app holds on to until it ends (or the app stops)."""
        task = asyncio.ensure_future(work)
        self._held.add(task)
        task.add_done_callback(self._held.discard)
        return task

    async def _answer(self, state: SandboxState, after: After | None, payload: bytes, send: Send) -> None:
        """Send the 200 of an accepted send, spoilt the way the `after` fault says."""
        if after is After.DROP:
            # Headers promise the whole body, half of it goes out, then the handler returns and
            # the server closes the connection: the client sees a truncated response.
            state.faults_injected["drop"] += 1
            state.requests[SEND, 200] += 1
            headers = [(b"content-type", _JSON), (b"content-length", b"%d" % len(payload))]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": payload[: len(payload) // 2], "more_body": True})
            return
        if after is After.TIMEOUT:
            state.faults_injected["timeout"] += 1
            await asyncio.sleep(self.config.timeout_delay_ms / 1000.0)
        content_type = _JSON
        if after is After.HTML_BODY:
            state.faults_injected["html_body"] += 1
            payload, content_type = errors.PROXY_PAGE, _HTML
        elif after is After.TRUNCATED_BODY:
            # Unlike DROP the response is complete (Content-Length matches): only the JSON is cut.
            state.faults_injected["truncated_body"] += 1
            payload = payload[: len(payload) // 2]
        state.requests[SEND, 200] += 1
        await _respond(send, 200, payload, content_type)

    async def _refuse(
        self, state: SandboxState, kind: Before, status: int, retry_after_s: int | None, send: Send
    ) -> None:
        state.requests[SEND, status] += 1
        if kind is Before.SERVER_ERROR:
            state.faults_injected[f"5xx_{status}"] += 1
            if status == 500:
                await _respond(send, 500, errors.INTERNAL_ERROR)
            else:
                await _respond(send, status, errors.gateway_page(status), _HTML)
            return
        state.faults_injected[kind.value] += 1
        extra = None
        if retry_after_s is not None:
            state.faults_injected["429_retry_after"] += 1
            extra = [(b"retry-after", b"%d" % retry_after_s)]
        await _respond(send, 429, errors.TOO_MANY_REQUESTS, extra=extra)

    def _get_reports(self, scope: Scope, now: float) -> tuple[int, bytes]:
        query, violations = parse_reports_query(scope["query_string"])
        if violations:
            return 400, errors.bad_request(violations)
        config = self.config
        records = self.state.fetch_reports(query, now)
        results = [report_of(record, config.price_per_message, config.currency) for record in records]
        return 200, orjson.dumps({"results": results})

    def _get_logs(self, scope: Scope, now: float) -> tuple[int, bytes]:
        query, violations = parse_logs_query(scope["query_string"])
        if violations:
            return 400, errors.bad_request(violations)
        config = self.config
        records = self.state.query_logs(query, now)
        results = [log_of(record, config.price_per_message, config.currency) for record in records]
        return 200, orjson.dumps({"results": results})

    # --- /_sandbox admin (no auth: the server binds loopback only) -------------------------

    async def _admin(self, path: str, method: str, scope: Scope, receive: Receive, send: Send) -> None:
        if path == "/_sandbox/stats" and method == "GET":
            query: bytes = scope["query_string"]
            per_message = b"per_message=1" in query or b"per_message=true" in query
            await _respond(send, 200, orjson.dumps(self.state.stats(per_message)))
        elif path == "/_sandbox/config" and method == "GET":
            await _respond(send, 200, orjson.dumps(config_as_dict(self.config)))
        elif path == "/_sandbox/config" and method == "POST":
            await self._configure(receive, send)
        elif path == "/_sandbox/reset" and method == "POST":
            self.state = SandboxState(self.config, time.time())
            await _respond(send, 200, b'{"reset":true}')
        else:
            await _respond(send, 405, errors.METHOD_NOT_ALLOWED)

    async def _configure(self, receive: Receive, send: Send) -> None:
        raw = await _read_body(receive)
        if raw is None:
            return
        updates: object = None
        with contextlib.suppress(orjson.JSONDecodeError):
            updates = orjson.loads(raw or b"{}")
        if not isinstance(updates, dict):
            await _respond(send, 400, orjson.dumps({"error": "body must be a JSON object"}))
            return
        problems = apply_updates(self.config, updates)
        if problems:
            await _respond(send, 400, orjson.dumps({"error": "invalid settings", "problems": dict(problems)}))
            return
        if "seed" in updates:
            self.state.reseed()
        await _respond(send, 200, orjson.dumps(config_as_dict(self.config)))


def _poisoned(body: object, needle: str) -> list[tuple[str, str]]:
    """Violations for texts the platform refuses as a whole request (the `reject_text_containing` fault).

    It stands for the provider-side rules a client cannot check beforehand: one such message makes
    the whole bulk a 400, which is what the worker must isolate.
    """
    if not needle or type(body) is not dict or type(body.get("messages")) is not list:
        return []
    found = []
    for i, message in enumerate(body["messages"]):
        content = message.get("content") if type(message) is dict else None
        text = content.get("text") if type(content) is dict else None
        if type(text) is str and needle in text:
            found.append((f"messages[{i}].content.text", "content refused by the platform's content policy"))
    return found
