"""The asyncio producer client: the same methods and validation as `Client`, awaited, never blocking the loop.

    from worker.client import AsyncClient

    async with AsyncClient.from_env() as sms:
        await sms.send("41793026727", "Your code is 123456", lane="otp", id="otp-8812")

Every Redis call of a send, a status or a cancel goes through redis.asyncio (worker.store.aio's
AsyncStore, one connection pool). The jobs are checked by the same Outbox as the synchronous
client's (its `prepare` / `prepare_many`, never its write), so both refuse the same jobs with the
same errors; a big `send_many` is checked a slice at a time with the loop served in between.

The blocking calls left run in worker threads (`asyncio.to_thread`) over a small redis-py
client of its own: Dramatiq's (its broker has no asyncio flavour; the wake-up's de-duplicating
kick is awaited here, and only the caller that won it, one per lane per 20 ms, sends the Dramatiq
message), and a call holding a job due later, which takes the Outbox's own write (see `_write`).

An AsyncClient belongs to the event loop it was first used on (redis.asyncio's pool does).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from types import TracebackType
from typing import Any

from worker.campaigns import Campaign
from worker.cancel import CancelAnswer
from worker.client.common import ClientConfig, MessageStatus, make_job
from worker.client.sync import make_producer_broker
from worker.errors import EnqueueIncomplete, JobValidationError, Problem, StoreError
from worker.models import Job
from worker.outbox import Enqueued, Outbox
from worker.settings import Settings, load_settings
from worker.store import Store, connect
from worker.store.aio import AsyncStore, connect_async
from worker.store.campaigns import campaign_steps
from worker.store.suppression import suppressed_steps
from worker.triggers import DISPATCH, KICK_DEDUPE_MS, Triggers, lane_queue

log = logging.getLogger(__name__)

# Jobs checked between two turns of the event loop (~2-3 ms of validation).
CHECK_SLICE = 1000


class AsyncClient:
    """A producer's asyncio handle on the SMS worker; see the module docstring. `await close()` it
    (or use `async with`)."""

    def __init__(
        self, redis_url: str | None = None, *, prefix: str | None = None, message_id_prefix: str | None = None,
        lanes: Sequence[str] | None = None, default_lane: str | None = None, wake: bool = True,
        config: ClientConfig | None = None,
    ) -> None:
        """As `Client`: explicit arguments (left out: the worker's defaults), or a whole `config`.
        Nothing connects until the first call."""
        self.config = config or ClientConfig.of(
            redis_url, prefix=prefix, message_id_prefix=message_id_prefix, lanes=lanes, default_lane=default_lane
        )
        self._store = AsyncStore(connect_async(self.config.redis_url), self.config.prefix,
                                 self.config.message_id_prefix)
        # redis-py, used only in worker threads: for the Dramatiq wake-up, and for calls holding
        # jobs due later (see _write). Its pool connects on first use.
        sync_redis = connect(self.config.redis_url)
        self._sync_store = Store(sync_redis, self.config.prefix, self.config.message_id_prefix)
        self._triggers = Triggers(self._sync_store, make_producer_broker(self.config, sync_redis)) if wake else None
        # The door's checks (prepare); its own write only for calls holding jobs due later, and
        # without its wake-up (ours is awaited).
        self._outbox = Outbox(self.config.outbox, self._sync_store)
        self._closed = False

    @classmethod
    def from_settings(cls, settings: Settings, *, wake: bool = True) -> AsyncClient:
        return cls(config=ClientConfig.from_settings(settings), wake=wake)

    @classmethod
    def from_env(cls, *, wake: bool = True) -> AsyncClient:
        """From the environment (and env file) the worker reads; ConfigError names every wrong variable."""
        return cls.from_settings(load_settings(), wake=wake)

    def _open(self) -> None:
        if self._closed:
            raise RuntimeError("this sms client is closed")

    # --- sending ------------------------------------------------------------------------------------
    async def send(
        self, to: str, text: str | None = None, *, lane: str | None = None, id: str | None = None,
        metadata: Mapping[str, Any] | None = None, sender: str | None = None,
        send_at: datetime | str | None = None, **fields: Any,
    ) -> Enqueued:
        """Client.send, awaited. Cancelled while its write is in flight, it leaves unknown whether
        the job was written (retrying with the same `id` is safe)."""
        self._open()
        job = make_job(to, text, id=id, metadata=metadata, sender=sender, send_at=send_at, fields=fields)
        lane, encoded = self._outbox.prepare(job, lane)
        [(mid, queued)] = await self._write(lane, encoded, [job], later=bool(Outbox.due_later(encoded)),
                                            campaigns=Outbox.campaigns_of(encoded))
        return Enqueued(mid, lane, queued)

    async def send_many(self, jobs: Iterable[Job | Mapping[str, Any]], lane: str | None = None) -> list[Enqueued]:
        """Client.send_many, awaited: all or nothing, the same errors and EnqueueIncomplete."""
        self._open()
        jobs = list(jobs)
        encoded: list[tuple[bytes, str | None]] = []
        problems: list[Problem] = []
        lane_name, later = "", False
        campaigns: list[str | None] = []
        counted = False  # whether any job names a campaign
        for start in range(0, max(1, len(jobs)), CHECK_SLICE):
            if start:
                await asyncio.sleep(0)  # let the loop run between slices
            try:
                lane_name, part = self._outbox.prepare_many(jobs[start : start + CHECK_SLICE], lane, start)
            except JobValidationError as error:
                if error.problems and error.problems[0].field == "lane":
                    raise  # the lane is wrong for every slice: say it once
                problems += error.problems
                continue
            encoded += part
            later = later or bool(Outbox.due_later(part))
            part_campaigns = Outbox.campaigns_of(part)  # read here, a slice at a time, not in one go
            counted = counted or part_campaigns is not None
            campaigns += part_campaigns or [None] * len(part)
        if problems:
            raise JobValidationError(problems)
        answers = await self._write(lane_name, encoded, jobs, later=later, campaigns=campaigns if counted else None)
        sent: list[Enqueued] = []
        for start in range(0, len(answers), CHECK_SLICE):  # ~1 us an answer: sliced as well
            if start:
                await asyncio.sleep(0)
            sent += [Enqueued(mid, lane_name, queued) for mid, queued in answers[start : start + CHECK_SLICE]]
        return sent

    async def _write(
        self, lane: str, encoded: list[tuple[bytes, str | None]], jobs: Sequence[Job | Mapping[str, Any]], *,
        later: bool, campaigns: list[str | None] | None = None,
    ) -> list[tuple[str, bool]]:
        """AsyncStore.enqueue, then wake the lane if anything new was queued (as Outbox._write does).

        A call holding a job due `later` takes the Outbox's own write instead (the schedule, then
        the outbox, with its answers merged: worker.outbox), in a worker thread on redis-py, so
        one implementation decides how a mixed call is written and answered. That path checks the
        jobs again; scheduling is not the throughput path."""
        try:
            if later:
                done = await asyncio.to_thread(self._outbox.enqueue_many, jobs, lane)
                answers = [(sent.message_id, sent.queued) for sent in done]
            elif campaigns is not None:  # counted at enqueue in their campaigns, as the Outbox's write does
                answers = await self._store.enqueue(lane, encoded, self.config.outbox.idempotency_ttl_s,
                                                    campaigns=campaigns, state_ttl_s=self.config.outbox.state_ttl_s)
            else:
                answers = await self._store.enqueue(lane, encoded, self.config.outbox.idempotency_ttl_s)
        except EnqueueIncomplete as error:
            if any(answer is not None and answer[1] for answer in error.queued):
                await self._wake(lane)
            raise
        if any(queued for _, queued in answers):
            await self._wake(lane)
        return answers

    async def _wake(self, lane: str) -> None:
        # Written already: a failed wake must not fail the call (the clock wakes every lane anyway).
        if self._triggers is None:
            return
        try:
            if await self._store.try_kick(lane, KICK_DEDUPE_MS):
                await asyncio.to_thread(self._triggers.send, DISPATCH, lane, queue=lane_queue(lane))
        except StoreError as error:
            log.warning("sms client: could not wake lane %s (the clock will): %s", lane, error)

    # --- asking -------------------------------------------------------------------------------------
    async def status(self, message_id: str | None = None, *, id: str | None = None) -> MessageStatus:
        """Client.status, awaited."""
        self._open()
        if (message_id is None) == (id is None):
            raise TypeError("status takes a message id or a producer id (id=...)")
        if id is not None:
            message_id = await self._store.message_id_of(id)
            if message_id is None:
                return MessageStatus.unknown(None)
        assert message_id is not None
        return MessageStatus.of(await self._store.locate(message_id))

    async def campaign(self, campaign_id: str) -> Campaign | None:
        """Client.campaign, awaited."""
        self._open()
        return await self._store.run(campaign_steps(self._store, campaign_id))

    async def is_suppressed(self, number: str) -> bool:
        """Client.is_suppressed, awaited (normalising costs 4-20 us of CPU: it runs on the loop)."""
        self._open()
        from worker.numbers import normalise, problem  # phonenumbers: loaded by the first check only

        normal = normalise(number)
        if normal is None:
            raise ValueError(f"not a phone number the worker can send to: {number!r} ({problem(number)})")
        [found] = await self._store.run(suppressed_steps(self._store, [normal]))
        return found

    async def cancel(self, message_id: str | None = None, *, id: str | None = None) -> CancelAnswer:
        """Client.cancel, awaited: the same steps and the same atomic decision (cancel.lua)."""
        self._open()
        if (message_id is None) == (id is None):
            raise TypeError("cancel takes a message id or a producer id (id=...)")
        return await self._store.cancel(message_id=message_id, producer_id=id, events_maxlen=self.config.events_maxlen,
                                        state_ttl_s=self.config.state_ttl_s)

    # --- lifetime -----------------------------------------------------------------------------------
    async def close(self) -> None:
        """Close both connection pools (idempotent); the client refuses calls afterwards."""
        if not self._closed:
            self._closed = True
            await self._store.close()
            await asyncio.to_thread(self._sync_store.close)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        await self.close()
