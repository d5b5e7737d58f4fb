"""The synchronous producer client: send, send_many, status and cancel over one Redis connection pool.

    from worker.client import Client

    with Client.from_env() as sms:                       # or Client("redis://redis:6379/0", prefix="sms")
        sms.send("41793026727", "Your code is 123456", lane="otp", id="otp-8812")

It is the Outbox (the validation and the pipelined writes every producer uses) on a Store, with
Triggers that wake the lane's dispatchers, all on one redis-py client: one connection pool, shared
by the Dramatiq broker the wake-ups go through. redis-py's pool is thread-safe, and so is
everything the client keeps (nothing but the pool changes after it is built): one client serves
every thread of a process.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from types import TracebackType
from typing import Any

from dramatiq.brokers.redis import RedisBroker

from worker.campaigns import Campaign
from worker.cancel import CancelAnswer, CancelConfig, cancel
from worker.client.common import ClientConfig, MessageStatus, make_job
from worker.errors import StoreError
from worker.models import Job
from worker.outbox import Enqueued, Outbox
from worker.settings import Settings, load_settings
from worker.store import Store, connect
from worker.store.lookup import LookupOps
from worker.triggers import Triggers, lane_queue

log = logging.getLogger(__name__)


def make_producer_broker(config: ClientConfig, client: Any) -> RedisBroker:
    """A Dramatiq broker that only sends wake-ups, on the client's own Redis client.

    The namespace and the lanes' queues are worker.runtime.make_broker's (a test checks they
    agree); no middleware, because a producer runs no actors (its wake-ups are consumed by the
    worker processes, whose broker has the middleware)."""
    broker = RedisBroker(client=client, namespace=f"{config.prefix}:dramatiq", middleware=[])  # type: ignore[no-untyped-call]
    for lane in config.outbox.lanes:
        broker.declare_queue(lane_queue(lane))
    return broker


class Client:
    """A producer's handle on the SMS worker; see the module docstring. Close it (or use `with`)."""

    def __init__(
        self, redis_url: str | None = None, *, prefix: str | None = None, message_id_prefix: str | None = None,
        lanes: Sequence[str] | None = None, default_lane: str | None = None, wake: bool = True,
        config: ClientConfig | None = None,
    ) -> None:
        """Explicit arguments (left out: the worker's defaults), or a whole `config`.

        `wake=False` wakes no dispatcher: the worker's clock finds the jobs within SMS_DISPATCH_TICK_MS."""
        self.config = config or ClientConfig.of(
            redis_url, prefix=prefix, message_id_prefix=message_id_prefix, lanes=lanes, default_lane=default_lane
        )
        self._redis = connect(self.config.redis_url)
        self._store = Store(self._redis, self.config.prefix, self.config.message_id_prefix)
        self._lookup = LookupOps(self._redis, self.config.prefix, self.config.message_id_prefix)
        self._triggers = Triggers(self._store, make_producer_broker(self.config, self._redis)) if wake else None
        self._outbox = Outbox(self.config.outbox, self._store, wake=self._wake if wake else None)
        self._cancel = CancelConfig(state_ttl_s=self.config.state_ttl_s, events_maxlen=self.config.events_maxlen)
        self._closed = False

    @classmethod
    def from_settings(cls, settings: Settings, *, wake: bool = True) -> Client:
        return cls(config=ClientConfig.from_settings(settings), wake=wake)

    @classmethod
    def from_env(cls, *, wake: bool = True) -> Client:
        """From the environment (and env file) the worker reads: REDIS_URL, SMS_KEY_PREFIX, SMS_LANES...;
        ConfigError names every wrong variable."""
        return cls.from_settings(load_settings(), wake=wake)

    def _wake(self, lane: str) -> None:
        # The jobs are written when this runs: a failed wake must not make the call look failed
        # (a retry without producer ids would queue them twice). The clock wakes every lane anyway.
        assert self._triggers is not None
        try:
            self._triggers.dispatch(lane)
        except StoreError as error:
            log.warning("sms client: could not wake lane %s (the clock will): %s", lane, error)

    def _open(self) -> None:
        if self._closed:
            raise RuntimeError("this sms client is closed")

    # --- sending ------------------------------------------------------------------------------------
    def send(
        self, to: str, text: str | None = None, *, lane: str | None = None, id: str | None = None,
        metadata: Mapping[str, Any] | None = None, sender: str | None = None,
        send_at: datetime | str | None = None, **fields: Any,
    ) -> Enqueued:
        """Queue one SMS; `fields` are the job's other options (validity_period, campaign_reference_id...).

        Returns its message id and `queued` (False: a duplicate of an earlier job with this `id`,
        whose message id it is). JobValidationError lists every problem and nothing is written;
        StoreError as Outbox.enqueue says."""
        self._open()
        job = make_job(to, text, id=id, metadata=metadata, sender=sender, send_at=send_at, fields=fields)
        return self._outbox.enqueue(job, lane)

    def send_many(self, jobs: Iterable[Job | Mapping[str, Any]], lane: str | None = None) -> list[Enqueued]:
        """Queue many jobs (wire-format dicts) to one lane, all or nothing: one bad job refuses the
        call and the error lists every problem (`jobs[3].to: ...`); see Outbox.enqueue_many."""
        self._open()
        return self._outbox.enqueue_many(jobs, lane)

    # --- asking -------------------------------------------------------------------------------------
    def status(self, message_id: str | None = None, *, id: str | None = None) -> MessageStatus:
        """Where one message is, by its message id or its producer `id` (exactly one)."""
        self._open()
        if (message_id is None) == (id is None):
            raise TypeError("status takes a message id or a producer id (id=...)")
        if id is not None:
            message_id = self._lookup.message_id_of(id)
            if message_id is None:
                return MessageStatus.unknown(None)
        assert message_id is not None
        return MessageStatus.of(self._lookup.locate(message_id))

    def campaign(self, campaign_id: str) -> Campaign | None:
        """A campaign's counters (worker.campaigns.Campaign: total, per state, sent, prices,
        complete, progress), None when it has none here (no job carried it, or they expired)."""
        self._open()
        return self._store.campaign_counts(campaign_id)

    def is_suppressed(self, number: str) -> bool:
        """Whether a number is on the suppression list (opted out): a job to it is rejected with
        reason "suppressed" on lanes that respect the list. International, with or without '+' and
        formatting ("41793026727", "+41 79 302 67 27"); ValueError for what is no phone number.
        One SMISMEMBER; the number is normalised as the worker does (worker.numbers)."""
        self._open()
        from worker.numbers import normalise, problem  # phonenumbers: loaded by the first check only

        normal = normalise(number)
        if normal is None:
            raise ValueError(f"not a phone number the worker can send to: {number!r} ({problem(number)})")
        return self._store.suppressed([normal])[0]

    def cancel(self, message_id: str | None = None, *, id: str | None = None) -> CancelAnswer:
        """Cancel a scheduled message, or a queued one no dispatcher has submitted yet (worker.cancel).

        `answer.outcome` says what happened: CANCELLED (never sent; a `cancelled` event is
        published), NOT_CANCELLABLE (`answer.state` says where it is; nothing changed) or UNKNOWN."""
        self._open()
        if (message_id is None) == (id is None):
            raise TypeError("cancel takes a message id or a producer id (id=...)")
        return cancel(self._store, self._cancel, message_id=message_id, producer_id=id)

    # --- lifetime -----------------------------------------------------------------------------------
    def close(self) -> None:
        """Close the connection pool (idempotent); the client refuses calls afterwards."""
        if not self._closed:
            self._closed = True
            self._store.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()
