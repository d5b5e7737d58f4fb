"""Where one message is: its hash, or its outbox entry while no dispatcher has submitted it yet.

A message gets its hash (`{p}:msg:{id}`) when a dispatcher submits it, or when it is scheduled or
replayed; until then it is only an outbox entry, found the way cancel finds it
(worker.store.schedule: one XRANGE for a message id derived from its entry, a bounded search
around the time in an id given at enqueue).

The hash is read again after an outbox search that found nothing: a dispatcher may have submitted
and settled the message (deleting its entry) during the search, and submit.lua writes the hash
before settle.lua deletes the entry, so the second read sees it. A message is therefore never
answered "unknown" while it exists.

The reads are sans-I/O steps (`locate_steps`), driven by `LookupOps` with redis-py here and by
worker.store.aio's `AsyncStore` with redis.asyncio, so both clients answer alike.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass
from typing import Any, TypeVar

from worker.store import resp
from worker.store.base import StoreBase
from worker.store.keys import Keys
from worker.store.schedule import locate_unrecorded

Command = tuple[Any, ...]
T = TypeVar("T")
Steps = Generator[Command, Any, T]


@dataclass(frozen=True, slots=True)
class Located:
    """What the store holds of one message: its hash (without the job, which holds the number and
    text), or, while it has no hash, whether its outbox entry exists."""

    message_id: str
    lane: str | None
    fields: dict[str, str]
    in_outbox: bool


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def hash_fields(reply: Any) -> dict[str, str]:
    """HGETALL's reply (a dict, or a flat list from a client that did not parse it) as text,
    without the job."""
    if isinstance(reply, list):
        reply = {reply[i]: reply[i + 1] for i in range(0, len(reply), 2)}
    fields = {_text(k): _text(v) for k, v in (reply or {}).items()}
    fields.pop("job", None)
    return fields


def locate_steps(keys: Keys, message_id: str) -> Steps[Located]:
    """The commands that find one message (see the module docstring)."""
    fields = hash_fields((yield ("HGETALL", keys.msg(message_id))))
    if fields:
        return Located(message_id, fields.get("lane"), fields, False)
    located = yield from locate_unrecorded(keys, message_id)
    if located is not None:
        return Located(message_id, located[0], {}, True)
    fields = hash_fields((yield ("HGETALL", keys.msg(message_id))))
    return Located(message_id, fields.get("lane"), fields, False)


def message_id_steps(keys: Keys, producer_id: str) -> Steps[str | None]:
    """The message id a producer id was queued as, while its claim lives (SMS_IDEMPOTENCY_TTL_S)."""
    found = yield ("GET", keys.idem(producer_id))
    return None if found is None else _text(found)


def drive(client: Any, steps: Steps[T]) -> T:
    """Run sans-I/O steps on a redis-py client, one command per round trip."""
    with resp.redis_errors():
        try:
            command = steps.send(None)
            while True:
                command = steps.send(client.execute_command(*command))
        except StopIteration as done:
            answer: T = done.value
            return answer


class LookupOps(StoreBase):
    """Synchronous reads of where a message is; shares a Store's client (`LookupOps(client, prefix, ...)`)."""

    def locate(self, message_id: str) -> Located:
        return drive(self.r, locate_steps(self, message_id))

    def message_id_of(self, producer_id: str) -> str | None:
        return drive(self.r, message_id_steps(self, producer_id))
