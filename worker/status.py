"""What the system looks like right now, read from Redis: for `sms-worker status` and the metrics."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import redis

from worker import redis_health
from worker.settings import Settings
from worker.store import DISPATCH_GROUP, Store, redis_errors

HEARTBEAT_STALE_S = 30.0


@dataclass
class LaneStatus:
    lane: str
    depth: int  # entries in the outbox stream not yet settled (waiting or in flight)
    waiting: int  # not yet claimed by any dispatcher
    in_flight: int  # claimed, pending in the consumer group
    oldest_age_s: float | None  # age of the oldest entry still in the outbox
    paused: str | None


@dataclass
class SystemStatus:
    lanes: list[LaneStatus]
    ambiguous: int
    awaiting_reports: int
    dead_letters: int
    parked_reports: int
    events: int
    limiter: dict[str, Any]
    last_drain: dict[str, Any] | None
    workers: list[dict[str, Any]] = field(default_factory=list)
    # What the server will do with our data (worker.redis_health): its configuration, the findings
    # (eviction, no persistence, replica, unknown) and since when it holds this data set (marker).
    redis: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _age_s(entry_id: bytes | str, now_s: float) -> float:
    raw = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return max(0.0, now_s - int(raw.split("-", 1)[0]) / 1000)


def collect(settings: Settings, store: Store) -> SystemStatus:
    """One snapshot, a handful of round trips (pipelined)."""
    now = time.time()
    r = store.r
    lanes = list(settings.sms_lanes)
    with redis_errors():
        pipe = r.pipeline(transaction=False)
        for lane in lanes:
            pipe.xlen(store.outbox(lane))
            pipe.xrange(store.outbox(lane), "-", "+", count=1)
            pipe.get(store.pause_key(lane))
        pipe.zcard(store.awaiting)
        pipe.xlen(store.dlq)
        pipe.zcard(store.key("reports", "parked"))
        pipe.xlen(store.events)
        pipe.hgetall(store.key("heartbeats"))
        pipe.hgetall(store.key("reports", "last_drain"))
        pipe.get(store.bucket("mps"))
        pipe.get(redis_health.marker_key(store))
        replies = pipe.execute()
        marker = replies.pop()
        pending = []
        for lane in lanes:
            try:
                pending.append(int(r.xpending(store.outbox(lane), DISPATCH_GROUP)["pending"]))
            except redis.ResponseError:  # NOGROUP before the first dispatch: nothing pending
                pending.append(0)
        ambiguous = _count_ambiguous(store, lanes)
    health = redis_health.inspect(r, settings.sms_redis_allow_volatile)
    redis_info = {**health.as_dict(), "data_since": redis_health.marker_since(marker)}
    statuses = []
    for i, lane in enumerate(lanes):
        depth, head, paused = replies[3 * i : 3 * i + 3]
        statuses.append(LaneStatus(
            lane=lane, depth=int(depth), waiting=max(0, int(depth) - pending[i]), in_flight=pending[i],
            oldest_age_s=round(_age_s(head[0][0], now), 3) if head else None,
            paused=paused.decode() if paused else None,
        ))
    awaiting, dlq, parked, events, heartbeats, last_drain, tat = replies[3 * len(lanes) :]
    workers = []
    for name, beat in sorted(heartbeats.items()):
        age = now - float(beat) / 1000
        workers.append({"consumer": name.decode(), "last_seen_s": round(age, 1), "alive": age < HEARTBEAT_STALE_S})
    limiter: dict[str, Any] = {
        "messages_per_s": settings.sms_rate_limit_mps or None,
        "requests_per_s": settings.sms_rate_limit_rps or None,
        # How far ahead of now the shared bucket is booked (0 = tokens available now).
        "booked_ahead_ms": max(0.0, round((int(tat) / 1e6 - now) * 1000, 1)) if tat else 0.0,
    }
    drain = {k.decode(): v.decode() for k, v in last_drain.items()} or None
    return SystemStatus(statuses, ambiguous, int(awaiting), int(dlq), int(parked), int(events), limiter, drain, workers,
                        redis=redis_info)


def _count_ambiguous(store: Store, lanes: list[str]) -> int:
    """Messages waiting for a reconciliation verdict: pending entries whose state is AMBIGUOUS."""
    total = 0
    for lane in lanes:
        try:
            pending = store.r.xpending_range(store.outbox(lane), DISPATCH_GROUP, "-", "+", 10_000)
        except redis.ResponseError:  # NOGROUP: nothing pending in this lane yet
            continue
        ids = [item["message_id"].decode() for item in pending]
        if not ids:
            continue
        pipe = store.r.pipeline(transaction=False)
        for entry_id in ids:
            pipe.xrange(store.outbox(lane), entry_id, entry_id)
        entries = [found[0] for found in pipe.execute() if found]
        mids = [store.entry_message_id(lane, entry_id.decode(), fields) for entry_id, fields in entries]
        pipe = store.r.pipeline(transaction=False)
        for mid in mids:
            pipe.hget(store.msg(mid), "state")
        total += sum(1 for state in pipe.execute() if state == b"AMBIGUOUS")
    return total


def heartbeat(store: Store, consumer: str) -> None:
    """A worker process says it is alive (read by `status` and the worker's /healthz)."""
    with redis_errors():
        store.r.hset(store.key("heartbeats"), consumer, int(time.time() * 1000))


def render(status: SystemStatus) -> str:
    """A readable table for people."""
    lines = [f"{'lane':<10}{'depth':>9}{'waiting':>9}{'in flight':>11}{'oldest':>10}  paused"]
    for lane in status.lanes:
        age = "-" if lane.oldest_age_s is None else f"{lane.oldest_age_s:.1f}s"
        paused = lane.paused or "-"
        lines.append(f"{lane.lane:<10}{lane.depth:>9}{lane.waiting:>9}{lane.in_flight:>11}{age:>10}  {paused}")
    lines += [
        "",
        f"ambiguous (awaiting reconciliation): {status.ambiguous}",
        f"accepted, awaiting a final report:   {status.awaiting_reports}",
        f"dead letters:                        {status.dead_letters}",
        f"parked reports (message unknown):    {status.parked_reports}",
        f"events published (stream length):    {status.events}",
        f"rate limiter: {status.limiter}",
        f"last drain: {status.last_drain or 'never'}",
        "workers:",
    ]
    lines += [f"  {w['consumer']}  seen {w['last_seen_s']}s ago  {'alive' if w['alive'] else 'STALE'}"
              for w in status.workers] or ["  (none)"]
    lines += _render_redis(status.redis)
    return "\n".join(lines)


def _render_redis(info: dict[str, Any]) -> list[str]:
    if not info:
        return []
    policy = info.get("maxmemory_policy") or "unknown"
    since = info.get("data_since")
    lines = [f"redis: {info.get('version') or '?'} {info.get('role') or '?'}, maxmemory-policy {policy}, "
             f"persistence {info.get('persistence')}"
             + ("" if info.get("config_readable") else " (CONFIG not allowed: read from INFO)")
             + (f", data set since {since}" if since else ", no instance marker yet (no worker ran)")]
    for finding in info.get("findings", []):
        level = "accepted" if finding["acknowledged"] else finding["level"].upper()
        lines.append(f"  {level:<8} {finding['message']}")
    return lines
