"""The outbox streams: producers append jobs, dispatchers claim, recover and release them."""

from __future__ import annotations

import itertools
import secrets
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, cast

import hiredis
import orjson
import redis

from worker.errors import EnqueueIncomplete, StoreError
from worker.store import resp
from worker.store.base import StoreBase, is_nogroup, load_script

DISPATCH_GROUP = "dispatch"
# Jobs per round trip when enqueueing; two chunks are in flight at a time.
ENQUEUE_CHUNK = 1000
# How long a campaign's counters are kept at least when a producer counts jobs in them, unless the
# caller says (the Outbox passes SMS_STATE_TTL_S): the state TTL's default.
CAMPAIGN_TTL_S = 3 * 86400
UNCOUNT_LUA = load_script("uncount")


class ClaimKind(StrEnum):
    """claim.lua's answer: what a dispatcher got from its lane's outbox."""

    NEW = "new"  # fresh entries
    RECOVERED = "recovered"  # entries a dead or paused dispatcher left pending past their lease
    WAIT = "wait"  # the rate limiter has no tokens yet: wait_ms
    EMPTY = "empty"  # nothing to do: wait for entries after last_id
    PAUSED = "paused"  # the lane is paused: wait_ms


@dataclass(frozen=True, slots=True)
class Entry:
    """One outbox entry as claimed: its stream id, message id and job JSON; `counted` is the campaign
    id the producer API counted it under at enqueue (its field `c`), None for entries it did not count
    (no campaign, or a plain XADD: those are counted when their message is first recorded)."""

    entry_id: str
    message_id: str
    job: bytes
    counted: str | None = None


def campaign_spec(job: bytes, counted: str | None = None, parsed: object = None) -> str:
    """The campaign spec the Lua scripts take for a job (worker/lua/lib/ledger.lua): "" for no
    campaign, "1<id>" when the producer API counted it at enqueue (`counted`: its entry's field `c`),
    "0<id>" when its message joins the campaign's counts only when first recorded (a plain XADD, a
    scheduled job). `parsed`: the job parsed already; else its JSON is read, only when it names a
    campaign at all."""
    if counted:
        return "1" + counted
    if parsed is None:
        if b'"campaign_reference_id"' not in job:
            return ""
        try:
            parsed = orjson.loads(job)
        except orjson.JSONDecodeError:
            return ""
    campaign = parsed.get("campaign_reference_id") if isinstance(parsed, dict) else None
    return "0" + campaign if isinstance(campaign, str) and campaign else ""


@dataclass(frozen=True, slots=True)
class Claim:
    kind: ClaimKind
    wait_ms: int
    entries: list[Entry]
    last_id: str = "0-0"  # for EMPTY: the outbox's last id, to wait for what comes after it


@dataclass(slots=True)
class _Enqueue:
    """The answers of one enqueue call as its chunks' replies come in."""

    outbox: str
    prefix: str  # the lane's message id prefix
    idem: str  # the producer-id key prefix
    jobs: Sequence[tuple[bytes, str | None]]
    results: list[tuple[str, bool] | None] = field(default_factory=list)
    repeats: list[bytes] = field(default_factory=list)  # entries of repeats: deleted, their answer stands
    undo_entries: list[bytes] = field(default_factory=list)  # appended without their claim: deleted, None
    undo_claims: list[tuple[str, str]] = field(default_factory=list)  # (key, mid) claimed without their entry
    failure: hiredis.ReplyError | None = None  # the first error that kept a job from being written
    # Per job, the campaign its entry is counted in at enqueue (field `c`), or None for a call
    # without campaign jobs (then nothing below is used and the writes are the plain ones).
    campaigns: Sequence[str | None] | None = None
    campaign_prefix: str = ""  # the counter hashes' key prefix ({p}:campaign:)
    counted: dict[bytes, str] = field(default_factory=dict)  # entry id -> campaign, for jobs `_undo` may delete
    unwritten: dict[str, int] = field(default_factory=dict)  # campaign -> its jobs counted whose XADD failed

    def fail(self, error: hiredis.ReplyError) -> None:
        self.failure = self.failure or error


