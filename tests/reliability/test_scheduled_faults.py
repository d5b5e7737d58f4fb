"""Scheduled jobs through crashes and Redis restarts: each sent once when due, cancelled ones never.

- crashes: jobs due over a few seconds, a fifth of them cancelled; the clock is SIGKILLed as the
  first become due (and restarted), then every worker while due jobs are claimed (and restarted);
- Redis restarts: the same with append-only persistence (appendfsync always), Redis SIGKILLed once
  before the jobs are due and once while they are being moved and sent, and started again on its
  data directory. Nobody restarts the workers or the clock: they reconnect by themselves.

A cancelled job must have one `cancelled` event and never reach the sandbox; every other one
exactly one send outcome and one POST (tests/reliability/harness.py's promises).
"""

from __future__ import annotations

import random
import signal
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

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
from worker.cancel import CancelConfig, cancel
from worker.devtools.devstack import Proc, wait_until
from worker.outbox import Enqueued

LEAD_S = 3.0  # the first job is due this long after its cancels are done (they take _cancel_s)
SPREAD_S = 3.0  # the others over the following seconds
# Cancels one at a time (several round trips each) on a loaded 2-core machine: 2,000 of them took
# more than 3 s in a full-size run, and the last ones found their jobs already sent.
CANCELS_PER_S = 250


def _lead_s(n: int) -> float:
    """How far ahead the first of `n` jobs is due: after the cancels of a fifth of them, plus LEAD_S."""
    return LEAD_S + n / 5 / CANCELS_PER_S


def _schedule(system: System, n: int, rng: random.Random, prefix: str) -> tuple[list[Enqueued], list[str]]:
    """Queue `n` jobs due between _lead_s(n) and _lead_s(n) + SPREAD_S from now; cancel a fifth of them
    by producer id. (queued, message ids cancelled)."""
    start = datetime.now(UTC)
    lead = _lead_s(n)
    batch = [{**job, "send_at": (start + timedelta(seconds=lead + rng.uniform(0, SPREAD_S))).isoformat()}
             for job in jobs(n, prefix=prefix)]
    queued = system.outbox.enqueue_many(batch, "bulk")
    config = CancelConfig.from_settings(system.settings)
    dropped = []
    for job in batch[::5]:
        answer = cancel(system.store, config, producer_id=str(job["id"]))
        assert answer.cancelled, answer.describe()
        dropped.append(str(answer.message_id))
    return queued, dropped


def _scheduled_left(system: System) -> int:
    return int(system.client.zcard(system.store.scheduled("bulk")))


def _check(system: System, record: Row, queued: list[Enqueued], dropped: list[str], timeout_s: float) -> None:
    """Wait for the schedule to empty and the run to settle, then hold the promises."""
    emptied = poll(lambda: _scheduled_left(system) == 0, timeout_s, 0.1)
    took = wait_settled(system, timeout_s)
    kept = [r.message_id for r in queued if r.message_id not in set(dropped)]
    verdict = verify(system, kept)
    record.add(verdict)
    cancelled = [e["message_id"] for e in system.events() if e["type"] == "cancelled"]
    sent = system.stats(per_message=True)["accepted_per_message_id"]
    assert emptied, f"{_scheduled_left(system)} jobs still scheduled long after their time\n{system.stack.logs()}"
    assert took is not None, f"the run did not settle: {verdict.summary()}"
    assert_promises(verdict)
    assert verdict.outcomes == {"accepted": len(kept) - len(verdict.no_send_event)}, verdict.summary()
    assert sorted(cancelled) == sorted(dropped), "one cancelled event per cancelled job"
    assert not set(dropped) & set(sent), "a cancelled job reached the provider"
    assert verdict.dead_letters == 0, verdict.summary()


def _restart(system: System, victims: list[Proc], clock: bool) -> None:
    for proc in victims:
        proc.signal(signal.SIGKILL)
    for proc in victims:
        proc.wait(10)
    for proc in victims:
        if proc.name.startswith("clock"):
            if clock:
                system.stack.start_clock()
        else:
            system.start_worker()


