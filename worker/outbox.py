"""Producer API: owns the door of the outbox — validate jobs, append them to a lane's stream, wake a dispatcher.

The wire format other languages use is one stream entry per job on `{prefix}:outbox:{lane}` with a
field `job` holding the job's JSON (see README, "Enqueue from any language"):

    XADD sms:outbox:bulk * job '{"to":"41793026727","text":"Hello","id":"order-42"}'

A job with a future `send_at` is not appended: it is held in the lane's schedule (state SCHEDULED,
worker.store.schedule) and appended when due; one with a past `send_at` is appended at once.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from worker.errors import EnqueueIncomplete, JobValidationError, Problem, StoreError
from worker.models import Job, encode_job, encode_plain_job, parse_send_at, validate_job
from worker.settings import Settings
from worker.store import Store


@dataclass(frozen=True, slots=True)
class OutboxConfig:
    """The settings an Outbox reads: the lanes it accepts and the limits a job is validated against."""

    lanes: tuple[str, ...]
    default_lane: str
    max_text_parts: int
    metadata_max_bytes: int
    idempotency_ttl_s: int
    schedule_horizon_s: int = 180 * 86400  # SMS_SCHEDULE_HORIZON_S: how far ahead send_at may be
    state_ttl_s: int = 3 * 86400  # a scheduled job's record is kept this long after it is due

    @classmethod
    def from_settings(cls, settings: Settings) -> OutboxConfig:
        return cls(
            lanes=tuple(settings.sms_lanes),
            default_lane=settings.sms_default_lane,
            max_text_parts=settings.sms_max_text_parts,
            metadata_max_bytes=settings.sms_metadata_max_bytes,
            idempotency_ttl_s=settings.sms_idempotency_ttl_s,
            schedule_horizon_s=settings.sms_schedule_horizon_s,
            state_ttl_s=settings.sms_state_ttl_s,
        )


@dataclass(frozen=True, slots=True)
class Enqueued:
    """What `enqueue` did with one job: its message id, and False if it was a duplicate."""

    message_id: str
    lane: str
    queued: bool

    @property
    def duplicate(self) -> bool:
        return not self.queued


class Outbox:
    """Validated, pipelined writes to the outbox streams; one instance per producer process."""

    def __init__(self, config: OutboxConfig, store: Store, wake: Callable[[str], object] | None = None) -> None:
        self.config = config
        self.store = store
        self.wake = wake

    def _lane(self, lane: str | None) -> str:
        lane = lane or self.config.default_lane
        if lane not in self.config.lanes:
            known = ", ".join(self.config.lanes)
            raise JobValidationError([Problem("lane", f"unknown lane {lane!r}; lanes: {known}")])
        return lane

    def validate(self, job: Job | Mapping[str, Any], index: int | None = None) -> Job:
        if isinstance(job, Job):
            job = job.model_dump(exclude_none=True, by_alias=True)
        return validate_job(
            job,
            max_text_parts=self.config.max_text_parts,
            metadata_max_bytes=self.config.metadata_max_bytes,
            index=index,
        )

    def _encode(self, job: Job | Mapping[str, Any], index: int | None = None) -> tuple[bytes, str | None]:
        """(wire JSON, producer id) of a valid job; JobValidationError otherwise (also for a
        send_at beyond SMS_SCHEDULE_HORIZON_S)."""
        encoded, producer_id, _, _ = self._encode_due(job, index)
        return encoded, producer_id

    def _encode_due(
        self, job: Job | Mapping[str, Any], index: int | None = None
    ) -> tuple[bytes, str | None, int | None, str | None]:
        """`_encode`, the due time (ms) of the job's send_at (None without one) and its campaign
        (campaign_reference_id, None without one). Only the pydantic path can see either: the fast
        path turns any job with one over to it."""
        fast = encode_plain_job(
            job, max_text_parts=self.config.max_text_parts,
            metadata_max_bytes=self.config.metadata_max_bytes,
        )
        if fast is not None:
            assert isinstance(job, dict)
            return fast, job.get("id"), None, None
        valid = self.validate(job, index)
        due = None
        if valid.send_at is not None:
            due = parse_send_at(valid.send_at)
            if (ahead_s := (due - time.time() * 1000) / 1000) > (horizon := self.config.schedule_horizon_s):
                raise JobValidationError([Problem(
                    "send_at", f"is {ahead_s / 86400:.1f} days ahead; at most {horizon} s "
                               f"({horizon / 86400:g} days) allowed (SMS_SCHEDULE_HORIZON_S)")], index)
        return encode_job(valid), valid.id, due, valid.campaign_reference_id or None

    @staticmethod
    def due_later(encoded: list[tuple[bytes, str | None]], now_ms: float | None = None) -> list[tuple[int, int]]:
        """(index, due ms) of the encoded jobs (as `prepare` returns them) whose send_at is still
        ahead: they go to the schedule. (`enqueue` knows this from encoding; this reads it back
        from the JSON for a client that writes `prepare`'s jobs itself.)"""
        now_ms = time.time() * 1000 if now_ms is None else now_ms
        later = []
        for index, (job, _) in enumerate(encoded):
            if b'"send_at"' not in job or not isinstance(send_at := orjson.loads(job).get("send_at"), str):
                continue
            if (due := parse_send_at(send_at)) > now_ms:
                later.append((index, due))
        return later

    def enqueue(self, job: Job | Mapping[str, Any], lane: str | None = None) -> Enqueued:
        """Queue one job; JobValidationError lists every problem and nothing is written.

        EnqueueIncomplete (`.queued == [None]`) means Redis refused it and nothing of it was written;
        any other StoreError leaves it unknown whether it was written (see `enqueue_many`)."""
        lane = self._lane(lane)
        encoded, producer_id, due, campaign = self._encode_due(job)
        [(mid, queued)] = self._write(lane, [(encoded, producer_id)], [] if due is None else [(0, due)],
                                      None if campaign is None else [campaign])
        return Enqueued(mid, lane, queued)

    def enqueue_many(self, jobs: Iterable[Job | Mapping[str, Any]], lane: str | None = None) -> list[Enqueued]:
        """Queue many jobs to one lane; one bad job refuses the whole call.

        Every job is validated before anything is written, so a refused call leaves the outbox as
        it was, and the error lists every problem of every job (`jobs[3].to: ...`).

        The writes go in chunks of 1,000 jobs, each written whole or not at all. When Redis refuses
        a chunk (out of memory, read-only, no permission...) the call raises EnqueueIncomplete:
        `.queued[i]` is job i's (message id, queued) answer if its chunk was written, None if
        nothing of it was; retrying exactly the None jobs is safe, with or without producer ids.
        Any other StoreError (the connection was lost mid-call) leaves unknown what was written:
        retrying the call is then safe only for jobs with a producer id.
        """
        lane, encoded, dues, campaigns = self._prepare_many(jobs, lane)
        return [Enqueued(mid, lane, queued) for mid, queued in self._write(lane, encoded, dues, campaigns)]

    def prepare(
        self, job: Job | Mapping[str, Any], lane: str | None = None
    ) -> tuple[str, list[tuple[bytes, str | None]]]:
        """`enqueue`'s checks without its write: (lane, [(wire JSON, producer id)]), or the same
        JobValidationError (the asyncio client writes what this returns through its own store)."""
        return self._lane(lane), [self._encode(job)]

    def prepare_many(
        self, jobs: Iterable[Job | Mapping[str, Any]], lane: str | None = None, start: int = 0
    ) -> tuple[str, list[tuple[bytes, str | None]]]:
        """`enqueue_many`'s checks without its write: every job is checked, every problem listed
        (`start` numbers the jobs of a slice of a bigger call as that call's)."""
        lane, encoded, _, _ = self._prepare_many(jobs, lane, start)
        return lane, encoded

    @staticmethod
    def campaigns_of(encoded: Sequence[tuple[bytes, str | None]]) -> list[str | None] | None:
        """Each encoded job's campaign (campaign_reference_id, None without one), read back from
        the JSON as `prepare` returns it, for a client that writes `prepare`'s jobs itself; None
        when no job has one (`enqueue` knows them from encoding)."""
        campaigns: list[str | None] = [None] * len(encoded)
        found = False
        for index, (job, _) in enumerate(encoded):
            if b'"campaign_reference_id"' in job and isinstance(
                    campaign := orjson.loads(job).get("campaign_reference_id"), str) and campaign:
                campaigns[index] = campaign
                found = True
        return campaigns if found else None

    def _prepare_many(
        self, jobs: Iterable[Job | Mapping[str, Any]], lane: str | None = None, start: int = 0
    ) -> tuple[str, list[tuple[bytes, str | None]], list[tuple[int, int]], list[str | None] | None]:
        """`prepare_many`, (index, due ms) of the jobs with a send_at, and each job's campaign
        (None for a call without campaign jobs)."""
        lane = self._lane(lane)
        encoded = []
        dues = []
        counted: dict[int, str] = {}  # index -> campaign, only for the jobs that have one
        problems: list[Problem] = []
        for index, job in enumerate(jobs, start):
            try:
                wire, producer_id, due, campaign = self._encode_due(job, index)
            except JobValidationError as error:
                problems += [Problem(f"jobs[{index}].{p.field}", p.message) for p in error.problems]
                continue
            if due is not None:
                dues.append((index - start, due))
            if campaign is not None:
                counted[index - start] = campaign
            encoded.append((wire, producer_id))
        if problems:
            raise JobValidationError(problems)
        campaigns = [counted.get(i) for i in range(len(encoded))] if counted else None
        return lane, encoded, dues, campaigns

    def _write(self, lane: str, encoded: list[tuple[bytes, str | None]], dues: list[tuple[int, int]],
               campaigns: list[str | None] | None = None) -> list[tuple[str, bool]]:
        """Jobs due later (`dues`: index, due ms) go to the lane's schedule (Store.schedule), the
        others (a past send_at included) to its outbox; `campaigns` (per job, or None for none)
        are counted at enqueue for the outbox's jobs (Store.enqueue), by schedule.lua for the others.

        A call mixing both writes the scheduled ones first; when the outbox write then fails,
        EnqueueIncomplete answers the scheduled ones as written."""
        now_ms = time.time() * 1000
        later = [(index, due) for index, due in dues if due > now_ms]
        if not later:
            return self._append(lane, encoded, campaigns)
        answers: list[tuple[str, bool] | None] = [None] * len(encoded)
        try:
            held: list[tuple[str, bool] | None] = list(self.store.schedule(
                lane, [(*encoded[i], due) for i, due in later], state_ttl_s=self.config.state_ttl_s,
                idempotency_ttl_s=self.config.idempotency_ttl_s))
        except EnqueueIncomplete as error:  # its answers are the scheduled jobs': renumber them
            for (i, _), partial in zip(later, error.queued, strict=True):
                answers[i] = partial
            raise EnqueueIncomplete(str(error), answers) from error
        for (i, _), answer in zip(later, held, strict=True):
            answers[i] = answer
        now = [i for i in range(len(encoded)) if answers[i] is None]
        try:
            appended: list[tuple[str, bool]] = self._append(
                lane, [encoded[i] for i in now], None if campaigns is None else [campaigns[i] for i in now]
            ) if now else []
        except EnqueueIncomplete as error:
            for i, partial in zip(now, error.queued, strict=True):
                answers[i] = partial
            raise EnqueueIncomplete(str(error), answers) from error
        for i, answer in zip(now, appended, strict=True):
            answers[i] = answer
        return [answer for answer in answers if answer is not None]

    def _append(self, lane: str, encoded: list[tuple[bytes, str | None]],
                campaigns: list[str | None] | None = None) -> list[tuple[str, bool]]:
        """Store.enqueue, then wake the lane if anything new was queued, also by a call that failed
        part-way (EnqueueIncomplete is raised after the wake; a failing wake does not replace it).
        Campaign counters are kept at least SMS_STATE_TTL_S (the state TTL, as the scripts keep them)."""
        try:
            if campaigns is None:
                answers = self.store.enqueue(lane, encoded, self.config.idempotency_ttl_s)
            else:
                answers = self.store.enqueue(lane, encoded, self.config.idempotency_ttl_s, campaigns=campaigns,
                                             state_ttl_s=self.config.state_ttl_s)
        except EnqueueIncomplete as error:
            if self.wake is not None and any(answer is not None and answer[1] for answer in error.queued):
                with contextlib.suppress(StoreError):  # the clock's tick wakes the lane anyway
                    self.wake(lane)
            raise
        if self.wake is not None and any(queued for _, queued in answers):
            self.wake(lane)
        return answers
