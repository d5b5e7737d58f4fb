"""One benchmark stack: private redis-server and sandbox, our workers and clock, or the baseline workers.

Built on worker.devtools.devstack (the processes the Procfile runs, on free loopback ports), plus what a
benchmark needs on top: the pids of each component for CPU accounting, producer-side objects (from
worker.producer, as any producer process builds them), the sandbox's admin client (tests.support.sandbox,
importable because `python -m bench` runs from the repository root), and event-stream readers that
take times from the stream entry ids (Redis's clock, in ms).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bench import procs
from tests.support.sandbox import SandboxAdmin
from worker.devtools.devstack import DevStack, Proc, wait_until
from worker.outbox import Outbox, OutboxConfig
from worker.producer import connect_store, connect_triggers
from worker.settings import Settings, settings_from_env
from worker.triggers import Triggers

API_KEY = "bench-key-0123456789"
REPO = Path(__file__).resolve().parent.parent
# Reports an hour away stay out of every send-side measurement.
NO_REPORTS = ("--report-delay-ms", "3600000")
WORKER_THREADS = 8
READY = "Worker process is ready for action."  # dramatiq's log line once a worker process has booted


def entry_ms(entry_id: bytes | str) -> int:
    """The server time (ms) at which a stream entry was added, from its id `<ms>-<seq>`."""
    raw = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return int(raw.rsplit("-", 2)[-2])


class BenchStack:
    """A DevStack with a per-component view; `start_ours()` / `start_baseline()` add the workers."""

    def __init__(self, env: Mapping[str, str] | None = None, sandbox_flags: tuple[str, ...] | None = NO_REPORTS,
                 ) -> None:
        """`sandbox_flags=None`: no sandbox (a producer-only stack)."""
        base = {"LOG_LEVEL": "INFO", "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO),
                                                                                 os.environ.get("PYTHONPATH")]))}
        self.dev = DevStack(env={**base, **(env or {})})
        try:
            self.dev.start_redis()
            if sandbox_flags is None:
                self.dev.env.update(ICOMM_API_KEY=API_KEY, ICOMM_BASE_URL="http://127.0.0.1:9")
                self.sandbox_url = self.dev.env["ICOMM_BASE_URL"]
            else:
                self.sandbox_url = self.dev.start_sandbox(API_KEY, *sandbox_flags)
        except BaseException:
            self.dev.stop()
            raise
        self.settings: Settings = settings_from_env(self.dev.env)
        self.store = connect_store(self.settings)
        self.client: Any = self.store.r  # raw Redis, to read the streams and INFO a benchmark measures
        self.sandbox = SandboxAdmin(self.sandbox_url)
        self.workers: list[Proc] = []
        self.clock: Proc | None = None
        self._triggers: Triggers | None = None
        self._outbox: Outbox | None = None

    def __enter__(self) -> BenchStack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sandbox.close()
        if self._triggers is not None:
            self._triggers.broker.close()
        self.store.close()
        self.dev.stop()

    # --- components --------------------------------------------------------------------------------
    def proc(self, name: str) -> Proc:
        return next(p for p in self.dev.procs if p.name == name)

    @property
    def redis_pid(self) -> int:
        return self.proc("redis").pid

    @property
    def sandbox_pid(self) -> int:
        return self.proc("sandbox").pid

    def components(self) -> dict[str, list[int]]:
        """Component name -> root pids (the CPU meter sums each root's process tree)."""
        found = {"workers": [w.pid for w in self.workers], "redis": [self.redis_pid],
                 "producer": [os.getpid()]}
        if any(p.name == "sandbox" for p in self.dev.procs):
            found["sandbox"] = [self.sandbox_pid]
        if self.clock is not None:
            found["clock"] = [self.clock.pid]
        return found

    def worker_children(self) -> list[int]:
        """The processes dramatiq forked to run actors (not the supervisors)."""
        return [pid for w in self.workers for pid in procs.tree(w.pid) if pid != w.pid]

    def wait_for_workers(self, timeout_s: float = 60) -> None:
        """Until every worker's dramatiq process has booted (its log says so), so no run pays for boots."""

        def ready() -> bool:
            for proc in self.workers:
                if not proc.alive():
                    raise RuntimeError(f"{proc.name} exited:\n{proc.tail()}")
            return all(READY in proc.log_path.read_text(errors="replace") for proc in self.workers)

        wait_until(ready, timeout_s, "the worker processes to boot", interval_s=0.05)

    # --- our pipeline ---------------------------------------------------------------------------------
    def start_ours(self, workers: int = 2, clock: bool = True, threads: int = WORKER_THREADS,
                   otp_worker: bool = False) -> None:
        """`otp_worker`: the split deployment (docs/operations.md): one more process that takes only
        the otp lane, and `workers` processes that take everything else."""
        for i in range(workers):
            self.workers.append(self.dev.start_worker(f"worker-{i + 1}", threads=threads,
                                                      skip_lanes="otp" if otp_worker else None))
        if otp_worker:
            self.workers.append(self.dev.start_worker("worker-otp", threads=threads, lanes="otp"))
        if clock:
            self.clock = self.dev.start_clock()
        self.wait_for_workers()
        self.wait_quiet()

    def wait_quiet(self) -> None:
        """Until the workers, the clock and Redis are booted and idle. A run measured while the clock
        still imported, or a worker still warmed up, paid for it: the second of two runs on one stack
        came out ~20 % slower than the first, with the same configuration (bench/procs.py)."""
        if self.clock is not None:
            clock = self.clock
            wait_until(lambda: "clock_started" in clock.log_path.read_text(errors="replace"), 60,
                       "the clock to boot", interval_s=0.05)
        roots = [w.pid for w in self.workers] + ([self.clock.pid] if self.clock else []) + [self.redis_pid]
        procs.wait_quiet(roots)

    def outbox(self) -> Outbox:
        """The producer's Outbox, waking the lanes it writes to."""
        if self._outbox is None:
            self._outbox = Outbox(OutboxConfig.from_settings(self.settings), self.store, wake=self.triggers().dispatch)
        return self._outbox

    def triggers(self) -> Triggers:
        """The stack's Triggers (one broker, made on first use and closed with the stack)."""
        if self._triggers is None:
            self._triggers = connect_triggers(self.settings, self.store)
        return self._triggers

    # --- the baseline ---------------------------------------------------------------------------------
    def start_baseline(self, workers: int = 2, threads: int = WORKER_THREADS) -> None:
        # The same idle poll as `sms-worker worker` sets.
        env = {"BENCH_BASELINE": "1", "dramatiq_worker_timeout": "20"}
        for i in range(workers):
            argv = [sys.executable, "-m", "dramatiq", "bench.baseline_actors", "--processes", "1",
                    "--threads", str(threads)]
            self.workers.append(self.dev.spawn(f"baseline-{i + 1}", argv, env))
        self.wait_for_workers()
        self.wait_quiet()

    def stop_workers(self) -> None:
        """Stop the workers and the clock (the stack's Redis and sandbox keep running)."""
        for proc in [*self.workers, *([self.clock] if self.clock else [])]:
            proc.stop()
            self.dev.procs.remove(proc)
        self.workers, self.clock, self._outbox = [], None, None

    def redis_commandstats(self) -> dict[str, tuple[int, int]]:
        """Redis's per-command (calls, usec) so far; commands run inside scripts are counted too."""
        return {name.removeprefix("cmdstat_"): (int(v["calls"]), int(v["usec"]))
                for name, v in self.client.info("commandstats").items()}

    # --- events -----------------------------------------------------------------------------------------
    def wait_for_events(self, stream: str, n: int, timeout_s: float) -> None:
        try:
            wait_until(lambda: int(self.client.xlen(stream)) >= n, timeout_s, f"{n} events on {stream}",
                       interval_s=0.05)
        except TimeoutError:
            print(self.dev.logs(), file=sys.stderr)
            raise

    def nth_event_ms(self, stream: str, n: int) -> int:
        """When the n-th event (1-based) of `stream` was published, in ms of the server clock."""
        if n <= 0:
            return 0
        # XRANGE from the start with COUNT n reads n entries; fine for a one-off after a run.
        last = b"-"
        remaining = n
        entry = None
        while remaining:
            batch = self.client.xrange(stream, min=last, max="+", count=min(remaining, 10_000))
            if not batch:
                raise RuntimeError(f"{stream} has fewer than {n} events")
            entry = batch[-1][0]
            remaining -= len(batch)
            last = b"(" + entry
        assert entry is not None
        return entry_ms(entry)

    def events(self, stream: str | None = None) -> list[tuple[bytes, dict[bytes, bytes]]]:
        return list(self.client.xrange(stream or self.store.events))