class OutboxOps(StoreBase):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._tag = secrets.token_hex(4)
        self._counter = itertools.count()

    def outbox_lanes(self) -> list[str]:
        """The lane of every outbox stream that exists, configured or not (a producer may write to
        any `{p}:outbox:<name>` with plain XADD)."""
        prefix = self.outbox("")
        with resp.redis_errors():
            keys = self.r.scan_iter(match=f"{prefix}*", count=1000, _type="stream")
            return sorted({key.decode()[len(prefix):] for key in keys})

    # --- producers -------------------------------------------------------------------------------
    def enqueue(
        self, lane: str, jobs: Sequence[tuple[bytes, str | None]], idempotency_ttl_s: int = 172_800,
        chunk: int = ENQUEUE_CHUNK, *, campaigns: Sequence[str | None] | None = None,
        state_ttl_s: int = CAMPAIGN_TTL_S,
    ) -> list[tuple[str, bool]]:
        """Append (job JSON, producer id) pairs; returns (message id, newly queued) per job.

        Plain commands, no script (a script costs ~8 us a job inside Redis), in chunks of `chunk`
        jobs on one connection with two chunks in flight: Python packs chunk k+1 while Redis runs
        chunk k. Each chunk is one MULTI/EXEC transaction, written whole or not at all: Redis
        discards the whole transaction (EXECABORT) when it refused a command while queueing it (out
        of memory under `noeviction`, MISCONF, READONLY...) or is out of memory at EXEC. (As
        independent commands, an out-of-memory Redis refused an XADD and then applied the claim of
        its producer id, so a retry was told "duplicate" for a job that was never written.)

        A job without a producer id is a plain XADD; its message id is derived from the entry id.
        A job with one gets its message id here, is appended with it, and claims the producer id
        with SET NX GET in the same transaction. A repeat (the id was claimed earlier) gets the
        earlier message id back and its entry is deleted afterwards with XDEL (an entry left by a
        producer that died before that is dropped by the dispatcher, which claims every producer id
        again before sending: Dispatcher._first_owners).

        Raises EnqueueIncomplete when Redis refused part of the call: `.queued[i]` is job i's answer,
        or None when nothing of it was written (its chunk was refused, or never sent because an
        earlier chunk was refused; with two chunks in flight the one after a refused chunk may
        still have been written, and is reported as such). Any other StoreError (the connection was
        lost with a chunk in flight) leaves the outcome unknown: only a retry with producer ids is
        safe then.

        `campaigns` (per job, its campaign_reference_id or None; None for a call without any) makes
        the entries of campaign jobs carry the field `c` and counts them in their campaign
        ({p}:campaign:{id}: total and queued) in the chunk's own transaction, so an entry exists
        exactly when it is counted; repeats and halves undone are uncounted as they are deleted
        (uncount.lua). The counter hash is kept at least `state_ttl_s`. A call without campaigns
        writes exactly what it wrote before counters existed.
        """
        call = _Enqueue(self.outbox(lane), self.lane_prefix(lane), self.idem(""), jobs, campaigns=campaigns,
                        campaign_prefix=self.campaign(""))
        packer = _ChunkPacker(call.outbox, call.idem, idempotency_ttl_s, self.campaign(""), self.campaigns,
                              state_ttl_s)
        with resp.connection(self.r) as (conn, reader):
            in_flight: list[tuple[int, list[str | None], int]] = []
            for start in range(0, len(jobs), chunk):
                mid_base = f"{call.prefix}{int(time.time() * 1000)}-p{self._tag}"
                packed, mids, count = packer.pack(jobs[start : start + chunk], mid_base, self._counter,
                                                  None if campaigns is None else campaigns[start : start + chunk])
                conn.send_packed_command([packed])
                in_flight.append((start, mids, count))
                if len(in_flight) == 2:
                    first, first_mids, first_count = in_flight.pop(0)
                    _read_chunk(call, resp.read_replies(conn, reader, first_count), first, first_mids)
                    if call.failure is not None:
                        break  # send no more; the chunk in flight is still read and reported
            for start, mids, count in in_flight:
                _read_chunk(call, resp.read_replies(conn, reader, count), start, mids)
            _undo(conn, reader, call)
        return _answers(call)

    # --- dispatchers ------------------------------------------------------------------------------
    def claim(
        self, lane: str, consumer: str, n: int, *, lease_ms: int, max_wait_ms: int, recover: bool
    ) -> Claim:
        reply = self.run(
            "claim",
            [self.outbox(lane), self.pause_key(lane)],
            [DISPATCH_GROUP, consumer, n, lease_ms, max_wait_ms, "1" if recover else "0"],
        )
        kind = ClaimKind(reply[0].decode())
        if kind is ClaimKind.EMPTY:
            return Claim(kind, 0, [], last_id=reply[2].decode())
        return Claim(kind, int(reply[1]), self._entries(lane, reply[2:]))

    def wait_for_new(self, lane: str, after_id: str, block_ms: int) -> bool:
        """Block until an entry after `after_id` is appended to the lane's outbox, or `block_ms`
        pass; True if one was. Claims nothing, so it holds no rate-limiter tokens while waiting."""
        with resp.redis_errors():
            return bool(self.r.xread({self.outbox(lane): after_id}, count=1, block=max(1, block_ms)))

    def claim_entries(self, lane: str, consumer: str, entry_ids: Sequence[str]) -> list[Entry]:
        """Take over specific pending entries (for reconciliation); deleted ones are skipped."""
        if not entry_ids:
            return []
        with resp.redis_errors():
            try:
                reply = self.r.xclaim(self.outbox(lane), DISPATCH_GROUP, consumer, 0, list(entry_ids))
            except redis.ResponseError as error:
                if not is_nogroup(error):
                    raise
                # The group is gone (Redis restarted empty or was flushed): nothing is pending, and
                # claim.lua recreates the group on the next claim.
                return []
        flat: list[Any] = []
        for entry_id, fields in reply:
            if fields:
                flat += [entry_id, [x for kv in fields.items() for x in kv]]
        return self._entries(lane, flat)

    def entry_message_id(self, lane: str, entry_id: str, fields: dict[bytes, bytes]) -> str:
        """An entry's message id: given at enqueue (jobs with a producer id, replays) or derived
        from the entry id (everything else)."""
        mid = fields.get(b"mid")
        return mid.decode() if mid else self.lane_prefix(lane) + entry_id

    def _entries(self, lane: str, flat: Sequence[Any]) -> list[Entry]:
        entries = []
        for i in range(0, len(flat), 2):
            entry_id = flat[i].decode()
            raw = flat[i + 1]
            fields = {raw[j]: raw[j + 1] for j in range(0, len(raw), 2)}
            counted = fields.get(b"c")
            entries.append(Entry(entry_id, self.entry_message_id(lane, entry_id, fields), fields.get(b"job", b""),
                                 counted.decode() if counted else None))
        return entries

    def retry_in(self, lane: str, consumer: str, entry_ids: Sequence[str], delay_ms: int, lease_ms: int) -> None:
        """Make pending entries due for recovery in `delay_ms` instead of a whole lease.

        XAUTOCLAIM takes entries idle for `lease_ms`; setting their idle time to the lease minus the
        delay brings a certainly-not-sent batch back as soon as its lane's pause is over.
        """
        if entry_ids:
            idle = max(0, lease_ms - delay_ms)
            try:
                self.pipeline([(b"XCLAIM", self.outbox(lane), DISPATCH_GROUP, consumer, 0, *entry_ids,
                                b"IDLE", idle, b"JUSTID")])
            except StoreError as error:
                # A vanished group has nothing pending to bring back (see claim_entries).
                if not is_nogroup(error.__cause__):
                    raise


