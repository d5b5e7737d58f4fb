"""The only module that knows Redis key names and scripts; redis-py errors become StoreError here.

Keys (prefix `sms` by default):
    {p}:outbox:{lane}        stream, one entry per job (`job` JSON, optional `mid`), group `dispatch`
    {p}:msg:{message_id}     hash, the message's state, job, attempts, bulk id... (TTL: state TTL)
    {p}:idem:{producer_id}   string, the message id a producer id was queued as (TTL: retention)
    {p}:events               stream, status events (`event` JSON)
    {p}:dlq                  stream, dead letters (`message_id`, `entry` JSON)
    {p}:awaiting             sorted set, accepted message ids by report deadline (ms)
    {p}:rl:{bucket}          GCRA bucket (TAT, microseconds)
    {p}:dispatchers:{lane}   sorted set, dispatcher slots by lease expiry (ms)
    {p}:kick:{lane}          de-duplicates dispatch kicks
    {p}:pause:{lane}         set while a lane is paused (value: the reason); expires by itself
    {p}:fence:{token}        lives while a batch may still write its request (TTL: the send window)
    {p}:reports:*            raw report pages, parked reports, drain lease (see reports.py)
Redis Cluster is not supported: scripts touch keys of several slots in one call.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import secrets
import socket
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, cast

import hiredis
import redis
from redis.commands.core import Script

from worker.errors import EnqueueIncomplete, StoreError

DISPATCH_GROUP = "dispatch"
# Messages per script call: a 1000-message settle in one call held Redis for 20-100 ms, and every
# otp send waited behind it; 100 keeps each call near 2 ms.
SCRIPT_CHUNK = 100
# A takeover waits this long past a SUBMITTING message's send_by before reconciling it: a request
# written just before the deadline is on its way, and a batch's submit calls (one per SCRIPT_CHUNK)
# set its fence a few ms apart.
FENCE_MARGIN_MS = 1000
# Jobs per round trip when enqueueing; two chunks are in flight at a time.
ENQUEUE_CHUNK = 1000


@contextlib.contextmanager
def redis_errors() -> Iterator[None]:
    """Map redis-py's exceptions into the worker's tree at this boundary."""
    try:
        yield
    except redis.RedisError as error:
        raise StoreError(f"Redis: {type(error).__name__}: {error}") from error


def connect(url: str, **kwargs: Any) -> redis.Redis:
    """One client (and its connection pool) per process, created at boot."""
    return redis.Redis.from_url(
        url,
        socket_connect_timeout=5,
        socket_timeout=30,
        health_check_interval=30,
        retry_on_timeout=False,
        **kwargs,
    )


def _read_replies(conn: Any, reader: hiredis.Reader, count: int) -> list[Any]:
    """Read `count` replies from a redis-py connection's socket with a hiredis parser of our own.

    The reader keeps bytes that belong to later replies, so several calls may share a connection
    with more commands in flight."""
    replies: list[Any] = []
    sock = conn._sock  # redis-py keeps the socket here; its own parser is bypassed on purpose
    while (reply := reader.gets()) is not False:
        replies.append(reply)
        if len(replies) == count:
            return replies
    while len(replies) < count:
        data = sock.recv(1 << 16)
        if not data:
            raise redis.ConnectionError("connection closed by Redis")
        reader.feed(data)
        while len(replies) < count and (reply := reader.gets()) is not False:
            replies.append(reply)
    return replies


def _check(replies: list[Any]) -> list[Any]:
    """Raise an error reply as StoreError (NOSCRIPT keeps its own type as the cause)."""
    for reply in replies:
        if isinstance(reply, hiredis.ReplyError):
            kind = redis.exceptions.NoScriptError if str(reply).startswith("NOSCRIPT") else redis.ResponseError
            raise StoreError(f"Redis: {reply}") from kind(str(reply))
    return replies


def _is_nogroup(error: Exception) -> bool:
    """Redis's answer for a stream or consumer group that does not exist (any more)."""
    return str(error).startswith("NOGROUP")


