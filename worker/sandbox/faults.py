"""Fault injection: which failure (if any) a request gets, drawn from the config and a seeded RNG."""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass

from worker.sandbox.config import SandboxConfig


class TokenBucket:
    """Classic token bucket; `rate` tokens/s, holds at most `capacity`. Rate 0 means unlimited."""

    def __init__(self, rate: float, capacity: float, now: float) -> None:
        self.rate = rate
        self.capacity = capacity
        self._tokens = capacity
        self._stamp = now

    def take(self, now: float) -> bool:
        """Take one token; False when the bucket is empty."""
        if self.rate <= 0:
            return True
        self._tokens = min(self.capacity, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


class Before(enum.Enum):
    """Faults that answer instead of accepting."""

    RATE_LIMITED = "rate_limit"  # request_rate_limit exceeded -> 429
    THROTTLED = "429"  # rate_429 draw -> 429
    SERVER_ERROR = "5xx"  # error_5xx_rate draw -> 500/502/503/504


class After(enum.Enum):
    """Faults that accept first and then misbehave on the response."""

    TIMEOUT = "timeout"  # hold the response for timeout_delay_ms
    DROP = "drop"  # cut the connection mid-response


@dataclass(frozen=True)
class SendFaults:
    """The faults drawn for one POST /sms/3/messages."""

    delay_s: float
    before: Before | None
    status: int  # the HTTP status for `before`
    retry_after_s: int | None
    after: After | None


class FaultInjector:
    """Draws the faults of each request; the bucket tracks `request_rate_limit` across requests."""

    def __init__(self, config: SandboxConfig, rng: random.Random, now: float) -> None:
        self._config = config
        self._rng = rng
        self._bucket = TokenBucket(0.0, 1.0, now)
        self._sync_bucket(now)

    def _sync_bucket(self, now: float) -> None:
        rate = self._config.request_rate_limit
        if rate != self._bucket.rate:
            self._bucket = TokenBucket(rate, max(1.0, rate), now)

    def draw_send(self, now: float) -> SendFaults:
        """Faults for one send request, in the order a real stack would hit them."""
        config = self._config
        rng = self._rng
        delay_s = config.latency_ms / 1000.0
        if config.jitter_ms > 0:
            delay_s += rng.random() * config.jitter_ms / 1000.0
        self._sync_bucket(now)
        before: Before | None = None
        status = 200
        retry_after: int | None = None
        if not self._bucket.take(now):
            before, status = Before.RATE_LIMITED, 429
        elif config.rate_429 > 0 and rng.random() < config.rate_429:
            before, status = Before.THROTTLED, 429
        elif config.error_5xx_rate > 0 and rng.random() < config.error_5xx_rate:
            codes = config.error_5xx_codes
            before, status = Before.SERVER_ERROR, codes[int(rng.random() * len(codes))]
        if status == 429 and config.retry_after_share > 0 and rng.random() < config.retry_after_share:
            retry_after = config.retry_after_s
        after: After | None = None
        if before is None:
            if config.accept_then_timeout_rate > 0 and rng.random() < config.accept_then_timeout_rate:
                after = After.TIMEOUT
            elif config.drop_rate > 0 and rng.random() < config.drop_rate:
                after = After.DROP
        return SendFaults(delay_s, before, status, retry_after, after)


class LogsLimiter:
    """GET /sms/3/logs budget: `logs_rate_per_min` requests per minute, refilled continuously."""

    def __init__(self, config: SandboxConfig, now: float) -> None:
        self._config = config
        self._per_min = -1
        self._bucket = TokenBucket(0.0, 1.0, now)
        self._sync(now)

    def _sync(self, now: float) -> None:
        per_min = self._config.logs_rate_per_min
        if per_min != self._per_min:
            self._per_min = per_min
            # 0 per minute means "always throttled": a tiny rate with capacity 0 never grants.
            self._bucket = TokenBucket(max(per_min, 1e-9) / 60.0, float(per_min), now)

    def allow(self, now: float) -> bool:
        """Take one request from the budget."""
        self._sync(now)
        return self._bucket.take(now)