class _ChunkPacker:
    """Packs one enqueue chunk as MULTI, an XADD (and a SET NX GET of its producer id) per job, EXEC;
    a chunk holding campaign jobs also gets their field `c` and its campaigns' counter commands."""

    def __init__(self, outbox: str, idem: str, idempotency_ttl_s: int, campaign_prefix: str = "",
                 campaigns_key: str = "", campaign_ttl_s: int = CAMPAIGN_TTL_S) -> None:
        self.xadd = b"".join(resp.bulk(part) for part in (b"XADD", outbox.encode(), b"*", b"job"))
        self.idem = idem
        self.set_head = b"*7\r\n" + resp.bulk(b"SET")
        self.set_options = b"".join(resp.bulk(part) for part in (b"NX", b"GET", b"EX", b"%d" % idempotency_ttl_s))
        self.campaign_prefix = campaign_prefix
        self.campaigns_key = campaigns_key
        self.campaign_ttl_s = campaign_ttl_s

    def pack(
        self, jobs: Sequence[tuple[bytes, str | None]], mid_base: str, counter: itertools.count[int],
        campaigns: Sequence[str | None] | None = None,
    ) -> tuple[bytes, list[str | None], int]:
        """(the chunk's bytes, each job's message id or None, how many replies it gets)."""
        if campaigns is not None:
            return self._pack_counted(jobs, campaigns, mid_base, counter)
        mids: list[str | None] = []
        parts: list[bytes] = [b"*1\r\n$5\r\nMULTI\r\n"]
        for job, producer_id in jobs:
            if producer_id is None:
                mids.append(None)
                parts.append(b"*5\r\n" + self.xadd + resp.bulk(job))
                continue
            mid = f"{mid_base}{next(counter):x}"
            mids.append(mid)
            mid_bulk = resp.bulk(mid.encode())
            parts.append(b"*7\r\n" + self.xadd + resp.bulk(job) + b"$3\r\nmid\r\n" + mid_bulk)
            parts.append(self.set_head + resp.bulk((self.idem + producer_id).encode()) + mid_bulk + self.set_options)
        parts.append(b"*1\r\n$4\r\nEXEC\r\n")
        return b"".join(parts), mids, len(parts)

    def _pack_counted(
        self, jobs: Sequence[tuple[bytes, str | None]], campaigns: Sequence[str | None], mid_base: str,
        counter: itertools.count[int],
    ) -> tuple[bytes, list[str | None], int]:
        """`pack` for a chunk that may hold campaign jobs: their entries carry `c` = the campaign,
        and per campaign the chunk adds total and queued, stamps first_ms / updated_ms (this
        host's clock: a transaction cannot read the server's), keeps the hash at least the TTL
        (EXPIRE NX sets one on a new hash, EXPIRE GT only ever lengthens it) and moves the
        campaign up in {p}:campaigns (GT: never back, if this clock is behind the scripts')."""
        mids: list[str | None] = []
        parts: list[bytes] = [b"*1\r\n$5\r\nMULTI\r\n"]
        per_campaign: dict[str, int] = {}
        for (job, producer_id), campaign in zip(jobs, campaigns, strict=True):
            counted = b""
            if campaign is not None:
                per_campaign[campaign] = per_campaign.get(campaign, 0) + 1
                counted = b"$1\r\nc\r\n" + resp.bulk(campaign.encode())
            head = b"*7\r\n" if campaign is not None else b"*5\r\n"
            if producer_id is None:
                mids.append(None)
                parts.append(head + self.xadd + resp.bulk(job) + counted)
                continue
            mid = f"{mid_base}{next(counter):x}"
            mids.append(mid)
            mid_bulk = resp.bulk(mid.encode())
            head = b"*9\r\n" if campaign is not None else b"*7\r\n"
            parts.append(head + self.xadd + resp.bulk(job) + b"$3\r\nmid\r\n" + mid_bulk + counted)
            parts.append(self.set_head + resp.bulk((self.idem + producer_id).encode()) + mid_bulk + self.set_options)
        now = b"%d" % int(time.time() * 1000)
        ttl = b"%d" % self.campaign_ttl_s
        for campaign, n in per_campaign.items():
            key = (self.campaign_prefix + campaign).encode()
            commands: list[tuple[Any, ...]] = [
                (b"HINCRBY", key, b"total", n), (b"HINCRBY", key, b"queued", n), (b"HSETNX", key, b"first_ms", now),
                (b"HSET", key, b"updated_ms", now), (b"EXPIRE", key, ttl, b"NX"), (b"EXPIRE", key, ttl, b"GT"),
                (b"ZADD", self.campaigns_key, b"GT", now, campaign.encode()),
            ]
            parts += [hiredis.pack_command(command) for command in commands]
        parts.append(b"*1\r\n$4\r\nEXEC\r\n")
        return b"".join(parts), mids, len(parts)


