"""Scheduled sends and cancel as deployed: real Redis, the sandbox, `sms-worker worker` and clock processes."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

from tests.support.system import jobs, running
from worker.cancel import CancelConfig, cancel
from worker.devtools.devstack import wait_until
from worker.models import parse_send_at


def test_scheduled_jobs_are_sent_when_due_and_cancelled_ones_never() -> None:
    """200 jobs due in ~4 s (100 with producer ids, 100 without), 50 of them cancelled, plus 100
    plain jobs now: the plain ones go at once, the scheduled ones within about a second of their
    time and not before it, each once; the cancelled ones never reach the sandbox."""
    with running() as system:
        send_at = (datetime.now(UTC) + timedelta(seconds=4)).isoformat()
        due_ms = parse_send_at(send_at)
        config = CancelConfig.from_settings(system.settings)
        scheduled = system.outbox.enqueue_many(jobs(100, id_prefix="s", send_at=send_at), "bulk")
        scheduled += system.outbox.enqueue_many(jobs(100, start=100, send_at=send_at), "bulk")
        now = system.outbox.enqueue_many(jobs(100, start=1000), "bulk")
        dropped = [r.message_id for r in scheduled[::4]]
        answers = [cancel(system.store, config, message_id=mid) for mid in dropped]
        assert all(answer.cancelled for answer in answers)
        wait_until(lambda: system.stats()["messages_accepted"] == 100, 30, "the unscheduled jobs")
        early = system.stats()["messages_accepted"]
        assert time.time() * 1000 < due_ms, "the test took too long to tell early from on time"
        outcomes = system.wait_for_send_outcomes(100 + 200, 30)
        sent_ms = time.time() * 1000
        stats = system.stats()
    assert early == 100, "nothing scheduled went out before its time"
    assert sent_ms - due_ms < 5000
    kept = {r.message_id for r in scheduled} - set(dropped)
    assert {mid for mid, kind in outcomes.items() if kind == "accepted"} == kept | {r.message_id for r in now}
    assert {mid for mid, kind in outcomes.items() if kind == "cancelled"} == set(dropped)
    assert stats["messages_accepted"] == 100 + 150 and stats["duplicates"] == 0
