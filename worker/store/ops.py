"""What operators read and the processes report: status snapshots, heartbeats, the instance marker,
and the server's own configuration (INFO, CONFIG GET).

The raw answers only: worker/status.py and worker/redis_health.py make sense of them.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import redis

from worker.errors import StoreError
from worker.store import resp
from worker.store.base import StoreBase
from worker.store.outbox import DISPATCH_GROUP

AMBIGUOUS_SCAN = 10_000  # pending entries per lane looked at for the ambiguous count
PER_LANE = 6  # replies per lane in a snapshot


@dataclass(frozen=True)
class LaneSnapshot:
    depth: int  # entries in the outbox stream
    head_id: str | None  # the oldest entry's id
    paused: str | None  # the pause's reason
    pause_ms: int  # its PTTL (-1 without expiry, -2 none)
    pending: int  # claimed, pending in the dispatch group
    scheduled: int = 0  # jobs held in the lane's schedule (send_at ahead)
    next_due_ms: int | None = None  # the earliest of their due times


@dataclass(frozen=True)
class Snapshot:
    """One status read: per lane (in the order asked), then the shared counters."""

    lanes: list[LaneSnapshot]
    awaiting: int
    dead_letters: int
    parked: int
    events: int
    heartbeats: dict[str, float]  # consumer -> last heartbeat (ms)
    last_drain: dict[str, str]
    booked_until_us: int | None  # the shared `mps` bucket's TAT
    marker: bytes | None  # the instance marker's value


@dataclass(frozen=True)
class MarkerCheck:
    made: bool  # this call wrote the marker (it was missing)
    value: bytes | None  # the marker now
    run_id: str | None  # the server's INFO run_id


class OperationsOps(StoreBase):
    if TYPE_CHECKING:
        # OutboxOps's, which Store joins: the one place an entry's message id is derived.
        def entry_message_id(self, lane: str, entry_id: str, fields: dict[bytes, bytes]) -> str: ...

    def snapshot(self, lanes: Sequence[str]) -> Snapshot:
        """A handful of round trips (pipelined) for `sms-worker status` and the metrics scrape."""
        with resp.redis_errors():
            pipe = self.r.pipeline(transaction=False)
            for lane in lanes:
                pipe.xlen(self.outbox(lane))
                pipe.xrange(self.outbox(lane), "-", "+", count=1)
                pipe.get(self.pause_key(lane))
                pipe.pttl(self.pause_key(lane))
                pipe.zcard(self.scheduled(lane))
                pipe.zrange(self.scheduled(lane), 0, 0, withscores=True)
            pipe.zcard(self.awaiting)
            pipe.xlen(self.dlq)
            pipe.zcard(self.reports_parked)
            pipe.xlen(self.events)
            pipe.hgetall(self.heartbeats)
            pipe.hgetall(self.last_drain)
            pipe.get(self.bucket("mps"))
            pipe.get(self.instance_marker)
            replies = pipe.execute()
            pending = [self._pending(lane) for lane in lanes]
        per_lane = []
        for i, lane_pending in enumerate(pending):
            depth, head, paused, pause_ms, scheduled, first_due = replies[PER_LANE * i : PER_LANE * i + PER_LANE]
            per_lane.append(LaneSnapshot(
                depth=int(depth), head_id=head[0][0].decode() if head else None,
                paused=paused.decode() if paused else None, pause_ms=int(pause_ms), pending=lane_pending,
                scheduled=int(scheduled), next_due_ms=int(first_due[0][1]) if first_due else None,
            ))
        awaiting, dlq, parked, events, heartbeats, last_drain, tat, marker = replies[PER_LANE * len(lanes) :]
        return Snapshot(
            lanes=per_lane, awaiting=int(awaiting), dead_letters=int(dlq), parked=int(parked), events=int(events),
            heartbeats={name.decode(): float(beat) for name, beat in heartbeats.items()},
            last_drain={k.decode(): v.decode() for k, v in last_drain.items()},
            booked_until_us=int(tat) if tat else None, marker=marker,
        )

    def _pending(self, lane: str) -> int:
        try:
            return int(self.r.xpending(self.outbox(lane), DISPATCH_GROUP)["pending"])
        except redis.ResponseError:  # NOGROUP before the first dispatch: nothing pending
            return 0

    def count_ambiguous(self, lanes: Sequence[str]) -> int:
        """Messages waiting for a reconciliation verdict: pending entries whose state is AMBIGUOUS."""
        with resp.redis_errors():
            return sum(self._ambiguous(lane) for lane in lanes)

    def _ambiguous(self, lane: str) -> int:
        try:
            pending = self.r.xpending_range(self.outbox(lane), DISPATCH_GROUP, "-", "+", AMBIGUOUS_SCAN)
        except redis.ResponseError:  # NOGROUP: nothing pending in this lane yet
            return 0
        ids = [item["message_id"].decode() for item in pending]
        if not ids:
            return 0
        pipe = self.r.pipeline(transaction=False)
        for entry_id in ids:
            pipe.xrange(self.outbox(lane), entry_id, entry_id)
        entries = [found[0] for found in pipe.execute() if found]
        pipe = self.r.pipeline(transaction=False)
        for entry_id, fields in entries:
            pipe.hget(self.msg(self.entry_message_id(lane, entry_id.decode(), fields)), "state")
        return sum(1 for state in pipe.execute() if state == b"AMBIGUOUS")

    def heartbeat(self, consumer: str) -> None:
        """A worker process says it is alive (read by `status` and the worker's /healthz)."""
        with resp.redis_errors():
            self.r.hset(self.heartbeats, consumer, int(time.time() * 1000))

    def check_instance_marker(self, fresh: bytes) -> MarkerCheck:
        """Write `fresh` as the instance marker if there is none; the marker and run_id, atomically."""
        with resp.redis_errors():
            pipe = self.r.pipeline(transaction=True)
            pipe.set(self.instance_marker, fresh, nx=True)
            pipe.get(self.instance_marker)
            pipe.info("server")
            made, value, server = pipe.execute()
        return MarkerCheck(bool(made), value, server.get("run_id"))

    def server_config(self, names: Sequence[str]) -> tuple[dict[str, Any], dict[str, str] | None]:
        """(INFO, the CONFIG GET answers for `names`), one round trip. CONFIG answers None when it is
        renamed, disabled or not allowed (NOPERM): not an error. StoreError when INFO fails."""
        with resp.redis_errors():
            pipe = self.r.pipeline(transaction=False)
            pipe.info()
            for name in names:
                pipe.config_get(name)
            info, *answers = pipe.execute(raise_on_error=False)
        if isinstance(info, Exception):
            raise StoreError(f"Redis: INFO failed: {info}") from info
        config: dict[str, str] = {}
        for answer in answers:
            if isinstance(answer, redis.ResponseError):  # renamed, disabled or NOPERM
                return info, None
            if isinstance(answer, Exception):
                raise StoreError(f"Redis: {type(answer).__name__}: {answer}") from answer
            config.update({_text(k): _text(v) for k, v in answer.items()})
        return info, config


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
