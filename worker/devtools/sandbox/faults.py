"""Fault injection: which failure (if any) a request gets, drawn from the config and a seeded RNG."""

from __future__ import annotations

import enum
import random
from collections import Counter
from dataclasses import dataclass

from worker.devtools.sandbox.codes import SCHEDULED_ACCEPTED, JsonObj
from worker.devtools.sandbox.config import SandboxConfig


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
    HTML_BODY = "html_body"  # a 200 whose body is a proxy's HTML page
    TRUNCATED_BODY = "truncated_body"  # a complete 200 whose JSON body stops half-way


@dataclass(frozen=True)
class SendFaults:
    """The faults drawn for one POST /sms/3/messages."""

    delay_s: float
    before: Before | None
    status: int  # the HTTP status for `before`
    retry_after_s: int | None
    after: After | None
    hold_s: float = 0.0  # late accept: how long to hold the request before accepting it (0: at once)
    partial_results: bool = False  # leave some per-destination results out of the response
    results_seed: int | None = None  # seeds the per-result draws; None when no per-result fault is on


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
        """Faults for one send request, in the order a real stack would hit them.

        Each draw happens only while its knob is on, so a seed gives the same faults as before a
        knob existed while that knob is off; the order of the draws below is part of that promise.
        """
        config = self._config
        delay_s = config.latency_ms / 1000.0
        if config.jitter_ms > 0:
            delay_s += self._rng.random() * config.jitter_ms / 1000.0
        before, status = self._draw_before(now)
        retry_after = config.retry_after_s if status == 429 and self._chance(config.retry_after_share) else None
        if before is not None:
            return SendFaults(delay_s, before, status, retry_after, None)
        after = self._draw_after()
        hold_s = config.late_accept_delay_ms / 1000.0 if self._chance(config.late_accept_rate) else 0.0
        partial = self._chance(config.partial_results_rate)
        # Per-result draws get their own stream, seeded now: which results they hit does not depend
        # on what other requests draw meanwhile (a late accept draws them seconds later).
        results_seed = self._rng.getrandbits(64) if partial or config.unknown_status_rate > 0 else None
        return SendFaults(delay_s, before, status, retry_after, after, hold_s, partial, results_seed)

    def _chance(self, rate: float) -> bool:
        """One draw against `rate`; no draw at all while the rate is 0."""
        return rate > 0 and self._rng.random() < rate

    def _draw_before(self, now: float) -> tuple[Before | None, int]:
        """The fault answering instead of accepting, and its HTTP status (200 when none)."""
        config = self._config
        self._sync_bucket(now)
        if not self._bucket.take(now):
            return Before.RATE_LIMITED, 429
        if self._chance(config.rate_429):
            return Before.THROTTLED, 429
        if self._chance(config.error_5xx_rate):
            codes = config.error_5xx_codes
            return Before.SERVER_ERROR, codes[int(self._rng.random() * len(codes))]
        return None, 200

    def _draw_after(self) -> After | None:
        """The first fault, in this order, whose draw hits: what goes wrong after accepting."""
        config = self._config
        rates = (
            (After.TIMEOUT, config.accept_then_timeout_rate),
            (After.DROP, config.drop_rate),
            (After.HTML_BODY, config.html_body_rate),
            (After.TRUNCATED_BODY, config.truncated_body_rate),
        )
        for fault, rate in rates:
            if self._chance(rate):
                return fault
        return None


def reshape_results(response: JsonObj, faults: SendFaults, config: SandboxConfig, counts: Counter[str]) -> None:
    """Apply the per-result faults to an accepted send's response, in place; `counts` gets one per change.

    The records behind the response are untouched: a message answered with an unknown status, or
    left out of the list, is accepted all the same and gets its report and its log entry.
    """
    if faults.results_seed is None:
        return
    rng = random.Random(faults.results_seed)
    results: list[JsonObj] = response["messages"]
    rate = config.unknown_status_rate
    if rate > 0:
        for result in results:
            if result["status"]["name"] == "PENDING_ACCEPTED" and rng.random() < rate:
                result["status"] = SCHEDULED_ACCEPTED
                counts["unknown_status"] += 1
    if faults.partial_results:
        kept = [result for result in results if rng.random() >= 0.5]
        if len(kept) == len(results):
            del kept[int(rng.random() * len(kept))]
        counts["partial_results"] += 1
        counts["partial_results_dropped"] += len(results) - len(kept)
        response["messages"] = kept


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
