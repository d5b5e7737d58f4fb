"""The dead-letter store: list, show, replay (keeping the messageId) and purge failed jobs.

A replay is refused, with the reason, when it cannot do any good (see `refusals`): a report dead
letter has no job; a job that fails validation, goes to a lane nobody configured, or was refused
by the provider as it is would only be dead-lettered again (an operator may insist: `force`); a
message that moved on since, or whose producer id another message owns now, must not be sent.
Each replay publishes a `requeued` event, so consumers know the `failed` before it was not final.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import redis

from worker import events
from worker.errors import JobValidationError, SmsWorkerError
from worker.models import validate_job
from worker.settings import Settings
from worker.store import Store, redis_errors

# A replay is one transaction guarded by WATCH on the dead-letter stream (so two operators cannot
# both queue the same dead letter); workers dead-lettering meanwhile abort it, and it is retried.
WATCH_TRIES = 50


@dataclass(frozen=True)
class DeadLetter:
    dlq_id: str
    message_id: str
    lane: str
    reason: str
    detail: str
    attempts: int
    at: str
    job: str
    last_answer: Any

    @classmethod
    def from_entry(cls, dlq_id: str, fields: dict[bytes, bytes]) -> DeadLetter:
        data = orjson.loads(fields.get(b"entry", b"{}"))
        return cls(
            dlq_id=dlq_id,
            message_id=fields.get(b"message_id", b"").decode(),
            lane=str(data.get("lane", "")),
            reason=str(data.get("reason", "")),
            detail=str(data.get("detail", "")),
            attempts=int(data.get("attempts", 0)),
            at=str(data.get("at", "")),
            job=str(data.get("job", "")),
            last_answer=data.get("last_answer"),
        )

    @property
    def is_job(self) -> bool:
        """Report dead letters (malformed pages, unknown statuses...) have no lane and no job."""
        return bool(self.lane)

    def as_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


@dataclass(frozen=True)
class Refusal:
    """Why a dead letter is not replayed. `forceable`: the operator may replay it anyway."""

    item: DeadLetter
    why: str
    forceable: bool


def _job_of(item: DeadLetter) -> dict[str, Any] | None:
    try:
        job = orjson.loads(item.job)
    except orjson.JSONDecodeError:
        return None
    return job if isinstance(job, dict) else None


class DeadLetters:
    def __init__(self, store: Store, settings: Settings) -> None:
        self.store = store
        self.settings = settings

    def iterate(self, *, lane: str | None = None, reason: str | None = None,
                since_ms: int | None = None, before_ms: int | None = None) -> Iterator[DeadLetter]:
        start = f"{since_ms}-0" if since_ms else "-"
        end = f"({before_ms}-0" if before_ms else "+"
        while True:
            with redis_errors():
                page = self.store.r.xrange(self.store.dlq, start, end, count=500)
            for raw_id, fields in page:
                item = DeadLetter.from_entry(raw_id.decode(), fields)
                if (lane is None or item.lane == lane) and (reason is None or item.reason == reason):
                    yield item
            if len(page) < 500:
                return
            start = "(" + page[-1][0].decode()

    def get(self, dlq_id_or_message_id: str) -> DeadLetter | None:
        with redis_errors():
            page = self.store.r.xrange(self.store.dlq, dlq_id_or_message_id, dlq_id_or_message_id) if (
                "-" in dlq_id_or_message_id and dlq_id_or_message_id.replace("-", "").isdigit()
            ) else []
        if page:
            return DeadLetter.from_entry(page[0][0].decode(), page[0][1])
        return next((d for d in self.iterate() if d.message_id == dlq_id_or_message_id), None)

    def refusals(self, items: Sequence[DeadLetter], *, lane: str | None = None) -> dict[str, Refusal]:
        """The dead letters (by dlq_id) a replay onto `lane` (default: each one's own) cannot help."""
        jobs = [i for i in items if i.is_job]
        with redis_errors():
            pipe = self.store.r.pipeline(transaction=False)
            for item in jobs:
                job = _job_of(item) or {}
                pipe.hget(self.store.msg(item.message_id), "state")
                if job.get("id") is not None:
                    pipe.get(self.store.idem(str(job["id"])))
                else:
                    pipe.echo(b"")
            replies = pipe.execute()
        found = {i.dlq_id: Refusal(i, f"a delivery-report dead letter ({i.detail[:120]}), not a job: there is "
                                   f"nothing to send; read it with `sms-worker dlq show {i.dlq_id}`, then purge it",
                                   forceable=False)
                 for i in items if not i.is_job}
        for n, item in enumerate(jobs):
            state, owner = replies[2 * n], replies[2 * n + 1]
            why = self._refusal(item, lane or item.lane, state.decode() if state else None,
                                owner.decode() if owner else None)
            if why is not None:
                found[item.dlq_id] = Refusal(item, why[0], forceable=why[1])
        return found

    def _refusal(self, item: DeadLetter, lane: str, state: str | None, owner: str | None) -> tuple[str, bool] | None:
        if state not in (None, "FAILED"):
            return f"message {item.message_id} is {state} now, not FAILED: a replay would send it again", True
        if owner and owner != item.message_id:
            return (f"its producer id is message {owner}'s now (the producer queued it again): a replay would "
                    f"be dropped as a duplicate", False)
        if lane not in self.settings.sms_lanes:
            return (f"lane {lane!r} is not configured (SMS_LANES: {', '.join(self.settings.sms_lanes)}): it would "
                    f"be dead-lettered again as unknown_lane; replay it onto a configured lane with --to-lane", True)
        job = _job_of(item)
        try:
            if job is None:
                raise JobValidationError([])
            validate_job(job, max_text_parts=self.settings.sms_max_text_parts,
                         metadata_max_bytes=self.settings.sms_metadata_max_bytes)
        except JobValidationError as error:
            problem = "; ".join(str(p) for p in error.problems) or "the job is not a JSON object"
            return (f"the job fails validation again ({problem}): it would be dead-lettered again as invalid_job; "
                    f"fix the producer and enqueue a corrected job", True)
        if item.reason == "bad_request":
            return (f"the provider refused this exact content ({item.detail[:160]}) and a replay sends it "
                    f"unchanged: fix it at the producer, or --force if the cause was fixed at the provider", True)
        return None

    def replay(self, item: DeadLetter, *, new_message_id: bool = False, lane: str | None = None) -> str:
        """Queue the job again on `lane` (default: its own), by default with its messageId, so the
        provider refuses a double; publish `requeued` and remove the dead letter, in one step.

        Returns the message id it is queued under. The message goes back to QUEUED (the only way
        out of FAILED). Under a new message id, the job's producer id (if any) is handed to the new
        message, or the dispatcher would drop it as a repeat of the old one.
        """
        if not item.is_job:
            raise SmsWorkerError(f"dead letter {item.dlq_id} ({item.reason}) is not a job and cannot be replayed")
        target = lane or item.lane
        job = _job_of(item)
        producer_id = None if job is None or job.get("id") is None else str(job["id"])
        mid = item.message_id
        if new_message_id:
            mid = f"{self.store.lane_prefix(target)}{events.now_ms()}-r{secrets.token_hex(4)}"
        event = events.requeued(item.message_id, job, lane=target, reason=item.reason, replay_id=item.dlq_id,
                                requeued_as=mid if new_message_id else None)
        watched = [self.store.dlq] + ([self.store.idem(producer_id)] if new_message_id and producer_id else [])
        with redis_errors(), self.store.r.pipeline(transaction=True) as pipe:
            for _ in range(WATCH_TRIES):
                try:
                    pipe.watch(*watched)
                    if not pipe.xrange(self.store.dlq, item.dlq_id, item.dlq_id):
                        raise SmsWorkerError(f"dead letter {item.dlq_id} is gone (replayed or purged meanwhile)")
                    if len(watched) > 1:
                        owner = pipe.get(watched[1])
                        if owner is not None and owner.decode() != item.message_id:
                            raise SmsWorkerError(f"dead letter {item.dlq_id}: its producer id is message "
                                                 f"{owner.decode()}'s now; not replayed")
                    pipe.multi()
                    pipe.xadd(self.store.outbox(target), {"job": item.job, "mid": mid})
                    if new_message_id:
                        if producer_id:
                            pipe.set(watched[1], mid, ex=self.settings.sms_idempotency_ttl_s)
                    else:
                        pipe.hset(self.store.msg(mid), mapping={"state": "QUEUED", "lane": target, "job": item.job})
                    pipe.xadd(self.store.events, {"event": event}, maxlen=self.settings.sms_events_stream_maxlen,
                              approximate=True)
                    pipe.xdel(self.store.dlq, item.dlq_id)
                    pipe.execute()
                    return mid
                except redis.WatchError:
                    continue
        raise SmsWorkerError(f"dead letter {item.dlq_id}: the dead letters kept changing; not replayed, try again")

    def purge(self, items: Sequence[DeadLetter]) -> int:
        purged = 0
        with redis_errors():
            for start in range(0, len(items), 1000):
                purged += int(self.store.r.xdel(self.store.dlq, *[i.dlq_id for i in items[start : start + 1000]]))
        return purged
