"""Per-lane coordination: dispatcher slots, dispatch kicks, pauses, and named leases."""

from __future__ import annotations

from collections.abc import Sequence

from worker.store import resp
from worker.store.base import StoreBase


class LaneOps(StoreBase):
    def acquire_slot(self, lane: str, member: str, limit: int, lease_ms: int) -> bool:
        return bool(self.run("slot", [self.dispatchers(lane)], [member, limit, lease_ms]))

    def release_slot(self, lane: str, member: str) -> None:
        with resp.redis_errors():
            self.r.zrem(self.dispatchers(lane), member)

    def try_kick(self, lane: str, dedupe_ms: int) -> bool:
        """True for the one caller per `dedupe_ms` that should send a dispatch message."""
        with resp.redis_errors():
            return bool(self.r.set(self.kick_key(lane), b"1", nx=True, px=max(1, dedupe_ms)))

    def pause(self, lane: str, reason: str, seconds: float) -> None:
        with resp.redis_errors():
            self.r.set(self.pause_key(lane), reason, px=max(1, int(seconds * 1000)))

    def resume(self, lane: str) -> None:
        with resp.redis_errors():
            self.r.delete(self.pause_key(lane))

    def paused_lanes(self, lanes: Sequence[str], reason: str) -> list[str]:
        """Those of `lanes` paused for `reason`, in one round trip."""
        if not lanes:
            return []
        with resp.redis_errors():
            values = self.r.mget([self.pause_key(lane) for lane in lanes])
        return [lane for lane, value in zip(lanes, values, strict=True) if value == reason.encode()]

    def paused(self, lane: str) -> str | None:
        with resp.redis_errors():
            value = self.r.get(self.pause_key(lane))
        return value.decode() if value else None

    def lease(self, name: str, holder: str, ttl_ms: int) -> int:
        """Take or renew lease `name`; the fencing token while `holder` has it, else 0."""
        return int(self.run("lease", [self.lease_key(name), self.fence_key(name)], [holder, ttl_ms]))

    def release_lease(self, name: str, holder: str) -> None:
        with resp.redis_errors():
            if self.r.get(self.lease_key(name)) == holder.encode():
                self.r.delete(self.lease_key(name))
