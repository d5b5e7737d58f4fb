"""The dead-letter store: list, show, replay (keeping the messageId) and purge failed jobs."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import orjson

from worker.errors import SmsWorkerError
from worker.store import Store, redis_errors


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

    def as_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


class DeadLetters:
    def __init__(self, store: Store) -> None:
        self.store = store

    def iterate(self, *, lane: str | None = None, reason: str | None = None,
                since_ms: int | None = None) -> Iterator[DeadLetter]:
        start = f"{since_ms}-0" if since_ms else "-"
        while True:
            with redis_errors():
                page = self.store.r.xrange(self.store.dlq, start, "+", count=500)
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

    def replay(self, item: DeadLetter, *, new_message_id: bool = False) -> str:
        """Queue the job again; by default with its messageId, so the provider refuses a double.

        Returns the stream entry id. The message goes back to QUEUED (the only way out of FAILED),
        and the dead letter is removed.
        """
        if not item.lane:
            # Report dead letters (malformed pages, unknown messages) have no job to send again.
            raise SmsWorkerError(f"dead letter {item.dlq_id} ({item.reason}) is not a job and cannot be replayed")
        outbox = self.store.outbox(item.lane)
        fields: dict[str, str] = {"job": item.job}
        if not new_message_id:
            fields["mid"] = item.message_id
        with redis_errors():
            pipe = self.store.r.pipeline(transaction=True)
            pipe.xadd(outbox, fields)
            if not new_message_id:
                pipe.hset(self.store.msg(item.message_id), "state", "QUEUED")
            pipe.xdel(self.store.dlq, item.dlq_id)
            entry_id, *_ = pipe.execute()
        return str(entry_id.decode())

    def purge(self, items: list[DeadLetter]) -> int:
        if not items:
            return 0
        with redis_errors():
            return int(self.store.r.xdel(self.store.dlq, *[i.dlq_id for i in items]))
