"""The composition root: owns how a worker process is wired — the broker with its middleware, the Runtime.

`make_broker` builds a Dramatiq RedisBroker with an explicit middleware list; `build_runtime` is
the one place that builds every component of a worker process from the Settings (each from its
own small config: `ProviderConfig.from_settings(settings)`, ...); `Resources` builds that Runtime
when a worker process boots and closes it at shutdown. Nothing here has import-time effects:
worker.broker calls these at import time for the worker processes, and processes that only
produce (the CLI, the web, the clock) are wired by worker.producer.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import dramatiq
import structlog
from dramatiq.brokers.redis import RedisBroker
from dramatiq.middleware import AgeLimit, Callbacks, Pipelines, Retries, ShutdownNotifications, TimeLimit

from worker import metrics, redis_health
from worker.accounts import Accounts, wire
from worker.dispatch import DispatchConfig, Dispatcher
from worker.errors import StoreError, StoreUnavailable
from worker.events import EventRelay
from worker.producer import connect_store
from worker.provider import Provider
from worker.reports import DrainConfig, Drainer, ProcessConfig, Processor, SweepConfig, Sweeper
from worker.settings import DEFAULT_ACCOUNT, Settings
from worker.store import Store, consumer_name
from worker.triggers import Triggers, lane_queue

log = structlog.get_logger(__name__)

HEARTBEAT_EVERY_S = 5.0


@dataclass
class Runtime:
    """What the actors of one worker process share."""

    settings: Settings
    store: Store
    provider: Provider
    triggers: Triggers
    dispatcher: Dispatcher
    stopping: threading.Event
    drainer: Drainer
    processor: Processor
    sweeper: Sweeper
    relay: EventRelay | None = None
    # worker.accounts: one Provider and one Drainer per account (`provider`, `drainer`: the default
    # account's, or the first one's when no lane sends through `default`).
    accounts: Accounts | None = None
    providers: dict[str, Provider] = field(default_factory=dict)
    drainers: dict[str, Drainer] = field(default_factory=dict)

    def drainer_of(self, account: str | None) -> Drainer | None:
        """The drain of `account` (None: the default account's, as the clock's plain message names it)."""
        if account is None:
            return self.drainers.get(DEFAULT_ACCOUNT) or (self.drainer if not self.drainers else None)
        return self.drainers.get(account)

    def close(self) -> None:
        for provider in {id(p): p for p in [self.provider, *self.providers.values()]}.values():
            provider.close()
        self.store.close()


@contextlib.contextmanager
def redis_outage_is_one_line(actor: str) -> Iterator[None]:
    """Redis down or restarting is an outage, not a bug: one warning line per message instead of a
    traceback (the work is not lost: it is in Redis, and the clock or recovery brings it back).
    Any other error keeps its traceback."""
    try:
        yield
    except StoreUnavailable as error:  # the store's name for unreachable, timed out or loading
        log.warning("actor_redis_unavailable", actor=actor, error=str(error))

def build_runtime(settings: Settings, broker: dramatiq.Broker) -> Runtime:
    store = connect_store(settings)
    # Per account (worker.accounts): its Provider (pool, key), RateLimiter (buckets), Drainer (lease).
    wired = wire(settings, store)
    accounts, providers, limiters, main = wired.accounts, wired.providers, wired.limiters, wired.main
    provider = providers[main]
    triggers = Triggers(store, broker)
    stopping = threading.Event()
    dispatcher = Dispatcher(
        DispatchConfig.from_settings(settings), store, provider, limiters[main], triggers, consumer_name(),
        stopping=stopping.is_set, routes=wired.routes,
    )
    processor = Processor(ProcessConfig.from_settings(settings), store, triggers)
    drainers = {
        name: Drainer(DrainConfig.from_settings(settings, None if a.is_default else a), store, providers[name],
                      triggers, stopping=stopping.is_set)
        for name, a in accounts.accounts.items()
    }
    return Runtime(
        settings, store, provider, triggers, dispatcher, stopping,
        drainer=drainers[main],
        processor=processor,
        sweeper=Sweeper(SweepConfig.from_settings(settings), store, processor, provider=provider,
                        before_logs_call=limiters[main].wait_for_logs_call, lane_logs=wired.lane_logs),
        relay=EventRelay(store, broker, settings.sms_events_dramatiq_queue, settings.sms_events_dramatiq_actor)
        if settings.sms_events_dramatiq_queue and settings.sms_events_dramatiq_actor else None,
        accounts=accounts, providers=providers, drainers=drainers,
    )


class Resources(dramatiq.Middleware):
    """Builds the Runtime at worker boot, signals dispatchers to stop at shutdown, then closes it.

    It also keeps the process's heartbeat (Redis, for `sms-worker status`; a local file, for the
    container's /healthz) and, with SMS_METRICS_PORT set, has Dramatiq fork the process that
    serves /metrics and /healthz for all worker processes of the container.

    And it watches the Redis server (worker.redis_health): a worker process says at boot what the
    server will do with our data (an error for an eviction policy, a warning for no persistence)
    and checks at every heartbeat that the server did not forget it (`redis_state_lost`). Every
    other process holding this broker (the clock, the web, producers) does the same whenever it
    wakes the workers through it (`after_enqueue`, at most every few seconds): for the clock that
    is its first tick and then every tick.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.runtime: Runtime | None = None
        self._beating = threading.Event()

    @property
    def forks(self) -> list[Callable[[], int]]:
        return [metrics.serve_worker_endpoints_forever] if self.settings.sms_metrics_port else []

    def before_worker_boot(self, broker: dramatiq.Broker, worker: Any) -> None:
        # Before the worker threads start, so no message ever runs without its resources.
        Accounts.from_settings(self.settings).require_keys()  # every account's key (ICOMM_API_KEY for `default`)
        self.runtime = build_runtime(self.settings, broker)
        redis_health.watch(self.settings, self.runtime.store).tick(force=True)  # never raises

    def after_worker_boot(self, broker: dramatiq.Broker, worker: Any) -> None:
        assert self.runtime is not None
        threading.Thread(target=self._heartbeat, args=(self.runtime,), name="heartbeat", daemon=True).start()

    def _heartbeat(self, runtime: Runtime) -> None:
        consumer = consumer_name()
        watch = redis_health.watch(self.settings, runtime.store)
        while not self._beating.is_set():
            metrics.touch_local_heartbeat()
            # Redis down: the dispatchers say so loudly; the local heartbeat still beats.
            with contextlib.suppress(StoreError):
                runtime.store.heartbeat(consumer)  # read by `sms-worker status`
            watch.tick(force=True)  # marker each beat, configuration every INSPECT_EVERY_S; never raises
            self._beating.wait(HEARTBEAT_EVERY_S)

    def after_enqueue(self, broker: dramatiq.Broker, message: Any, delay: int | None) -> None:
        # The clock enqueues every tick; producers and the web when they wake workers. A look is
        # due at most every redis_health.CHECK_EVERY_S, so almost every call returns at once.
        client = getattr(broker, "client", None)
        if client is not None:
            # The Store is made only by the first look of this process (`watch` keeps it).
            redis_health.watch(self.settings, lambda: Store(client, self.settings.sms_key_prefix)).tick()

    def before_worker_shutdown(self, broker: dramatiq.Broker, worker: Any) -> None:
        self._beating.set()
        if self.runtime is not None:
            # Dispatchers finish the batch in hand and take no new one.
            self.runtime.stopping.set()

    def after_worker_shutdown(self, broker: dramatiq.Broker, worker: Any) -> None:
        metrics.mark_process_dead()
        if self.runtime is not None:
            self.runtime.close()
            self.runtime = None


def make_broker(settings: Settings) -> tuple[RedisBroker, Resources]:
    resources = Resources(settings)
    broker = RedisBroker(  # type: ignore[no-untyped-call]
        url=settings.redis_url,
        namespace=f"{settings.sms_key_prefix}:dramatiq",
        middleware=[
            # Dispatch loops are short (seconds); a message running for minutes is stuck.
            TimeLimit(time_limit=int(max(60.0, settings.sms_lease_s * 2) * 1000)),
            AgeLimit(),
            ShutdownNotifications(),
            Callbacks(),
            Pipelines(),
            # Our actors own their retries (outbox recovery, reconciliation); Dramatiq must not
            # re-run a dispatch whose batch is already pending.
            Retries(max_retries=0),
            resources,
        ],
    )
    # Actors are declared on the shared queue; the lanes' queues carry their dispatch messages.
    for lane in settings.sms_lanes:
        broker.declare_queue(lane_queue(lane))
    return broker, resources
