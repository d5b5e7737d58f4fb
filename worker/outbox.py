"""Producer API: validate jobs at the door, append them to a lane's outbox, wake a dispatcher.

The wire format other languages use is one stream entry per job on `{prefix}:outbox:{lane}` with a
field `job` holding the job's JSON (see README, "Enqueue from any language"):

    XADD sms:outbox:bulk * job '{"to":"41793026727","text":"Hello","id":"order-42"}'
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from worker.errors import JobValidationError, Problem
from worker.models import Job, encode_job, encode_plain_job, validate_job
from worker.settings import Settings
from worker.store import Store


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

    def __init__(self, settings: Settings, store: Store, wake: Callable[[str], object] | None = None) -> None:
        self.settings = settings
        self.store = store
        self.wake = wake

    def _lane(self, lane: str | None) -> str:
        lane = lane or self.settings.sms_default_lane
        if lane not in self.settings.sms_lanes:
            known = ", ".join(self.settings.sms_lanes)
            raise JobValidationError([Problem("lane", f"unknown lane {lane!r}; lanes: {known}")])
        return lane

    def validate(self, job: Job | Mapping[str, Any], index: int | None = None) -> Job:
        if isinstance(job, Job):
            job = job.model_dump(exclude_none=True, by_alias=True)
        return validate_job(
            job,
            max_text_parts=self.settings.sms_max_text_parts,
            metadata_max_bytes=self.settings.sms_metadata_max_bytes,
            index=index,
        )

    def _encode(self, job: Job | Mapping[str, Any], index: int | None = None) -> tuple[bytes, str | None]:
        """(wire JSON, producer id) of a valid job; JobValidationError otherwise."""
        fast = encode_plain_job(
            job, max_text_parts=self.settings.sms_max_text_parts,
            metadata_max_bytes=self.settings.sms_metadata_max_bytes,
        )
        if fast is not None:
            assert isinstance(job, dict)
            return fast, job.get("id")
        valid = self.validate(job, index)
        return encode_job(valid), valid.id

    def enqueue(self, job: Job | Mapping[str, Any], lane: str | None = None) -> Enqueued:
        """Queue one job; JobValidationError lists every problem and nothing is written."""
        lane = self._lane(lane)
        [(mid, queued)] = self.store.enqueue(lane, [self._encode(job)], self.settings.sms_idempotency_ttl_s)
        if queued and self.wake is not None:
            self.wake(lane)
        return Enqueued(mid, lane, queued)

    def enqueue_many(self, jobs: Iterable[Job | Mapping[str, Any]], lane: str | None = None) -> list[Enqueued]:
        """Queue many jobs to one lane, all or nothing: one bad job refuses the whole call.

        Every job is validated before anything is written, so a refused call leaves the outbox as
        it was, and the error lists every problem of every job (`jobs[3].to: ...`). A Redis failure
        during the writes (StoreError) leaves the chunks already written queued.
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
        results = [
            Enqueued(mid, lane, queued)
            for mid, queued in self.store.enqueue(lane, encoded, self.settings.sms_idempotency_ttl_s)
        ]
        if self.wake is not None and any(r.queued for r in results):
            self.wake(lane)
        return results
