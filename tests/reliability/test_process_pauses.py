"""Worker processes paused (SIGSTOP) past their lease and resumed (SIGCONT): nothing lost, nothing sent twice.

A paused process is what a long GC pause, a VM freeze or a swap storm looks like from outside: the
process holds claimed batches, a SUBMITTING record, maybe a request half-way through its connection
pool, and then does nothing for longer than the lease. Another worker takes its entries over. When the
paused one wakes up it carries on exactly where it stopped, which is the danger: a stale owner must
never write its request (the batch's fence and send deadline), and the taker must not resend before
the old owner provably cannot send any more.

Moments (each trial pauses at all of them, a seeded RNG picks the victims and the timing):

- pool_wait: POSTs wait for the worker's only provider connection (ICOMM_MAX_CONNECTIONS=1 and a slow
             provider), i.e. between submit.lua and the request leaving;
- mid_post:  a POST is in flight (the sandbox holds it before accepting);
- reconcile: ambiguous sends are being checked in the provider's logs (timeouts after acceptance).
"""

from __future__ import annotations

import random
import signal
import time
from pathlib import Path

import orjson

from tests.reliability.harness import (
    LANES,
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
from worker.devtools.devstack import Proc

MOMENTS = ("pool_wait", "mid_post", "reconcile")
LEASE_S = 3.2
SEND_WINDOW_S = 2.5


def _counter(system: System, name: str) -> int:
    return int(system.stats()["faults"].get(name, 0))


def _bring(system: System, moment: str) -> bool:
    """Set the sandbox up so the workers are at `moment`; False if it never came."""
    if moment == "reconcile":
        counter, knobs = "timeout", {"accept_then_timeout_rate": 0.5, "timeout_delay_ms": 1200, "latency_ms": 0}
    else:
        counter, knobs = "latency", {"latency_ms": 400 if moment == "pool_wait" else 900}
    base = _counter(system, counter)
    system.configure(**knobs)
    return poll(lambda: _counter(system, counter) > base, 30, 0.01)


def _calm(system: System) -> None:
    system.configure(latency_ms=0, accept_then_timeout_rate=0.0)


def _pause(procs: list[Proc], seconds: float) -> None:
    for proc in procs:
        proc.signal(signal.SIGSTOP)
    time.sleep(seconds)  # the fault itself: a process frozen for this long, not a wait for a condition
    for proc in procs:
        proc.signal(signal.SIGCONT)


def test_paused_workers_never_send_a_batch_twice(size: Size, record: Row, pause_trial: int, tmp_path: Path) -> None:
    """SIGSTOP past the lease at pool wait / mid-POST / reconcile, then SIGCONT: every job sent once."""
    record.suite = "worker pauses"
    rng = random.Random(f"{size.seed}:pause:{pause_trial}")
    n, rate = size.pause_sms, size.pause_rate
    env = {
        "SMS_RATE_LIMIT_MPS": str(rate), "SMS_RATE_LIMIT_BURST_S": "0.2",
        # One connection per process: with a slow provider, dispatchers queue for it after submit.lua.
        "ICOMM_MAX_CONNECTIONS": "1", "ICOMM_POOL_TIMEOUT_S": "2", "SMS_LEASE_S": str(LEASE_S),
        # Shorter than the pauses, so a paused owner wakes up to a closed window and its request must
        # be refused; a takeover within send_by + 1 s (the lease is shorter) must wait for it.
        "SMS_SEND_WINDOW_S": str(SEND_WINDOW_S),
        # A reports GET cut under a pause (seen: ReadError EBADF while the process's one connection
        # was contended) may have handed out a page nobody will see again; the product finds those
        # reports in GET /sms/3/logs after SMS_REPORT_LOOKUP_AFTER_S (1 h by default): 5 s here, so
        # the recovery happens within the trial and is counted.
        "SMS_REPORT_LOOKUP_AFTER_S": "5",
        # Many small bulks in flight at once, so several threads of a process hold submitted batches.
        "SMS_LANES": orjson.dumps({**LANES, "bulk": {"batch_size": 50, "max_wait_ms": 0, "concurrency": 12}}).decode(),
    }
    paused = 0
    missed: list[str] = []
    with running(env, workers=3, seed=size.seed + pause_trial, log_dir=tmp_path) as system:
        queued = system.outbox.enqueue_many(jobs(n, prefix=f"p{pause_trial}"), "bulk")
        for round_ in range(size.pause_rounds):
            moment = MOMENTS[round_ % len(MOMENTS)]
            if not _bring(system, moment):
                missed.append(moment)
            time.sleep(rng.uniform(0.05, 0.4))  # a random moment within it, not a wait for a condition
            victims = rng.sample(system.workers(), rng.randint(1, 2))
            _pause(victims, LEASE_S + rng.uniform(0.5, 3.0))
            _calm(system)
            paused += len(victims)
            record.fault(f"SIGSTOP@{moment}", len(victims))
        took = wait_settled(system, size.wait_s(n, rate))
        verdict = verify(system, [r.message_id for r in queued])
        crashed = system.dead_processes()
        errors = system.worker_log_errors()
        record.count("requests refused by their fence", system.logged("send_window_closed", "messages"))
        record.count("reports found by the logs lookup", system.logged("reports_swept", "found_by_lookup"))
    record.add(verdict)
    if missed:
        record.note = f"moments not reached (paused anyway): {', '.join(missed)}"
    assert paused > 0
    assert took is not None, f"the run did not settle: {verdict.summary()}"
    assert not crashed, f"processes died: {crashed}"
    assert not errors, errors[:5]
    assert_promises(verdict)
    assert verdict.outcomes == {"accepted": n - len(verdict.no_send_event)}, verdict.summary()
    assert verdict.dead_letters == 0, verdict.summary()
