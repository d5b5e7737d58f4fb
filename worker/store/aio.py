"""The producer's store on redis.asyncio: enqueue, kicks and message lookups that never block the loop.

The same writes as the synchronous `Store` (worker/store/outbox.py: MULTI/EXEC chunks of an XADD
and a SET NX GET per job, two chunks in flight, repeats and half-written jobs undone after), packed
and answered by the same pure helpers, so both flavours write and answer alike; only the socket
I/O differs. It is not joined into `Store`: a producer's event loop holds this one on its own.

The replies are parsed from the connection's StreamReader with a hiredis Reader of our own, as
worker/store/resp.py does with the socket (redis.asyncio's pipeline spends ~10 us of Python per
command). A call cancelled or failed with a chunk in flight disconnects its connection, never
returning a half-read one to the pool, and leaves unknown what was written (as a lost connection
does for the synchronous store: only a retry with producer ids is safe then).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import secrets
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import hiredis
import redis
import redis.asyncio

from worker.store import resp
from worker.store.keys import Keys
from worker.store.lookup import Located, Steps, T, locate_steps, message_id_steps
from worker.store.outbox import (
    CAMPAIGN_TTL_S,
    ENQUEUE_CHUNK,
    _answers,
    _ChunkPacker,
    _Enqueue,
    _read_chunk,
    _undo_commands,
)
from worker.store.schedule import CancelAnswer, cancel_steps

# The same timeouts as worker.store.base.connect.
SOCKET_TIMEOUT_S = 30.0


def connect_async(url: str, **kwargs: Any) -> redis.asyncio.Redis:
    """One asyncio client (and its connection pool) per event loop."""
    return redis.asyncio.Redis.from_url(
        url, socket_connect_timeout=5, socket_timeout=SOCKET_TIMEOUT_S, health_check_interval=30,
        retry_on_timeout=False, **kwargs,
    )


async def _read_replies(conn: Any, reader: hiredis.Reader, count: int) -> list[Any]:
    """`count` replies off an asyncio connection's stream (see resp.read_replies)."""
    replies: list[Any] = []
    stream = conn._reader  # redis.asyncio keeps the StreamReader here; its own parser is bypassed
    while len(replies) < count:
        reply = reader.gets()
        if reply is not False:
            replies.append(reply)
            continue
        async with asyncio.timeout(SOCKET_TIMEOUT_S):
            data = await stream.read(1 << 16)
        if not data:
            raise redis.ConnectionError("connection closed by Redis")
        reader.feed(data)
    return replies


async def _send(conn: Any, data: bytes) -> None:
    """Write packed commands to a pooled (so connected) asyncio connection.

    Straight to its StreamWriter, not through `send_packed_command`: that wraps the write in
    asyncio.wait_for, which on Python 3.11 loses a cancellation that arrives as the write
    completes (the call then carried on as if never cancelled)."""
    writer = conn._writer  # redis.asyncio keeps the StreamWriter here, next to the reader
    if writer is None:
        raise redis.ConnectionError("connection to Redis is closed")
    writer.write(data)
    async with asyncio.timeout(SOCKET_TIMEOUT_S):
        await writer.drain()