def _read_chunk(call: _Enqueue, replies: list[Any], start: int, mids: list[str | None]) -> None:
    """One chunk's replies (MULTI's +OK, one +QUEUED per command, EXEC's array) -> each job's
    answer in `call.results`: (message id, queued), or None if nothing of it was written.

    A job Redis half wrote (possible only when a command fails inside EXEC, e.g. WRONGTYPE, or when
    MULTI itself was refused and the commands ran one by one) has that half listed in
    `undo_entries` / `undo_claims` and is reported as None."""
    executed = replies[-1]
    if isinstance(replies[0], hiredis.ReplyError):
        executed = replies[1:-1]  # no transaction: each command's reply is its result
    elif not isinstance(executed, list):
        # EXECABORT: a command was refused while queueing (its error says why), or EXEC itself
        # was refused (out of memory). Nothing of the chunk was written.
        call.results.extend([None] * len(mids))
        reason = next((r for r in replies[1:-1] if isinstance(r, hiredis.ReplyError)), executed)
        call.fail(reason if isinstance(reason, hiredis.ReplyError) else hiredis.ReplyError(f"EXEC: {reason!r}"))
        return
    _read_answers(call, iter(executed), start, mids)


def _read_answers(call: _Enqueue, answers: Iterator[Any], start: int, mids: list[str | None]) -> None:
    """Each job's answer from an executed chunk, noting for a chunk packed by `_pack_counted` what
    `_undo` must uncount: the entries of campaign jobs it may delete (repeats, halves), and per
    campaign the jobs counted whose XADD failed (only if the chunk's count itself was applied)."""
    campaigns = call.campaigns[start : start + len(mids)] if call.campaigns is not None else [None] * len(mids)
    unwritten: dict[str, int] = {}
    for i, mid in enumerate(mids):
        entry_id = next(answers)
        if mid is None:
            _plain_answer(call, entry_id)
        else:
            _claimed_answer(call, mid, entry_id, next(answers), str(call.jobs[start + i][1]))
        if (campaign := campaigns[i]) is None:
            continue
        if type(entry_id) is not bytes:
            unwritten[campaign] = unwritten.get(campaign, 0) + 1
        elif mid is not None:
            call.counted[entry_id] = campaign
    for campaign in dict.fromkeys(c for c in campaigns if c is not None):  # `_pack_counted`'s order
        total = next(answers)  # HINCRBY total, then the campaign's other counter commands
        for _ in range(_COUNTER_COMMANDS - 1):
            next(answers)
        if type(total) is int and campaign in unwritten:
            call.unwritten[campaign] = call.unwritten.get(campaign, 0) + unwritten[campaign]


