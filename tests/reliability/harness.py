"""What the reliability suites share: sizes, a running stack, the checks of the two promises, result rows.

The running stack is tests.support.system's, extended: shorter timeouts, two lanes, reports within
300 ms, more probes, and a run SIGKILLed at its end. Every suite starts the real processes
(worker.devtools.devstack.DevStack: redis-server, the sandbox, `sms-worker worker` and `clock`,
optionally `web`), injects its faults, waits with bounded polls, then measures:

- lost: a queued job with neither a send outcome event (accepted / rejected / failed) nor a final
  report event;
- duplicated: a messageId the sandbox accepted more than once. The sandbox runs with duplicate-id
  rejection OFF (`--no-reject-duplicate-ids`), so a second send is accepted and counted instead of
  being refused: the provider's own guard is taken away and the count measures the worker alone;
- reports: every report the sandbox generated must give exactly one final event (delivered,
  undeliverable, expired, rejected) on `sms:events`.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import redis

from tests.support import system as support
from tests.support.sandbox import API_KEY as API_KEY  # the suites import it from here
from worker.devtools.devstack import wait_until
from worker.store import DISPATCH_GROUP

SEND_OUTCOMES = frozenset({"accepted", "rejected", "failed"})
FINAL = frozenset({"delivered", "undeliverable", "expired", "rejected"})
LANES = {
    "otp": {"batch_size": 50, "max_wait_ms": 0, "concurrency": 2},
    "bulk": {"batch_size": 100, "max_wait_ms": 0, "concurrency": 4},
}
BATCH = LANES["bulk"]["batch_size"]
# The end-to-end settings, shorter still, so recovery and reconciliation happen within a test. The
# lease must exceed the longest send: (0.3 + 0.3 + 0.8) s x 2 attempts + 0.1 s x 2 backoffs = 3.0 s;
# the send window adds the pool waits: (0.3 + 0.3 + 0.3 + 0.8 + 0.1) s x 2 = 3.6 s.
READ_TIMEOUT_S = 0.8
BASE_ENV = {
    **support.BASE_ENV,
    "LOG_FORMAT": "json",
    "ICOMM_CONNECT_TIMEOUT_S": "0.3", "ICOMM_WRITE_TIMEOUT_S": "0.3", "ICOMM_READ_TIMEOUT_S": str(READ_TIMEOUT_S),
    "ICOMM_RETRY_BACKOFF_MAX_S": "0.1", "ICOMM_SEND_RETRY_ATTEMPTS": "2", "ICOMM_POOL_TIMEOUT_S": "0.3",
    "SMS_LEASE_S": "3.2",
    "SMS_LANES": orjson.dumps(LANES).decode(),
}
# Reports soon, and the provider's duplicate-id guard off, so `duplicated` measures the worker alone.
SANDBOX_FLAGS = ("--report-delay-ms", "300", "--logs-rate-per-min", "100000", "--no-reject-duplicate-ids")


# --- sizes -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Size:
    """How big each suite runs: `short` in CI, `full` from scripts/reliability."""

    mode: str
    seed: int
    crash_trials: int
    crash_sms: int
    crash_rate: int  # messages/s limit: keeps a run long enough for every kill moment
    restart_sms: int
    restart_rate: int
    restart_down_s: float  # how long Redis stays down between stop and start
    storm_sms: int
    storm_rate: int
    outage_s: float
    outage_sms: int
    bad_normal_sms: int
    security_sms: int
    pause_trials: int
    pause_sms: int
    pause_rate: int
    pause_rounds: int  # SIGSTOP/SIGCONT rounds per trial (the moments cycle)
    test_timeout_s: int

    def wait_s(self, sms: int, rate: int) -> float:
        """A bound for a run of `sms` at `rate`/s to settle, kills and recoveries included."""
        return 60.0 + 3.0 * sms / rate


SHORT = Size(mode="short", seed=7, crash_trials=2, crash_sms=2000, crash_rate=500, restart_sms=1500,
             restart_rate=500, restart_down_s=1.0, storm_sms=1000, storm_rate=600, outage_s=8.0, outage_sms=1000,
             bad_normal_sms=600, security_sms=600, pause_trials=1, pause_sms=3000, pause_rate=400,
             pause_rounds=3,
             test_timeout_s=300)
FULL = Size(mode="full", seed=7, crash_trials=20, crash_sms=20_000, crash_rate=1500, restart_sms=20_000,
            restart_rate=1500, restart_down_s=3.0, storm_sms=20_000, storm_rate=1000, outage_s=120.0,
            outage_sms=20_000, bad_normal_sms=10_000, security_sms=5000, pause_trials=5, pause_sms=15_000,
            pause_rate=250, pause_rounds=12, test_timeout_s=3600)


def size_from_env(env: Mapping[str, str]) -> Size:
    """SMS_RELIABILITY=short|full; SMS_RELIABILITY_TRIALS / _CRASH_SMS / _SEED override the crash suite."""
    mode = env.get("SMS_RELIABILITY", "short").strip().lower() or "short"
    if mode not in ("short", "full"):
        raise ValueError(f"SMS_RELIABILITY={mode!r}: use 'short' (CI, the default) or 'full'")
    size = FULL if mode == "full" else SHORT
    overrides: dict[str, int] = {}
    for variable, name in (("SMS_RELIABILITY_TRIALS", "crash_trials"), ("SMS_RELIABILITY_CRASH_SMS", "crash_sms"),
                           ("SMS_RELIABILITY_SEED", "seed")):
        if env.get(variable):
            value = int(env[variable])
            if value < (0 if name == "seed" else 1):
                raise ValueError(f"{variable}={value}: too small")
            overrides[name] = value
    return Size(**{**asdict(size), **overrides})


# --- a running system ----------------------------------------------------------------------------------


class System(support.System):
    """The end-to-end System plus the probes the reliability checks read."""

    def dead_letters(self) -> list[dict[str, Any]]:
        return [{"message_id": f[b"message_id"].decode(), **orjson.loads(f[b"entry"])}
                for _, f in self.client.xrange(self.store.dlq)]

    def outbox_left(self) -> int:
        """Entries still in any lane's outbox (settled entries are deleted)."""
        return sum(int(self.client.xlen(self.store.outbox(lane))) for lane in LANES)

    def pending(self, lane: str = "bulk") -> int:
        try:
            return int(self.client.xpending(self.store.outbox(lane), DISPATCH_GROUP)["pending"])
        except redis.ResponseError:  # no group yet: nothing was ever claimed
            return 0

    def events_len(self) -> int:
        return int(self.client.xlen(self.store.events))

    def logged(self, event: str, field: str) -> int:
        """The sum of `field` over the worker processes' log lines of `event`."""
        total = 0
        for path in self.stack.log_dir.glob("worker-*.log"):
            for line in path.read_text(errors="replace").splitlines():
                if f'"event": "{event}"' in line:
                    with contextlib.suppress(orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                        total += int(orjson.loads(line)[field])
        return total

    def worker_log_errors(self) -> list[str]:
        """Log lines of worker processes that speak of an unhandled exception."""
        bad = []
        for path in sorted(self.stack.log_dir.glob("worker-*.log")):
            for line in path.read_text(errors="replace").splitlines():
                if "Traceback" in line or '"level": "critical"' in line or "unhandled" in line.lower():
                    bad.append(f"{path.name}: {line[:300]}")
        return bad


@contextmanager
def running(
    env: dict[str, str] | None = None, sandbox_flags: Iterable[str] = (), *, workers: int = 2, web: bool = False,
    appendonly: bool = False, seed: int = 7, log_dir: Path | None = None, clock: bool = True,
) -> Iterator[System]:
    """Start redis, the sandbox, `workers` worker processes, the clock (and web); SIGKILL them all after
    (the run is measured: it ends at once).

    SMS_RELIABILITY_ENV (a JSON object of settings) overrides the suite's own, to measure what a
    setting costs, e.g. SMS_RELIABILITY_ENV='{"SMS_RECONCILE_WINDOW_S": "0.8"}'."""
    overrides = orjson.loads(os.environ.get("SMS_RELIABILITY_ENV") or "{}")
    full_env = {**BASE_ENV, **(env or {}), **{str(k): str(v) for k, v in overrides.items()}}
    flags = (*SANDBOX_FLAGS, "--seed", str(seed), *sandbox_flags)
    with support.launch(System, full_env, flags, workers=workers, clocks=int(clock), web=web, appendonly=appendonly,
                        log_dir=log_dir, kill_at_exit=True) as system:
        yield system


def jobs(n: int, start: int = 0, prefix: str = "job") -> list[dict[str, Any]]:
    """`n` valid jobs with producer ids and metadata."""
    return support.jobs(n, start, id_prefix=prefix)


# --- waiting and checking ------------------------------------------------------------------------------


def settled(system: System) -> bool:
    """Every outbox entry is settled (acknowledged and deleted), the sandbox generated and handed out
    every report, every handed-out page is processed (no drain in progress, no raw page left, no
    report parked), and no accepted message still awaits its final state (a report lost on the way
    is recovered by the sweep once the message's report deadline has passed)."""
    if system.outbox_left():
        return False
    stats = system.stats()
    reports = stats["reports"]
    handed_out = reports["fetched"] + reports["pushed"]
    if not (reports["pending"] == 0 and reports["generated"] + reports["suppressed"] == stats["messages_accepted"]
            and handed_out == reports["generated"] and reports["webhook_queued"] == 0):
        return False
    store = system.store
    with system.client.pipeline(transaction=False) as pipe:
        pipe.exists(store.lease_key("reports-drain"))
        pipe.xlen(store.reports_raw)
        pipe.hlen(store.reports_parked)
        pipe.zcard(store.awaiting)
        draining, raw, parked, awaiting = pipe.execute()
    return not draining and not raw and not parked and not awaiting


def wait_settled(system: System, timeout_s: float) -> float | None:
    """Poll `settled` up to `timeout_s`; the seconds it took, or None on timeout (the checks then say why)."""
    started = time.monotonic()
    try:
        wait_until(lambda: settled(system), timeout_s, "the run to settle", interval_s=0.25)
    except TimeoutError:
        return None
    return time.monotonic() - started


@dataclass
class Verdict:
    """What a run did with its jobs, measured from the events stream and the sandbox's counters."""

    jobs: int = 0
    lost: list[str] = field(default_factory=list)  # queued, and neither a send outcome nor a final event
    twice: list[str] = field(default_factory=list)  # more than one send outcome
    no_send_event: list[str] = field(default_factory=list)  # a final report event but no send outcome event
    outcomes: Counter[str] = field(default_factory=Counter)  # first send outcome per job
    duplicated: int = 0  # messageIds the sandbox accepted more than once
    unexpected: list[str] = field(default_factory=list)  # accepted by the sandbox, unknown to the events
    accepted_at_provider: int = 0
    reports: int = 0  # generated by the sandbox
    report_events: int = 0
    reports_missing: list[str] = field(default_factory=list)  # accepted at the provider, no final event
    reports_twice: list[str] = field(default_factory=list)
    events: int = 0
    duplicate_event_ids: int = 0
    dead_letters: int = 0
    faults: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        return (f"jobs={self.jobs} lost={len(self.lost)} {self.lost[:3]} twice={self.twice[:3]} "
                f"no_send_event={len(self.no_send_event)} {self.no_send_event[:3]} "
                f"duplicated={self.duplicated} unexpected={self.unexpected[:3]} reports={self.reports} "
                f"report_events={self.report_events} missing_reports={self.reports_missing[:3]} "
                f"reports_twice={self.reports_twice[:3]} duplicate_event_ids={self.duplicate_event_ids} "
                f"outcomes={dict(self.outcomes)} dead_letters={self.dead_letters}")


def verify(system: System, expected: Iterable[str], key: str = "message_id") -> Verdict:
    """Measure the run. `expected` holds each queued job's key: its message id, or its producer `id`
    (key="id") when a producer may have retried an enqueue; events are matched on that key, the
    sandbox's per-messageId counts on message ids."""
    expected = list(expected)
    events = system.events()
    stats = system.stats(per_message=True)
    per_message: dict[str, int] = stats["accepted_per_message_id"]
    verdict = Verdict(jobs=len(expected), events=len(events), faults=dict(stats["faults"]))
    verdict.duplicate_event_ids = len(events) - len({e["event_id"] for e in events})
    sends: dict[str, list[str]] = {}
    finals_by_key: Counter[str] = Counter()
    finals: Counter[str] = Counter()
    for e in events:
        if e["type"] in FINAL and e.get("done_at") is not None:  # a report's event (send-side ones have none)
            finals[e["message_id"]] += 1
            finals_by_key[str(e.get(key))] += 1
        elif e["type"] in SEND_OUTCOMES:
            sends.setdefault(str(e.get(key)), []).append(e["type"])
    for job_key in expected:
        outcome = sends.get(job_key)
        if not outcome:
            (verdict.no_send_event if finals_by_key[job_key] else verdict.lost).append(job_key)
            continue
        verdict.outcomes[outcome[0]] += 1
        if len(outcome) > 1:
            verdict.twice.append(job_key)
    verdict.duplicated = sum(1 for n in per_message.values() if n > 1)
    known = {e["message_id"] for e in events}
    verdict.unexpected = sorted(set(per_message) - known)[:20]
    verdict.accepted_at_provider = len(per_message)
    verdict.reports = int(stats["reports"]["generated"])
    verdict.report_events = sum(finals.values())
    verdict.reports_missing = [mid for mid in per_message if finals[mid] == 0][:20]
    verdict.reports_twice = [mid for mid, n in finals.items() if n > 1][:20]
    verdict.dead_letters = int(system.client.xlen(system.store.dlq))
    return verdict


def assert_promises(verdict: Verdict) -> None:
    """Nothing lost, nothing sent twice, every generated report gives exactly one final event."""
    assert not verdict.lost, f"{len(verdict.lost)} jobs lost: {verdict.summary()}"
    assert not verdict.twice, f"jobs with two send outcomes: {verdict.summary()}"
    assert verdict.duplicated == 0, f"the sandbox accepted a messageId twice: {verdict.summary()}"
    assert not verdict.unexpected, f"the sandbox accepted ids we never queued: {verdict.summary()}"
    assert verdict.duplicate_event_ids == 0, f"an event_id was published twice: {verdict.summary()}"
    assert not verdict.reports_missing, f"reports without a final event: {verdict.summary()}"
    assert not verdict.reports_twice, f"reports with two final events: {verdict.summary()}"
    assert verdict.report_events == verdict.reports, f"final events != generated reports: {verdict.summary()}"


# --- result rows -----------------------------------------------------------------------------------


@dataclass
class Row:
    """One line of the results table (docs/reliability.md); crash trials add up to one line per suite."""

    suite: str
    mode: str
    trials: int = 1
    faults: dict[str, int] = field(default_factory=dict)
    jobs: int = 0
    lost: int = 0
    duplicated: int = 0
    reports: int = 0
    report_events: int = 0
    events: int = 0
    dead_letters: int = 0
    no_send_event: int = 0  # final report event without an accepted/rejected/failed event before it
    counts: dict[str, int] = field(default_factory=dict)  # anything else a suite counts (summed, shown as notes)
    seconds: float = 0.0
    result: str = "not run"
    note: str = ""

    def add(self, verdict: Verdict) -> None:
        """Take one run's measurements (and the sandbox's fault counters) into the row."""
        self.jobs += verdict.jobs
        self.lost += len(verdict.lost)
        self.duplicated += verdict.duplicated + len(verdict.twice)
        self.reports += verdict.reports
        self.report_events += verdict.report_events
        self.events += verdict.events
        self.dead_letters += verdict.dead_letters
        self.no_send_event += len(verdict.no_send_event)
        for name, n in verdict.faults.items():
            name = "5xx" if name.startswith("5xx_") else name
            self.faults[name] = self.faults.get(name, 0) + n

    def count(self, name: str, n: int) -> None:
        """Count something worth a note (summed over trials)."""
        self.counts[name] = self.counts.get(name, 0) + n

    def fault(self, name: str, n: int = 1) -> None:
        """Count a fault the suite injected itself (a SIGKILL, a Redis restart...)."""
        self.faults[name] = self.faults.get(name, 0) + n


class Recorder:
    """Writes a test's Row as JSON into the results directory when the test ends."""

    def __init__(self, directory: Path, test_id: str, row: Row) -> None:
        self.directory = directory
        self.test_id = test_id
        self.row = row
        self.started = time.monotonic()

    def save(self, result: str) -> None:
        self.row.result = result
        self.row.seconds = round(time.monotonic() - self.started, 1)
        name = "".join(c if c.isalnum() else "_" for c in self.test_id)[-150:]
        (self.directory / f"{name}.json").write_bytes(orjson.dumps(asdict(self.row)))


def poll(condition: Callable[[], bool], timeout_s: float, interval_s: float = 0.005) -> bool:
    """Poll `condition` until true; False after `timeout_s` (a moment the scenario may miss)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if condition():
                return True
        time.sleep(interval_s)
    return False
