"""What the Redis server behind REDIS_URL will do with our data: keep it, evict it, or forget it.

Every promise of this worker lives in Redis (outbox streams, message states, producer-id claims,
consumer groups, report pages). Two questions are asked here:

1. **Will it keep the data?** (`inspect`, for `sms-worker check`, `sms-worker status`, /readyz and
   every process at start.) From `INFO` (always answered) and `CONFIG GET` (often renamed or
   forbidden on managed Redis; then what INFO cannot tell is reported as *unknown*, never guessed):
     - `maxmemory-policy` other than `noeviction`: under memory pressure Redis silently deletes
       keys, queued jobs included. ERROR: `check` fails, /readyz is not ready.
     - no persistence (`appendonly no` and no RDB save points): a restart loses every queued job.
       WARNING: `check` fails unless SMS_REDIS_ALLOW_VOLATILE=true says the operator accepts it.
     - a replica (`role:slave`): writes fail (READONLY) or land on a copy the next sync discards.
       ERROR.
     - `appendonly no` and CONFIG not allowed: whether RDB snapshots are taken is *unknown*
       (INFO does not show save points). WARNING, shown but not failing `check`.

2. **Did it forget?** (`RedisWatch`, one per process.) At its first look a process writes (if
   absent) the instance marker `{prefix}:instance`, a random token, and remembers the value it saw.
   Later looks (worker heartbeat, the clock's ticks and any other enqueue through the broker, the
   web's /readyz; at most every CHECK_EVERY_S) compare it: missing, or replaced by another
   process's token, means the data this process knew is gone (restarted empty, FLUSHALL, evicted):
   an error `redis_state_lost` and `sms_redis_state_lost_total`. A restart that kept its data
   (AOF/RDB, or a failover to a replica that had the marker) only changes INFO's `run_id`:
   `redis_restarted`, at info level.

   Limits, honestly: only a process that saw the marker before the loss can notice it (a loss
   while every process was down, or before any ran, looks like a first start); a partial loss
   (the last second of `appendfsync everysec`, minutes of RDB, a lagging replica promoted) keeps
   the old marker and is not noticed; a hand-deleted marker looks like a loss.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import secrets
import threading
import time
from collections.abc import Callable
from typing import Any

import structlog

from worker import metrics
from worker.errors import StoreError
from worker.settings import Settings
from worker.store import Store, consumer_name

log = structlog.get_logger(__name__)

ERROR = "error"
WARNING = "warning"
# The label values of sms_redis_config_risk; each is exported as 0 or 1 after every inspection.
RISKS = ("eviction", "no_persistence", "replica", "unknown")
CHECK_EVERY_S = 5.0  # marker checks, per process
INSPECT_EVERY_S = 30.0  # configuration re-read by running processes (a live CONFIG SET is seen this late)
CONFIG_NAMES = ("maxmemory-policy", "appendonly", "save")
ALLOW_VOLATILE = "SMS_REDIS_ALLOW_VOLATILE"


@dataclasses.dataclass(frozen=True)
class Finding:
    """One way this Redis can lose our data, in words an operator can act on."""

    risk: str  # one of RISKS
    level: str  # ERROR or WARNING
    setting: str  # the Redis setting at fault
    value: str
    meaning: str
    fix: str
    acknowledged: bool = False  # accepted by SMS_REDIS_ALLOW_VOLATILE

    def line(self) -> str:
        accepted = f" (accepted: {ALLOW_VOLATILE}=true)" if self.acknowledged else ""
        return f"Redis {self.setting} is {self.value}: {self.meaning}; fix: {self.fix}{accepted}"


@dataclasses.dataclass(frozen=True)
class RedisHealth:
    """One inspection of the server."""

    version: str | None
    role: str | None  # "master" or "slave"
    maxmemory_policy: str | None  # None: unknown
    maxmemory: int | None
    appendonly: bool | None  # None: unknown
    save: str | None  # RDB save points, "" for none; None: unknown (CONFIG GET not allowed)
    config_readable: bool  # CONFIG GET answered
    run_id: str | None
    findings: tuple[Finding, ...]

    @property
    def persistence(self) -> str:
        """One of aof, aof+rdb, rdb, none, unknown."""
        rdb = None if self.save is None else bool(self.save.strip())
        if self.appendonly:
            return "aof+rdb" if rdb else "aof"
        if self.appendonly is None or rdb is None:
            return "rdb" if rdb else "unknown"
        return "rdb" if rdb else "none"

    def blocking(self) -> list[Finding]:
        """What makes `sms-worker check` fail: every error, and no persistence unless accepted."""
        return [f for f in self.findings
                if f.level == ERROR or (f.risk == "no_persistence" and not f.acknowledged)]

    def not_ready(self) -> list[Finding]:
        """What makes /readyz fail: the errors (data silently deleted or writes refused)."""
        return [f for f in self.findings if f.level == ERROR]

    def summary(self) -> str:
        policy = self.maxmemory_policy or "unknown"
        save = "unknown" if self.save is None else f'"{self.save}"'
        aof = "unknown" if self.appendonly is None else ("yes" if self.appendonly else "no")
        return (f"{self.version or '?'} {self.role or '?'}, maxmemory-policy {policy}, persistence "
                f"{self.persistence} (appendonly {aof}, save {save})"
                + ("" if self.config_readable else ", CONFIG not allowed: read from INFO"))

    def as_dict(self) -> dict[str, Any]:
        return {
            "version": self.version, "role": self.role, "maxmemory_policy": self.maxmemory_policy,
            "maxmemory": self.maxmemory, "appendonly": self.appendonly, "save": self.save,
            "persistence": self.persistence, "config_readable": self.config_readable,
            "findings": [{"risk": f.risk, "level": f.level, "acknowledged": f.acknowledged, "message": f.line()}
                         for f in self.findings],
        }


def _human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("b", "kb", "mb"):
        if size < 1024:
            return f"{size:.4g}{unit}"
        size /= 1024
    return f"{size:.4g}gb"


def evaluate(info: dict[str, Any], config: dict[str, str] | None, *, allow_volatile: bool = False) -> RedisHealth:
    """The verdict from an `INFO` reply and `CONFIG GET` answers (None when CONFIG is not allowed)."""
    cfg = config or {}
    policy = cfg.get("maxmemory-policy") or info.get("maxmemory_policy")
    maxmemory = info.get("maxmemory")
    save = cfg.get("save") if config is not None else None
    health = RedisHealth(
        version=info.get("redis_version"), role=info.get("role"),
        maxmemory_policy=str(policy) if policy is not None else None,
        maxmemory=int(maxmemory) if maxmemory is not None else None, appendonly=_appendonly(info, cfg),
        save=str(save) if save is not None else None, config_readable=config is not None,
        run_id=info.get("run_id"), findings=(),
    )
    findings = [*_eviction(health), *_replica(health, info), *_persistence(health, allow_volatile)]
    return dataclasses.replace(health, findings=tuple(findings))


def _appendonly(info: dict[str, Any], cfg: dict[str, str]) -> bool | None:
    if "appendonly" in cfg:
        return cfg["appendonly"] == "yes"
    if "aof_enabled" in info:
        return int(info["aof_enabled"]) == 1
    return None


def _eviction(health: RedisHealth) -> list[Finding]:
    policy = health.maxmemory_policy
    if policy is None:
        return [Finding(
            "unknown", WARNING, "maxmemory-policy", "unknown (neither INFO nor CONFIG GET show it)",
            "cannot tell whether Redis may evict queued jobs", "make sure it is noeviction")]
    if policy == "noeviction":
        return []
    limit = f"maxmemory {_human_bytes(health.maxmemory)}" if health.maxmemory else "no maxmemory yet: evicts once set"
    return [Finding(
        "eviction", ERROR, "maxmemory-policy", f"{policy} ({limit})",
        "under memory pressure Redis silently deletes keys: queued jobs, message states, producer-id claims",
        "CONFIG SET maxmemory-policy noeviction (and maxmemory-policy noeviction in redis.conf or your "
        "provider's parameter group)")]


def _replica(health: RedisHealth, info: dict[str, Any]) -> list[Finding]:
    if health.role is None or health.role == "master":
        return []
    where = f" of {info.get('master_host')}:{info.get('master_port')}" if info.get("master_host") else ""
    return [Finding(
        "replica", ERROR, "role", f"replica{where}",
        "writes fail (READONLY) or land on a copy the next sync discards",
        "point REDIS_URL at the primary")]


def _persistence(health: RedisHealth, allow_volatile: bool) -> list[Finding]:
    if health.persistence == "none":
        return [Finding(
            "no_persistence", WARNING, "persistence", 'off (appendonly no, save "")',
            "a restart loses every queued job, message state and consumer group",
            f"CONFIG SET appendonly yes (and appendonly yes in redis.conf), or {ALLOW_VOLATILE}=true to accept it",
            acknowledged=allow_volatile)]
    if health.persistence == "unknown":
        return [Finding(
            "unknown", WARNING, "persistence", "unknown (appendonly no; RDB save points unreadable: CONFIG GET "
            "is not allowed)", "cannot tell whether a restart keeps the queued jobs",
            f"turn on AOF or snapshots in your provider's settings, or {ALLOW_VOLATILE}=true to accept the risk",
            acknowledged=allow_volatile)]
    return []


def inspect(store: Store, allow_volatile: bool = False) -> RedisHealth:
    """Ask the server (one round trip). StoreError when it does not answer at all; a refused or
    renamed CONFIG is not an error: what INFO cannot tell is reported as unknown."""
    info, config = store.server_config(CONFIG_NAMES)
    return evaluate(info, config, allow_volatile=allow_volatile)


def publish(health: RedisHealth) -> None:
    """Set sms_redis_config_risk{risk} to 1 for each risk found, 0 for the others."""
    found = {f.risk for f in health.findings}
    for risk in RISKS:
        metrics.REDIS_CONFIG_RISK.labels(risk).set(1 if risk in found else 0)


def marker_since(value: bytes | None) -> str | None:
    """When the marker (and so the data set this worker knows) was created, ISO 8601 UTC."""
    if not value:
        return None
    try:
        ms = int(value.decode().rsplit("@", 1)[1])
    except (IndexError, ValueError, UnicodeDecodeError):
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ms / 1000))


@dataclasses.dataclass(frozen=True)
class RedisWatchConfig:
    allow_volatile: bool  # SMS_REDIS_ALLOW_VOLATILE: no persistence is accepted

    @classmethod
    def from_settings(cls, settings: Settings) -> RedisWatchConfig:
        return cls(allow_volatile=settings.sms_redis_allow_volatile)


class RedisWatch:
    """One per process (see `watch`): says what the server will do with our data, at the first look
    and whenever that changes, and notices when the server forgot what it had."""

    def __init__(self, store: Store, config: RedisWatchConfig) -> None:
        self.store = store
        self.allow_volatile = config.allow_volatile
        self.lock = threading.Lock()
        self.health: RedisHealth | None = None
        self.losses = 0
        self._marker: bytes | None = None
        self._run_id: str | None = None
        self._announced: dict[str, Finding] | None = None
        self._next_check = 0.0
        self._next_inspect = 0.0

    def tick(self, *, force: bool = False) -> None:
        """Look if due (at most every CHECK_EVERY_S); never raises, never waits for another look."""
        if not force and time.monotonic() < self._next_check:
            return
        if not self.lock.acquire(blocking=False):
            return
        try:
            self._next_check = time.monotonic() + CHECK_EVERY_S
            if self.health is None or time.monotonic() >= self._next_inspect:
                self.inspect_now()
            self.check_marker()
        except (StoreError, OSError):
            pass  # Redis away: dispatchers, the clock and the web say so; the next look asks again
        except Exception as error:  # noqa: BLE001 -- a watch must never break the process it watches
            log.warning("redis_watch_failed", error=f"{type(error).__name__}: {error}")
        finally:
            self.lock.release()

    def inspect_now(self) -> RedisHealth:
        """Inspect now (call with `lock` held); logs when the verdict changed. StoreError if unreachable."""
        health = inspect(self.store, self.allow_volatile)
        self.health = health
        self._next_inspect = time.monotonic() + INSPECT_EVERY_S
        publish(health)
        self._announce(health)
        return health

    def _announce(self, health: RedisHealth) -> None:
        """At the first inspection: the configuration and every finding. Later: only what changed
        (a new finding at its level, a fixed one as `redis_config_risk_cleared`)."""
        now = {f.risk: f for f in health.findings}
        before = self._announced
        self._announced = now
        if before is None:
            log.info("redis_config", summary=health.summary(), persistence=health.persistence,
                     maxmemory_policy=health.maxmemory_policy, role=health.role, process=consumer_name())
            before = {}
        for risk, f in now.items():
            if risk in before and before[risk] == f:
                continue
            level = ERROR if f.level == ERROR else "info" if f.acknowledged else WARNING
            getattr(log, level)("redis_config_risk", risk=f.risk, setting=f.setting, value=f.value,
                                meaning=f.meaning, fix=f.fix, acknowledged=f.acknowledged, process=consumer_name())
        for risk in before.keys() - now.keys():
            log.info("redis_config_risk_cleared", risk=risk, summary=health.summary(), process=consumer_name())

    def check_marker(self) -> None:
        """Compare the instance marker with the one this process saw last (call with `lock` held)."""
        fresh = f"{secrets.token_hex(8)}@{int(time.time() * 1000)}".encode()
        seen = self.store.check_instance_marker(fresh)
        made, value, run_id = seen.made, seen.value, seen.run_id
        if self._marker is None:
            log.info("redis_instance_seen", marker_since=marker_since(value), marked_now=bool(made), run_id=run_id,
                     process=consumer_name())
        elif value != self._marker:
            self.losses += 1
            metrics.REDIS_STATE_LOST.inc()
            log.error(
                "redis_state_lost", how="restarted empty" if run_id != self._run_id else "flushed or evicted",
                marker_was_since=marker_since(self._marker), marker_now_since=marker_since(value),
                remade_by_this_process=bool(made), run_id=run_id, previous_run_id=self._run_id,
                meaning="Redis no longer has the data it had: jobs queued before, message states, producer-id "
                        "claims, consumer groups and pending batches are gone; new jobs are sent normally",
                do="docs/operations.md, 'Redis lost its data'", process=consumer_name(),
            )
        elif run_id != self._run_id:
            log.info("redis_restarted", run_id=run_id, previous_run_id=self._run_id, data="kept",
                     marker_since=marker_since(value), process=consumer_name())
        self._marker, self._run_id = value, run_id


_watches: dict[tuple[int, str, str], RedisWatch] = {}
_watches_lock = threading.Lock()


def watch(settings: Settings, store: Store | Callable[[], Store]) -> RedisWatch:
    """This process's watch of settings' Redis (made on first use, through `store`, or the Store
    the callable makes then; per pid, so a forked child gets its own)."""
    key = (os.getpid(), settings.redis_url, settings.sms_key_prefix)
    with _watches_lock:
        found = _watches.get(key)
        if found is None:
            found = _watches[key] = RedisWatch(store if isinstance(store, Store) else store(),
                                               RedisWatchConfig.from_settings(settings))
    return found


def readiness(settings: Settings, store: Store) -> tuple[bool, dict[str, Any], str | None]:
    """For /readyz: (ready, detail, error). Inspects at every call (three commands), so a fixed
    policy is seen at once. StoreError when Redis does not answer."""
    w = watch(settings, store)
    with w.lock:
        health = w.inspect_now()
        if time.monotonic() >= w._next_check:
            w._next_check = time.monotonic() + CHECK_EVERY_S
            with contextlib.suppress(StoreError):  # a replica refuses the marker's SET: the inspection says why
                w.check_marker()
    detail: dict[str, Any] = {"persistence": health.persistence, "maxmemory_policy": health.maxmemory_policy,
                              "role": health.role, "risks": [f.risk for f in health.findings]}
    if w.losses:
        detail["state_lost_seen"] = w.losses
    errors = health.not_ready()
    return not errors, detail, "; ".join(f.line() for f in errors) or None
