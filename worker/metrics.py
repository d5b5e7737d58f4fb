"""Prometheus metrics: owns the counters every process keeps, and the gauges read from Redis at scrape time.

Worker processes are forked by Dramatiq, so counters use prometheus_client's multiprocess mode
(PROMETHEUS_MULTIPROC_DIR, set by `sms-worker worker` before anything imports prometheus_client);
one exposition process per worker container serves their sum on SMS_METRICS_PORT together with
/healthz. The web process serves its own on /metrics.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from worker.errors import StoreError

if TYPE_CHECKING:
    from worker.settings import Settings
    from worker.status import StatusConfig
    from worker.store import Store

MESSAGES = Counter("sms_messages_total", "Messages by lane and send outcome", ["lane", "outcome"])
BATCH_SIZE = Histogram("sms_batch_size", "Messages per bulk request", buckets=(1, 10, 50, 100, 250, 500, 1000, 2000))
PROVIDER_SECONDS = Histogram(
    "sms_provider_request_seconds", "icomm API request duration by endpoint and outcome class",
    ["endpoint", "outcome"], buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
RETRIES = Counter("sms_provider_retries_total", "Safe retries of requests not acted on", ["endpoint", "error"])
RECONCILE = Counter("sms_reconcile_total", "Reconciliation verdicts from GET /sms/3/logs", ["verdict"])
FENCED = Counter(
    "sms_send_window_closed_total",
    "Messages whose request was not written because their batch's send window had closed (a paused process)",
)
UNKNOWN_PROVIDER_VALUES = Counter(
    "sms_provider_unknown_values_total", "Provider answers carrying a value this code does not know", ["what"]
)
LIMITER_WAIT = Histogram(
    "sms_limiter_wait_seconds", "Time dispatchers waited for rate-limit tokens",
    buckets=(0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
DEAD_LETTERS = Counter("sms_dead_letters_total", "Messages dead-lettered, by reason", ["reason"])
EVENTS = Counter("sms_events_published_total", "Status events published, by type", ["type"])
REPORT_LAG = Histogram(
    "sms_report_lag_seconds", "From the report's doneAt to its status event",
    buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 300, 900, 3600),
)
REPORTS = Counter("sms_reports_total", "Delivery reports processed, by source and result", ["source", "result"])


class RedisStateCollector(Collector):
    """Gauges computed from Redis when scraped (outbox depth and age, pauses, parked, DLQ)."""

    def __init__(self, config: StatusConfig, store: Store) -> None:
        self.config = config
        self.store = store

    def collect(self) -> Iterator[GaugeMetricFamily]:
        from worker.status import collect

        try:
            status = collect(self.config, self.store)
        except StoreError:  # a scrape must answer even when Redis does not
            up = GaugeMetricFamily("sms_redis_up", "Redis answered the scrape")
            up.add_metric([], 0)
            yield up
            return
        up = GaugeMetricFamily("sms_redis_up", "Redis answered the scrape")
        up.add_metric([], 1)
        yield up
        depth = GaugeMetricFamily("sms_outbox_depth", "Jobs in the outbox (waiting + in flight)", labels=["lane"])
        waiting = GaugeMetricFamily("sms_outbox_waiting", "Jobs not yet claimed", labels=["lane"])
        age = GaugeMetricFamily("sms_outbox_oldest_age_seconds", "Age of the oldest job in the outbox", labels=["lane"])
        paused = GaugeMetricFamily("sms_lane_paused", "1 while a lane is paused", labels=["lane", "reason"])
        scheduled = GaugeMetricFamily("sms_scheduled_jobs", "Jobs held until their send_at", labels=["lane"])
        for lane in status.lanes:
            scheduled.add_metric([lane.lane], lane.scheduled)
            depth.add_metric([lane.lane], lane.depth)
            waiting.add_metric([lane.lane], lane.waiting)
            age.add_metric([lane.lane], lane.oldest_age_s or 0.0)
            if lane.paused:
                paused.add_metric([lane.lane, lane.paused], 1)
        yield from (depth, waiting, age, paused, scheduled)
        spent = GaugeMetricFamily("sms_lane_spend_today", "Messages and SMS parts the traffic policy counted today "
                                  "(UTC) on lanes with a daily cap", labels=["lane", "unit"])
        cap = GaugeMetricFamily("sms_lane_daily_cap", "A lane's daily cap today (the configured cap plus any "
                                "`resume --extra`)", labels=["lane", "unit"])
        for lane in status.lanes:
            for unit, (used, limit) in (lane.budget or {}).items():
                spent.add_metric([lane.lane, unit], used)
                cap.add_metric([lane.lane, unit], limit)
        yield from (spent, cap)
        yield from _account_gauges(status.accounts)
        for name, doc, value in (
            ("sms_ambiguous_messages", "Messages awaiting a reconciliation verdict", status.ambiguous),
            ("sms_awaiting_reports", "Accepted messages without a final report yet", status.awaiting_reports),
            ("sms_dead_letters", "Entries in the dead-letter store", status.dead_letters),
            ("sms_parked_reports", "Reports whose message is not known yet", status.parked_reports),
        ):
            gauge = GaugeMetricFamily(name, doc)
            gauge.add_metric([], value)
            yield gauge


def _account_gauges(accounts: list[dict[str, Any]]) -> Iterator[GaugeMetricFamily]:
    """Per icomm account (worker.accounts; the label takes only configured account names)."""
    lanes = GaugeMetricFamily("sms_account_lanes", "Lanes that send through the account", labels=["account"])
    paused = GaugeMetricFamily("sms_account_lanes_paused", "The account's lanes paused now, by reason (auth: "
                               "its key was refused)", labels=["account", "reason"])
    booked = GaugeMetricFamily("sms_account_limiter_booked_ahead_seconds", "How far ahead of now the account's "
                               "messages/s bucket is booked", labels=["account"])
    spent = GaugeMetricFamily("sms_account_spend_today", "Messages and SMS parts the traffic policy counted today "
                              "(UTC) over all lanes of an account with a daily cap", labels=["account", "unit"])
    cap = GaugeMetricFamily("sms_account_daily_cap", "An account's daily cap today (the configured cap plus any "
                            "`resume --account --extra`)", labels=["account", "unit"])
    for account in accounts:
        name = account["account"]
        lanes.add_metric([name], len(account["lanes"]))
        booked.add_metric([name], float(account["booked_ahead_ms"]) / 1000)
        for reason in sorted(set(account["paused"].values())):
            paused.add_metric([name, reason], sum(1 for r in account["paused"].values() if r == reason))
        for unit, (used, limit) in (account.get("budget") or {}).items():
            spent.add_metric([name, unit], used)
            cap.add_metric([name, unit], limit)
    yield from (lanes, paused, booked, spent, cap)


def registries(settings: Settings, store: Store) -> list[CollectorRegistry]:
    """What an exposition endpoint serves: this process's (or all worker processes') counters, and
    the Redis gauges."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        counters = CollectorRegistry()
        multiprocess.MultiProcessCollector(counters)  # type: ignore[no-untyped-call]
    else:
        counters = REGISTRY
    from worker.status import StatusConfig

    state = CollectorRegistry()
    state.register(RedisStateCollector(StatusConfig.from_settings(settings), store))
    return [counters, state]


