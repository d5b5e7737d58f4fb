"""The global rate limiter's GCRA buckets (ratelimit*.lua)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from worker.store import resp
from worker.store.base import StoreBase


class LimiterOps(StoreBase):
    def acquire_tokens(self, want: int, buckets: Sequence[tuple[str, float, float, str]]) -> tuple[int, int]:
        """buckets: (name, rate/s, burst, "messages"|"request"); returns (granted, wait_ms)."""
        keys = [self.bucket(name) for name, *_ in buckets]
        args: list[Any] = [want]
        for _, rate, burst, kind in buckets:
            args += [rate, burst, kind]
        granted, wait_ms = self.run("ratelimit", keys, args)
        return int(granted), int(wait_ms)

    def refund_tokens(
        self, unused: int, request_unused: bool, buckets: Sequence[tuple[str, float, float, str]]
    ) -> None:
        keys = [self.bucket(name) for name, *_ in buckets]
        args: list[Any] = [unused, "1" if request_unused else "0"]
        for _, rate, _burst, kind in buckets:
            args += [rate, kind]
        self.run("ratelimit_refund", keys, args)

    def charge_tokens(self, extra: int, buckets: Sequence[tuple[str, float]]) -> None:
        """Charge (name, rate/s) message buckets `extra` more tokens (parts beyond one per message)."""
        self.run("ratelimit_charge", [self.bucket(name) for name, _ in buckets], [extra, *(r for _, r in buckets)])

    def penalize(self, pause_ms: int, buckets: Sequence[tuple[str, float, float]]) -> None:
        keys = [self.bucket(name) for name, *_ in buckets]
        args: list[Any] = [pause_ms]
        for _, rate, burst in buckets:
            args += [rate, burst]
        self.run("ratelimit_penalize", keys, args)

    def account_state(self, bucket: str, account: str) -> tuple[int | None, dict[str, str]]:
        """An account's `mps` bucket TAT (microseconds, None: never charged) and its last drain's
        record (worker.accounts; for `sms-worker status`), in one round trip."""
        with resp.redis_errors():
            pipe = self.r.pipeline(transaction=False)
            pipe.get(self.bucket(bucket))
            pipe.hgetall(self.last_drain_of(account))
            tat, record = pipe.execute()
        return (int(tat) if tat else None), {k.decode(): v.decode() for k, v in record.items()}
