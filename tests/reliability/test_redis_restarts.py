"""Redis restarted mid-run with append-only persistence (appendfsync always): nothing lost, nothing twice.

A producer thread keeps enqueuing (with producer ids, retrying a chunk that failed while Redis was
away) while workers send and the clock ticks. Redis is stopped gracefully (SIGTERM) or killed (SIGKILL),
kept down for a measured moment, and started again on the same port with the same data directory.
Nobody restarts the workers, the clock or the producer: they must reconnect by themselves.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path

import redis

from tests.reliability.harness import (
    BATCH,
    Row,
    Size,
    System,
    assert_promises,
    jobs,
    poll,
    running,
    verify,
    wait_settled,
)
from worker.clock import Clock, ClockConfig
from worker.devtools.devstack import DevStack, wait_until
from worker.errors import SmsWorkerError
from worker.producer import connect_store, connect_triggers
from worker.settings import Settings
from worker.store import Store, connect

CHUNK = 100


class Producer(threading.Thread):
    """Enqueues `n` jobs in chunks at about `rate`/s; a chunk that fails is retried (ids make that safe)."""

    def __init__(self, system: System, n: int, rate: int) -> None:
        super().__init__(name="producer", daemon=True)
        self.system = system
        self.n = n
        self.pace_s = CHUNK / rate
        self.done = 0
        self.errors: Counter[str] = Counter()
        self.gave_up: str | None = None

    def run(self) -> None:
        for start in range(0, self.n, CHUNK):
            batch = jobs(min(CHUNK, self.n - start), start, prefix="order")
            deadline = time.monotonic() + 60
            while True:
                try:
                    self.system.outbox.enqueue_many(batch, "bulk")
                    break
                except (SmsWorkerError, redis.RedisError, OSError) as error:
                    # Which error a producer sees while Redis is away (the API promises StoreError).
                    self.errors[f"{type(error).__module__}.{type(error).__name__}"] += 1
                    if time.monotonic() > deadline:
                        self.gave_up = f"chunk {start}: {error}"
                        return
                    time.sleep(0.05)
            self.done += len(batch)
            time.sleep(self.pace_s)


def test_redis_restarts_mid_run_lose_and_duplicate_nothing(size: Size, record: Row, tmp_path: Path) -> None:
    """Redis SIGTERMed, later SIGKILLed, mid-run and restarted from its AOF: every job sent once, every report once."""
    record.suite = "redis restarts"
    n, rate = size.restart_sms, size.restart_rate
    env = {"SMS_RATE_LIMIT_MPS": str(rate), "SMS_RATE_LIMIT_BURST_S": str(BATCH / rate)}
    stopped = []
    with running(env, appendonly=True, seed=size.seed, log_dir=tmp_path) as system:
        stack = system.stack
        producer = Producer(system, n, rate)
        producer.start()
        for how, progress in (("SIGTERM", 0.3), ("SIGKILL", 0.65)):
            under_way = poll(lambda p=progress: producer.done >= n * p
                             and system.stats()["messages_accepted"] >= n * p / 2, size.wait_s(n, rate), 0.05)
            assert under_way, (
                f"after {len(stopped)} restart(s) the run stalled: producer {producer.done}/{n} "
                f"{dict(producer.errors)} {producer.gave_up}, sandbox accepted {system.stats()['messages_accepted']}, "
                f"dead processes {system.dead_processes(stopped)}\n{stack.logs()}"
            )
            [server] = [p for p in stack.procs if p.name == "redis" and p.alive()]
            if how == "SIGTERM":
                server.stop()
            else:
                server.kill()
            stopped.append(server)
            down_since = time.monotonic()
            while time.monotonic() - down_since < size.restart_down_s:  # the scenario: Redis stays away a while
                time.sleep(0.05)
            stack.start_redis(appendonly=True, port=stack.redis_port)
            record.fault(f"redis {how} + restart")
        producer.join(size.wait_s(n, rate))
        took = wait_settled(system, size.wait_s(n, rate))
        verdict = verify(system, [f"order-{i}" for i in range(n)], key="id")
        crashed = system.dead_processes(killed=stopped)
        logs = stack.logs() if crashed else ""
    record.add(verdict)
    record.note = (f"Redis down {size.restart_down_s:g} s each time; the producer retried "
                   f"{sum(producer.errors.values())} chunk(s): {dict(producer.errors)}")
    leaked = sorted(name for name in producer.errors if not name.startswith("worker."))
    problems = []
    if producer.gave_up is not None or producer.done != n:
        problems.append(f"the producer could not enqueue all jobs ({producer.done}/{n}): {producer.gave_up}")
    if crashed:
        problems.append(f"processes died and did not come back by themselves: {crashed}")
    if took is None:
        problems.append(f"the run did not settle: {verdict.summary()}")
    assert not problems, "\n".join(problems) + f"\n{logs}"
    assert_promises(verdict)
    assert verdict.outcomes == {"accepted": n - len(verdict.no_send_event)}, verdict.summary()
    assert verdict.dead_letters == 0, verdict.summary()
    assert not leaked, f"Outbox.enqueue_many raised {leaked} instead of StoreError while Redis was away"


def test_redis_killed_during_a_store_call_surfaces_as_store_error(record: Row, tmp_path: Path) -> None:
    """A Store call cut by `kill -9` of Redis raises StoreError (what producers, the clock and drains catch)."""
    record.suite = "redis kill -9 mid-call"
    record.trials = 3
    outcomes: Counter[str] = Counter()
    with DevStack(log_dir=tmp_path) as stack:
        stack.start_redis(appendonly=True)
        for _ in range(record.trials):
            store = Store(connect(stack.env["REDIS_URL"]))
            store.pipeline([(b"PING",)])
            caught: list[BaseException] = []

            def write(store: Store = store, caught: list[BaseException] = caught) -> None:
                try:
                    while True:  # big pipelines, so the kill lands while one is on the wire
                        store.pipeline([(b"XADD", b"s", b"*", b"job", b"x" * 200) for _ in range(2000)])
                except BaseException as error:  # noqa: BLE001 -- the point is to see what escapes
                    caught.append(error)

            writer = threading.Thread(target=write, daemon=True)
            writer.start()
            wait_until(lambda store=store: int(store.r.xlen("s")) > 2000, 20, "writes to be under way")
            [server] = [p for p in stack.procs if p.name == "redis" and p.alive()]
            server.kill()
            writer.join(20)
            record.fault("redis SIGKILL mid-call")
            outcomes[f"{type(caught[0]).__module__}.{type(caught[0]).__name__}" if caught else "nothing"] += 1
            stack.start_redis(appendonly=True, port=stack.redis_port)
            store.r.close()
    record.note = f"a Store call cut by kill -9 raised: {dict(outcomes)}"
    # StoreUnavailable is the StoreError of an outage (what runtime.redis_outage_is_one_line expects).
    assert outcomes == {"worker.errors.StoreUnavailable": record.trials}, (
        f"Store.pipeline let {dict(outcomes)} escape: the socket read in store.resp.read_replies is outside "
        "redis_errors(), so `except StoreError` in Outbox callers, Clock.run and Drainer.append misses it"
    )


def test_the_clock_keeps_ticking_when_redis_fails_under_its_broker(settings: Settings, record: Row) -> None:
    """A Redis error from the Dramatiq broker's enqueue reaches the clock as StoreError, so it keeps running."""
    record.suite = "clock with Redis failing"
    store = connect_store(settings)  # the clock's own Redis answers...
    unreachable = settings.model_copy(update={"redis_url": "redis://127.0.0.1:1/0"})
    triggers = connect_triggers(unreachable, store)  # ...its broker's not
    tick_50_ms = ClockConfig.from_settings(settings.model_copy(update={"sms_dispatch_tick_ms": 50}))
    clock = Clock(tick_50_ms, store, triggers)
    stop = threading.Event()
    died: list[BaseException] = []

    def run() -> None:
        try:
            clock.run(stop)
        except BaseException as error:  # noqa: BLE001 -- the point is to see what ends the clock
            died.append(error)

    ticking = threading.Thread(target=run, name="clock", daemon=True)
    ticking.start()
    poll(lambda: not ticking.is_alive(), 1.0, 0.05)  # twenty ticks
    stop.set()
    ticking.join(5)
    store.close()
    triggers.broker.close()
    record.fault("broker's Redis unreachable")
    record.note = f"Clock.run ended by {type(died[0]).__module__}.{type(died[0]).__name__}" if died else ""
    assert not died, (
        f"the clock died of {type(died[0]).__module__}.{type(died[0]).__name__}: {died[0]} -- Triggers.send lets "
        "redis-py errors from RedisBroker.enqueue escape, and Clock.run catches only StoreError; the same error "
        "reaches producers through Outbox's wake and the webhook through its wake"
    )
