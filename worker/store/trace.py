"""The reads of `sms-worker trace`: one message's record, the events and dead letters its trail names,
and the bounded scans that find a number's messages. Read only: nothing here writes.

What a trail says is worker/trace.py's; this module only fetches. Every scan is bounded by the
caller's `max_entries` (an operator's command must not walk a million-entry stream unasked), and
pages through XRANGE/ZRANGE so no single reply is large.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from worker.store import resp
from worker.store.base import StoreBase
from worker.store.lookup import drive, message_id_steps
from worker.store.schedule import locate_unrecorded, stream_rows

# Entries per XRANGE page (and ids per pipelined lookup) in the scans.
SCAN_PAGE = 1000

Rows = list[tuple[str, dict[bytes, bytes]]]


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


class TraceOps(StoreBase):
    def trace_record(self, message_id: str) -> dict[str, str]:
        """The message's hash, every field (its job and trail included); {} when it has none."""
        (reply,) = self.pipeline([(b"HGETALL", self.msg(message_id))])
        if isinstance(reply, list):  # RESP2's flat list; RESP3 answers a map
            reply = {reply[i]: reply[i + 1] for i in range(0, len(reply), 2)}
        return {_text(k): _text(v) for k, v in (reply or {}).items()}

    def trace_outbox_entry(self, message_id: str) -> tuple[str, str, bytes] | None:
        """(lane, outbox entry id, job) of a message with no record yet, found the way cancel finds it
        (one XRANGE for a derived id, a bounded search around the time in an id given at enqueue)."""
        return drive(self.r, locate_unrecorded(self, message_id))

    def trace_message_id_of(self, producer_id: str) -> str | None:
        """The message id a producer id was queued as ({p}:idem:{id}), while its claim lives."""
        return drive(self.r, message_id_steps(self, producer_id))

    def trace_events(self, entry_ids: Sequence[str]) -> dict[str, bytes | None]:
        """Each events stream entry's `event` JSON by id; None for one trimmed from the stream."""
        return {i: None if fields is None else fields.get(b"event")
                for i, fields in self._entries_by_id(self.events, entry_ids).items()}

    def trace_dead_letters(self, entry_ids: Sequence[str]) -> dict[str, dict[bytes, bytes] | None]:
        """Each dead letter's fields (`message_id`, `entry`) by id; None for one replayed or purged."""
        return self._entries_by_id(self.dlq, entry_ids)

    def _entries_by_id(self, stream: str, entry_ids: Sequence[str]) -> dict[str, dict[bytes, bytes] | None]:
        """One XRANGE id id per entry, SCAN_PAGE of them per round trip."""
        found: dict[str, dict[bytes, bytes] | None] = {}
        ids = list(dict.fromkeys(entry_ids))
        for start in range(0, len(ids), SCAN_PAGE):
            chunk = ids[start : start + SCAN_PAGE]
            replies = self.pipeline([(b"XRANGE", stream, i, i) for i in chunk])
            for entry_id, reply in zip(chunk, replies, strict=True):
                rows = stream_rows(reply)
                found[entry_id] = rows[0][1] if rows else None
        return found

    # --- the scans of `trace --to` ------------------------------------------------------------------
    def trace_lanes(self) -> list[str]:
        """Every lane with an outbox stream or a schedule, configured or not (a producer may write to
        any `{p}:outbox:<name>` with plain XADD)."""
        lanes: set[str] = set()
        with resp.redis_errors():
            for prefix, kind in ((self.outbox(""), "stream"), (self.scheduled(""), "zset")):
                for key in self.r.scan_iter(match=f"{prefix}*", count=1000, _type=kind):
                    lanes.add(_text(key)[len(prefix):])
        return sorted(lanes)

    def trace_event_pages(self, since_ms: int, max_entries: int) -> Iterator[Rows]:
        """Pages of the events stream from `since_ms` on, at most `max_entries` entries in all."""
        return self._pages(self.events, since_ms, max_entries)

    def trace_outbox_pages(self, lane: str, since_ms: int, max_entries: int) -> Iterator[Rows]:
        """Pages of a lane's outbox (pending entries included: an entry leaves only when settled)."""
        return self._pages(self.outbox(lane), since_ms, max_entries)

    def _pages(self, stream: str, since_ms: int, max_entries: int) -> Iterator[Rows]:
        start, read = f"{max(0, since_ms)}-0", 0
        while read < max_entries:
            count = min(SCAN_PAGE, max_entries - read)
            (reply,) = self.pipeline([(b"XRANGE", stream, start, b"+", b"COUNT", count)])
            rows = stream_rows(reply)
            if rows:
                yield rows
            if len(rows) < count:
                return
            read += len(rows)
            start = "(" + rows[-1][0]

    def trace_scheduled_pages(self, lane: str, max_entries: int) -> Iterator[list[tuple[str, bytes | None]]]:
        """Pages of (message id, job JSON or None) of a lane's schedule, at most `max_entries` in all."""
        read = 0
        while read < max_entries:
            count = min(SCAN_PAGE, max_entries - read)
            (members,) = self.pipeline([(b"ZRANGE", self.scheduled(lane), read, read + count - 1)])
            mids = [_text(m) for m in members or []]
            if not mids:
                return
            jobs = self.pipeline([(b"HGET", self.msg(mid), b"job") for mid in mids])
            yield list(zip(mids, jobs, strict=True))
            if len(mids) < count:
                return
            read += len(mids)
