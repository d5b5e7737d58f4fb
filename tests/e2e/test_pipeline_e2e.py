"""The send pipeline as deployed: real Redis, the sandbox, `sms-worker worker` (Dramatiq) and clock processes."""

from __future__ import annotations

import shutil
import signal
import subprocess

import orjson
import pytest

from tests.support.system import API_KEY, SANDBOX_FLAGS, jobs, running
from worker.devtools.devstack import wait_until
from worker.triggers import lane_queue


def test_ten_thousand_sms_arrive_complete_without_duplicates() -> None:
    """10,000 SMS over both lanes: every one accepted once, each with its metadata echoed."""
    with running() as system:
        bulk = system.outbox.enqueue_many(jobs(9000), "bulk")
        otp = system.outbox.enqueue_many(jobs(1000, start=9000), "otp")
        outcomes = system.wait_for_send_outcomes(10_000, 90)
        stats = system.stats()
    assert set(outcomes) == {r.message_id for r in bulk + otp}
    assert set(outcomes.values()) == {"accepted"}
    assert stats["messages_accepted"] == 10_000
    assert stats["duplicates"] == 0


def test_sigkill_of_a_worker_mid_run_loses_and_duplicates_nothing() -> None:
    """A worker killed with SIGKILL while sending: its claimed jobs are recovered and reconciled."""
    with running(sandbox_flags=(*SANDBOX_FLAGS, "--latency-ms", "40")) as system:
        queued = system.outbox.enqueue_many(jobs(8000), "bulk")
        wait_until(lambda: system.stats()["messages_accepted"] >= 1500, 60, "the run to be under way")
        victim = system.stack.procs[2]
        assert victim.name == "worker-1"
        victim.signal(signal.SIGKILL)
        system.stack.start_worker("worker-3")
        outcomes = system.wait_for_send_outcomes(8000, 120)
        stats = system.stats()
    assert set(outcomes) == {r.message_id for r in queued}
    assert set(outcomes.values()) == {"accepted"}
    assert stats["duplicates"] == 0
    assert stats["messages_accepted"] == 8000


def test_accept_then_timeout_faults_produce_no_duplicates() -> None:
    """Sends the provider accepted but never answered are reconciled from its logs, not resent."""
    lanes = {"otp": {"batch_size": 50, "max_wait_ms": 0}, "bulk": {"batch_size": 100, "max_wait_ms": 0}}
    flags = ("--accept-then-timeout-rate", "0.3", "--timeout-delay-ms", "2500")
    env = {"SMS_LANES": orjson.dumps(lanes).decode()}
    with running(env=env, sandbox_flags=(*SANDBOX_FLAGS, *flags)) as system:
        queued = system.outbox.enqueue_many(jobs(3000), "bulk")
        outcomes = system.wait_for_send_outcomes(3000, 90)
        stats = system.stats()
    assert set(outcomes) == {r.message_id for r in queued}
    assert set(outcomes.values()) == {"accepted"}
    assert stats["faults"].get("timeout", 0) > 0
    assert stats["duplicates"] == 0
    assert stats["messages_accepted"] == 3000


def test_one_invalid_message_does_not_stop_the_other_999() -> None:
    """The provider refuses a bulk over one message: it is isolated and dead-lettered, 999 are sent."""
    with running(sandbox_flags=(*SANDBOX_FLAGS, "--reject-text-containing", "POISON")) as system:
        batch = jobs(1000)
        batch[417]["text"] = "this one is POISON to the provider"
        queued = system.outbox.enqueue_many(batch, "bulk")
        outcomes = system.wait_for_send_outcomes(1000, 60)
        stats = system.stats()
        dead = [orjson.loads(f[b"entry"]) for _, f in system.client.xrange(system.store.dlq)]
    assert outcomes[queued[417].message_id] == "failed"
    assert sum(1 for t in outcomes.values() if t == "accepted") == 999
    assert stats["messages_accepted"] == 999
    assert [d["reason"] for d in dead] == ["bad_request"]
    assert "content.text" in dead[0]["detail"]


