"""SIGTERM: a worker finishes the bulk in flight, takes no new one, exits in time, and loses nothing."""

from __future__ import annotations

import signal
import time

from tests.support.system import SANDBOX_FLAGS, jobs, running
from worker.devtools.devstack import wait_until
from worker.store import DISPATCH_GROUP


def test_sigterm_finishes_the_batch_in_flight_and_exits_in_time() -> None:
    """The stopped worker leaves nothing pending; a fresh worker sends the rest; no duplicates."""
    env = {"SMS_SHUTDOWN_TIMEOUT_S": "5",
           "SMS_LANES": '{"otp":{"batch_size":50,"max_wait_ms":0},"bulk":{"batch_size":100,"max_wait_ms":0}}'}
    with running(env=env, sandbox_flags=(*SANDBOX_FLAGS, "--latency-ms", "300"), workers=1) as system:
        queued = system.outbox.enqueue_many(jobs(3000), "bulk")
        wait_until(lambda: system.stats()["messages_accepted"] >= 200, 30, "sending to be under way")
        worker = system.stack.procs[2]
        assert worker.name == "worker-1"
        started = time.monotonic()
        worker.signal(signal.SIGTERM)
        code = worker.wait(15)
        stopped_in_s = time.monotonic() - started
        assert code is not None, "the worker did not exit within 15 s of SIGTERM"
        # Everything it had claimed was settled before it left: nothing waits for the lease.
        pending = system.client.xpending(system.store.outbox("bulk"), DISPATCH_GROUP)["pending"]
        sent_before = system.stats()["messages_accepted"]
        assert pending == 0, system.stack.logs()
        assert system.client.xlen(system.store.events) == sent_before
        system.stack.start_worker("worker-2")
        outcomes = system.wait_for_send_outcomes(3000, 90)
        stats = system.stats()
    assert stopped_in_s < 5 + 2
    assert sent_before < 3000
    assert set(outcomes) == {r.message_id for r in queued}
    assert set(outcomes.values()) == {"accepted"}
    assert stats["duplicates"] == 0
