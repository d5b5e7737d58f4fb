"""Report pages and their bookkeeping: the raw stream, parked reports, counters, the logs lookup.

    reports_raw            stream, one entry per raw page (`page` bytes, `src` drain|webhook|logs,
                           `fence` for drained pages), consumer group `reports` (worker.reports.RAW_GROUP)
    reports_parked         hash, messageId -> report JSON of a message not known (yet)
    reports_parked_since   sorted set, messageId -> first seen (ms)
    reports_stats          hash, counters (applied, duplicates, parked, unknown_emitted, ...)
    reports_lookup         sorted set, messageId -> next look in GET /sms/3/logs due (ms)
    reports_lookup_tries   hash, messageId -> lookups so far
    reports_lookup_cursor  hash, where the sweep's pass over the awaiting set is (`score`, `member`)
    last_drain             hash, when the reports endpoint last answered, and what it gave

The scripts: report_append.lua (a drained page, fence checked), report_fetch.lua (the message hashes
a batch needs), report_apply.lua (states, events, parking, dead letters, acks; its op codes are
worker.reports.ops.OpCode), report_lookup.lua (claims lookups so two sweeps never look one up twice).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import redis

from worker.errors import StoreError
from worker.store import resp
from worker.store.base import StoreBase, is_nogroup

# A raw entry as read from the stream: its id and fields (None: deleted since it was read).
RawEntry = tuple[str, dict[bytes, bytes] | None]

# Error codes of a Redis that cannot serve now (memory, loading, a failover, a lost group...): the
# batch is retried later. Any other error reply (a script refusing its arguments, a runtime error)
# is about what the call carried.
_REDIS_STATE_ERRORS = ("OOM", "LOADING", "BUSY", "READONLY", "MASTERDOWN", "MISCONF", "NOGROUP", "NOSCRIPT",
                       "TRYAGAIN", "CLUSTERDOWN", "NOREPLICAS", "NOAUTH", "NOPERM", "WRONGPASS", "EXECABORT")


def refused_for_its_arguments(error: BaseException) -> bool:
    """Whether a StoreError is Redis refusing what a call carried (a script's error reply), as
    opposed to Redis being unable to serve now (out of memory, loading, read-only...)."""
    cause = error.__cause__
    # redis-py gives the error replies it recognises (OOM, LOADING, READONLY...) their own subclasses.
    return type(cause) is redis.ResponseError and not str(cause).startswith(_REDIS_STATE_ERRORS)


def lost_group(error: BaseException) -> bool:
    """Whether a StoreError says the consumer group (or its stream) is gone: Redis lost its data."""
    return is_nogroup(error.__cause__) or "NOGROUP" in str(error)


class ReportRow(NamedTuple):
    """What report_fetch.lua read from one message hash (None: missing)."""

    state: str | None
    reason: str | None
    job: bytes | None
    lane: str | None
    bulk_id: str | None
    # Set with the message's first record, never changed after: a report's price is summed only for one.
    campaign: str | None = None


def _text(value: bytes | None) -> str | None:
    return value.decode() if value is not None else None


class ReportOps(StoreBase):
    # --- writing pages ------------------------------------------------------------------------------
    def append_report_page(self, page: bytes, token: int, lease: str, source: str = "drain") -> bool:
        """Append a drained page (src `source`: `drain`, or `drain:{account}` for another account's
        drain; its fencing token); returns whether `token` is still lease `lease`'s current one. The
        page is appended either way (see report_append.lua)."""
        current, _ = self.run("report_append", [self.reports_raw, self.fence_key(lease)], [token, page, source])
        return bool(current)

    def add_report_page(self, page: bytes, source: str) -> None:
        """Append a page of reports from elsewhere (`logs`: final statuses found in the logs)."""
        with resp.redis_errors():
            self.r.xadd(self.reports_raw, {"page": page, "src": source})

    def store_webhook_reports(
        self, page: bytes | None, dead: Sequence[tuple[str, bytes]], source: str = "webhook"
    ) -> None:
        """A webhook body's good reports as one raw page (src `webhook`, or `webhook:{account}` when
        another account's secret authenticated it) and its malformed ones as dead letters, in one
        MULTI/EXEC (a Redis refusing writes discards the whole transaction)."""
        with resp.redis_errors():
            pipe = self.r.pipeline(transaction=True)
            if page is not None:
                pipe.xadd(self.reports_raw, {"page": page, "src": source})
            for message_id, entry in dead:
                pipe.xadd(self.dlq, {"message_id": message_id, "entry": entry})
            if dead:
                pipe.hincrby(self.reports_stats, "dead_letters", len(dead))
            pipe.execute()

    def record_last_drain(self, fields: Mapping[str, str | int], account: str | None = None) -> None:
        """For `sms-worker status`: when the reports endpoint last answered, and what it gave (for
        `account`, an account of SMS_ACCOUNTS; None: the default account)."""
        with resp.redis_errors():
            self.r.hset(self.last_drain_of(account), mapping=dict(fields))

    def last_drain_record(self, account: str | None = None) -> dict[str, str]:
        """What record_last_drain wrote for `account` (empty before its first drain)."""
        with resp.redis_errors():
            raw = self.r.hgetall(self.last_drain_of(account))
        return {k.decode(): v.decode() for k, v in raw.items()}

    # --- reading pages (consumer group) --------------------------------------------------------------
    def create_report_group(self, group: str) -> None:
        """Create the raw stream's consumer group (and the stream) from its start, if it is missing:
        pages written before any processor ran count too."""
        try:
            with resp.redis_errors():
                self.r.xgroup_create(self.reports_raw, group, id="0", mkstream=True)
        except StoreError as error:
            if "BUSYGROUP" not in str(error):
                raise

    def report_stream_exists(self) -> bool:
        with resp.redis_errors():
            return bool(self.r.exists(self.reports_raw))

    def read_report_pages(self, group: str, consumer: str, count: int) -> list[RawEntry]:
        """Up to `count` raw entries never delivered to the group yet (XREADGROUP >)."""
        with resp.redis_errors():
            reply = self.r.xreadgroup(group, consumer, {self.reports_raw: ">"}, count=count)
        return [(eid.decode(), fields) for _, entries in reply or [] for eid, fields in entries]

    def claim_stale_report_pages(self, group: str, consumer: str, idle_ms: int, limit: int) -> list[RawEntry]:
        """Entries another consumer read but left unacknowledged for `idle_ms` (XAUTOCLAIM), oldest first."""
        claimed: list[RawEntry] = []
        start = "0-0"
        with resp.redis_errors():
            while len(claimed) < limit:
                reply = self.r.xautoclaim(self.reports_raw, group, consumer, idle_ms, start_id=start, count=limit)
                start = reply[0].decode() if isinstance(reply[0], bytes) else str(reply[0])
                claimed += [(eid.decode(), fields) for eid, fields in reply[1]]
                if start == "0-0":
                    break
        return claimed

    # --- applying reports ----------------------------------------------------------------------------
    def fetch_report_rows(self, message_ids: Sequence[str]) -> list[ReportRow]:
        """What report processing needs of each message hash, in one script call."""
        if not message_ids:
            return []
        reply = self.run("report_fetch", [self.msg(m) for m in message_ids], [])
        return [ReportRow(_text(state), _text(reason), job, _text(lane), _text(bulk_id), _text(campaign))
                for state, reason, job, lane, bulk_id, campaign in reply]

    def apply_reports(
        self, ops: Sequence[Sequence[Any]], *, group: str, now_ms: int, events_maxlen: int,
        ack: Sequence[str] = (), dead: Sequence[tuple[str, bytes]] = (),
    ) -> tuple[bool, list[int]]:
        """One report_apply.lua call: `ops` are (code, messageId, state, status, payload, price, source)
        each; the raw entries `ack` are acknowledged and `dead` written only if no op conflicted.
        Returns (acknowledged, result per op)."""
        keys = [self.reports_raw, self.events, self.awaiting, self.dlq, self.reports_parked,
                self.reports_parked_since, self.reports_stats]
        keys += [self.msg(op[1]) for op in ops]
        args: list[Any] = [group, now_ms, events_maxlen, len(ack), *ack, len(dead)]
        for message_id, entry in dead:
            args += [message_id, entry]
        for op in ops:
            args += op  # code, messageId, state, status, payload, price, source: the script's order
        reply = self.run("report_apply", keys, args)
        return reply[0] == 1, [int(x) for x in reply[1:]]

    def report_counters(self) -> dict[str, int]:
        with resp.redis_errors():
            raw = self.r.hgetall(self.reports_stats)
        return {k.decode(): int(v) for k, v in raw.items()}

    # --- parked reports ------------------------------------------------------------------------------
    def parked_reports(self, offset: int, count: int) -> list[tuple[str, float, bytes | None]]:
        """Parked reports, oldest first, from `offset`: (messageId, first seen ms, report JSON)."""
        with resp.redis_errors():
            pairs = self.r.zrange(self.reports_parked_since, offset, offset + count - 1, withscores=True)
            if not pairs:
                return []
            mids = [m.decode() for m, _ in pairs]
            payloads = self.r.hmget(self.reports_parked, mids)
        return [(mid, since, payload) for mid, (_, since), payload in zip(mids, pairs, payloads, strict=True)]

    def drop_parked(self, message_ids: Sequence[str]) -> None:
        if message_ids:
            with resp.redis_errors():
                self.r.zrem(self.reports_parked_since, *message_ids)
                self.r.hdel(self.reports_parked, *message_ids)

    # --- the awaiting set and the logs lookup ----------------------------------------------------------
    def due_awaiting(self, now_ms: int, limit: int) -> list[str]:
        """Messages whose report deadline is at or before `now_ms`, earliest first."""
        with resp.redis_errors():
            due = self.r.zrangebyscore(self.awaiting, "-inf", now_ms, start=0, num=limit)
        return [m.decode() for m in due]

    def scan_awaiting(self, after_ms: int, horizon_ms: float, limit: int) -> list[tuple[bytes, float]]:
        """The next `limit` awaiting entries (messageId, deadline) from the lookup cursor, moving it on.

        From the entry after the cursor's message, or, when that message left the set, from the
        cursor's deadline (from `after_ms` without a cursor). At the end of a round (fewer than
        `limit` entries, or the last one past `horizon_ms`) the cursor is dropped: the next starts over."""
        cursor = self.reports_lookup_cursor
        with resp.redis_errors():
            cursor_score, cursor_member = self.r.hmget(cursor, ["score", "member"])
            rank = self.r.zrank(self.awaiting, cursor_member) if cursor_member is not None else None
            if rank is not None:
                entries = self.r.zrange(self.awaiting, rank + 1, rank + limit, withscores=True)
            else:
                low = f"({cursor_score.decode()}" if cursor_score is not None else f"({after_ms}"
                entries = self.r.zrangebyscore(self.awaiting, low, horizon_ms, start=0, num=limit, withscores=True)
            if len(entries) < limit or entries[-1][1] > horizon_ms:
                self.r.delete(cursor)
            else:
                self.r.hset(cursor, mapping={"score": repr(entries[-1][1]), "member": entries[-1][0]})
        return list(entries)

    def lookup_candidates(self, message_ids: Sequence[str]) -> list[tuple[float | None, bytes | None, bytes | None]]:
        """Per message: (its lookup due time if scheduled, its state, its updated_ms), one round trip."""
        with resp.redis_errors():
            pipe = self.r.pipeline(transaction=False)
            for mid in message_ids:
                pipe.zscore(self.reports_lookup, mid)
                pipe.hmget(self.msg(mid), ["state", "updated_ms"])
            replies = pipe.execute()
        return [(scheduled, state, updated) for scheduled, (state, updated) in zip(replies[::2], replies[1::2],
                                                                                   strict=True)]

    def schedule_lookups(self, due: Mapping[str, int]) -> None:
        """Put messages on the lookup schedule (due ms each), unless they are on it already."""
        if due:
            with resp.redis_errors():
                self.r.zadd(self.reports_lookup, dict(due), nx=True)

    def due_lookups(self, now_ms: int, limit: int) -> list[str]:
        with resp.redis_errors():
            due = self.r.zrangebyscore(self.reports_lookup, "-inf", now_ms, start=0, num=limit)
        return [m.decode() for m in due]

    def lookup_states(self, message_ids: Sequence[str]) -> list[tuple[bytes | None, float | None]]:
        """Per message: (its state, its report deadline if it still awaits one), one round trip."""
        with resp.redis_errors():
            pipe = self.r.pipeline(transaction=False)
            for mid in message_ids:
                pipe.hget(self.msg(mid), "state")
                pipe.zscore(self.awaiting, mid)
            replies = pipe.execute()
        return list(zip(replies[::2], replies[1::2], strict=True))

    def drop_lookups(self, message_ids: Sequence[str]) -> None:
        if message_ids:
            with resp.redis_errors():
                self.r.zrem(self.reports_lookup, *message_ids)
                self.r.hdel(self.reports_lookup_tries, *message_ids)

    def claim_lookups(self, now_ms: int, until_ms: int, message_ids: Sequence[str]) -> list[int]:
        """Claim due lookups until `until_ms` (report_lookup.lua); per message its lookups counting
        this one, or 0 when it is not due (any more)."""
        tries = self.run("report_lookup", [self.reports_lookup, self.reports_lookup_tries],
                         [now_ms, until_ms, *message_ids])
        return [int(n) for n in tries]

    def reschedule_lookups(self, due: Mapping[str, int]) -> None:
        """Move scheduled lookups to new due times (ms); messages no longer scheduled stay off."""
        if due:
            with resp.redis_errors():
                pipe = self.r.pipeline(transaction=False)
                for mid, at_ms in due.items():
                    pipe.zadd(self.reports_lookup, {mid: at_ms}, xx=True)
                pipe.execute()