def test_scheduled_jobs_survive_killed_clocks_and_workers(size: Size, record: Row, tmp_path: Path) -> None:
    """SIGKILL the clock as jobs become due and the workers while they send: each sent once, none cancelled sent."""
    record.suite = "scheduled: crashes"
    rng = random.Random(f"{size.seed}:scheduled-crash")
    n, rate = size.crash_sms // 2, size.crash_rate
    env = {"SMS_RATE_LIMIT_MPS": str(rate), "SMS_RATE_LIMIT_BURST_S": str(BATCH / rate)}
    with running(env, seed=size.seed, log_dir=tmp_path) as system:
        queued, dropped = _schedule(system, n, rng, "sc")
        first_due = min(int(system.store.message(r.message_id)["due_ms"]) for r in queued)
        wait_until(lambda: time.time() * 1000 >= first_due, _lead_s(n) + 5, "the first job to be due", interval_s=0.01)
        clocks = [p for p in system.stack.procs if p.name.startswith("clock") and p.alive()]
        _restart(system, clocks, clock=False)  # the clock dies as it starts moving jobs ...
        record.fault("SIGKILL clock@due", len(clocks))
        time.sleep(rng.uniform(0.2, 1.0))  # the scenario: down a random moment
        system.stack.start_clock()  # ... and a new one takes over the schedule
        hit = poll(lambda: system.pending() > 0, 30, 0.005)
        victims = system.workers()
        _restart(system, victims, clock=True)
        record.fault("SIGKILL workers@claim of due jobs" if hit else "SIGKILL workers (claim not seen)", len(victims))
        _check(system, record, queued, dropped, size.wait_s(n, rate) + _lead_s(n) + SPREAD_S)
        crashed = system.dead_processes([*clocks, *victims])
    record.note = f"{len(dropped)} of {n} scheduled jobs cancelled before they were due"
    assert not crashed, f"processes died that nobody killed: {crashed}"


def test_scheduled_jobs_survive_redis_restarts(size: Size, record: Row, tmp_path: Path) -> None:
    """Redis SIGKILLed before the jobs are due and again while they are moved: each sent once, from its AOF."""
    record.suite = "scheduled: redis restarts"
    rng = random.Random(f"{size.seed}:scheduled-restart")
    n, rate = size.restart_sms // 2, size.restart_rate
    env = {"SMS_RATE_LIMIT_MPS": str(rate), "SMS_RATE_LIMIT_BURST_S": str(BATCH / rate)}
    killed: list[Proc] = []
    with running(env, appendonly=True, seed=size.seed, log_dir=tmp_path) as system:
        stack = system.stack
        queued, dropped = _schedule(system, n, rng, "sr")
        first_due = min(int(system.store.message(r.message_id)["due_ms"]) for r in queued)
        for moment_ms in (first_due - 1500, first_due + 300):
            wait_until(lambda m=moment_ms: time.time() * 1000 >= m, _lead_s(n) + 30, "the moment", interval_s=0.01)
            [server] = [p for p in stack.procs if p.name == "redis" and p.alive()]
            server.kill()
            killed.append(server)
            down_since = time.monotonic()
            while time.monotonic() - down_since < size.restart_down_s:  # the scenario: Redis stays away a while
                time.sleep(0.05)
            stack.start_redis(appendonly=True, port=stack.redis_port)
            record.fault("redis SIGKILL + restart, scheduled jobs held")
        _check(system, record, queued, dropped, size.wait_s(n, rate) + _lead_s(n) + SPREAD_S)
        crashed = system.dead_processes(killed)
    record.note = f"Redis down {size.restart_down_s:g} s each time; {len(dropped)} of {n} jobs cancelled"
    assert not crashed, f"processes died and did not come back by themselves: {crashed}"
