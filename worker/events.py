"""Status events: owns their schema (version 1), their JSON, and the relay to a Dramatiq queue.

One event per state change, published to the events stream:

    {"v": 1, "event_id": "<messageId>:<type>", "type": "accepted", "at": "2026-11-27T10:00:00.000Z",
     "message_id": "...", "bulk_id": "...", "lane": "bulk", "id": "<producer id>",
     "metadata": {...}, "to": "41793026727", "status": {...}, "error": {...}, "reason": null,
     "price": null, "mcc_mnc": null, "sent_at": null, "done_at": null, "message_count": null}

Types: accepted, rejected, failed (send side); delivered, undeliverable, expired, rejected
(reports); unknown_message (a report for a message this worker never sent); requeued (an
operator replayed the message's dead letter: the `failed` before it was not its end); cancelled
(a scheduled or queued message was cancelled before any attempt: it is never sent). `event_id`
is the same for the same state change and different for every other one, so a consumer that sees
one twice (at-least-once delivery) can drop the repeat: a `failed` names its outbox entry (a
replayed message that fails again fails from a new entry), a requeue its dead letter. The JSON
Schema (worker/schemas/event-v1.schema.json) says the same; tests/unit/test_event_schema.py holds them
together.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:  # the relay's collaborators; importing them here would tie this module to Redis
    import dramatiq

    from worker.store import Store

SCHEMA_VERSION = 1


# (ms, its ISO form): a batch settles a thousand events within a few ms, and formatting the time
# was the single most expensive step of building an event.
_last_iso: tuple[int, str] = (0, "")


def now_iso() -> str:
    global _last_iso
    ms = time.time_ns() // 1_000_000
    cached = _last_iso
    if cached[0] != ms:
        moment = datetime.fromtimestamp(ms // 1000, UTC).replace(microsecond=ms % 1000 * 1000)
        text = moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")
        cached = _last_iso = (ms, text)
    return cached[1]


def now_ms() -> int:
    return int(time.time() * 1000)


def build(
    kind: str,
    message_id: str,
    job: dict[str, Any] | None,
    *,
    lane: str | None,
    bulk_id: str | None = None,
    status: dict[str, Any] | None = None,
    error: dict[str, Any] | None = None,
    reason: str | None = None,
    report: dict[str, Any] | None = None,
    at: str | None = None,
    event_id: str | None = None,
    rule: str | None = None,
) -> bytes:
    """One event as JSON; `job` is the producer's job (its id, metadata and `to` are echoed);
    `event_id` replaces the default `<message_id>:<kind>`; `rule` (a traffic-policy rejection only,
    worker.policy) names the rule that fired and is the one key not always present."""
    job = job or {}
    report = report or {}
    # The job of an invalid_job `failed` is whatever a producer wrote: echo only what has the
    # schema's type (a number as `id` would break every consumer coded against it).
    producer_id, metadata, to = job.get("id"), job.get("metadata"), job.get("to") or report.get("to")
    event: dict[str, Any] = {
        "v": SCHEMA_VERSION,
        "event_id": event_id or f"{message_id}:{kind}",
        "type": kind,
        "at": at or now_iso(),
        "message_id": message_id,
        "bulk_id": bulk_id or report.get("bulkId"),
        "lane": lane,
        "id": producer_id if type(producer_id) is str else None,
        "metadata": metadata if type(metadata) is dict else None,
        "to": to if type(to) is str else None,
        "status": status,
        "error": error,
        "reason": reason,
        "price": report.get("price"),
        "mcc_mnc": report.get("mccMnc"),
        "sent_at": report.get("sentAt"),
        "done_at": report.get("doneAt"),
        "message_count": report.get("messageCount"),
    }
    if rule is not None:
        event["rule"] = rule
    return orjson.dumps(event)


def requeued(message_id: str, job: dict[str, Any] | None, *, lane: str, reason: str, replay_id: str,
             requeued_as: str | None = None) -> bytes:
    """`requeued`: a dead letter (`reason`, the reason it had) was queued again on `lane`.

    Its event_id carries the dead letter's id, so a message replayed twice has two requeued events
    a consumer keeps apart. `requeued_as` names the new message id of a replay under a new one
    (the events that follow carry it); it is null when the message keeps its id."""
    event = orjson.loads(build("requeued", message_id, job, lane=lane, reason=reason))
    event["event_id"] = f"{message_id}:requeued:{replay_id}"
    event["requeued_as"] = requeued_as
    return orjson.dumps(event)


def parse(raw: bytes | str) -> dict[str, Any]:
    value = orjson.loads(raw)
    if not isinstance(value, dict):
        raise ValueError("an event is a JSON object")
    return value


RELAY_GROUP = "dramatiq-relay"
# Events per Dramatiq message: consumers get a list, so a burst is a few messages, not thousands.
RELAY_BATCH = 100


class EventRelay:
    """Forwards the events stream to a Dramatiq queue and actor, at least once.

    It reads with its own consumer group and acknowledges entries only after their message is
    enqueued; a relay that dies in between is taken over after `lease_ms` and the batch is sent
    again, so consumers drop repeats by `event_id`.
    """

    def __init__(self, store: Store, broker: dramatiq.Broker, queue: str, actor: str, lease_ms: int = 60_000) -> None:
        self.store = store
        self.broker = broker
        self.queue = queue
        self.actor = actor
        self.lease_ms = lease_ms

    def run(self, consumer: str, max_messages: int = 200) -> int:
        """Relay what is waiting (stale entries of a dead relay first); returns events relayed."""
        import dramatiq

        stream = self.store.events
        relayed = 0
        for _ in range(max_messages):
            entries = self.store.read_group(stream, RELAY_GROUP, consumer, RELAY_BATCH, self.lease_ms)
            if not entries:
                break
            batch = [parse(fields[b"event"]) for _, fields in entries]
            self.broker.enqueue(dramatiq.Message(
                queue_name=self.queue, actor_name=self.actor, args=(batch,), kwargs={}, options={},
            ))
            self.store.ack(stream, RELAY_GROUP, [entry_id for entry_id, _ in entries])
            relayed += len(batch)
        return relayed