# Commands per campaign and chunk that `_pack_counted` adds.
_COUNTER_COMMANDS = 7


def _plain_answer(call: _Enqueue, entry_id: Any) -> None:
    """A job without a producer id: appended or not."""
    if type(entry_id) is bytes:
        call.results.append((call.prefix + entry_id.decode(), True))
    else:
        call.results.append(None)
        call.fail(entry_id)


def _claimed_answer(call: _Enqueue, mid: str, entry_id: Any, earlier: Any, producer_id: str) -> None:
    """A job with a producer id: its XADD's and its SET NX GET's replies."""
    appended = type(entry_id) is bytes
    if appended and earlier is None:
        call.results.append((mid, True))
    elif type(earlier) is bytes:
        # A repeat: the producer id is queued as `earlier`, whatever became of this entry.
        call.results.append((earlier.decode(), False))
        if appended:
            call.repeats.append(entry_id)
        else:
            call.fail(entry_id)
    else:
        call.results.append(None)
        call.fail(earlier if appended else entry_id)
        if appended:  # appended, claim refused
            call.undo_entries.append(entry_id)
        elif earlier is None:  # claimed, append refused
            call.undo_claims.append((call.idem + producer_id, mid))


def _undo(conn: Any, reader: hiredis.Reader, call: _Enqueue) -> None:
    """Delete the entries of repeats and the halves of half-written jobs.

    Plain commands (XDEL and DEL are allowed when Redis is out of memory, also inside a failed call;
    queued in a MULTI they would not be), and uncount.lua for entries counted in a campaign (it too
    runs out of memory: see its header). If this round trip is lost, a plain StoreError says the
    outcome is unknown (the counters stay exact: an entry is uncounted only with its deletion)."""
    commands = _undo_commands(call)
    if commands:
        conn.send_packed_command([resp.pack(commands)])
        resp.check(resp.read_replies(conn, reader, len(commands)))


