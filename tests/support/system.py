"""A whole running system for end-to-end tests: real processes, plus the producer and probes a test needs."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import orjson

from worker.devtools.devstack import DevStack, free_port, wait_until
from worker.outbox import Outbox
from worker.runtime import make_broker
from worker.settings import settings_from_env
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
    # An ambiguous send that never reached the provider is resent after 3 checks over 2 s, not 60 s.
    "SMS_RECONCILE_WINDOW_S": "2", "SMS_RECONCILE_CHECKS": "3",
}
# Reports far in the future unless a test wants them: send-side tests see only send outcomes.
SANDBOX_FLAGS = ("--report-delay-ms", "600000", "--logs-rate-per-min", "100000", "--seed", "3")


class System:
    """A running stack plus the producer-side objects a test needs."""

    def __init__(self, stack: DevStack, sandbox_url: str) -> None:
        self.stack = stack
        self.settings = settings_from_env(stack.env)
        self.sandbox_url = sandbox_url
        self.client: Any = connect(self.settings.redis_url)
        self.store = Store(self.client)
        broker, _ = make_broker(self.settings)
        self.triggers = Triggers(self.store, broker)
        self.outbox = Outbox(self.settings, self.store, wake=self.triggers.dispatch)

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
    env: dict[str, str] | None = None, sandbox_flags: tuple[str, ...] = SANDBOX_FLAGS, *, workers: int = 2,
    clocks: int = 1, web: bool = False,
) -> Iterator[System]:
    """Redis, the sandbox, `workers` worker processes, `clocks` clocks and (with `web`) the web process
    with the webhook configured; all stopped afterwards."""
    full_env = {**BASE_ENV, **(env or {})}
    web_port = free_port() if web else None
    if web_port is not None:
        full_env.setdefault("SMS_WEBHOOK_PUBLIC_URL", f"http://127.0.0.1:{web_port}")
        full_env.setdefault("SMS_WEBHOOK_SECRET", secrets.token_hex(16))
    with DevStack(env=full_env) as stack:
        stack.start_redis()
        sandbox_url = stack.start_sandbox(API_KEY, *sandbox_flags)
        if web_port is not None:
            stack.start_web(web_port)
        for i in range(workers):
            stack.start_worker(f"worker-{i + 1}")
        for i in range(clocks):
            stack.start_clock(f"clock-{i + 1}")
        system = System(stack, sandbox_url)
        try:
            yield system
        finally:
            system.client.close()


def jobs(n: int, start: int = 0, **extra: Any) -> list[dict[str, Any]]:
    """`n` plain jobs with distinct numbers and metadata."""
    return [
        {"to": f"4179{start + i:07d}", "text": f"hello {start + i}", "metadata": {"n": start + i}, **extra}
        for i in range(n)
    ]
