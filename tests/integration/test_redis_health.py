"""worker.redis_health against real redis-servers: what a server will do with our data, and noticing it forgot.

Also: every consumer of a stream consumer group must survive the group (and its stream) vanishing, as
after a Redis restarted empty.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import orjson
import pytest
import redis
from prometheus_client import REGISTRY
from redis.backoff import NoBackoff
from redis.retry import Retry
from structlog.testing import capture_logs

from worker import redis_health
from worker.devtools.devstack import DevStack
from worker.dispatch import DispatchConfig, Dispatcher
from worker.producer import connect_store
from worker.provider import Provider, ProviderConfig
from worker.ratelimit import RateLimiter, RateLimiterConfig
from worker.redis_health import RedisWatch, RedisWatchConfig, evaluate, inspect
from worker.settings import Settings
from worker.status import StatusConfig, collect, render
from worker.store import DISPATCH_GROUP, Store


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevStack]:
    """A private redis-server this module may reconfigure, restart and flush (never the shared one)."""
    with DevStack(log_dir=tmp_path_factory.mktemp("redis-health")) as dev:
        dev.start_redis()
        yield dev


@pytest.fixture
def admin(stack: DevStack) -> Iterator[Any]:
    """A client of the private server, reset to a volatile, noeviction primary before each test."""
    client = redis.Redis(port=stack.redis_port)
    client.flushall()
    client.config_set("maxmemory-policy", "noeviction")
    client.config_set("save", "")
    client.config_set("appendonly", "no")
    yield client
    client.config_set("maxmemory-policy", "noeviction")
    client.config_set("appendonly", "no")
    client.close()


def _settings(stack: DevStack, **changes: Any) -> Settings:
    return Settings.model_validate({"redis_url": f"redis://127.0.0.1:{stack.redis_port}/0",
                                    "icomm_api_key": "k" * 20, "log_format": "console", **changes})


def _risks(client: Any, allow_volatile: bool = False) -> list[tuple[str, str, bool]]:
    return [(f.risk, f.level, f.acknowledged) for f in inspect(Store(client), allow_volatile).findings]


# --- what the server will do with our data ------------------------------------------------------------


def test_a_volatile_server_is_a_warning_that_fails_check_until_accepted(admin: Any) -> None:
    health = inspect(Store(admin))
    assert health.persistence == "none" and health.maxmemory_policy == "noeviction" and health.config_readable
    assert _risks(admin) == [("no_persistence", "warning", False)]
    assert [f.risk for f in health.blocking()] == ["no_persistence"] and health.not_ready() == []
    line = health.findings[0].line()
    assert "appendonly" in line and "CONFIG SET appendonly yes" in line and "SMS_REDIS_ALLOW_VOLATILE" in line
    accepted = inspect(Store(admin), allow_volatile=True)
    assert accepted.blocking() == [] and _risks(admin, True) == [("no_persistence", "warning", True)]


def test_aof_or_rdb_save_points_count_as_persistence(admin: Any) -> None:
    admin.config_set("save", "3600 1")
    assert inspect(Store(admin)).persistence == "rdb" and _risks(admin) == []
    admin.config_set("save", "")
    admin.config_set("appendonly", "yes")
    assert inspect(Store(admin)).persistence == "aof" and _risks(admin) == []


@pytest.mark.parametrize("policy", ["allkeys-lru", "volatile-lru", "allkeys-random", "volatile-ttl"])
def test_any_eviction_policy_is_an_error_for_check_and_readiness(admin: Any, policy: str) -> None:
    """volatile-* too: message states and producer-id claims carry TTLs, so they are eviction candidates."""
    admin.config_set("appendonly", "yes")
    admin.config_set("maxmemory-policy", policy)
    health = inspect(Store(admin), allow_volatile=True)  # accepting volatility never accepts eviction
    assert _risks(admin, True) == [("eviction", "error", False)]
    assert health.blocking() == health.not_ready() == list(health.findings)
    line = health.findings[0].line()
    assert f"maxmemory-policy is {policy}" in line and "CONFIG SET maxmemory-policy noeviction" in line


def test_without_config_what_info_cannot_tell_is_unknown(stack: DevStack, admin: Any) -> None:
    """Managed Redis renames or forbids CONFIG: the policy and AOF come from INFO, RDB save points are unknown."""
    admin.acl_setuser("no-config", enabled=True, passwords=["+pw-no-config"], keys=["*"], channels=["*"],
                      commands=["+@all", "-config"])
    limited = redis.Redis(port=stack.redis_port, username="no-config", password="pw-no-config")
    try:
        health = inspect(Store(limited))
        assert not health.config_readable and health.save is None and health.persistence == "unknown"
        assert _risks(limited) == [("unknown", "warning", False)]
        assert health.blocking() == [], "unknown is said, not guessed: it does not fail check"
        assert "unknown" in health.findings[0].line() and "CONFIG GET" in health.findings[0].line()
        admin.config_set("maxmemory-policy", "allkeys-lru")
        assert ("eviction", "error", False) in _risks(limited), "INFO alone shows the eviction policy"
        admin.config_set("appendonly", "yes")
        assert inspect(Store(limited)).persistence == "aof", "INFO alone shows AOF"
    finally:
        admin.acl_deluser("no-config")
        limited.close()


def test_a_replica_is_an_error(stack: DevStack, admin: Any, tmp_path: Any) -> None:
    with DevStack(log_dir=tmp_path) as other:
        other.start_redis(appendonly=True)
        replica = redis.Redis(port=other.redis_port)
        replica.replicaof("127.0.0.1", stack.redis_port)
        health = inspect(Store(replica))
        assert health.role == "slave" and [f.risk for f in health.not_ready()] == ["replica"]
        assert "point REDIS_URL at the primary" in health.findings[0].line()
        replica.replicaof("NO", "ONE")
        replica.close()


def test_evaluate_reads_info_alone_and_an_unknown_policy_is_said() -> None:
    """The pure verdict: no maxmemory_policy anywhere (very old or odd servers) is unknown, not fine."""
    health = evaluate({"role": "master", "aof_enabled": 1}, None)
    assert health.persistence == "aof" and [f.risk for f in health.findings] == ["unknown"]
    assert evaluate({"role": "master", "maxmemory_policy": "noeviction", "aof_enabled": 0},
                    {"save": "900 1", "appendonly": "no"}).findings == ()


def test_status_shows_the_findings(stack: DevStack, admin: Any) -> None:
    admin.config_set("maxmemory-policy", "allkeys-lru")
    settings = _settings(stack)
    store = connect_store(settings)
    status = collect(StatusConfig.from_settings(settings), store)
    assert [f["risk"] for f in status.redis["findings"]] == ["eviction", "no_persistence"]
    text = render(status)
    assert "maxmemory-policy allkeys-lru" in text and "ERROR" in text
    assert "CONFIG SET maxmemory-policy noeviction" in text
    accepted = render(collect(StatusConfig.from_settings(_settings(stack, sms_redis_allow_volatile=True)), store))
    assert "accepted" in accepted and "SMS_REDIS_ALLOW_VOLATILE=true" in accepted
    store.r.close()


# --- did it forget? -------------------------------------------------------------------------------------


def _lost_total() -> float:
    return REGISTRY.get_sample_value("sms_redis_state_lost_total") or 0.0


def _events(logs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == name]


def test_a_flushed_redis_is_noticed_by_every_process_that_knew_it(stack: DevStack, admin: Any) -> None:
    settings = _settings(stack)
    one, two = (RedisWatch(Store(redis.Redis(port=stack.redis_port)), RedisWatchConfig.from_settings(settings))
                for _ in range(2))
    before = _lost_total()
    with capture_logs() as logs:
        one.tick(force=True)
        two.tick(force=True)
        one.tick(force=True)  # nothing changed: no line
        assert _events(logs, "redis_state_lost") == [] and len(_events(logs, "redis_instance_seen")) == 2
        admin.flushall()
        one.tick(force=True)  # gone: remade by `one`
        two.tick(force=True)  # replaced by `one`'s: lost for `two` too
    lost = _events(logs, "redis_state_lost")
    assert [(e["log_level"], e["how"], e["remade_by_this_process"]) for e in lost] == [
        ("error", "flushed or evicted", True), ("error", "flushed or evicted", False)]
    assert one.losses == two.losses == 1 and _lost_total() == before + 2
    with capture_logs() as logs:
        one.tick(force=True)
        two.tick(force=True)
    assert _events(logs, "redis_state_lost") == [], "one loss is said once per process"


def test_restarts_empty_and_with_persistence_are_told_apart(tmp_path: Any) -> None:
    """A restart from the AOF only changes run_id (redis_restarted); a restart with nothing is a loss."""
    with DevStack(log_dir=tmp_path) as own:
        own.start_redis(appendonly=True)  # from the start: a live CONFIG SET appendonly delays SIGTERM
        watch = RedisWatch(Store(redis.Redis(port=own.redis_port)), RedisWatchConfig.from_settings(_settings(own)))
        watch.tick(force=True)

        def restart(*, appendonly: bool, wipe: bool) -> None:
            [server] = [p for p in own.procs if p.name == "redis" and p.alive()]
            server.stop()
            if wipe:
                shutil.rmtree(own.log_dir / "redis-data")
            own.start_redis(appendonly=appendonly, port=own.redis_port)

        with capture_logs() as logs:
            restart(appendonly=True, wipe=False)
            watch.tick(force=True)
        assert _events(logs, "redis_state_lost") == []
        assert [e["data"] for e in _events(logs, "redis_restarted")] == ["kept"]

        with capture_logs() as logs:
            restart(appendonly=False, wipe=True)
            watch.tick(force=True)
        assert [e["how"] for e in _events(logs, "redis_state_lost")] == ["restarted empty"]


def test_a_watch_never_raises_while_redis_is_away() -> None:
    settings = Settings(redis_url="redis://127.0.0.1:1/0", icomm_api_key="k" * 20)
    watch = RedisWatch(Store(redis.Redis(port=1, socket_connect_timeout=0.2, retry=Retry(NoBackoff(), 0))),
                       RedisWatchConfig.from_settings(settings))
    watch.tick(force=True)
    assert watch.health is None and watch.losses == 0


def test_the_risk_gauge_follows_the_inspection(stack: DevStack, admin: Any) -> None:
    watch = RedisWatch(Store(redis.Redis(port=stack.redis_port)), RedisWatchConfig.from_settings(_settings(stack)))
    admin.config_set("maxmemory-policy", "allkeys-lru")
    with watch.lock:
        watch.inspect_now()
    value = lambda risk: REGISTRY.get_sample_value("sms_redis_config_risk", {"risk": risk})  # noqa: E731
    assert (value("eviction"), value("no_persistence"), value("replica"), value("unknown")) == (1, 1, 0, 0)
    admin.config_set("maxmemory-policy", "noeviction")
    with capture_logs() as logs, watch.lock:
        watch.inspect_now()
    assert value("eviction") == 0
    assert [(e["event"], e["risk"]) for e in logs] == [("redis_config_risk_cleared", "eviction")]


def test_readiness_fails_on_eviction_and_reports_volatility(stack: DevStack, admin: Any) -> None:
    settings = _settings(stack)
    ok, detail, error = redis_health.readiness(settings, Store(admin))
    assert ok and error is None and detail["risks"] == ["no_persistence"] and detail["persistence"] == "none"
    admin.config_set("maxmemory-policy", "allkeys-lru")
    ok, detail, error = redis_health.readiness(settings, Store(admin))
    assert not ok and error is not None and "maxmemory-policy is allkeys-lru" in error


# --- consumer groups vanishing (Redis restarted empty) --------------------------------------------------


@pytest.fixture
def store(redis_client: redis.Redis) -> Store:  # the shared server, flushed before each test
    return Store(redis_client)


def _pending_batch(store: Store) -> list[str]:
    """Two jobs claimed by a consumer (pending in the group), as before a restart."""
    outbox = store.outbox("bulk")
    ids = [store.r.xadd(outbox, {"job": orjson.dumps({"to": "41790000001", "text": str(i)})}).decode()
           for i in range(2)]
    claim = store.claim("bulk", "c1", 10, lease_ms=60_000, max_wait_ms=0, recover=False)
    assert [e.entry_id for e in claim.entries] == ids
    return ids


def test_the_dispatch_claim_recreates_its_group(store: Store) -> None:
    """claim.lua creates the group at every call: a vanished outbox (and group) is simply empty, then new."""
    _pending_batch(store)
    store.r.flushall()
    assert store.claim("bulk", "c1", 10, lease_ms=60_000, max_wait_ms=0, recover=True).kind == "empty"
    store.r.xadd(store.outbox("bulk"), {"job": b'{"to":"41790000002","text":"after"}'})
    assert store.claim("bulk", "c1", 10, lease_ms=60_000, max_wait_ms=0, recover=True).kind == "new"


def test_the_event_relay_group_is_recreated(store: Store) -> None:
    """Store.read_group (the Dramatiq event relay) creates its group on every read; XACK of a lost one is 0."""
    store.r.xadd(store.events, {"event": b"{}"})
    [(first, _)] = store.read_group(store.events, "relay", "c1", 10, 60_000)
    store.r.flushall()
    store.ack(store.events, "relay", [first])  # the group is gone: a no-op, no error
    store.r.xadd(store.events, {"event": b"{}"})
    assert len(store.read_group(store.events, "relay", "c1", 10, 60_000)) == 1


def test_status_survives_vanished_groups(store: Store, settings: Settings) -> None:
    _pending_batch(store)
    store.r.flushall()
    store.r.xadd(store.outbox("bulk"), {"job": b"{}"})  # a stream again, without its group
    status = collect(StatusConfig.from_settings(settings), store)
    assert {lane.lane: lane.in_flight for lane in status.lanes} == {"otp": 0, "bulk": 0}


@pytest.mark.parametrize("rewritten", [False, True], ids=["stream-gone", "stream-rewritten"])
def test_taking_over_entries_of_a_vanished_group_finds_nothing(store: Store, rewritten: bool) -> None:
    ids = _pending_batch(store)
    store.r.flushall()
    if rewritten:
        store.r.xadd(store.outbox("bulk"), {"job": b"{}"})
    assert store.claim_entries("bulk", "c2", ids) == []


def test_scheduling_a_retry_in_a_vanished_group_does_nothing(store: Store) -> None:
    ids = _pending_batch(store)
    store.r.flushall()
    store.retry_in("bulk", "c1", ids, delay_ms=100, lease_ms=60_000)
    assert not store.r.exists(store.outbox("bulk"))


def test_a_reconcile_after_the_group_vanished_is_a_quiet_no_op(store: Store, settings: Settings) -> None:
    ids = _pending_batch(store)
    store.r.flushall()

    class NoWake:
        def dispatch(self, lane: str, delay_ms: int = 0) -> bool:
            return True

        def reconcile(self, lane: str, entry_ids: Any, delay_ms: int) -> None:
            return None

    provider = Provider(ProviderConfig.from_settings(settings))
    try:
        dispatcher = Dispatcher(replace(DispatchConfig.from_settings(settings), listen=False), store, provider,
                                RateLimiter(RateLimiterConfig.from_settings(settings), store), NoWake(), "c2")
        assert dispatcher.reconcile("bulk", ids) == 0
    finally:
        provider.close()
    assert not store.r.exists(store.outbox("bulk")), DISPATCH_GROUP
