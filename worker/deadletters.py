"""Dead letters: their one format (written by dispatch and reports, read here), and list, show,
replay (keeping the messageId) and purge.

The format: a dead-letter stream entry has `message_id` ("" for none) and `entry`, a JSON object
built by `job_dead_letter` (a job that failed: kind "job") or `report_dead_letter` (a delivery
report or page that could not be processed: kind "report"). Both carry kind, reason, detail, at,
lane and job (a report's lane and job are ""), so a reader needs no case for either.
`DeadLetter.from_entry` reads both, and letters written before `kind` existed (a lane means a job).

A replay is refused, with the reason, when it cannot do any good (see `refusals`): a report dead
letter has no job; a job that fails validation, goes to a lane nobody configured, or was refused
by the provider as it is would only be dead-lettered again (an operator may insist: `force`); a
message that moved on since, or whose producer id another message owns now, must not be sent.
Each replay publishes a `requeued` event, so consumers know the `failed` before it was not final.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any, Final

import orjson

from worker import events
from worker.errors import JobValidationError, SmsWorkerError
from worker.models import validate_job
from worker.settings import Settings
from worker.store import Store
from worker.store.deadletters import ReplayOutcome, Requeue

PAGE = 500  # dead letters per XRANGE while iterating
# How deep a report dead letter keeps a body orjson cannot write whole (it stops at 254 levels);
# worker.reports bounds what it accepts at the same depth (MAX_DEPTH).
CLIP_DEPTH: Final = 32


class DeadLetterKind(StrEnum):
    JOB = "job"  # a job that failed for good: it can be replayed
    REPORT = "report"  # a delivery report or report page that could not be processed: nothing to send


# --- the format ------------------------------------------------------------------------------------
def job_dead_letter(*, message_id: str, lane: str, entry_id: str, reason: str, detail: str, attempts: int,
                    job: bytes | str, last_answer: object = None) -> bytes:
    """The `entry` JSON of a failed job's dead letter. `job` is the outbox entry's job as queued
    (kept whole, even when it is not valid JSON, so a replay sends exactly that); `last_answer`
    the provider's last answer, if it gave one."""
    return orjson.dumps({
        "kind": DeadLetterKind.JOB, "message_id": message_id, "lane": lane, "entry_id": entry_id,
        "reason": reason, "detail": detail, "attempts": attempts, "last_answer": last_answer,
        "at": events.now_iso(), "job": job.decode("utf-8", "replace") if isinstance(job, bytes) else job,
    }, default=str)


def report_dead_letter(reason: str, detail: str, source: str, raw_entry: str, /, **extras: Any) -> bytes:
    """The `entry` JSON of a report dead letter: where it came from (`source`: drain, webhook,
    logs...; `raw_entry`: the raw report stream entry), and `extras` such as the item or page."""
    entry = {"kind": DeadLetterKind.REPORT, "reason": reason, "detail": detail, "source": source,
             "raw_entry": raw_entry, "at": events.now_iso(), "lane": "", "job": "", **extras}
    try:
        return orjson.dumps(entry, default=str)
    except TypeError:  # orjson.JSONEncodeError: nested deeper than orjson writes (254 levels)
        return orjson.dumps({**entry, **{k: clip(v) for k, v in extras.items()}}, default=str)


def clip(value: Any, depth: int = CLIP_DEPTH) -> Any:
    """A copy of `value` cut at `depth` levels, for dead letters of bodies orjson cannot write whole."""
    if type(value) not in (dict, list):
        return value
    if depth <= 0:
        return f"<cut: nested deeper than {CLIP_DEPTH} levels>"
    if type(value) is dict:
        return {key: clip(child, depth - 1) for key, child in value.items()}
    return [clip(child, depth - 1) for child in value]


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
    kind: DeadLetterKind = DeadLetterKind.JOB

    @classmethod
    def from_entry(cls, dlq_id: str, fields: dict[bytes, bytes]) -> DeadLetter:
        data = orjson.loads(fields.get(b"entry", b"{}"))
        lane = str(data.get("lane", ""))
        return cls(
            dlq_id=dlq_id,
            message_id=fields.get(b"message_id", b"").decode(),
            lane=lane,
            reason=str(data.get("reason", "")),
            detail=str(data.get("detail", "")),
            attempts=int(data.get("attempts", 0)),
            at=str(data.get("at", "")),
            job=str(data.get("job", "")),
            last_answer=data.get("last_answer"),
            kind=_kind(data.get("kind"), lane),
        )

    @property
    def is_job(self) -> bool:
        """Report dead letters (malformed pages, unknown statuses...) have no lane and no job."""
        return self.kind is DeadLetterKind.JOB and bool(self.lane)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _kind(written: object, lane: str) -> DeadLetterKind:
    if isinstance(written, str) and written in tuple(DeadLetterKind):
        return DeadLetterKind(written)
    # A letter from before `kind` was written: only jobs had a lane.
    return DeadLetterKind.JOB if lane else DeadLetterKind.REPORT


# --- list, show, replay, purge ---------------------------------------------------------------------
@dataclass(frozen=True)
class Refusal:
    """Why a dead letter is not replayed. `forceable`: the operator may replay it anyway."""

    item: DeadLetter
    why: str
    forceable: bool


@dataclass(frozen=True)
class DeadLettersConfig:
    lanes: tuple[str, ...]  # the configured lanes, in SMS_LANES order
    max_text_parts: int
    metadata_max_bytes: int
    idempotency_ttl_s: int
    events_maxlen: int

    @classmethod
    def from_settings(cls, settings: Settings) -> DeadLettersConfig:
        return cls(lanes=tuple(settings.sms_lanes), max_text_parts=settings.sms_max_text_parts,
                   metadata_max_bytes=settings.sms_metadata_max_bytes,
                   idempotency_ttl_s=settings.sms_idempotency_ttl_s,
                   events_maxlen=settings.sms_events_stream_maxlen)