def _bulk(value: bytes) -> bytes:
    """One RESP bulk string; cheaper than packing a whole command when most of it is fixed."""
    return b"$%d\r\n%s\r\n" % (len(value), value)


def consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def _load(name: str) -> str:
    return (resources.files("worker") / "lua" / f"{name}.lua").read_text()


@dataclass(frozen=True, slots=True)
class Entry:
    """One outbox entry as claimed: its stream id, message id and job JSON."""

    entry_id: str
    message_id: str
    job: bytes


@dataclass(frozen=True, slots=True)
class Claim:
    kind: str  # "new", "recovered", "wait", "empty" or "paused"
    wait_ms: int
    entries: list[Entry]
    last_id: str = "0-0"  # for "empty": the outbox's last id, to wait for what comes after it


@dataclass(frozen=True, slots=True)
class Submitted:
    """submit.lua's / absent.lua's answer for one message: a state or verdict, attempts, a wait."""

    state: str
    attempts: int
    wait_ms: int = 0


@dataclass(slots=True)
class Outcome:
    """What settle.lua records for one message.

    `guard` makes an outcome that is our own decision (not sent, ambiguous, given up) conditional on
    still owning the message: "f:<fence>" (the batch's fence is still the message's) or "c:<consumer>"
    (we still hold its reconciliation lease); "" for the provider's facts (accepted, rejected)."""

    message_id: str
    entry_id: str
    state: str
    ack: bool
    event: bytes = b""
    deadline_ms: int | None = None
    fields: dict[str, str | int] | None = None
    dead_letter: bytes = b""
    guard: str = ""


