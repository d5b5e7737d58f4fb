"""Worker processes SIGKILLed at chosen moments of a run, and restarted: nothing lost, nothing sent twice.

Each trial sends N SMS (rate-limited so the run lasts long enough to be hit) and kills worker processes
(the whole process group: dramatiq's parent and its forked worker) at these moments, then starts
replacements:

- claim:      as soon as the first outbox entries are claimed (pending in the consumer group);
- mid_post:   while a bulk POST is in flight (the sandbox holds it 600 ms before accepting);
- after_post: after the provider accepted a bulk but before the worker had its answer (the sandbox
              accepts, then holds the response), i.e. before any bookkeeping of the outcome;
- drain:      while a reports drain holds its lease, or a drained page is stored but not processed.

The moments, the victims and the pauses between kills come from a seeded RNG (SMS_RELIABILITY_SEED).
"""

from __future__ import annotations

import contextlib
import random
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from tests.reliability.harness import (
    BATCH,
    FINAL,
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
from worker.devtools.devstack import Proc, wait_until

MOMENTS = ("claim", "mid_post", "after_post", "drain")
VALIDITY = {"amount": 15, "time_unit": "SECONDS"}


def _schedule(size: Size, trial: int, rng: random.Random) -> list[str]:
    """Full runs hit every moment in each trial (claim first); short runs split them over the trials."""
    if size.mode == "full" or size.crash_trials == 1:
        rest = list(MOMENTS[1:])
        rng.shuffle(rest)
        return ["claim", *rest]
    per_trial = max(1, len(MOMENTS) // size.crash_trials)
    start = (trial * per_trial) % len(MOMENTS)
    return list(MOMENTS[start : start + per_trial])


def _sandbox_counter(system: System, name: str) -> int:
    return int(system.stats()["faults"].get(name, 0))


def _wait_for_moment(system: System, moment: str) -> bool:
    """Bring the run to `moment` (with the sandbox's help); False if it never came."""
    if moment == "claim":
        return poll(lambda: system.pending() > 0, 30)
    if moment == "drain":
        lease, raw = system.store.lease_key("reports-drain"), system.store.reports_raw
        return poll(lambda: bool(system.client.exists(lease)) or int(system.client.xlen(raw)) > 0, 30, 0.002)
    if moment == "mid_post":
        counter, knobs = "latency", {"latency_ms": 600}
    else:
        counter, knobs = "timeout", {"accept_then_timeout_rate": 1.0, "timeout_delay_ms": 500}
    base = _sandbox_counter(system, counter)
    system.configure(**knobs)
    return poll(lambda: _sandbox_counter(system, counter) > base, 30, 0.01)


def _calm(system: System) -> None:
    system.configure(latency_ms=0, accept_then_timeout_rate=0.0)


def _victims(system: System, moment: str, rng: random.Random) -> list[Proc]:
    workers = system.workers()
    if moment in ("mid_post", "after_post"):
        return workers  # whichever worker holds the POST must die
    return rng.sample(workers, rng.randint(1, len(workers)))


def kill_at_moments(system: System, moments: Sequence[str], rng: random.Random, record: Row,
                    killed: list[Proc], missed: list[str]) -> None:
    """At each moment (a random pause between them), SIGKILL its victims and start as many new
    workers; the killed go to `killed`, the moments the run never reached to `missed`."""
    for i, moment in enumerate(moments):
        if i:
            time.sleep(rng.uniform(0.2, 1.0))  # the scenario: a random moment, not a wait for a condition
        hit = _wait_for_moment(system, moment)
        victims = _victims(system, moment, rng)
        for proc in victims:
            proc.signal(signal.SIGKILL)
        for proc in victims:
            proc.wait(10)
        _calm(system)
        killed += victims
        if hit:
            record.fault(f"SIGKILL@{moment}", len(victims))
        else:
            missed.append(moment)
        for _ in victims:
            system.start_worker()


def test_sigkilled_workers_lose_nothing_and_send_nothing_twice(
    size: Size, record: Row, trial: int, tmp_path: Path
) -> None:
    """SIGKILL at claim / mid-POST / after-POST / drain, restart: every job sent once, every report once."""
    record.suite = "worker crashes"
    rng = random.Random(f"{size.seed}:crash:{trial}")
    n = size.crash_sms
    rate = size.crash_rate
    # A report a killed drain took with it is recovered from the provider's logs once its message is past
    # its report deadline: a 15 s validity and no grace put that deadline inside the trial.
    env = {"SMS_RATE_LIMIT_MPS": str(rate), "SMS_RATE_LIMIT_BURST_S": str(BATCH / rate), "SMS_NO_REPORT_GRACE_S": "0"}
    missed: list[str] = []
    killed: list[Proc] = []
    with running(env, seed=size.seed + trial, log_dir=tmp_path) as system:
        otp = n // 10
        batch = [{**job, "validity_period": VALIDITY} for job in jobs(n, prefix=f"t{trial}")]
        queued = system.outbox.enqueue_many(batch[:otp], "otp") + system.outbox.enqueue_many(batch[otp:], "bulk")
        kill_at_moments(system, _schedule(size, trial, rng), rng, record, killed, missed)
        took = wait_settled(system, size.wait_s(n, rate))
        verdict = verify(system, [r.message_id for r in queued])
        crashed = system.dead_processes(killed)
        record.count("reports a killed drain took with it, recovered from the provider's logs",
                     system.logged("reports_recovered_from_logs", "reports"))
    record.add(verdict)
    if missed:
        record.note = f"moments not reached (killed anyway): {', '.join(missed)}"
    assert took is not None, f"the run did not settle: {verdict.summary()}"
    assert not crashed, f"processes died that nobody killed: {crashed}"
    assert_promises(verdict)
    # A report may overtake the recovery of a killed send: the message ends with its final event only.
    assert verdict.outcomes == {"accepted": n - len(verdict.no_send_event)}, verdict.summary()
    assert verdict.dead_letters == 0, verdict.summary()
    assert not missed, f"the run never reached: {missed}"


# Run in a child process with the stack's environment: one drain of the reports endpoint that dies by
# SIGKILL the moment the GET has returned its page, before the page is stored.
DIES_AFTER_GET = """
import os, signal
from worker.provider import Provider, ProviderConfig
from worker.reports import DrainConfig, Drainer
from worker.settings import load_settings
from worker.store import Store, connect

settings = load_settings()
provider = Provider(ProviderConfig.from_settings(settings))
drainer = Drainer(DrainConfig.from_settings(settings), Store(connect(settings.redis_url)), provider)
drainer.append = lambda page, token: os.kill(os.getpid(), signal.SIGKILL)
drainer.drain()
"""


def test_a_drain_killed_right_after_its_get_loses_no_report(size: Size, record: Row, tmp_path: Path) -> None:
    """A worker SIGKILLed between the reports GET and storing the page: its reports still give final events.

    The page only ever existed in the killed process's memory, and the provider hands a report out
    once; the sweep finds those messages past their report deadline and recovers their final
    statuses from GET /sms/3/logs. A 5 s validity and no grace bring that deadline within the test.
    """
    record.suite = "drain killed after its GET"
    n = 1500
    short_deadline = {"SMS_NO_REPORT_GRACE_S": "0"}
    with running(short_deadline, seed=size.seed, log_dir=tmp_path, clock=False) as system:  # nobody drains yet
        batch = [{**job, "validity_period": {"amount": 5, "time_unit": "SECONDS"}} for job in jobs(n)]
        queued = system.outbox.enqueue_many(batch, "bulk")
        wait_until(lambda: system.stats()["reports"]["unfetched"] == n, 60, f"{n} reports to wait at the provider")
        doomed = subprocess.run([sys.executable, "-c", DIES_AFTER_GET], env=system.stack.env, capture_output=True,
                                timeout=60, check=False)
        handed_out = n - int(system.stats()["reports"]["unfetched"])
        system.stack.start_clock()  # the workers drain the rest
        took = wait_settled(system, 60)

        def recovered() -> bool:
            # The lost page's reports come back once their messages pass the 5 s deadline and the
            # sweep finds their final statuses in the logs: wait for that, bounded.
            finals = {e["message_id"] for e in system.events() if e["type"] in FINAL and e.get("done_at")}
            return len(finals) >= n

        with contextlib.suppress(TimeoutError):
            wait_until(recovered, 30, "the lost reports to be recovered from the logs", interval_s=0.25)
        verdict = verify(system, [r.message_id for r in queued])
    record.add(verdict)
    record.fault("SIGKILL after the reports GET")
    record.note = f"the killed drain took {handed_out} reports from the once-only endpoint"
    assert doomed.returncode == -signal.SIGKILL, doomed.stderr.decode()[-2000:]
    assert handed_out == 1000, "the doomed drain should have taken one full page"
    assert took is not None, f"the run did not settle: {verdict.summary()}"
    assert not verdict.reports_missing, (
        f"{verdict.reports - verdict.report_events} of {verdict.reports} reports never became events: the page "
        f"the killed drain received was never stored, and the provider hands a report out only once "
        f"(e.g. {verdict.reports_missing[:3]}); {verdict.summary()}"
    )
    assert_promises(verdict)