def test_401_pauses_the_lane_and_resumes_without_loss() -> None:
    """With the key refused the lane pauses and keeps its jobs; once the key works they all go out."""
    with running() as system:
        system.configure(forbidden_keys=[API_KEY])
        queued = system.outbox.enqueue_many(jobs(500), "bulk")
        wait_until(lambda: system.store.paused("bulk") == "auth", 20, "the bulk lane to pause")
        assert system.client.xlen(system.store.events) == 0
        system.configure(forbidden_keys=[])
        outcomes = system.wait_for_send_outcomes(500, 60)
        stats = system.stats()
    assert set(outcomes) == {r.message_id for r in queued}
    assert set(outcomes.values()) == {"accepted"}
    assert stats["duplicates"] == 0


def test_a_job_written_with_redis_cli_is_sent() -> None:
    """The documented wire format: a plain XADD from redis-cli is validated and sent."""
    redis_cli = shutil.which("redis-cli")
    assert redis_cli, "redis-cli comes with Debian's redis-server package"
    with running(workers=1) as system:
        port = system.stack.redis_port
        job = '{"to":"41793026727","text":"Hello from redis-cli","id":"cli-1","metadata":{"from":"cli"}}'
        subprocess.run([redis_cli, "-p", str(port), "XADD", "sms:outbox:otp", "*", "job", job],
                       check=True, capture_output=True)
        subprocess.run([redis_cli, "-p", str(port), "XADD", "sms:outbox:otp", "*", "job", job],
                       check=True, capture_output=True)
        outcomes = system.wait_for_send_outcomes(1, 30)
        wait_until(lambda: system.client.xlen("sms:outbox:otp") == 0, 10, "the repeat to be dropped")
        events = system.events()
        stats = system.stats()
    assert list(outcomes.values()) == ["accepted"]
    assert events[0]["id"] == "cli-1" and events[0]["metadata"] == {"from": "cli"}
    assert stats["messages_accepted"] == 1


@pytest.mark.slow
def test_rate_limit_holds_across_worker_processes() -> None:
    """Two workers share one limit: over 10 s the sandbox sees R/s within 5%, never R + one batch."""
    rate, batch = 1000, 100
    env = {
        "SMS_RATE_LIMIT_MPS": str(rate), "SMS_RATE_LIMIT_BURST_S": str(batch / rate),
        "SMS_LANES": orjson.dumps({"otp": {"batch_size": 50, "max_wait_ms": 0},
                                   "bulk": {"batch_size": batch, "max_wait_ms": 0, "concurrency": 4}}).decode(),
    }
    with running(env=env) as system:
        system.outbox.enqueue_many(jobs(14_000), "bulk")
        wait_until(lambda: system.stats()["messages_accepted"] >= 12_500, 40, "12,500 sends")
        by_second = {int(k): v for k, v in system.stats()["accepted_by_second"].items()}
    seconds = sorted(by_second)
    window = seconds[1:11]  # whole seconds only: the first one is partial
    assert len(window) == 10 and window[-1] - window[0] == 9
    total = sum(by_second[s] for s in window)
    assert abs(total - 10 * rate) <= 0.05 * 10 * rate, by_second
    assert max(by_second[s] for s in window) <= rate + batch, by_second


def test_a_worker_given_only_the_otp_lane_sends_otp_and_nothing_else() -> None:
    """`sms-worker worker --lanes otp` consumes only the otp lane's queue: otp jobs go out while bulk
    jobs wait, until a `--skip-lanes otp` worker (everything else) starts beside it."""
    with running(workers=0) as system:
        system.stack.start_worker("worker-otp", lanes="otp")
        bulk = system.outbox.enqueue_many(jobs(300), "bulk")
        otp = system.outbox.enqueue_many(jobs(20, start=300), "otp")
        outcomes = system.wait_for_send_outcomes(20, 60)
        assert set(outcomes) == {r.message_id for r in otp}
        # The producer and the clock (every 200 ms) kick the bulk lane; its dispatch messages pile
        # up unread, as no worker here takes that lane's queue.
        unread = f"{system.settings.sms_key_prefix}:dramatiq:{lane_queue('bulk')}.msgs"
        wait_until(lambda: system.client.hlen(unread) >= 3, 10, "three bulk dispatch messages")
        assert system.client.xlen(system.store.outbox("bulk")) == 300
        assert system.stats()["messages_accepted"] == 20
        system.stack.start_worker("worker-rest", skip_lanes="otp")
        outcomes = system.wait_for_send_outcomes(320, 60)
        stats = system.stats()
    assert set(outcomes) == {r.message_id for r in bulk + otp}
    assert stats["messages_accepted"] == 320 and stats["duplicates"] == 0
