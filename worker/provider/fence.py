"""The send fence: asking "may this batch still be sent?" at the last moment before a byte is written.

`Provider.send(..., fence=f)` calls `f()` once per HTTP attempt, at the last moment: from
httpcore's `trace` extension on `send_request_headers.started`, i.e. after the pool handed out a
connection and after it connected, immediately before the first byte of the request is written.
False (or an exception) aborts the attempt there: httpcore writes nothing and closes that connection
(its request cycle did not complete, so it is never reused), and `send` raises `SendWindowClosed`.
Before each retry's backoff sleep the fence is asked again (by the client), so a retry never sleeps
past a closed window. Headers and body are two socket writes; if more than `FENCE_WRITE_GRACE_S`
passed from the fence call to `send_request_body.started` (the process was paused in between), the
body is not written either: the server got headers announcing a Content-Length and then the end of
the connection, an incomplete request it cannot act on, and `send` raises `SendWindowClosed`. A
transport that does not emit trace events (`httpx.MockTransport` in tests) is asked right before the
request is handed to it instead (`FenceBeforeTransport`). Nothing can fence a pause inside a single
socket write; the batch lease covers the write and read timeouts for that.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import httpx

# From the fence call to the body write: longer means the process was paused or starved between the
# header write and the body write, and the body is not written. The gap is normally microseconds;
# keep this well below the margin the fence's owner leaves between its own deadline and a takeover
# (worker.store.FENCE_MARGIN_MS, 1 s).
FENCE_WRITE_GRACE_S = 0.5


class FenceClosed(Exception):
    """Raised from httpcore's trace callback to abort an attempt before (more of) it is written."""


def ask_fence(fence: Callable[[], bool], consequence: str) -> None:
    """Raise FenceClosed unless the fence says yes; its own exception is kept as the cause."""
    try:
        still_open = fence()
    except Exception as exc:
        raise FenceClosed(f"the send fence failed ({type(exc).__name__}){consequence}") from exc
    if not still_open:
        raise FenceClosed(f"the send window is closed{consequence}")


class AttemptTrace:
    """httpcore's `trace` callback for one HTTP attempt.

    httpcore calls it only once the pool handed the request a connection, so its first event marks
    the attempt as holding one (`on_acquired`, the client's pool accounting); on
    `send_request_headers.started` it consults the send fence (once) and on
    `send_request_body.started` it checks that the fence's answer is still fresh. Raising here
    aborts the request before that write, and httpcore closes the connection."""

    __slots__ = ("_fence", "_now", "_on_acquired", "acquired", "fence_asked_at")

    def __init__(
        self, fence: Callable[[], bool] | None, on_acquired: Callable[[], None], now: Callable[[], float]
    ) -> None:
        self._fence = fence
        self._on_acquired = on_acquired
        self._now = now
        self.acquired = False
        self.fence_asked_at: float | None = None

    def __call__(self, event: str, info: Mapping[str, Any]) -> None:
        if not self.acquired:
            self.acquired = True
            self._on_acquired()
        if event.endswith("send_request_headers.started"):
            self.admit()
        elif event.endswith("send_request_body.started"):
            self.check_fresh("the headers were written, the body was not: the server got an incomplete request")

    def admit(self) -> None:
        """Ask the fence, once per attempt; a second call (a transport that both takes the request
        and traces it) only checks that the first answer is still fresh."""
        if self._fence is None:
            return
        if self.fence_asked_at is not None:
            self.check_fresh("nothing was written")
            return
        self.fence_asked_at = self._now()
        ask_fence(self._fence, "; nothing was written")

    def check_fresh(self, written: str) -> None:
        if self.fence_asked_at is None:
            return
        waited_s = self._now() - self.fence_asked_at
        if waited_s > FENCE_WRITE_GRACE_S:
            raise FenceClosed(f"{waited_s:.3f} s passed since the send fence said yes; {written}")


class FenceBeforeTransport(httpx.BaseTransport):
    """Wraps an injected transport that does not emit httpcore trace events (httpx.MockTransport):
    the fence is consulted right before the request is handed to it. The real transport consults
    it at the socket, from the trace callback."""

    def __init__(self, inner: httpx.BaseTransport) -> None:
        self._inner = inner

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        trace = request.extensions.get("trace")
        if isinstance(trace, AttemptTrace):
            trace.admit()
        return self._inner.handle_request(request)

    def close(self) -> None:
        self._inner.close()