def _job_of(item: DeadLetter) -> dict[str, Any] | None:
    try:
        job = orjson.loads(item.job)
    except orjson.JSONDecodeError:
        return None
    return job if isinstance(job, dict) else None


def _producer_id(item: DeadLetter) -> str | None:
    job = _job_of(item)
    return None if job is None or job.get("id") is None else str(job["id"])


def _is_entry_id(text: str) -> bool:
    """A stream entry id (`1764230000000-0`), as opposed to a messageId."""
    return "-" in text and text.replace("-", "").isdigit()


class DeadLetters:
    def __init__(self, store: Store, config: DeadLettersConfig) -> None:
        self.store = store
        self.config = config

    def iterate(self, *, lane: str | None = None, reason: str | None = None,
                since_ms: int | None = None, before_ms: int | None = None) -> Iterator[DeadLetter]:
        start = f"{since_ms}-0" if since_ms else "-"
        end = f"({before_ms}-0" if before_ms else "+"
        while True:
            page = self.store.dead_letter_page(start, end, PAGE)
            for dlq_id, fields in page:
                item = DeadLetter.from_entry(dlq_id, fields)
                if (lane is None or item.lane == lane) and (reason is None or item.reason == reason):
                    yield item
            if len(page) < PAGE:
                return
            start = "(" + page[-1][0]

    def get(self, dlq_id_or_message_id: str) -> DeadLetter | None:
        raw = self.store.dead_letter(dlq_id_or_message_id) if _is_entry_id(dlq_id_or_message_id) else None
        if raw is not None:
            return DeadLetter.from_entry(*raw)
        return next((d for d in self.iterate() if d.message_id == dlq_id_or_message_id), None)

    def refusals(self, items: Sequence[DeadLetter], *, lane: str | None = None) -> dict[str, Refusal]:
        """The dead letters (by dlq_id) a replay onto `lane` (default: each one's own) cannot help."""
        jobs = [i for i in items if i.is_job]
        checks = self.store.replay_checks([(i.message_id, _producer_id(i)) for i in jobs])
        found = {i.dlq_id: Refusal(i, f"a delivery-report dead letter ({i.detail[:120]}), not a job: there is "
                                   f"nothing to send; read it with `sms-worker dlq show {i.dlq_id}`, then purge it",
                                   forceable=False)
                 for i in items if not i.is_job}
        for item, (state, owner) in zip(jobs, checks, strict=True):
            why = self._refusal(item, lane or item.lane, state, owner)
            if why is not None:
                found[item.dlq_id] = Refusal(item, why[0], forceable=why[1])
        return found

    def _refusal(self, item: DeadLetter, lane: str, state: str | None, owner: str | None) -> tuple[str, bool] | None:
        if state not in (None, "FAILED"):
            return f"message {item.message_id} is {state} now, not FAILED: a replay would send it again", True
        if owner and owner != item.message_id:
            return (f"its producer id is message {owner}'s now (the producer queued it again): a replay would "
                    f"be dropped as a duplicate", False)
        if lane not in self.config.lanes:
            return (f"lane {lane!r} is not configured (SMS_LANES: {', '.join(self.config.lanes)}): it would "
                    f"be dead-lettered again as unknown_lane; replay it onto a configured lane with --to-lane", True)
        problem = self._invalid(item)
        if problem is not None:
            return (f"the job fails validation again ({problem}): it would be dead-lettered again as invalid_job; "
                    f"fix the producer and enqueue a corrected job", True)
        if item.reason == "bad_request":
            return (f"the provider refused this exact content ({item.detail[:160]}) and a replay sends it "
                    f"unchanged: fix it at the producer, or --force if the cause was fixed at the provider", True)
        return None

    def _invalid(self, item: DeadLetter) -> str | None:
        """Why the dead letter's job fails validation, or None when it passes."""
        job = _job_of(item)
        try:
            if job is None:
                raise JobValidationError([])
            validate_job(job, max_text_parts=self.config.max_text_parts,
                         metadata_max_bytes=self.config.metadata_max_bytes)
        except JobValidationError as error:
            return "; ".join(str(p) for p in error.problems) or "the job is not a JSON object"
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
        mid = item.message_id
        if new_message_id:
            mid = f"{self.store.lane_prefix(target)}{events.now_ms()}-r{secrets.token_hex(4)}"
        event = events.requeued(item.message_id, _job_of(item), lane=target, reason=item.reason,
                                replay_id=item.dlq_id, requeued_as=mid if new_message_id else None)
        answer = self.store.replay_dead_letter(Requeue(
            dlq_id=item.dlq_id, lane=target, job=item.job, message_id=mid, event=event,
            handover_id=_producer_id(item), new_message_id=new_message_id, original_message_id=item.message_id,
            idempotency_ttl_s=self.config.idempotency_ttl_s, events_maxlen=self.config.events_maxlen,
        ))
        if answer.outcome is ReplayOutcome.GONE:
            raise SmsWorkerError(f"dead letter {item.dlq_id} is gone (replayed or purged meanwhile)")
        if answer.outcome is ReplayOutcome.TAKEN:
            raise SmsWorkerError(f"dead letter {item.dlq_id}: its producer id is message {answer.owner}'s now; "
                                 "not replayed")
        if answer.outcome is ReplayOutcome.BUSY:
            raise SmsWorkerError(f"dead letter {item.dlq_id}: the dead letters kept changing; not replayed, "
                                 "try again")
        return mid

    def purge(self, items: Sequence[DeadLetter]) -> int:
        return self.store.purge_dead_letters([i.dlq_id for i in items])