class AsyncStore(Keys):
    """What a producer does in Redis, awaited: enqueue, kick a lane, read a message."""

    def __init__(self, client: redis.asyncio.Redis, prefix: str = "sms", message_id_prefix: str = "sw") -> None:
        super().__init__(prefix, message_id_prefix)
        # As in StoreBase: replies are bytes (decode_responses off), treated as untyped here.
        self.r: Any = client
        self._tag = secrets.token_hex(4)
        self._counter = itertools.count()

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[tuple[Any, hiredis.Reader]]:
        """A pooled connection whose replies we parse ourselves (see resp.connection)."""
        pool = self.r.connection_pool
        with resp.redis_errors():
            conn = await pool.get_connection()
            try:
                yield conn, hiredis.Reader()
            except OSError as error:  # our own reads bypass redis-py (a timeout is an OSError too)
                await conn.disconnect(nowait=True)
                raise redis.ConnectionError(f"connection to Redis lost: {error!r}") from error
            except BaseException:
                # Cancelled or failed with replies unread: a half-read connection must not be reused.
                await conn.disconnect(nowait=True)
                raise
            finally:
                await pool.release(conn)

    async def enqueue(
        self, lane: str, jobs: Sequence[tuple[bytes, str | None]], idempotency_ttl_s: int = 172_800,
        chunk: int = ENQUEUE_CHUNK, *, campaigns: Sequence[str | None] | None = None,
        state_ttl_s: int = CAMPAIGN_TTL_S,
    ) -> list[tuple[str, bool]]:
        """Store.enqueue, awaited: the same transactions, campaign counters, answers and EnqueueIncomplete."""
        call = _Enqueue(self.outbox(lane), self.lane_prefix(lane), self.idem(""), jobs, campaigns=campaigns,
                        campaign_prefix=self.campaign(""))
        packer = _ChunkPacker(call.outbox, call.idem, idempotency_ttl_s, self.campaign(""), self.campaigns,
                              state_ttl_s)
        async with self._connection() as (conn, reader):
            in_flight: list[tuple[int, list[str | None], int]] = []
            for start in range(0, len(jobs), chunk):
                mid_base = f"{call.prefix}{int(time.time() * 1000)}-p{self._tag}"
                packed, mids, count = packer.pack(jobs[start : start + chunk], mid_base, self._counter,
                                                  None if campaigns is None else campaigns[start : start + chunk])
                await _send(conn, packed)
                in_flight.append((start, mids, count))
                # Awaiting a stream that has data (Redis answers fast) never suspends: without
                # this, a call of 100k jobs held the loop for its whole length (~0.5 s).
                await asyncio.sleep(0)
                if len(in_flight) == 2:
                    first, first_mids, first_count = in_flight.pop(0)
                    _read_chunk(call, await _read_replies(conn, reader, first_count), first, first_mids)
                    if call.failure is not None:
                        break  # send no more; the chunk in flight is still read and reported
            for start, mids, count in in_flight:
                _read_chunk(call, await _read_replies(conn, reader, count), start, mids)
            undo = _undo_commands(call)
            if undo:
                await _send(conn, resp.pack(undo))
                resp.check(await _read_replies(conn, reader, len(undo)))
        return _answers(call)

    async def try_kick(self, lane: str, dedupe_ms: int) -> bool:
        """LaneOps.try_kick: True for the one caller per `dedupe_ms` that should send a dispatch message."""
        with resp.redis_errors():
            return bool(await self.r.set(self.kick_key(lane), b"1", nx=True, px=max(1, dedupe_ms)))

    async def run(self, steps: Steps[T]) -> T:
        """Run sans-I/O steps (worker.store.lookup, worker.store.schedule's cancel) on this client."""
        with resp.redis_errors():
            try:
                command = steps.send(None)
                while True:
                    command = steps.send(await self.r.execute_command(*command))
            except StopIteration as done:
                answer: T = done.value
                return answer

    async def locate(self, message_id: str) -> Located:
        """LookupOps.locate, awaited (worker/store/lookup.py says how a message is found)."""
        return await self.run(locate_steps(self, message_id))

    async def message_id_of(self, producer_id: str) -> str | None:
        return await self.run(message_id_steps(self, producer_id))

    async def cancel(self, *, message_id: str | None = None, producer_id: str | None = None, events_maxlen: int,
                     state_ttl_s: int) -> CancelAnswer:
        """ScheduleOps.cancel, awaited: the same steps, decided by the same cancel.lua."""
        return await self.run(cancel_steps(self, message_id=message_id, producer_id=producer_id,
                                           events_maxlen=events_maxlen, state_ttl_s=state_ttl_s))

    async def ping(self) -> None:
        with resp.redis_errors():
            await self.r.ping()

    async def close(self) -> None:
        await self.r.aclose()
