"""The provider misbehaving: a storm of 5xx, 429s, timeouts and dropped connections; then a full outage.

Storm: 20% 5xx (500/502/503/504), 10% 429 (half with Retry-After: 1), 5% accepted-then-timed-out
(the answer comes after the worker's read timeout), 5% accepted-then-dropped, 0-100 ms jitter, and a
messages/s limit in the worker (SMS_RATE_LIMIT_MPS). Outage: every API call answers 503 for a while.
"""

from __future__ import annotations

import time
from pathlib import Path

import orjson

from tests.reliability.harness import (
    BATCH,
    LANES,
    Row,
    Size,
    assert_promises,
    jobs,
    running,
    verify,
    wait_settled,
)
from worker.devtools.devstack import wait_until

RECOVERY_FLOOR_MPS = 250
STORM = ("--error-5xx-rate", "0.2", "--rate-429", "0.1", "--retry-after-share", "0.5", "--retry-after-s", "1",
         "--accept-then-timeout-rate", "0.05", "--timeout-delay-ms", "1500", "--drop-rate", "0.05",
         "--jitter-ms", "100")


def test_a_fault_storm_ends_with_every_job_sent_once_within_the_rate_limit(
    size: Size, record: Row, tmp_path: Path
) -> None:
    """Every job reaches a terminal state, nothing twice, and no second carries more than limit + one batch."""
    record.suite = "provider fault storm"
    n, rate = size.storm_sms, size.storm_rate
    env = {"SMS_RATE_LIMIT_MPS": str(rate), "SMS_RATE_LIMIT_BURST_S": str(BATCH / rate)}
    with running(env, STORM, seed=size.seed, log_dir=tmp_path) as system:
        otp = n // 10
        queued = system.outbox.enqueue_many(jobs(otp), "otp") + system.outbox.enqueue_many(jobs(n - otp, otp), "bulk")
        took = wait_settled(system, size.wait_s(n, rate) * 2)
        verdict = verify(system, [r.message_id for r in queued])
        by_second = {int(s): c for s, c in system.stats()["accepted_by_second"].items()}
        dead = system.dead_letters()
        crashed = system.dead_processes()
    record.add(verdict)
    busiest = max(by_second.values(), default=0)
    record.note = f"limit {rate}/s, batch {BATCH}: busiest second at the sandbox {busiest}"
    assert took is not None, f"the run did not settle: {verdict.summary()}"
    assert not crashed, crashed
    assert {"5xx", "429", "timeout", "drop"} <= {k.split("_")[0] for k in verdict.faults}, verdict.faults
    assert_promises(verdict)
    assert verdict.outcomes == {"accepted": n - len(verdict.no_send_event)}, verdict.summary()
    assert not dead, f"retryable faults were dead-lettered: {[(d['reason'], d['detail']) for d in dead[:5]]}"
    assert busiest <= rate + BATCH, f"the sandbox saw {busiest} messages in one second (limit {rate}): {by_second}"


def test_an_outage_keeps_the_backlog_and_drains_it_after(size: Size, record: Row, tmp_path: Path) -> None:
    """The API answers 503 to everything for a while: nothing is dead-lettered, the backlog is sent after."""
    record.suite = "provider outage"
    n = size.outage_sms
    rate = max(500, n // 10)
    lanes = {**LANES, "bulk": {**LANES["bulk"], "concurrency": 2}}
    # The outage is short next to the retry horizon (an hour at least) and long next to the lane's
    # outage pause (0.3 s; the production default is 10 s, for outages of minutes).
    env = {"SMS_RATE_LIMIT_MPS": str(rate), "SMS_RATE_LIMIT_BURST_S": str(BATCH / rate), "SMS_OUTAGE_PAUSE_S": "0.3",
           "SMS_RETRY_HORIZON_S": str(int(max(3600, 10 * size.outage_s))), "SMS_LANES": orjson.dumps(lanes).decode()}
    with running(env, seed=size.seed, log_dir=tmp_path) as system:
        half = n // 2
        queued = system.outbox.enqueue_many(jobs(half), "bulk")
        wait_until(lambda: system.stats()["messages_accepted"] >= half // 4, 60, "the run to be under way")
        system.configure(down=True)
        started = time.monotonic()
        queued += system.outbox.enqueue_many(jobs(n - half, half), "bulk")  # the backlog grows meanwhile
        paused: set[str] = set()
        most_dead = backlog = 0
        while time.monotonic() - started < size.outage_s:  # the scenario: the outage lasts outage_s
            paused.add(system.store.paused("bulk") or "")
            most_dead = max(most_dead, int(system.client.xlen(system.store.dlq)))
            backlog = system.outbox_left()
            time.sleep(0.25)
        system.configure(down=False)
        outage = time.monotonic() - started
        # The backlog is pending after the outage and comes back by recovery, a batch at a time:
        # allow for a drain well below the rate limit.
        took = wait_settled(system, size.wait_s(n, RECOVERY_FLOOR_MPS))
        verdict = verify(system, [r.message_id for r in queued])
        dead = system.dead_letters()
        crashed = system.dead_processes()
    record.add(verdict)
    record.note = (f"outage {outage:.0f} s, backlog at its end {backlog:,} jobs, drained in {took:.0f} s after it "
                   f"({backlog / max(took, 0.1):,.0f} jobs/s; limit {rate:,}/s)" if took is not None
                   else f"outage {outage:.0f} s, backlog {backlog:,} jobs, not drained in "
                        f"{size.wait_s(n, RECOVERY_FLOOR_MPS):.0f} s")
    assert not crashed, crashed
    assert verdict.faults.get("down", 0) > 0, verdict.faults
    assert "provider_unavailable" in paused, f"the lane never paused during the outage: {paused}"
    assert backlog >= n - half, f"the backlog was not kept: {backlog} entries left in the outbox"
    assert most_dead == 0 and not dead, (
        f"retryable 503s were dead-lettered within the retry horizon: "
        f"{len(dead)} dead letters, e.g. {[(d['reason'], d['attempts'], d['detail']) for d in dead[:3]]}"
    )
    assert took is not None, f"the backlog was not drained: {verdict.summary()}"
    assert_promises(verdict)
    assert verdict.outcomes == {"accepted": n - len(verdict.no_send_event)}, verdict.summary()
