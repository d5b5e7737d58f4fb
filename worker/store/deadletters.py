"""The dead-letter stream: reading pages of it, the replay transaction, and purging.

What a dead letter says (its JSON) is worker/deadletters.py's; this module only moves entries.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

import redis

from worker.store import resp
from worker.store.base import StoreBase, load_script

# A replay is one transaction guarded by WATCH on the dead-letter stream (so two operators cannot
# both queue the same dead letter); workers dead-lettering meanwhile abort it, and it is retried.
WATCH_TRIES = 50

RawDeadLetter = tuple[str, dict[bytes, bytes]]


class ReplayOutcome(StrEnum):
    REPLAYED = "replayed"
    GONE = "gone"  # replayed or purged meanwhile
    TAKEN = "taken"  # the producer id belongs to another message now
    BUSY = "busy"  # the dead letters kept changing for WATCH_TRIES tries


@dataclass(frozen=True)
class ReplayAnswer:
    outcome: ReplayOutcome
    owner: str | None = None  # for TAKEN: the message the producer id belongs to


@dataclass(frozen=True)
class Requeue:
    """What a replay writes, in one transaction with the dead letter's removal."""

    dlq_id: str
    lane: str
    job: str  # the job JSON as it was dead-lettered
    message_id: str  # the id it is queued under (new, or the dead letter's own)
    event: bytes  # the `requeued` status event
    # Under a new message id: the producer id handed over to it (None: the job has none).
    handover_id: str | None
    new_message_id: bool
    original_message_id: str
    idempotency_ttl_s: int
    events_maxlen: int


class DeadLetterOps(StoreBase):
    def dead_letter_page(self, start: str, end: str, count: int) -> list[RawDeadLetter]:
        """Up to `count` dead letters from `start` to `end` (XRANGE bounds: "-", "+", "(id")."""
        with resp.redis_errors():
            page = self.r.xrange(self.dlq, start, end, count=count)
        return [(raw_id.decode(), fields) for raw_id, fields in page]

    def dead_letter(self, dlq_id: str) -> RawDeadLetter | None:
        page = self.dead_letter_page(dlq_id, dlq_id, 1)
        return page[0] if page else None

    def replay_checks(self, pairs: Sequence[tuple[str, str | None]]) -> list[tuple[str | None, str | None]]:
        """For each (message id, producer id or None): (its state, the message its producer id
        belongs to), None where there is none; one round trip."""
        with resp.redis_errors():
            pipe = self.r.pipeline(transaction=False)
            for message_id, producer_id in pairs:
                pipe.hget(self.msg(message_id), "state")
                if producer_id is not None:
                    pipe.get(self.idem(producer_id))
                else:
                    pipe.echo(b"")
            replies = pipe.execute()
        return [(_text(replies[2 * n]), _text(replies[2 * n + 1])) for n in range(len(pairs))]

    def replay_dead_letter(self, requeue: Requeue) -> ReplayAnswer:
        """Queue the job again, publish its event and remove the dead letter, all or nothing."""
        r = requeue
        watched = [self.dlq] + ([self.idem(r.handover_id)] if r.new_message_id and r.handover_id else [])
        with resp.redis_errors(), self.r.pipeline(transaction=True) as pipe:
            for _ in range(WATCH_TRIES):
                try:
                    pipe.watch(*watched)
                    if not pipe.xrange(self.dlq, r.dlq_id, r.dlq_id):
                        return ReplayAnswer(ReplayOutcome.GONE)
                    if len(watched) > 1:
                        owner = pipe.get(watched[1])
                        if owner is not None and owner.decode() != r.original_message_id:
                            return ReplayAnswer(ReplayOutcome.TAKEN, owner.decode())
                    pipe.multi()
                    pipe.xadd(self.outbox(r.lane), {"job": r.job, "mid": r.message_id})
                    if r.new_message_id:
                        if r.handover_id:
                            pipe.set(watched[1], r.message_id, ex=r.idempotency_ttl_s)
                    else:
                        pipe.eval(load_script("requeue"), 1, self.msg(r.message_id), r.lane, r.job, r.dlq_id)
                    pipe.xadd(self.events, {"event": r.event}, maxlen=r.events_maxlen, approximate=True)
                    pipe.xdel(self.dlq, r.dlq_id)
                    pipe.execute()
                    return ReplayAnswer(ReplayOutcome.REPLAYED)
                except redis.WatchError:
                    continue
        return ReplayAnswer(ReplayOutcome.BUSY)

    def purge_dead_letters(self, dlq_ids: Sequence[str]) -> int:
        """Delete these dead letters (1000 ids per XDEL); how many there were."""
        purged = 0
        with resp.redis_errors():
            for start in range(0, len(dlq_ids), 1000):
                purged += int(self.r.xdel(self.dlq, *dlq_ids[start : start + 1000]))
        return purged


def _text(value: bytes | None) -> str | None:
    return value.decode() if value else None
