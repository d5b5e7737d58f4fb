"""The clock process: owns the periodic wake-ups; it only enqueues, and a Redis lease idles a second one.

Every tick it moves each lane's due scheduled jobs to its outbox (atomic due.lua calls: a job is
at most about a tick late) and wakes a dispatcher for each lane (jobs written with plain Redis
commands, and retries after a pause, are picked up this way); the report drain and the sweeps
run on their own intervals. It never does the work itself, so it stays tiny and one instance is enough.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from worker import triggers as names
from worker.errors import StoreError
from worker.settings import DEFAULT_ACCOUNT, Settings
from worker.store import Store
from worker.store.schedule import MOVE_CHUNK
from worker.triggers import Wakes

log = structlog.get_logger(__name__)

LEASE = "clock"
# The unknown-lane sweep's SCAN costs what the keyspace holds, not what traffic does: every 30 s,
# with 300,000 message hashes in Redis, it was 3-4 us of Redis per SMS sent. A job written to a lane
# that does not exist is dead-lettered within five minutes (`status` lists its stream at once).
OUTBOX_SWEEP_S = 300.0
MOVE_CHUNKS = 20  # due.lua calls per lane and tick at most


def sweep_interval_s(settings: Settings) -> float:
    """How often the clock sends the report sweep (worker.reports.Sweeper sizes its logs lookups by it)."""
    return max(1.0, settings.sms_reports_drain_interval_s)


@dataclass(frozen=True, slots=True)
class ClockConfig:
    """The settings the clock reads: what to wake, and how often."""

    lanes: tuple[str, ...]
    tick_ms: int
    drain_interval_s: float
    sweep_interval_s: float
    relay_events: bool  # SMS_EVENTS_DRAMATIQ_QUEUE is set: the event relay runs every second
    state_ttl_s: int = 3 * 86400  # SMS_STATE_TTL_S: a moved job's record is kept this long
    accounts: tuple[str, ...] = (DEFAULT_ACCOUNT,)  # Settings.account_names(): each has its report drain

    @classmethod
    def from_settings(cls, settings: Settings) -> ClockConfig:
        return cls(
            lanes=tuple(settings.sms_lanes),
            tick_ms=settings.sms_dispatch_tick_ms,
            drain_interval_s=settings.sms_reports_drain_interval_s,
            sweep_interval_s=sweep_interval_s(settings),
            relay_events=bool(settings.sms_events_dramatiq_queue),
            state_ttl_s=settings.sms_state_ttl_s,
            accounts=tuple(settings.account_names()),
        )


class Clock:
    """Wakes every lane each tick and sends the periodic report, sweep and relay messages, while it
    holds the clock lease. `triggers` is worker.triggers.Triggers in production; any `Wakes` will do."""

    def __init__(self, config: ClockConfig, store: Store, triggers: Wakes, now: Callable[[], float] = time.monotonic):
        self.config = config
        self.store = store
        self.triggers = triggers
        self.now = now
        self.id = f"clock-{uuid.uuid4().hex[:12]}"
        self.tick_s = config.tick_ms / 1000
        # name -> (interval in s, what to send); the lanes are woken every tick.
        self.periodic: dict[str, tuple[float, Callable[[], None]]] = {
            names.DRAIN_REPORTS: (config.drain_interval_s, self._drain_every_account),
            names.PROCESS_REPORTS: (1.0, self.triggers.process_reports),
            names.SWEEP: (config.sweep_interval_s, lambda: self.triggers.send(names.SWEEP)),
            # Outbox streams of lanes nobody configured (a plain XADD to a misspelt lane): SCAN is
            # linear in the keyspace, so now and then, not every tick.
            names.SWEEP_OUTBOXES: (OUTBOX_SWEEP_S, lambda: self.triggers.send(names.SWEEP_OUTBOXES)),
        }
        if config.relay_events:
            self.periodic[names.RELAY_EVENTS] = (1.0, lambda: self.triggers.send(names.RELAY_EVENTS))
        self._last: dict[str, float] = {}

    def _drain_every_account(self) -> None:
        """One drain per account (worker.accounts): the default account's message has no argument, as before."""
        for account in self.config.accounts:
            self.triggers.send(names.DRAIN_REPORTS, *([] if account == DEFAULT_ACCOUNT else [account]))

    def tick(self) -> bool:
        """One round; returns whether this clock is the leader."""
        ttl_ms = int(max(3 * self.tick_s, 2.0) * 1000)
        if not self.store.lease(LEASE, self.id, ttl_ms):
            return False
        for lane in self.config.lanes:
            self.move_due(lane)
            self.triggers.dispatch(lane)
        now = self.now()
        for name, (interval_s, send) in self.periodic.items():
            if now - self._last.get(name, -1e9) >= interval_s:
                self._last[name] = now
                send()
        return True

    def move_due(self, lane: str) -> int:
        """Move the lane's due scheduled jobs to its outbox; a backlog of due jobs (the clock was
        down) is moved MOVE_CHUNKS chunks a tick, so a tick stays short."""
        moved = 0
        for _ in range(MOVE_CHUNKS):
            count, _next = self.store.move_due(lane, state_ttl_s=self.config.state_ttl_s)
            moved += count
            if count < MOVE_CHUNK:
                break
        if moved:
            log.info("scheduled_due", lane=lane, moved=moved)
        return moved

    def run(self, stop: threading.Event) -> None:
        log.info("clock_started", clock_id=self.id, tick_ms=self.config.tick_ms)
        leader = False
        while not stop.is_set():
            try:
                now_leader = self.tick()
            except StoreError as error:
                log.warning("clock_redis_unavailable", error=str(error))
                now_leader = False
            if now_leader != leader:
                log.info("clock_leadership", clock_id=self.id, leader=now_leader)
                leader = now_leader
            stop.wait(self.tick_s)
        self.store.release_lease(LEASE, self.id)
        log.info("clock_stopped", clock_id=self.id)
