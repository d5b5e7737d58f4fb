"""Redis out of memory (`maxmemory` + `noeviction`) while a producer enqueues with producer ids.

A private redis-server gets a memory limit a little above what it uses. A producer enqueues jobs
with producer ids through `Outbox.enqueue_many` faster than a consumer (standing in for the
dispatchers: it reads the outbox and deletes what it read, which frees memory) drains them, so
Redis keeps running out of memory and calls fail part-way. The producer retries as the README says:
after `EnqueueIncomplete` the jobs whose answer is None, after any other `StoreError` the whole
call with the same ids.

Afterwards every job must be in the outbox exactly once, with the message id it was answered with
and the claim of its producer id pointing at that entry: nothing claimed without its entry (a job
told "duplicate" that nobody will send), no job appended twice. A job the producer gave up on must
have left nothing behind.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
import redis

from tests.reliability.harness import Row, Size
from tests.support.redis_server import RedisServer
from worker.errors import EnqueueIncomplete, StoreError
from worker.outbox import Outbox, OutboxConfig
from worker.settings import Settings
from worker.store import Store, connect

LANE = "bulk"
CALL = 2_500  # jobs per enqueue_many call: three transactions of ENQUEUE_CHUNK, so a call can fail part-way
TEXT = "x" * 300  # the outbox, not the claims, should fill the memory
# Room above what Redis uses at the start: the query buffers of two chunks in flight (~0.7 MB), the
# claims (~150 bytes each, they stay), and a backlog of a few thousand entries.
HEADROOM_BYTES = 2_000_000
CLAIM_BYTES = 150


@pytest.fixture
def server() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.cleanup()


class Consumer(threading.Thread):
    """Reads the outbox and deletes each entry it read, like dispatchers settling jobs (slower than
    the producer, so the backlog grows until Redis is out of memory)."""

    def __init__(self, url: str, outbox: str) -> None:
        super().__init__(name="consumer", daemon=True)
        self.client: Any = redis.Redis.from_url(url, socket_timeout=10)
        self.outbox = outbox
        self.entries: list[tuple[str, dict[bytes, bytes]]] = []
        self.stop = threading.Event()
        self.deleted = 0
        self.progress = threading.Condition()
        self.error: BaseException | None = None

    def run(self) -> None:
        last = "0-0"
        try:
            while not self.stop.is_set():
                reply = self.client.xread({self.outbox: last}, count=100, block=100)
                if not reply:
                    continue
                batch = reply[0][1]
                last = batch[-1][0].decode()
                for entry_id, fields in batch:  # one at a time, as slow as settling: the producer is faster
                    self.entries.append((entry_id.decode(), fields))
                    self.client.xdel(self.outbox, entry_id)
                    with self.progress:
                        self.deleted += 1
                        self.progress.notify_all()
        except BaseException as error:  # noqa: BLE001 -- reported by the test
            self.error = error
        finally:
            with self.progress:
                self.stop.set()
                self.progress.notify_all()

    def made_room(self, entries: int, timeout_s: float) -> None:
        """Wait until `entries` more entries were deleted (or the consumer ended)."""
        with self.progress:
            target = self.deleted + entries
            self.progress.wait_for(lambda: self.deleted >= target or self.stop.is_set(), timeout_s)

    def finish(self) -> list[tuple[str, dict[bytes, bytes]]]:
        """Stop, and return every entry ever appended: the ones read plus the ones left."""
        self.stop.set()
        self.join(10)
        left = self.client.xrange(self.outbox)
        self.client.close()
        return self.entries + [(entry_id.decode(), fields) for entry_id, fields in left]


def test_calls_refused_part_way_by_redis_oom_leave_no_claim_without_its_job(size: Size, record: Row,
                                                                             server: RedisServer) -> None:
    """Out of memory mid-call: each job is queued exactly once or reported as not written, never
    claimed without its entry (a retry told "duplicate" for a job nobody will send)."""
    record.suite = "redis out of memory"
    n = 20_000 if size.mode == "short" else 200_000
    settings = Settings(redis_url=server.url, icomm_base_url="http://127.0.0.1:9",
                        icomm_api_key="rel-oom-key-0123456789", log_format="console")
    store = Store(connect(server.url))
    outbox = Outbox(OutboxConfig.from_settings(settings), store)
    admin: Any = redis.Redis.from_url(server.url)
    admin.config_set("maxmemory-policy", "noeviction")
    admin.config_set("maxmemory", int(admin.info("memory")["used_memory"]) + HEADROOM_BYTES + n * CLAIM_BYTES)
    consumer = Consumer(server.url, store.outbox(LANE))
    consumer.start()

    jobs = [{"to": f"4179{i:07d}", "text": f"{TEXT} {i}", "id": f"oom-{i}", "metadata": {"n": i}} for i in range(n)]
    answers: dict[str, tuple[str, bool]] = {}
    errors: Counter[str] = Counter()
    partial = 0  # calls that wrote some of their jobs and not others
    gave_up: list[str] = []
    deadline = time.monotonic() + 20
    started = time.monotonic()
    for start in range(0, n, CALL):
        todo = jobs[start : start + CALL]
        while todo:
            try:
                done = outbox.enqueue_many(todo, LANE)
            except EnqueueIncomplete as error:
                errors[type(error).__name__] += 1
                assert len(error.queued) == len(todo)
                partial += 0 < sum(answer is not None for answer in error.queued) < len(todo)
                for job, answer in zip(todo, error.queued, strict=True):
                    if answer is not None:
                        answers[job["id"]] = answer
                todo = [job for job, answer in zip(todo, error.queued, strict=True) if answer is None]
            except StoreError as error:
                errors[type(error).__name__] += 1  # what was written is not known: retry it all, ids make it safe
            else:
                answers.update((job["id"], (r.message_id, r.queued)) for job, r in zip(todo, done, strict=True))
                todo = []
            if todo:
                if time.monotonic() > deadline:
                    gave_up += [job["id"] for job in todo]
                    break
                # Until the consumer has made room for the retry (at most the backlog it has to drain).
                consumer.made_room(min(len(todo), int(admin.xlen(store.outbox(LANE)))), timeout_s=2.0)
    seconds = time.monotonic() - started
    entries = consumer.finish()
    keys = list(admin.scan_iter(store.idem("*"), count=1000))
    values = [value for start in range(0, len(keys), 1000) for value in admin.mget(keys[start : start + 1000])]
    claims = {key.decode().removeprefix(store.idem("")): value.decode()
              for key, value in zip(keys, values, strict=True) if value is not None}
    refusals = int(admin.info("stats").get("total_error_replies", 0))
    admin.close()
    store.r.close()

    by_id: dict[str, list[str]] = {}
    for _, fields in entries:
        by_id.setdefault(orjson.loads(fields[b"job"])["id"], []).append(fields[b"mid"].decode())
    mids = {mid for found in by_id.values() for mid in found}
    claimed_without_entry = sorted(pid for pid, mid in claims.items() if mid not in mids)
    appended_twice = sorted(pid for pid, found in by_id.items() if len(found) > 1)
    wrong_answer = sorted(pid for pid, (mid, _) in answers.items() if by_id.get(pid) != [mid] or claims.get(pid) != mid)
    left_behind = sorted(pid for pid in gave_up if pid in by_id or pid in claims)

    record.jobs = n
    record.lost = len(claimed_without_entry) + len(wrong_answer)
    record.duplicated = len(appended_twice)
    record.fault("Redis OOM refusals (error replies)", refusals)
    record.count("calls failed part-way", partial)
    record.note = (f"maxmemory {HEADROOM_BYTES / 1e6:g} MB + {CLAIM_BYTES} B/job above the start, noeviction; "
                   f"{dict(errors)} in {seconds:.1f} s, {len(gave_up)} jobs given up")
    summary = (f"{len(answers)}/{n} answered, {len(gave_up)} given up, {len(entries)} entries, errors {dict(errors)}, "
               f"{partial} calls failed part-way; claimed without entry {len(claimed_without_entry)} "
               f"{claimed_without_entry[:3]}, appended twice {len(appended_twice)} {appended_twice[:3]}, answer not "
               f"the queued entry {len(wrong_answer)} {wrong_answer[:3]}, given up but left behind {left_behind[:3]}")
    assert consumer.error is None, f"the consumer failed: {consumer.error!r}"
    assert sum(errors.values()) > 0, f"Redis never ran out of memory: the scenario did not happen ({summary})"
    assert not claimed_without_entry, summary
    assert not appended_twice, summary
    assert not wrong_answer, summary
    assert not left_behind, summary
    assert len(answers) + len(gave_up) == n, summary
    assert partial > 0, f"no call failed part-way: the scenario did not happen ({summary})"
    if not errors["StoreError"]:  # only EnqueueIncomplete: a retried job was reported as not written
        assert all(queued for _, queued in answers.values()), f"a retried job was told 'duplicate': {summary}"
