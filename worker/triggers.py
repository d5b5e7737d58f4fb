"""Wake-ups: owns the actor and queue names, and the de-duplicated Dramatiq messages that start
dispatchers, reconciliations and report work.

Producers, the clock, the web process and the actors all wake the workers through here, so the
actor and queue names live in one place and importing this module needs no broker of its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import dramatiq
import dramatiq.errors

from worker.errors import StoreError
from worker.store import Store, redis_errors

# Report work, sweeps and the event relay go to QUEUE; each lane's dispatches and reconciliations
# to its own queue, so a worker process can be given only some lanes (`sms-worker worker --lanes
# otp`): an otp process that never runs a bulk batch answers within milliseconds however busy
# the bulk workers are.
QUEUE = "sms"


def lane_queue(lane: str) -> str:
    return f"{QUEUE}-lane-{lane}"

DISPATCH = "dispatch"
RECONCILE = "reconcile"
DRAIN_REPORTS = "drain_reports"
PROCESS_REPORTS = "process_reports"
SWEEP = "sweep"
RELAY_EVENTS = "relay_events"
SWEEP_OUTBOXES = "sweep_outboxes"

# A kick is de-duplicated for this long: a burst of producers sends one message, not thousands.
KICK_DEDUPE_MS = 20


class Wakes(Protocol):
    """The wake-ups code can ask for: `Triggers` in production; a test passes a recorder of its own
    (a class with these methods) instead of patching a Triggers."""

    def send(self, actor: str, *args: Any, delay_ms: int = 0, queue: str = QUEUE) -> None: ...

    def dispatch(self, lane: str, delay_ms: int = 0) -> bool: ...

    def reconcile(self, lane: str, entry_ids: Sequence[str], delay_ms: int) -> None: ...

    def process_reports(self) -> None: ...


class Triggers:
    """Sends actor messages by name through a broker; `store` de-duplicates the frequent ones.

    Both are constructor arguments, so a test can hand it a stub broker (dramatiq's StubBroker) and
    see the messages it sent, or pass any other `Wakes` where Triggers is expected."""

    def __init__(self, store: Store, broker: dramatiq.Broker) -> None:
        self.store = store
        self.broker = broker

    def send(self, actor: str, *args: Any, delay_ms: int = 0, queue: str = QUEUE) -> None:
        message: dramatiq.Message[Any] = dramatiq.Message(
            queue_name=queue, actor_name=actor, args=args, kwargs={}, options={}
        )
        # The broker has its own Redis connection: its failures are ours to name (StoreError), so
        # every caller that survives a Redis outage (the clock, producers, the web) survives this too.
        try:
            with redis_errors():
                self.broker.enqueue(message, delay=delay_ms or None)
        except dramatiq.errors.BrokerConnectionError as error:
            raise StoreError(f"Redis (Dramatiq broker): {error}") from error

    def dispatch(self, lane: str, delay_ms: int = 0) -> bool:
        """Wake a dispatcher for `lane` unless one was woken within the de-duplication window."""
        if self.store.try_kick(lane, max(KICK_DEDUPE_MS, delay_ms)):
            self.send(DISPATCH, lane, delay_ms=delay_ms, queue=lane_queue(lane))
            return True
        return False

    def reconcile(self, lane: str, entry_ids: Sequence[str], delay_ms: int) -> None:
        self.send(RECONCILE, lane, list(entry_ids), delay_ms=delay_ms, queue=lane_queue(lane))

    def process_reports(self) -> None:
        if self.store.try_kick("reports", KICK_DEDUPE_MS):
            self.send(PROCESS_REPORTS)
