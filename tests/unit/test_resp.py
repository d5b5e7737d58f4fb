"""The hand-packed RESP path (worker/store/resp.py) against a real Redis: what it relies on in
redis-py, replies in order, error replies, and a connection lost mid-call."""

from __future__ import annotations

from typing import Any

import hiredis
import pytest
import redis

from worker.errors import StoreError, StoreUnavailable
from worker.store import resp


def test_what_it_relies_on_in_redis_py_is_there(redis_client: redis.Redis) -> None:
    pool = redis_client.connection_pool
    conn = pool.get_connection()
    try:
        conn.send_packed_command([hiredis.pack_command((b"PING",))])
        assert conn._sock is not None  # connected by the send; our reads take this socket
        assert resp.read_replies(conn, hiredis.Reader(), 1) == [b"PONG"]
    finally:
        pool.release(conn)
    assert callable(conn.disconnect)


def test_a_pipeline_answers_in_order(redis_client: redis.Redis) -> None:
    commands = [(b"SET", f"k{i}", i) for i in range(3000)] + [(b"GET", "k2999"), (b"INCR", "k7")]
    replies = resp.pipeline(redis_client, commands)
    assert len(replies) == 3002  # several socket reads: the reader keeps what belongs to later replies
    assert replies[-2:] == [b"2999", 8]


def test_two_calls_in_flight_on_one_connection_keep_their_replies_apart(redis_client: redis.Redis) -> None:
    with resp.connection(redis_client) as (conn, reader):
        conn.send_packed_command([resp.pack([(b"ECHO", b"a" * 100_000), (b"ECHO", b"b")])])
        conn.send_packed_command([resp.pack([(b"ECHO", b"c")])])
        assert resp.read_replies(conn, reader, 2) == [b"a" * 100_000, b"b"]
        assert resp.read_replies(conn, reader, 1) == [b"c"]


def test_a_bulk_string_is_what_hiredis_packs() -> None:
    assert b"*2\r\n" + resp.bulk(b"ECHO") + resp.bulk(b"x\r\ny") == hiredis.pack_command((b"ECHO", b"x\r\ny"))


def test_an_error_reply_is_a_store_error_with_redis_py_s_type(redis_client: redis.Redis) -> None:
    redis_client.set("s", "text")
    with pytest.raises(StoreError) as caught:
        resp.pipeline(redis_client, [(b"PING",), (b"XLEN", "s")])
    assert isinstance(caught.value.__cause__, redis.ResponseError)
    assert "WRONGTYPE" in str(caught.value)
    with pytest.raises(StoreError) as missing:
        resp.pipeline(redis_client, [(b"EVALSHA", "0" * 40, 0)])
    assert isinstance(missing.value.__cause__, redis.exceptions.NoScriptError)


def test_a_connection_lost_mid_call_is_an_outage_and_leaves_the_pool(redis_client: redis.Redis) -> None:
    victim = redis_client.client_id()  # the pooled connection the next call takes
    killer = redis.Redis(connection_pool=redis.ConnectionPool.from_url(
        f"redis://{redis_client.connection_pool.connection_kwargs['host']}:"
        f"{redis_client.connection_pool.connection_kwargs['port']}"))

    def ping_after_the_kill() -> None:
        with resp.connection(redis_client) as (conn, reader):
            seen.append(conn)
            killer.client_kill_filter(_id=victim)
            conn.send_packed_command([resp.pack([(b"PING",)])])
            resp.read_replies(conn, reader, 1)

    seen: list[Any] = []
    with pytest.raises(StoreUnavailable):
        ping_after_the_kill()
    killer.close()
    [conn] = seen
    assert conn._sock is None  # disconnected: a half-read connection never goes back into use
    assert redis_client.ping()  # the pool makes a fresh one
