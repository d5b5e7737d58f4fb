"""Producer wiring: the one way a process outside the workers gets its Store, its Triggers and an Outbox.

The CLI, the web process, the clock, `sms-worker reconcile`, the metrics fork, the demo, the tests
and the benchmarks all build these the same way:

    with producer(settings) as p:            # Store + broker + Triggers + Outbox waking the lanes
        p.outbox.enqueue({"to": "41793026727", "text": "Hello"})

    store = connect_store(settings)          # only the Store (one Redis client and its pool)
    triggers = connect_triggers(settings, store)   # a broker of its own, to wake the workers

Worker processes are wired by worker.runtime.build_runtime instead (the composition root).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING

from worker.outbox import Outbox, OutboxConfig
from worker.settings import Settings
from worker.store import Store, connect
from worker.triggers import Triggers

if TYPE_CHECKING:
    import dramatiq


def connect_store(settings: Settings) -> Store:
    """A Store on its own Redis client: the key prefix and message-id prefix of these settings."""
    return Store(connect(settings.redis_url), settings.sms_key_prefix, settings.sms_message_id_prefix)


def connect_triggers(settings: Settings, store: Store) -> Triggers:
    """Triggers sending through a Dramatiq broker of their own (closed with `triggers.broker.close()`)."""
    # Imported here: worker.runtime imports the whole worker (dispatch, reports, metrics), and
    # worker.metrics imports this module for its scrape's Store.
    from worker.runtime import make_broker

    broker, _ = make_broker(settings)
    return Triggers(store, broker)


@dataclass
class Producer:
    """What a producer process holds: its Store, the Triggers that wake the workers (None when it
    must not wake them) and the Outbox writing through both. `close()` closes both connections."""

    store: Store
    triggers: Triggers | None
    outbox: Outbox

    @property
    def broker(self) -> dramatiq.Broker | None:
        return self.triggers.broker if self.triggers is not None else None

    def wake(self, lane: str) -> None:
        """Wake a dispatcher for `lane` now (de-duplicated); nothing for a producer built with wake=False."""
        if self.triggers is not None:
            self.triggers.dispatch(lane)

    def close(self) -> None:
        if self.triggers is not None:
            self.triggers.broker.close()
        self.store.close()

    def __enter__(self) -> Producer:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()


def producer(settings: Settings, *, wake: bool = True) -> Producer:
    """A Producer; with `wake=False` nothing wakes the workers (a dry run, or nobody consumes:
    the clock's tick wakes every lane anyway)."""
    store = connect_store(settings)
    triggers = connect_triggers(settings, store) if wake else None
    outbox = Outbox(
        OutboxConfig.from_settings(settings), store, wake=triggers.dispatch if triggers is not None else None
    )
    return Producer(store, triggers, outbox)
