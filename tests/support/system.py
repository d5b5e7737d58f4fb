"""A whole running system for end-to-end tests: the real processes, plus the producer and probes a test needs.

`running()` starts Redis, the sandbox, the worker processes, the clocks and (optionally) the web
process under a `DevStack`, and hands over a `System`: the producer side (`store`, `outbox`,
`triggers`, built by worker.producer as any producer process builds them), the sandbox's admin
client and a few probes. The reliability suites extend both (tests/reliability/harness.py) through
`launch()`, which takes the System class and the full environment.
"""

from __future__ import annotations

import secrets
import signal
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import httpx
import orjson

from tests.support.sandbox import API_KEY, SandboxAdmin
from worker.devtools.devstack import DevStack, Proc, free_port, wait_until
from worker.producer import producer
from worker.settings import settings_from_env
from worker.store import Store
from worker.triggers import Triggers

__all__ = ["API_KEY", "BASE_ENV", "SANDBOX_FLAGS", "System", "jobs", "launch", "running"]

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
    """A running stack plus the producer-side objects and the probes a test needs.

    `client` is the Store's raw Redis client: tests use it to *assert* on streams and keys; what
    the test does to the system goes through `outbox`, `triggers` and `store`'s named methods."""

    def __init__(self, stack: DevStack, sandbox_url: str, web_url: str | None = None) -> None:
        self.stack = stack
        self.settings = settings_from_env(stack.env)
        self.sandbox_url = sandbox_url
        self.web_url = web_url
        self.sandbox = SandboxAdmin(sandbox_url)
        self.http = httpx.Client(timeout=10, trust_env=False)  # a test's own calls, e.g. to the web process
        self.producer = producer(self.settings)
        assert self.producer.triggers is not None  # producer() wakes the workers unless told not to
        self.store: Store = self.producer.store
        self.triggers: Triggers = self.producer.triggers
        self.outbox = self.producer.outbox
        self.client: Any = self.store.r
        self._workers_started = 0

    def close(self) -> None:
        self.http.close()
        self.sandbox.close()
        self.producer.close()

    # --- sandbox --------------------------------------------------------------------------------
    def stats(self, per_message: bool = False) -> dict[str, Any]:
        return self.sandbox.stats(per_message)

    def configure(self, **knobs: Any) -> None:
        self.sandbox.configure(**knobs)

    # --- processes ------------------------------------------------------------------------------
    def start_worker(self) -> Proc:
        """One more worker process, named worker-1, worker-2, ... in the order they start."""
        self._workers_started += 1
        return self.stack.start_worker(f"worker-{self._workers_started}")

    def workers(self) -> list[Proc]:
        return [p for p in self.stack.procs if p.name.startswith("worker-") and p.alive()]

    def dead_processes(self, killed: Iterable[Proc] = ()) -> list[str]:
        """Processes that exited without the test killing them (a crash)."""
        spared = {id(p) for p in killed}
        return [f"{p.name} (exit {p.popen.returncode if p.popen else '?'})" for p in self.stack.procs
                if id(p) not in spared and not p.alive()]

    def kill_all_but_redis(self) -> None:
        """SIGKILL every process but Redis: a measured run ends at once (graceful shutdown has its own
        tests, and a dramatiq worker takes seconds to stop)."""
        for proc in self.stack.procs:
            if proc.name != "redis":
                proc.signal(signal.SIGKILL)

    # --- Redis probes ---------------------------------------------------------------------------
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


SystemT = TypeVar("SystemT", bound=System)


@contextmanager
def launch(
    system_type: type[SystemT], env: Mapping[str, str], sandbox_flags: Iterable[str], *, workers: int, clocks: int,
    web: bool, appendonly: bool = False, log_dir: Path | None = None, kill_at_exit: bool = False,
) -> Iterator[SystemT]:
    """Redis, the sandbox (with `sandbox_flags` as given), the web process (with `web`, the webhook
    configured), a `system_type` on them, `workers` worker processes and `clocks` clocks; all stopped
    afterwards: gracefully, or with `kill_at_exit` at once."""
    full_env = dict(env)
    web_port = free_port() if web else None
    if web_port is not None:
        full_env.setdefault("SMS_WEBHOOK_PUBLIC_URL", f"http://127.0.0.1:{web_port}")
        full_env.setdefault("SMS_WEBHOOK_SECRET", secrets.token_hex(16))
    with DevStack(env=full_env, log_dir=log_dir) as stack:
        stack.start_redis(appendonly=appendonly)
        sandbox_url = stack.start_sandbox(API_KEY, *sandbox_flags)
        web_url = None
        if web_port is not None:
            stack.start_web(web_port)  # returns once /readyz answers 200
            web_url = f"http://127.0.0.1:{web_port}"
        system = system_type(stack, sandbox_url, web_url)
        try:
            for _ in range(workers):
                system.start_worker()
            for i in range(clocks):
                stack.start_clock(f"clock-{i + 1}")
            yield system
        finally:
            system.close()
            if kill_at_exit:
                system.kill_all_but_redis()


@contextmanager
def running(
    env: dict[str, str] | None = None, sandbox_flags: tuple[str, ...] = SANDBOX_FLAGS, *, workers: int = 2,
    clocks: int = 1, web: bool = False,
) -> Iterator[System]:
    """Redis, the sandbox, `workers` worker processes, `clocks` clocks and (with `web`) the web process
    with the webhook configured, on BASE_ENV and `env`; all stopped gracefully afterwards."""
    with launch(System, {**BASE_ENV, **(env or {})}, sandbox_flags, workers=workers, clocks=clocks, web=web) as system:
        yield system


def jobs(n: int, start: int = 0, *, id_prefix: str | None = None, **extra: Any) -> list[dict[str, Any]]:
    """`n` valid jobs with distinct numbers and metadata; with `id_prefix`, producer ids `{id_prefix}-{i}`."""
    made = []
    for i in range(start, start + n):
        job: dict[str, Any] = {"to": f"4179{i:07d}", "text": f"hello {i}"}
        if id_prefix is not None:
            job["id"] = f"{id_prefix}-{i}"
        made.append({**job, "metadata": {"n": i}, **extra})
    return made
