"""The rate limiter: which GCRA buckets a send charges, and the push-back after a 429.

Buckets are shared by every process on every host (they live in Redis and use its clock):
    mps          messages per second, all lanes          (SMS_RATE_LIMIT_MPS)
    mps:{lane}   that lane's share of it, when below 1   (SMS_LANES[..].rate_share)
    rps          bulk requests per second                (SMS_RATE_LIMIT_RPS)
    logs         GET /sms/3/logs calls                   (SMS_LOGS_RATE_PER_MIN)
Those are the `default` account's; each account of SMS_ACCOUNTS has its own RateLimiter, whose
buckets are `acct:{account}:mps`, `acct:{account}:rps` and `acct:{account}:logs` (its own limits,
its rate_limit_mps/rps) and the `mps:{lane}` shares of its lanes; a 429 pushes back its buckets only.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from worker.settings import Settings
from worker.store import Store

if TYPE_CHECKING:
    from worker.accounts import Account

# After a 429 without Retry-After, everybody pauses this long before the next grant.
DEFAULT_429_PAUSE_S = 1.0
UNLIMITED = 1e9


@dataclass(frozen=True, slots=True)
class RateLimiterConfig:
    """The limits a RateLimiter applies (0 = no limit), read once from the settings."""

    mps: float = 0.0  # SMS_RATE_LIMIT_MPS
    rps: float = 0.0  # SMS_RATE_LIMIT_RPS
    burst_s: float = 1.0  # SMS_RATE_LIMIT_BURST_S
    logs_per_min: int = 120  # SMS_LOGS_RATE_PER_MIN
    # lane -> its share of `mps` (SMS_LANES[..].rate_share); every lane of the account is here.
    lane_shares: Mapping[str, float] = field(default_factory=dict)
    bucket_prefix: str = ""  # worker.accounts.Account.bucket_prefix: "" for the default account

    @classmethod
    def from_settings(cls, settings: Settings, account: Account | None = None) -> RateLimiterConfig:
        """The default account's limits (every lane), or `account`'s (its lanes)."""
        if account is None or account.is_default:
            mps, rps, prefix = settings.sms_rate_limit_mps, settings.sms_rate_limit_rps, ""
        else:
            mps, rps, prefix = account.rate_limit_mps, account.rate_limit_rps, account.bucket_prefix
        lanes = settings.sms_lanes.items()
        return cls(
            mps=mps, rps=rps, burst_s=settings.sms_rate_limit_burst_s, logs_per_min=settings.sms_logs_rate_per_min,
            lane_shares={lane: cfg.rate_share for lane, cfg in lanes if account is None or cfg.account == account.name},
            bucket_prefix=prefix,
        )


class RateLimiter:
    def __init__(self, config: RateLimiterConfig, store: Store) -> None:
        self.config = config
        self.store = store

    def _buckets(self, lane: str) -> list[tuple[str, float, float, str]]:
        c = self.config
        mps = f"{c.bucket_prefix}mps"
        # With no limit set, an effectively unlimited bucket still carries the 429 push-back.
        buckets: list[tuple[str, float, float, str]] = [(mps, UNLIMITED, UNLIMITED, "messages")]
        if c.mps > 0:
            burst = max(1.0, c.mps * c.burst_s)
            buckets[0] = (mps, c.mps, burst, "messages")
            share = c.lane_shares.get(lane, 1.0)
            if share < 1:
                rate = c.mps * share
                buckets.append((f"mps:{lane}", rate, max(1.0, rate * c.burst_s), "messages"))
        if c.rps > 0:
            burst = max(1.0, c.rps * c.burst_s)
            buckets.append((f"{c.bucket_prefix}rps", c.rps, burst, "request"))
        return buckets

    def acquire(self, lane: str, want: int) -> tuple[int, int]:
        """Up to `want` message tokens for one bulk request: (granted, ms to wait if none)."""
        return self.store.acquire_tokens(want, self._buckets(lane))

    def refund(self, lane: str, unused: int, request_unused: bool) -> None:
        """Give back tokens a claim did not use (fewer jobs waiting than were granted). Without a
        limit there is nothing worth giving back, and no round trip is spent on it."""
        buckets = self._buckets(lane)
        if (unused > 0 or request_unused) and any(rate < UNLIMITED for _, rate, _, _ in buckets):
            self.store.refund_tokens(unused, request_unused, buckets)

    @property
    def limits_messages(self) -> bool:
        """Whether a messages/s limit is set (only then are parts worth counting)."""
        return self.config.mps > 0

    def charge_parts(self, lane: str, extra_parts: int) -> None:
        """A claimed batch has `extra_parts` SMS parts beyond one per message (multi-part texts):
        charge the message buckets for them, so the shared rate counts parts as the provider does.
        Without a limit there is nothing to charge, and no round trip is spent on it."""
        buckets = [(name, rate) for name, rate, _, kind in self._buckets(lane)
                   if kind == "messages" and rate < UNLIMITED]
        if extra_parts > 0 and buckets:
            self.store.charge_tokens(extra_parts, buckets)

    def acquire_logs_call(self) -> int:
        """One GET /sms/3/logs call: 0 if allowed now, else ms to wait."""
        rate = self.config.logs_per_min / 60.0
        # A small burst lets a crashed batch reconcile quickly; the provider allows 120/min.
        bucket = f"{self.config.bucket_prefix}logs"
        granted, wait_ms = self.store.acquire_tokens(1, [(bucket, rate, min(10.0, rate * 5), "request")])
        return 0 if granted else wait_ms

    def wait_for_logs_call(self) -> None:
        """Block until one GET /sms/3/logs call is allowed (shared by reconciliation and recovery)."""
        while wait_ms := self.acquire_logs_call():
            time.sleep(wait_ms / 1000)

    def penalize(self, retry_after_s: float | None) -> None:
        """The provider said 429: push every send bucket back so all processes pause together."""
        pause_ms = int(1000 * (retry_after_s if retry_after_s is not None else DEFAULT_429_PAUSE_S))
        # (An account with no lane left still has its account-wide buckets.)
        buckets = {name: (name, rate, burst) for lane in (list(self.config.lane_shares) or [""])
                   for name, rate, burst, _ in self._buckets(lane)}
        self.store.penalize(pause_ms, list(buckets.values()))
