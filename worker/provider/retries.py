"""When the client retries a request: tenacity, full-jitter exponential backoff, at least the `Retry-After` asked for.

Only `ProviderNotActedOn` is retried (the provider certainly did not act), never its
`SendWindowClosed` (nothing was sent, and the batch's window is closed: resending is the next
owner's decision). A `Retry-After` beyond the wait ceiling stops the retries at once: that wait
belongs to the slower retry owner (the dispatcher, which pauses the lane).
"""

from __future__ import annotations

from collections.abc import Callable

import structlog
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    retry_if_not_exception_type,
    wait_random_exponential,
)

from worker import metrics
from worker.errors import ProviderNotActedOn, SendWindowClosed

# One logger name for the whole package, as when it was one module: log filters keep working.
log = structlog.get_logger("worker.provider")

RETRY_WAIT_CEILING_S = 60.0


class RetryPolicy:
    """The retry schedule of one Provider; thread-safe (every call gets its own controller)."""

    def __init__(
        self, *, attempts: int, backoff_base_s: float, backoff_max_s: float, sleep: Callable[[float], None]
    ) -> None:
        self._attempts = attempts
        self._sleep = sleep
        self._jitter = wait_random_exponential(multiplier=backoff_base_s, max=backoff_max_s)
        # Settings sizes the batch lease with icomm_retry_backoff_max_s per wait: a longer sleep
        # could let another worker take the batch over while this one still means to send it.
        self._wait_ceiling_s = min(RETRY_WAIT_CEILING_S, backoff_max_s)

    def retrying(self, before_sleep: Callable[[RetryCallState], None]) -> Retrying:
        # A fresh controller per call: tenacity keeps per-run state on it, and threads share the policy.
        return Retrying(
            sleep=self._sleep,
            stop=self._stop,
            wait=self._wait,
            # SendWindowClosed is a ProviderNotActedOn (nothing was sent) that must never be resent.
            retry=retry_if_exception_type(ProviderNotActedOn) & retry_if_not_exception_type(SendWindowClosed),
            before_sleep=before_sleep,
            reraise=True,
        )

    def _stop(self, state: RetryCallState) -> bool:
        if state.attempt_number >= self._attempts:
            return True
        # A Retry-After beyond the ceiling belongs to the slower retry owner (the dispatcher).
        retry_after = _last_retry_after(state)
        return retry_after is not None and retry_after > self._wait_ceiling_s

    def _wait(self, state: RetryCallState) -> float:
        wait_s = self._jitter(state)
        retry_after = _last_retry_after(state)
        if retry_after is not None:
            wait_s = max(wait_s, retry_after)
        return min(wait_s, self._wait_ceiling_s)


def log_retry(endpoint: str, state: RetryCallState) -> None:
    """Count and log one retry: endpoint, attempt, error class and status, never a body."""
    exc = state.outcome.exception() if state.outcome is not None else None
    metrics.RETRIES.labels(endpoint, type(exc).__name__).inc()
    log.debug(
        "provider_retry", endpoint=endpoint, attempt=state.attempt_number, error=type(exc).__name__,
        status_code=getattr(exc, "status_code", None),
        wait_s=round(state.next_action.sleep, 3) if state.next_action is not None else None,
    )


def _last_retry_after(state: RetryCallState) -> float | None:
    exc = state.outcome.exception() if state.outcome is not None else None
    return exc.retry_after_s if isinstance(exc, ProviderNotActedOn) else None
