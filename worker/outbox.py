"""Producer API: owns the door of the outbox — validate jobs, append them to a lane's stream, wake a dispatcher.

The wire format other languages use is one stream entry per job on `{prefix}:outbox:{lane}` with a
field `job` holding the job's JSON (see README, "Enqueue from any language"):

    XADD sms:outbox:bulk * job '{"to":"41793026727","text":"Hello","id":"order-42"}'
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from worker.errors import EnqueueIncomplete, JobValidationError, Problem, StoreError
from worker.models import Job, encode_job, encode_plain_job, validate_job
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

    @classmethod
    def from_settings(cls, settings: Settings) -> OutboxConfig:
        return cls(
            lanes=tuple(settings.sms_lanes),
            default_lane=settings.sms_default_lane,
            max_text_parts=settings.sms_max_text_parts,
            metadata_max_bytes=settings.sms_metadata_max_bytes,
            idempotency_ttl_s=settings.sms_idempotency_ttl_s,
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
        """(wire JSON, producer id) of a valid job; JobValidationError otherwise."""
        fast = encode_plain_job(
            job, max_text_parts=self.config.max_text_parts,
            metadata_max_bytes=self.config.metadata_max_bytes,
        )
        if fast is not None:
            assert isinstance(job, dict)
            return fast, job.get("id")
        valid = self.validate(job, index)
        return encode_job(valid), valid.id

    def enqueue(self, job: Job | Mapping[str, Any], lane: str | None = None) -> Enqueued:
        """Queue one job; JobValidationError lists every problem and nothing is written.

        EnqueueIncomplete (`.queued == [None]`) means Redis refused it and nothing of it was written;
        any other StoreError leaves it unknown whether it was written (see `enqueue_many`)."""
        lane = self._lane(lane)
        [(mid, queued)] = self._write(lane, [self._encode(job)])
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
        lane = self._lane(lane)
        encoded = []
        problems: list[Problem] = []
        for index, job in enumerate(jobs):
            try:
                encoded.append(self._encode(job, index))
            except JobValidationError as error:
                problems += [Problem(f"jobs[{index}].{p.field}", p.message) for p in error.problems]
        if problems:
            raise JobValidationError(problems)
        return [Enqueued(mid, lane, queued) for mid, queued in self._write(lane, encoded)]

    def _write(self, lane: str, encoded: list[tuple[bytes, str | None]]) -> list[tuple[str, bool]]:
        """Store.enqueue, then wake the lane if anything new was queued, also by a call that failed
        part-way (EnqueueIncomplete is raised after the wake; a failing wake does not replace it)."""
        try:
            answers = self.store.enqueue(lane, encoded, self.config.idempotency_ttl_s)
        except EnqueueIncomplete as error:
            if self.wake is not None and any(answer is not None and answer[1] for answer in error.queued):
                with contextlib.suppress(StoreError):  # the clock's tick wakes the lane anyway
                    self.wake(lane)
            raise
        if self.wake is not None and any(queued for _, queued in answers):
            self.wake(lane)
        return answers
