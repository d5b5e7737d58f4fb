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
from typing import Any

import hiredis
import redis
from redis.commands.core import Script

from worker.errors import StoreError

DISPATCH_GROUP = "dispatch"
# Messages per script call: a 1000-message settle in one call held Redis for 20-100 ms, and every
# otp send waited behind it; 100 keeps each call near 2 ms.
SCRIPT_CHUNK = 100
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


@dataclass(slots=True)
class Outcome:
    """What settle.lua records for one message."""

    message_id: str
    entry_id: str
    state: str
    ack: bool
    event: bytes = b""
    deadline_ms: int | None = None
    fields: dict[str, str | int] | None = None
    dead_letter: bytes = b""


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

    def key(self, *parts: str) -> str:
        """Any other key of the namespace (reports, leases, heartbeats)."""
        return ":".join((self.p, *parts))

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
        chunk k. A job without a producer id is a plain XADD; its message id is derived from the
        entry id. A job with one gets its message id here, is appended with it, and then claims the
        producer id with SET NX GET. A repeat (the id was claimed earlier) gets the earlier message
        id back and its entry is deleted again. Appending first is what makes a crash harmless:
        an entry whose claim never happened is claimed by the dispatcher before sending
        (Dispatcher._drop_duplicate_ids), so a job is never lost and a repeat never sent.
        """
        outbox, prefix = self.outbox(lane), self.lane_prefix(lane)
        xadd = b"".join(_bulk(part) for part in (b"XADD", outbox.encode(), b"*", b"job"))
        idem = self.idem("")
        set_head = b"*7\r\n" + _bulk(b"SET")
        set_options = b"".join(_bulk(part) for part in (b"NX", b"GET", b"EX", b"%d" % idempotency_ttl_s))
        results: list[tuple[str, bool]] = []
        repeats: list[bytes] = []
        with self._connection() as (conn, reader):
            in_flight: list[tuple[list[str | None], int]] = []
            for start in range(0, len(jobs), chunk):
                mid_base = f"{prefix}{int(time.time() * 1000)}-p{self._tag}"
                mids: list[str | None] = []
                parts: list[bytes] = []
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
                conn.send_packed_command([b"".join(parts)])
                in_flight.append((mids, len(parts)))
                if len(in_flight) == 2:
                    self._enqueued(conn, reader, prefix, *in_flight.pop(0), results, repeats)
            for mids, count in in_flight:
                self._enqueued(conn, reader, prefix, mids, count, results, repeats)
            if repeats:
                xdel: tuple[Any, ...] = (b"XDEL", outbox, *repeats)
                conn.send_packed_command([hiredis.pack_command(xdel)])
                _check(_read_replies(conn, reader, 1))
        return results

    @staticmethod
    def _enqueued(
        conn: Any, reader: hiredis.Reader, prefix: str, mids: list[str | None], count: int,
        results: list[tuple[str, bool]], repeats: list[bytes],
    ) -> None:
        """Read one chunk's replies: (message id, queued) per job, and the entry ids of repeats."""
        replies = iter(_check(_read_replies(conn, reader, count)))
        for mid in mids:
            entry_id = next(replies)
            if mid is None:
                results.append((prefix + entry_id.decode(), True))
                continue
            earlier = next(replies)
            if earlier is None:
                results.append((mid, True))
            else:
                results.append((earlier.decode(), False))
                repeats.append(entry_id)

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
            reply = self.r.xclaim(self.outbox(lane), DISPATCH_GROUP, consumer, 0, list(entry_ids))
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
            self.pipeline([(b"XCLAIM", self.outbox(lane), DISPATCH_GROUP, consumer, 0, *entry_ids,
                            b"IDLE", idle, b"JUSTID")])

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
        self, lane: str, items: Sequence[Entry], *, consumer: str, lease_ms: int, state_ttl_s: int, now_ms: int
    ) -> list[tuple[str, int]]:
        """Mark messages SUBMITTING before their POST; returns (previous state, attempts) each."""
        calls = []
        for start in range(0, len(items), SCRIPT_CHUNK):
            chunk = items[start : start + SCRIPT_CHUNK]
            args: list[Any] = [now_ms, state_ttl_s, consumer, lease_ms]
            for e in chunk:
                args += [lane, e.entry_id, e.job]
            calls.append(([self.msg(e.message_id) for e in chunk], args))
        return [(state.decode(), int(n)) for reply in self.run_many("submit", calls) for state, n in reply]

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
                    "" if o.deadline_ms is None else o.deadline_ms, o.dead_letter, len(fields),
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