class Store:
    """Typed operations over one Redis database, each one round trip."""

    def __init__(self, client: redis.Redis, prefix: str = "sms", message_id_prefix: str = "sw") -> None:
        # redis-py types replies as unions of str/bytes/None/awaitables; this client always
        # answers bytes (decode_responses off), so its replies are treated as untyped here.
        self.r: Any = client
        self.p = prefix
        self.mid_prefix = message_id_prefix
        self._scripts: dict[str, Script] = {}
        self._tag = secrets.token_hex(4)
        self._counter = itertools.count()

    # --- keys ------------------------------------------------------------------------------------
    def outbox(self, lane: str) -> str:
        return f"{self.p}:outbox:{lane}"

    def msg(self, message_id: str) -> str:
        return f"{self.p}:msg:{message_id}"

    def idem(self, producer_id: str) -> str:
        return f"{self.p}:idem:{producer_id}"

    @property
    def events(self) -> str:
        return f"{self.p}:events"

    @property
    def dlq(self) -> str:
        return f"{self.p}:dlq"

    @property
    def awaiting(self) -> str:
        return f"{self.p}:awaiting"

    def bucket(self, name: str) -> str:
        return f"{self.p}:rl:{name}"

    def dispatchers(self, lane: str) -> str:
        return f"{self.p}:dispatchers:{lane}"

    def kick_key(self, lane: str) -> str:
        return f"{self.p}:kick:{lane}"

    def pause_key(self, lane: str) -> str:
        return f"{self.p}:pause:{lane}"

    def fence_key(self, token: str) -> str:
        return f"{self.p}:fence:{token}"

    def key(self, *parts: str) -> str:
        """Any other key of the namespace (reports, leases, heartbeats)."""
        return ":".join((self.p, *parts))

    def outbox_lanes(self) -> list[str]:
        """The lane of every outbox stream that exists, configured or not (a producer may write to
        any `{p}:outbox:<name>` with plain XADD)."""
        prefix = f"{self.p}:outbox:"
        with redis_errors():
            keys = self.r.scan_iter(match=f"{prefix}*", count=1000, _type="stream")
            return sorted({key.decode()[len(prefix):] for key in keys})

    def lane_prefix(self, lane: str) -> str:
        return f"{self.mid_prefix}-{lane}-"

    # --- scripts ---------------------------------------------------------------------------------
    def script(self, name: str) -> Script:
        script = self._scripts.get(name)
        if script is None:
            script = self._scripts[name] = self.r.register_script(_load(name))
        return script

    def run(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """EVALSHA a script from worker/lua (loaded on first use, and again after a Redis restart)."""
        return self.run_many(name, [(keys, args)])[0]

    def run_many(self, name: str, calls: Sequence[tuple[Sequence[str], Sequence[Any]]]) -> list[Any]:
        """Several calls of one script in one round trip. Redis runs each call atomically but may
        serve other clients between them, so a big batch cut into calls does not stall an otp send."""
        script = self.script(name)
        commands = [(b"EVALSHA", script.sha, len(keys), *keys, *args) for keys, args in calls]
        try:
            return self.pipeline(commands)
        except StoreError as error:
            if not isinstance(error.__cause__, redis.exceptions.NoScriptError):
                raise
        # Redis restarted and forgot its scripts: nothing of this call ran (scripts are all-or-nothing
        # per call, and the cache is empty for all of them), so load and send again.
        with redis_errors():
            self.r.script_load(script.script)
        return self.pipeline(commands)

    # --- producers -------------------------------------------------------------------------------
    def enqueue(
        self, lane: str, jobs: Sequence[tuple[bytes, str | None]], idempotency_ttl_s: int = 172_800,
        chunk: int = ENQUEUE_CHUNK,
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
        again before sending: Dispatcher._drop_duplicate_ids).

        Raises EnqueueIncomplete when Redis refused part of the call: `.queued[i]` is job i's answer,
        or None when nothing of it was written (its chunk was refused, or never sent because an
        earlier chunk was refused; with two chunks in flight the one after a refused chunk may
        still have been written, and is reported as such). Any other StoreError (the connection was
        lost with a chunk in flight) leaves the outcome unknown: only a retry with producer ids is
        safe then.
        """
        outbox, prefix = self.outbox(lane), self.lane_prefix(lane)
        xadd = b"".join(_bulk(part) for part in (b"XADD", outbox.encode(), b"*", b"job"))
        idem = self.idem("")
        set_head = b"*7\r\n" + _bulk(b"SET")
        set_options = b"".join(_bulk(part) for part in (b"NX", b"GET", b"EX", b"%d" % idempotency_ttl_s))
        results: list[tuple[str, bool] | None] = []
        repeats: list[bytes] = []  # entries of repeats: deleted, their answer stands
        undo_entries: list[bytes] = []  # entries appended without their claim: deleted, reported None
        undo_claims: list[tuple[str, str]] = []  # (key, message id) of claims made without their entry
        failure: hiredis.ReplyError | None = None  # the first error that kept a job from being written
        with self._connection() as (conn, reader):
            in_flight: list[tuple[int, list[str | None], int]] = []
            for start in range(0, len(jobs), chunk):
                mid_base = f"{prefix}{int(time.time() * 1000)}-p{self._tag}"
                mids: list[str | None] = []
                parts: list[bytes] = [b"*1\r\n$5\r\nMULTI\r\n"]
                for job, producer_id in jobs[start : start + chunk]:
                    if producer_id is None:
                        mids.append(None)
                        parts.append(b"*5\r\n" + xadd + _bulk(job))
                    else:
                        mid = f"{mid_base}{next(self._counter):x}"
                        mids.append(mid)
                        mid_bulk = _bulk(mid.encode())
                        parts.append(b"*7\r\n" + xadd + _bulk(job) + b"$3\r\nmid\r\n" + mid_bulk)
                        parts.append(set_head + _bulk((idem + producer_id).encode()) + mid_bulk + set_options)
                parts.append(b"*1\r\n$4\r\nEXEC\r\n")
                conn.send_packed_command([b"".join(parts)])
                in_flight.append((start, mids, len(parts)))
                if len(in_flight) == 2:
                    error = self._enqueued(conn, reader, prefix, idem, jobs, *in_flight.pop(0), results, repeats,
                                           undo_entries, undo_claims)
                    failure = failure or error
                    if failure is not None:
                        break  # send no more; the chunk in flight is still read and reported
            for item in in_flight:
                error = self._enqueued(conn, reader, prefix, idem, jobs, *item, results, repeats, undo_entries,
                                       undo_claims)
                failure = failure or error
            if repeats or undo_entries or undo_claims:
                # Plain commands (XDEL and DEL are allowed when Redis is out of memory, also inside a
                # failed call; queued in a MULTI they would not be). If this round trip is lost, a
                # plain StoreError says the outcome is unknown.
                commands: list[tuple[Any, ...]] = []
                if repeats or undo_entries:
                    commands.append((b"XDEL", outbox, *repeats, *undo_entries))
                if undo_claims:
                    commands.append((b"DEL", *(key for key, _ in undo_claims)))
                conn.send_packed_command([b"".join([hiredis.pack_command(c) for c in commands])])
                _check(_read_replies(conn, reader, len(commands)))
        if undo_claims:
            # A later job of this call with the same producer id was told it repeats a claim now
            # undone; its entry is deleted as a repeat's, so nothing of it is written either.
            undone = {mid for _, mid in undo_claims}
            results = [None if answer is not None and answer[0] in undone else answer for answer in results]
        if failure is None:
            return cast(list[tuple[str, bool]], results)  # every job has its answer
        results += [None] * (len(jobs) - len(results))
        written = sum(1 for answer in results if answer is not None)
        raise EnqueueIncomplete(
            f"Redis: {failure} ({written} of {len(jobs)} jobs answered, nothing written of the other "
            f"{len(jobs) - written})",
            results,
        ) from redis.ResponseError(str(failure))

    @staticmethod
    def _enqueued(
        conn: Any, reader: hiredis.Reader, prefix: str, idem: str, jobs: Sequence[tuple[bytes, str | None]],
        start: int, mids: list[str | None], count: int, results: list[tuple[str, bool] | None],
        repeats: list[bytes], undo_entries: list[bytes], undo_claims: list[tuple[str, str]],
    ) -> hiredis.ReplyError | None:
        """Read one chunk's `count` replies (MULTI's +OK, one +QUEUED per command, EXEC's array)
        and append each job's answer to `results`: (message id, queued), or None if nothing of it
        was written. Returns the first error that kept a job of the chunk from being written.

        Entry ids of repeats go to `repeats`. A job Redis half wrote (possible only when a command
        fails inside EXEC, e.g. WRONGTYPE, or when MULTI itself was refused and the commands ran one
        by one) has that half listed in `undo_entries` / `undo_claims` and is reported as None."""
        replies = _read_replies(conn, reader, count)
        executed = replies[-1]
        if isinstance(replies[0], hiredis.ReplyError):
            executed = replies[1:-1]  # no transaction: each command's reply is its result
        elif not isinstance(executed, list):
            # EXECABORT: a command was refused while queueing (its error says why), or EXEC itself
            # was refused (out of memory). Nothing of the chunk was written.
            results.extend([None] * len(mids))
            reason = next((r for r in replies[1:-1] if isinstance(r, hiredis.ReplyError)), executed)
            return reason if isinstance(reason, hiredis.ReplyError) else hiredis.ReplyError(f"EXEC: {reason!r}")
        failure = None
        answers = iter(executed)
        for i, mid in enumerate(mids):
            entry_id = next(answers)
            appended = type(entry_id) is bytes
            if mid is None:
                if appended:
                    results.append((prefix + entry_id.decode(), True))
                else:
                    results.append(None)
                    failure = failure or entry_id
                continue
            earlier = next(answers)
            if appended and earlier is None:
                results.append((mid, True))
            elif type(earlier) is bytes:
                # A repeat: the producer id is queued as `earlier`, whatever became of this entry.
                results.append((earlier.decode(), False))
                if appended:
                    repeats.append(entry_id)
                else:
                    failure = failure or entry_id
            else:
                results.append(None)
                failure = failure or (earlier if appended else entry_id)
                if appended:  # appended, claim refused
                    undo_entries.append(entry_id)
                elif earlier is None:  # claimed, append refused
                    undo_claims.append((idem + str(jobs[start + i][1]), mid))
        return failure

    @contextlib.contextmanager
    def _connection(self) -> Iterator[tuple[Any, hiredis.Reader]]:
        """A pooled connection whose replies we parse ourselves with one hiredis.Reader.

        redis-py's pipeline spends ~10 us of Python per command; packing with hiredis and parsing
        the replies straight off the socket is several times cheaper, which is what lets one
        producer enqueue 100k+ jobs/s.
        """
        pool = self.r.connection_pool
        with redis_errors():
            conn = pool.get_connection()
            try:
                yield conn, hiredis.Reader()
            except OSError as error:
                # Our own reads bypass redis-py, so a reset socket arrives as a bare OSError.
                conn.disconnect()
                raise redis.ConnectionError(f"connection to Redis lost: {error}") from error
            except BaseException:
                # A half-read connection must not go back to the pool.
                conn.disconnect()
                raise
            finally:
                pool.release(conn)

    def pipeline(self, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
        """Many commands in one round trip, packed and parsed by hiredis.

        An error reply is raised as StoreError (the other replies of the call are then lost:
        callers send commands that fail only when Redis itself is broken).
        """
        with self._connection() as (conn, reader):
            conn.send_packed_command([b"".join([hiredis.pack_command(c) for c in commands])])
            replies = _read_replies(conn, reader, len(commands))
        return _check(replies)

    # --- dispatch --------------------------------------------------------------------------------
    def claim(
        self, lane: str, consumer: str, n: int, *, lease_ms: int, max_wait_ms: int, recover: bool
    ) -> Claim:
        reply = self.run(
            "claim",
            [self.outbox(lane), self.pause_key(lane)],
            [DISPATCH_GROUP, consumer, n, lease_ms, max_wait_ms, "1" if recover else "0"],
        )
        kind = reply[0].decode()
        if kind == "empty":
            return Claim(kind, 0, [], last_id=reply[2].decode())
        return Claim(kind, int(reply[1]), self._entries(lane, reply[2:]))

    def wait_for_new(self, lane: str, after_id: str, block_ms: int) -> bool:
        """Block until an entry after `after_id` is appended to the lane's outbox, or `block_ms`
        pass; True if one was. Claims nothing, so it holds no rate-limiter tokens while waiting."""
        with redis_errors():
            return bool(self.r.xread({self.outbox(lane): after_id}, count=1, block=max(1, block_ms)))

    def claim_entries(self, lane: str, consumer: str, entry_ids: Sequence[str]) -> list[Entry]:
        """Take over specific pending entries (for reconciliation); deleted ones are skipped."""
        if not entry_ids:
            return []
        with redis_errors():
            try:
                reply = self.r.xclaim(self.outbox(lane), DISPATCH_GROUP, consumer, 0, list(entry_ids))
            except redis.ResponseError as error:
                if not _is_nogroup(error):
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
            entries.append(Entry(entry_id, self.entry_message_id(lane, entry_id, fields), fields.get(b"job", b"")))
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
                if not isinstance(error.__cause__, redis.ResponseError) or not _is_nogroup(error.__cause__):
                    raise

    def claim_producer_ids(self, pairs: Sequence[tuple[str, str]], ttl_s: int) -> list[str]:
        """(producer id, message id) pairs -> the message id that owns each producer id.

        The first message to claim a producer id owns it for `ttl_s`; a later one gets the
        owner's message id back and is a repeat.
        """
        if not pairs:
            return []
        earlier = self.pipeline(
            [(b"SET", self.idem(pid), mid, b"NX", b"GET", b"EX", ttl_s) for pid, mid in pairs]
        )
        return [mid if prev is None else prev.decode() for prev, (_, mid) in zip(earlier, pairs, strict=True)]

    def submit(
        self, lane: str, items: Sequence[Entry], *, consumer: str, lease_ms: int, state_ttl_s: int, fence: str,
        send_window_ms: int, margin_ms: int = FENCE_MARGIN_MS,
    ) -> list[Submitted]:
        """Mark messages SUBMITTING under the batch's fence before their POST (submit.lua)."""
        calls = []
        for start in range(0, len(items), SCRIPT_CHUNK):
            chunk = items[start : start + SCRIPT_CHUNK]
            args: list[Any] = [state_ttl_s, consumer, lease_ms, fence, send_window_ms, margin_ms]
            for e in chunk:
                args += [lane, e.entry_id, e.job]
            calls.append(([self.fence_key(fence), *(self.msg(e.message_id) for e in chunk)], args))
        return [Submitted(state.decode(), int(n), int(wait)) for reply in self.run_many("submit", calls)
                for state, n, wait in reply]

    def fences_alive(self, fences: Sequence[str]) -> bool:
        """True while every one of these fences still lives: their batches may still write requests."""
        keys = {self.fence_key(f) for f in fences}
        with redis_errors():
            return int(self.r.exists(*keys)) == len(keys)

    def absent(
        self, items: Sequence[Entry], *, consumer: str, checks: int, window_ms: int, fence: str, send_window_ms: int,
        max_attempts: int,
    ) -> list[Submitted]:
        """The verdict on messages missing from the provider's logs (absent.lua): RESEND (under the
        new fence), WAIT, EXHAUSTED or STALE, with attempts and the wait."""
        calls = []
        for start in range(0, len(items), SCRIPT_CHUNK):
            chunk = items[start : start + SCRIPT_CHUNK]
            calls.append(([self.fence_key(fence), *(self.msg(e.message_id) for e in chunk)],
                          [consumer, checks, window_ms, fence, send_window_ms, max_attempts]))
        return [Submitted(state.decode(), int(n), int(wait)) for reply in self.run_many("absent", calls)
                for state, n, wait in reply]

    def renew_checks(self, message_ids: Sequence[str], consumer: str, lease_ms: int) -> int:
        """Extend this consumer's reconciliation leases on these messages; how many it still held."""
        calls = [([self.msg(m) for m in message_ids[start : start + SCRIPT_CHUNK]], [consumer, lease_ms])
                 for start in range(0, len(message_ids), SCRIPT_CHUNK)]
        return sum(int(n) for n in self.run_many("check_renew", calls)) if calls else 0

    def settle(self, lane: str, outcomes: Sequence[Outcome], *, now_ms: int, events_maxlen: int,
               state_ttl_s: int) -> list[bool]:
        """Record outcomes with their events (settle.lua); returns whether each was applied."""
        calls = []
        for start in range(0, len(outcomes), SCRIPT_CHUNK):
            keys = [self.outbox(lane), self.events, self.awaiting, self.dlq]
            args: list[Any] = [DISPATCH_GROUP, now_ms, events_maxlen, state_ttl_s]
            for o in outcomes[start : start + SCRIPT_CHUNK]:
                keys.append(self.msg(o.message_id))
                fields = o.fields or {}
                args += [
                    o.message_id, o.entry_id, o.state, "1" if o.ack else "0", o.event,
                    "" if o.deadline_ms is None else o.deadline_ms, o.dead_letter, o.guard, len(fields),
                ]
                for name, value in fields.items():
                    args += [name, value]
            calls.append((keys, args))
        return [bool(x) for reply in self.run_many("settle", calls) for x in reply]

    def message(self, message_id: str) -> dict[str, str]:
        with redis_errors():
            raw = self.r.hgetall(self.msg(message_id))
        return {k.decode(): v.decode() for k, v in raw.items()}

    # --- dispatcher slots, kicks and pauses --------------------------------------------------------
    def acquire_slot(self, lane: str, member: str, limit: int, lease_ms: int) -> bool:
        return bool(self.run("slot", [self.dispatchers(lane)], [member, limit, lease_ms]))

    def release_slot(self, lane: str, member: str) -> None:
        with redis_errors():
            self.r.zrem(self.dispatchers(lane), member)

    def try_kick(self, lane: str, dedupe_ms: int) -> bool:
        """True for the one caller per `dedupe_ms` that should send a dispatch message."""
        with redis_errors():
            return bool(self.r.set(self.kick_key(lane), b"1", nx=True, px=max(1, dedupe_ms)))

    def pause(self, lane: str, reason: str, seconds: float) -> None:
        with redis_errors():
            self.r.set(self.pause_key(lane), reason, px=max(1, int(seconds * 1000)))

    def resume(self, lane: str) -> None:
        with redis_errors():
            self.r.delete(self.pause_key(lane))

    def paused_lanes(self, lanes: Sequence[str], reason: str) -> list[str]:
        """Those of `lanes` paused for `reason`, in one round trip."""
        if not lanes:
            return []
        with redis_errors():
            values = self.r.mget([self.pause_key(lane) for lane in lanes])
        return [lane for lane, value in zip(lanes, values, strict=True) if value == reason.encode()]

    def paused(self, lane: str) -> str | None:
        with redis_errors():
            value = self.r.get(self.pause_key(lane))
        return value.decode() if value else None

    def lease(self, name: str, holder: str, ttl_ms: int) -> int:
        """Take or renew lease `name`; the fencing token while `holder` has it, else 0."""
        return int(self.run("lease", [self.key("lease", name), self.key("fence", name)], [holder, ttl_ms]))

    def release_lease(self, name: str, holder: str) -> None:
        with redis_errors():
            if self.r.get(self.key("lease", name)) == holder.encode():
                self.r.delete(self.key("lease", name))

    # --- consumer groups on other streams (events relay) -----------------------------------------
    def read_group(
        self, stream: str, group: str, consumer: str, count: int, lease_ms: int
    ) -> list[tuple[str, dict[bytes, bytes]]]:
        """Up to `count` entries for `consumer`: a dead consumer's stale ones first, then new ones.

        The group is created from the start of the stream on first use.
        """
        with redis_errors():
            try:
                self.r.xgroup_create(stream, group, id="0", mkstream=True)
            except redis.ResponseError as error:
                if "BUSYGROUP" not in str(error):
                    raise
            _, stale, _ = self.r.xautoclaim(stream, group, consumer, lease_ms, "0-0", count=count)
            entries = [(e[0], e[1]) for e in stale if e[1]]
            if not entries:
                reply = self.r.xreadgroup(group, consumer, {stream: ">"}, count=count)
                entries = reply[0][1] if reply else []
        return [(entry_id.decode(), fields) for entry_id, fields in entries]

    def ack(self, stream: str, group: str, entry_ids: Sequence[str]) -> None:
        if entry_ids:
            with redis_errors():
                self.r.xack(stream, group, *entry_ids)

    # --- rate limiter ----------------------------------------------------------------------------
    def acquire_tokens(self, want: int, buckets: Sequence[tuple[str, float, float, str]]) -> tuple[int, int]:
        """buckets: (name, rate/s, burst, "messages"|"request"); returns (granted, wait_ms)."""
        keys = [self.bucket(name) for name, *_ in buckets]
        args: list[Any] = [want]
        for _, rate, burst, kind in buckets:
            args += [rate, burst, kind]
        granted, wait_ms = self.run("ratelimit", keys, args)
        return int(granted), int(wait_ms)

    def refund_tokens(
        self, unused: int, request_unused: bool, buckets: Sequence[tuple[str, float, float, str]]
    ) -> None:
        keys = [self.bucket(name) for name, *_ in buckets]
        args: list[Any] = [unused, "1" if request_unused else "0"]
        for _, rate, _burst, kind in buckets:
            args += [rate, kind]
        self.run("ratelimit_refund", keys, args)

    def penalize(self, pause_ms: int, buckets: Sequence[tuple[str, float, float]]) -> None:
        keys = [self.bucket(name) for name, *_ in buckets]
        args: list[Any] = [pause_ms]
        for _, rate, burst in buckets:
            args += [rate, burst]
        self.run("ratelimit_penalize", keys, args)