def _undo_commands(call: _Enqueue) -> list[tuple[Any, ...]]:
    """The XDEL and DEL of `_undo` (also sent by worker.store.aio's enqueue); entries counted in a
    campaign are deleted by uncount.lua instead, which uncounts each only if it deleted it."""
    commands: list[tuple[Any, ...]] = []
    deleted = [*call.repeats, *call.undo_entries]
    counted = [entry for entry in deleted if entry in call.counted] if call.counted else []
    if counted:
        deleted = [entry for entry in deleted if entry not in call.counted]
        keys = [call.campaign_prefix + call.counted[entry] for entry in counted]
        commands.append((b"EVAL", UNCOUNT_LUA, 1 + len(keys), call.outbox, *keys, *counted))
    if deleted:
        commands.append((b"XDEL", call.outbox, *deleted))
    for campaign, n in call.unwritten.items():
        key = call.campaign_prefix + campaign
        commands += [(b"HINCRBY", key, b"total", -n), (b"HINCRBY", key, b"queued", -n)]
    if call.undo_claims:
        commands.append((b"DEL", *(key for key, _ in call.undo_claims)))
    return commands


def _answers(call: _Enqueue) -> list[tuple[str, bool]]:
    results = call.results
    if call.undo_claims:
        # A later job of this call with the same producer id was told it repeats a claim now
        # undone; its entry is deleted as a repeat's, so nothing of it is written either.
        undone = {mid for _, mid in call.undo_claims}
        results = [None if answer is not None and answer[0] in undone else answer for answer in results]
    if call.failure is None:
        return cast(list[tuple[str, bool]], results)  # every job has its answer
    results += [None] * (len(call.jobs) - len(results))
    written = sum(1 for answer in results if answer is not None)
    raise EnqueueIncomplete(
        f"Redis: {call.failure} ({written} of {len(call.jobs)} jobs answered, nothing written of the other "
        f"{len(call.jobs) - written})",
        results,
    ) from redis.ResponseError(str(call.failure))