def render(regs: list[CollectorRegistry]) -> tuple[bytes, str]:
    return b"".join(generate_latest(reg) for reg in regs), CONTENT_TYPE_LATEST


def serve_worker_endpoints(settings: Settings, store: Store, port: int, host: str = "0.0.0.0") -> None:  # noqa: S104
    """The worker container's /metrics and /healthz (healthy: a local worker process sent a
    heartbeat recently). Runs forever; Dramatiq forks it next to the workers."""
    from worker.status import HEARTBEAT_STALE_S

    regs = registries(settings, store)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/metrics":
                body, ctype = render(regs)
                self._send(200, body, ctype)
            elif self.path == "/healthz":
                self._send(*_worker_health(HEARTBEAT_STALE_S))
            else:
                self._send(404, b"not found\n", "text/plain")

        def _send(self, code: int, body: bytes, ctype: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:  # scrapes every few seconds: not worth a log line
            return

    ThreadingHTTPServer((host, port), Handler).serve_forever()


def _local_dir() -> Path | None:
    raw = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    return Path(raw) if raw else None


def touch_local_heartbeat() -> None:
    """A worker process says it is alive, in a file next to its metrics (read by /healthz)."""
    directory = _local_dir()
    if directory is not None:
        (directory / f"heartbeat-{os.getpid()}").touch()


def mark_process_dead() -> None:
    directory = _local_dir()
    if directory is not None:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(os.getpid(), str(directory))  # type: ignore[no-untyped-call]
        (directory / f"heartbeat-{os.getpid()}").unlink(missing_ok=True)


def _worker_health(stale_s: float) -> tuple[int, bytes, str]:
    """Alive while some worker process of this container beat recently. Redis is not asked: a
    Redis outage must not make the orchestrator restart every worker."""
    directory = _local_dir()
    now = time.time()
    beats = list(directory.glob("heartbeat-*")) if directory else []
    if any(now - beat.stat().st_mtime < stale_s for beat in beats):
        return 200, b"ok\n", "text/plain"
    return 503, b"no recent heartbeat from a worker process\n", "text/plain"


def serve_worker_endpoints_forever() -> int:
    """Dramatiq fork entry point: settings from the environment, then serve until stopped."""
    from worker.producer import connect_store
    from worker.settings import load_settings

    settings = load_settings()
    store = connect_store(settings)
    serve_worker_endpoints(settings, store, settings.sms_metrics_port)
    return 0


# --- Redis that evicts or forgets (worker.redis_health) -----------------------------------------------
# Set by each process from its own inspection of the server (at start, then every 30 s; the web at
# every /readyz), so in a worker container the live processes' maximum is served.
from prometheus_client import Gauge  # noqa: E402 -- appended with the metrics it serves

REDIS_CONFIG_RISK = Gauge(
    "sms_redis_config_risk",
    "1 while the Redis server can lose our data: eviction (maxmemory-policy not noeviction), no_persistence "
    "(no AOF, no RDB save points), replica (REDIS_URL is a replica), unknown (CONFIG not allowed, cannot tell)",
    ["risk"], multiprocess_mode="livemax",
)
REDIS_STATE_LOST = Counter(
    "sms_redis_state_lost_total", "Times a process saw Redis come back without the data it had (instance marker gone)"
)

# --- delivery reports: what the report path kept or recreated (worker.reports) -------------------------
REPORT_PAGE_STORE_RETRIES = Counter(
    "sms_reports_page_store_retries_total",
    "Attempts to store a fetched reports page that Redis refused (the page is kept in memory until stored)",
)
REPORTS_UNKNOWN_STATUS = Counter(
    "sms_reports_unknown_status_total",
    "Reports whose status group this code does not know (not final: no event; kept in the dead letters)",
)
REPORTS_STATE_RECREATED = Counter(
    "sms_reports_state_recreated_total",
    "Redis state the report processor found missing and recreated (e.g. its consumer group after Redis lost its data)",
    ["what"],
)
PROVIDER_POOL_RESETS = Counter(
    "sms_provider_pool_resets_total",
    "icomm HTTP clients replaced because their connection pool stopped handing out connections, by reason",
    ["reason"],
)

# --- the traffic policy (worker.policy) ----------------------------------------------------------------
# Labels are small fixed sets (lane, worker.policy.Reason / HoldReason, open|closed): never a number or an id.
POLICY_REJECTED = Counter(
    "sms_policy_rejected_total", "Jobs rejected by the traffic policy before any send, by lane and reason",
    ["lane", "reason"],
)
POLICY_HELD = Counter(
    "sms_policy_held_total",
    "Jobs the traffic policy kept for later (budget: the lane is at a daily cap; campaign_cap; guard_unavailable)",
    ["lane", "reason"],
)
POLICY_GUARD_ERRORS = Counter(
    "sms_policy_guard_errors_total",
    "Batches whose guards' state Redis could not give, by lane and what was done (open: sent unchecked; closed: kept)",
    ["lane", "mode"],
)
