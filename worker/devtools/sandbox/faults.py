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
        if before is not None:
            return SendFaults(delay_s, before, status, retry_after, after)
        # Each draw below happens only while its knob is on, so a seed gives the same faults as
        # before these knobs existed when they are off.
        if config.accept_then_timeout_rate > 0 and rng.random() < config.accept_then_timeout_rate:
            after = After.TIMEOUT
        elif config.drop_rate > 0 and rng.random() < config.drop_rate:
            after = After.DROP
        elif config.html_body_rate > 0 and rng.random() < config.html_body_rate:
            after = After.HTML_BODY
        elif config.truncated_body_rate > 0 and rng.random() < config.truncated_body_rate:
            after = After.TRUNCATED_BODY
        hold_s = 0.0
        if config.late_accept_rate > 0 and rng.random() < config.late_accept_rate:
            hold_s = config.late_accept_delay_ms / 1000.0
        partial = config.partial_results_rate > 0 and rng.random() < config.partial_results_rate
        # Per-result draws get their own stream, seeded now: which results they hit does not depend
        # on what other requests draw meanwhile (a late accept draws them seconds later).
        results_seed = rng.getrandbits(64) if partial or config.unknown_status_rate > 0 else None
        return SendFaults(delay_s, before, status, retry_after, after, hold_s, partial, results_seed)


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
