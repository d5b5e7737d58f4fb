"""The hand-packed RESP path: commands packed by hiredis, replies parsed straight off the socket.

redis-py's pipeline spends ~10 us of Python per command; packing with hiredis and parsing the
replies ourselves is several times cheaper. That is what lets one producer enqueue 100k+ jobs/s
(98k -> 181k jobs/s measured when it replaced redis-py's pipeline, docs/performance.md), so it is
used where a call carries work per message: enqueue (a command per job), the dispatcher's
producer-id claims (a command per message) and the Lua script calls (about ten arguments per
message, packed by C here and by Python in redis-py). Everything else uses redis-py's ordinary API.

What it relies on in redis-py (pinned by tests/unit/test_resp.py): a pooled connection from
`client.connection_pool.get_connection()` has `send_packed_command(list[bytes])`, `disconnect()`
and its socket at `._sock` once connected; `pool.release(conn)` takes it back.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import hiredis
import redis

from worker.errors import StoreError, StoreUnavailable

# Errors that mean Redis is not there (yet), as opposed to a refused command.
_OUTAGES = (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError)


@contextlib.contextmanager
def redis_errors() -> Iterator[None]:
    """Map redis-py's exceptions into the worker's tree at this boundary."""
    try:
        yield
    except redis.RedisError as error:
        kind = StoreUnavailable if isinstance(error, _OUTAGES) else StoreError
        raise kind(f"Redis: {type(error).__name__}: {error}") from error


def bulk(value: bytes) -> bytes:
    """One RESP bulk string; cheaper than packing a whole command when most of it is fixed."""
    return b"$%d\r\n%s\r\n" % (len(value), value)


def pack(commands: Sequence[tuple[Any, ...]]) -> bytes:
    return b"".join([hiredis.pack_command(c) for c in commands])


def read_replies(conn: Any, reader: hiredis.Reader, count: int) -> list[Any]:
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


def is_noscript(reply: Any) -> bool:
    """Whether a reply is Redis's answer to EVALSHA of a script it does not have."""
    return isinstance(reply, hiredis.ReplyError) and str(reply).startswith("NOSCRIPT")


def check(replies: list[Any]) -> list[Any]:
    """Raise an error reply as StoreError (NOSCRIPT keeps its own type as the cause)."""
    for reply in replies:
        if isinstance(reply, hiredis.ReplyError):
            kind = redis.exceptions.NoScriptError if is_noscript(reply) else redis.ResponseError
            raise StoreError(f"Redis: {reply}") from kind(str(reply))
    return replies


@contextlib.contextmanager
def connection(client: Any) -> Iterator[tuple[Any, hiredis.Reader]]:
    """A pooled connection whose replies we parse ourselves with one hiredis.Reader."""
    pool = client.connection_pool
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


def pipeline(client: Any, commands: Sequence[tuple[Any, ...]], *, checked: bool = True) -> list[Any]:
    """Many commands in one round trip, packed and parsed by hiredis.

    An error reply is raised as StoreError (the other replies of the call are then lost:
    callers send commands that fail only when Redis itself is broken); `checked=False` returns
    error replies in their place instead (hiredis.ReplyError).
    """
    with connection(client) as (conn, reader):
        conn.send_packed_command([pack(commands)])
        replies = read_replies(conn, reader, len(commands))
    return check(replies) if checked else replies

