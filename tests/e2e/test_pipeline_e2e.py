"""The send pipeline as deployed: real Redis, the sandbox, `sms-worker worker` (Dramatiq) and clock processes."""

from __future__ import annotations

import shutil
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import orjson
import pytest

from worker.devstack import DevStack, wait_until
from worker.outbox import Outbox
from worker.runtime import make_broker
from worker.settings import Settings, settings_from_env
from worker.store import Store, connect
from worker.triggers import Triggers

API_KEY = "e2e-key-0123456789"
# Short timeouts and lease so crash recovery and reconciliation happen within a test.
BASE_ENV = {
    "LOG_LEVEL": "INFO",
    "ICOMM_CONNECT_TIMEOUT_S": "0.5", "ICOMM_WRITE_TIMEOUT_S": "0.5", "ICOMM_READ_TIMEOUT_S": "1",
    "ICOMM_RETRY_BACKOFF_BASE_S": "0.02", "ICOMM_RETRY_BACKOFF_MAX_S": "0.2", "ICOMM_SEND_RETRY_ATTEMPTS": "3",
    "SMS_LEASE_S": "8", "SMS_RECONCILE_DELAY_S": "0.5", "SMS_OUTAGE_PAUSE_S": "0.5", "SMS_AUTH_PAUSE_S": "1",
    "SMS_DISPATCH_TICK_MS": "200", "SMS_LOGS_RATE_PER_MIN": "6000", "SMS_REPORTS_DRAIN_INTERVAL_S": "1",
}
SANDBOX_FLAGS = ("--report-delay-ms", "600000", "--logs-rate-per-min", "100000", "--seed", "3")


class System:
    """A running stack plus the producer-side objects a test needs."""

    def __init__(self, stack: DevStack, settings: Settings, sandbox_url: str) -> None:
        self.stack = stack
        self.settings = settings
        self.sandbox_url = sandbox_url
        self.client: Any = connect(settings.redis_url)
        self.store = Store(self.client)
        broker, _ = make_broker(settings)
        self.triggers = Triggers(self.store, broker)
        self.outbox = Outbox(settings, self.store, wake=self.triggers.dispatch)

    def stats(self) -> dict[str, Any]:
        response = httpx.get(f"{self.sandbox_url}/_sandbox/stats", timeout=5)
        response.raise_for_status()
        data: dict[str, Any] = response.json()
        return data

    def configure(self, **knobs: Any) -> None:
        httpx.post(f"{self.sandbox_url}/_sandbox/config", json=knobs, timeout=5).raise_for_status()

    def events(self) -> list[dict[str, Any]]:
        return [orjson.loads(f[b"event"]) for _, f in self.client.xrange(self.store.events)]

    def wait_for_send_outcomes(self, n: int, timeout_s: float) -> dict[str, str]:
        """Wait until `n` messages have a send-side outcome; returns message id -> event type."""

        def done() -> bool:
            return int(self.client.xlen(self.store.events)) >= n

        try:
            wait_until(done, timeout_s, f"{n} send outcomes", interval_s=0.1)
        except TimeoutError:
            print(self.stack.logs())
            raise
        return {e["message_id"]: e["type"] for e in self.events()}


@contextmanager
def running(
    env: dict[str, str] | None = None, sandbox_flags: tuple[str, ...] = (), workers: int = 2
) -> Iterator[System]:
    full_env = {**BASE_ENV, **(env or {})}
    with DevStack(env=full_env) as stack:
        stack.start_redis()
        sandbox_url = stack.start_sandbox(API_KEY, *SANDBOX_FLAGS, *sandbox_flags)
        for i in range(workers):
            stack.start_worker(f"worker-{i + 1}")
        stack.start_clock()
        settings = settings_from_env(stack.env)
        system = System(stack, settings, sandbox_url)
        try:
            yield system
        finally:
            system.client.close()


def _jobs(n: int, start: int = 0) -> list[dict[str, Any]]:
    return [
        {"to": f"4179{start + i:07d}", "text": f"hello {start + i}", "metadata": {"n": start + i}} for i in range(n)
    ]


def test_ten_thousand_sms_arrive_complete_without_duplicates() -> None:
    """10,000 SMS over both lanes: every one accepted once, each with its metadata echoed."""
    with running() as system:
        bulk = system.outbox.enqueue_many(_jobs(9000), "bulk")
        otp = system.outbox.enqueue_many(_jobs(1000, start=9000), "otp")
        outcomes = system.wait_for_send_outcomes(10_000, 90)
        stats = system.stats()
    assert set(outcomes) == {r.message_id for r in bulk + otp}
    assert set(outcomes.values()) == {"accepted"}
    assert stats["messages_accepted"] == 10_000
    assert stats["duplicates"] == 0


def test_sigkill_of_a_worker_mid_run_loses_and_duplicates_nothing() -> None:
    """A worker killed with SIGKILL while sending: its claimed jobs are recovered and reconciled."""
    with running(sandbox_flags=("--latency-ms", "40")) as system:
        queued = system.outbox.enqueue_many(_jobs(8000), "bulk")
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
    with running(env={"SMS_LANES": orjson.dumps(lanes).decode()}, sandbox_flags=flags) as system:
        queued = system.outbox.enqueue_many(_jobs(3000), "bulk")
        outcomes = system.wait_for_send_outcomes(3000, 90)
        stats = system.stats()
    assert set(outcomes) == {r.message_id for r in queued}
    assert set(outcomes.values()) == {"accepted"}
    assert stats["faults"].get("timeout", 0) > 0
    assert stats["duplicates"] == 0
    assert stats["messages_accepted"] == 3000


def test_one_invalid_message_does_not_stop_the_other_999() -> None:
    """The provider refuses a bulk over one message: it is isolated and dead-lettered, 999 are sent."""
    with running(sandbox_flags=("--reject-text-containing", "POISON")) as system:
        jobs = _jobs(1000)
        jobs[417]["text"] = "this one is POISON to the provider"
        queued = system.outbox.enqueue_many(jobs, "bulk")
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
        queued = system.outbox.enqueue_many(_jobs(500), "bulk")
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
        system.outbox.enqueue_many(_jobs(14_000), "bulk")
        wait_until(lambda: system.stats()["messages_accepted"] >= 12_500, 40, "12,500 sends")
        by_second = {int(k): v for k, v in system.stats()["accepted_by_second"].items()}
    seconds = sorted(by_second)
    window = seconds[1:11]  # whole seconds only: the first one is partial
    assert len(window) == 10 and window[-1] - window[0] == 9
    total = sum(by_second[s] for s in window)
    assert abs(total - 10 * rate) <= 0.05 * 10 * rate, by_second
    assert max(by_second[s] for s in window) <= rate + batch, by_second
