"""The provider answering in ways a well-behaved sandbox never did: nothing lost, nothing sent twice.

The mix, on top of normal traffic, with the provider's duplicate-id rejection OFF (so a second send of a
messageId is accepted and counted, not refused):

- 200 with a proxy's HTML page or a JSON body cut in half (the messages were accepted);
- 200 listing fewer results than messages sent (the missing ones were accepted too);
- results with a status group the contract does not have (SCHEDULED; really accepted);
- accepted only after the worker's read timeout (the provider acts late);
- logs that show an accepted message only a while after its acceptance (eventual consistency).

Each of them leaves the worker without a verdict; the logs give it, once absence held long enough.
"""

from __future__ import annotations

from pathlib import Path

from tests.reliability.harness import READ_TIMEOUT_S, Row, Size, assert_promises, jobs, running, verify, wait_settled

# The late acceptance and the logs' lag together stay inside what the reconcile window covers:
# reconcile delay (0.5 s) + read timeout + window (2 s) > late accept + lag.
LATE_ACCEPT_MS = 1200
LOGS_LAG_MS = 1000
ODD = {
    "html_body_rate": 0.04, "truncated_body_rate": 0.04, "partial_results_rate": 0.04,
    "unknown_status_rate": 0.04, "late_accept_rate": 0.04, "late_accept_delay_ms": LATE_ACCEPT_MS,
    "logs_lag_ms": LOGS_LAG_MS,
}


def test_odd_provider_answers_end_with_every_job_accepted_once(size: Size, record: Row, tmp_path: Path) -> None:
    """Every job ends accepted exactly once (no `rejected` guessed from an unknown group, no resend of a
    message the lagging logs did not show yet)."""
    record.suite = "odd provider answers"
    assert LATE_ACCEPT_MS / 1000 > READ_TIMEOUT_S, "the late acceptance must come after the worker gave up"
    n, rate = size.storm_sms, size.storm_rate
    env = {"SMS_RATE_LIMIT_MPS": str(rate), "SMS_RATE_LIMIT_BURST_S": "0.2"}
    with running(env, seed=size.seed, log_dir=tmp_path) as system:
        system.configure(**ODD)
        queued = system.outbox.enqueue_many(jobs(n, prefix="odd"), "bulk")
        took = wait_settled(system, size.wait_s(n, rate))
        verdict = verify(system, [r.message_id for r in queued])
        record.count("ambiguous sends reconciled", system.logged("reconciled", "messages"))
    record.add(verdict)
    record.note = f"settled in {took:.1f} s" if took is not None else "did not settle"
    assert took is not None, f"the run did not settle: {verdict.summary()}"
    faults = verdict.faults
    for name in ("html_body", "truncated_body", "partial_results", "unknown_status", "late_accept"):
        assert any(k.startswith(name) and v > 0 for k, v in faults.items()), f"no {name} fault happened: {faults}"
    assert_promises(verdict)
    assert verdict.outcomes == {"accepted": n - len(verdict.no_send_event)}, verdict.summary()
    assert verdict.dead_letters == 0, verdict.summary()
