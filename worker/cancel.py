"""Cancel: the one entry point for cancelling a message before it is sent (CLI, producers, the client).

    answer = cancel(store, CancelConfig.from_settings(settings), message_id="sw-bulk-...")
    answer = cancel(store, config, producer_id="order-42")
    answer.outcome  # CancelOutcome.CANCELLED | NOT_CANCELLABLE (answer.state says where it is) | UNKNOWN

A SCHEDULED message, or a QUEUED one no dispatcher has submitted yet, becomes CANCELLED: it is never
POSTed, and one `cancelled` event is published. A message already SUBMITTING or later is left as it
is and the answer says its state. The decision is one Lua script (worker/lua/cancel.lua) against
the same record submit.lua decides on, so a cancel and a dispatcher racing for one message never
both win. An asyncio client drives the same steps (`worker.store.cancel_steps`) with redis.asyncio.
"""

from __future__ import annotations

from dataclasses import dataclass

from worker.settings import Settings
from worker.store import CancelAnswer, CancelOutcome, Store, cancel_steps

__all__ = ["CancelAnswer", "CancelConfig", "CancelOutcome", "cancel", "cancel_steps"]


@dataclass(frozen=True, slots=True)
class CancelConfig:
    """The settings a cancel reads: how long the cancelled record is kept, and the events stream's cap."""

    state_ttl_s: int = 3 * 86400
    events_maxlen: int = 1_000_000

    @classmethod
    def from_settings(cls, settings: Settings) -> CancelConfig:
        return cls(state_ttl_s=settings.sms_state_ttl_s, events_maxlen=settings.sms_events_stream_maxlen)


def cancel(store: Store, config: CancelConfig | None = None, *, message_id: str | None = None,
           producer_id: str | None = None) -> CancelAnswer:
    """Cancel one message by its message id or its producer id (exactly one of them)."""
    config = config or CancelConfig()
    return store.cancel(message_id=message_id, producer_id=producer_id, events_maxlen=config.events_maxlen,
                        state_ttl_s=config.state_ttl_s)
