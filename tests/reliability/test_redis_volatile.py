"""A Redis that evicts or forgets: the operator is told, and a Redis restarted empty is survived.

(a) A stack whose Redis has `maxmemory-policy allkeys-lru` (it may silently evict queued jobs): `sms-worker
    check` fails naming the setting and its fix, /readyz is not ready, the processes log it as an error at
    start and the metric says so; fixing the policy live makes /readyz ready and `check` pass again.
(b) Redis restarted EMPTY (stopped, its data deleted, started on the same port without persistence) under a
    running system: every process logs `redis_state_lost`, none crashes, and every job enqueued after the
    restart is sent once and settled. Jobs queued before it are gone: that is what "no persistence" means,
    and why (a) and `check` exist.
(c) The same restart WITH persistence (AOF) is not reported as a loss: the processes log `redis_restarted`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import httpx
import orjson
import redis

from tests.reliability.harness import (
    API_KEY,
    BASE_ENV,
    SANDBOX_FLAGS,
    Row,
    Size,
    System,
    jobs,
    poll,
    running,
    verify,
    wait_settled,
)
from worker.devtools.devstack import DevStack, free_port, wait_until


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "worker.cli", *args], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=60, check=False)


def _log_lines(path: Path, event: str) -> list[dict[str, object]]:
    lines = []
    if path.exists():
        for line in path.read_text(errors="replace").splitlines():
            if f'"event": "{event}"' in line:
                try:
                    lines.append(orjson.loads(line))
                except orjson.JSONDecodeError:
                    continue
    return lines


def _gauge(url: str, name: str, labels: str) -> float | None:
    """A sample of `name` with `labels` from a /metrics endpoint; None while it does not answer or lacks it."""
    try:
        text = httpx.get(url, timeout=5).text
    except httpx.HTTPError:
        return None
    for line in text.splitlines():
        if line.startswith(f"{name}{{") and labels in line:
            return float(line.rsplit(" ", 1)[1])
    return None


def test_an_evicting_redis_fails_check_and_readyz_and_is_logged(record: Row, tmp_path: Path) -> None:
    """allkeys-lru: check exits non-zero naming maxmemory-policy and the fix; /readyz 503; logs and metric say so."""
    record.suite = "redis evicting (allkeys-lru)"
    web_port, metrics_port = free_port(), free_port()
    with DevStack(env=BASE_ENV, log_dir=tmp_path) as stack:
        stack.start_redis(appendonly=True)  # persistence on: eviction is the only problem of this Redis
        admin = redis.Redis(port=stack.redis_port)
        admin.config_set("maxmemory-policy", "allkeys-lru")
        stack.start_sandbox(API_KEY, *SANDBOX_FLAGS)
        env = dict(stack.env)

        check = _cli(env, "check")
        assert check.returncode != 0, f"check passed on an evicting Redis:\n{check.stdout}{check.stderr}"
        problem = [line for line in check.stderr.splitlines() if "maxmemory-policy" in line]
        assert len(problem) == 1, check.stderr
        assert "allkeys-lru" in problem[0] and "CONFIG SET maxmemory-policy noeviction" in problem[0], problem
        assert "Traceback" not in check.stderr

        worker = stack.start_worker("worker-1", env={"SMS_METRICS_PORT": str(metrics_port)})
        clock = stack.start_clock()
        # Not stack.start_web: that waits for /readyz to answer 200, which this Redis never allows.
        web = stack.spawn("web", [sys.executable, "-m", "worker.cli", "web", "--port", str(web_port)])
        readyz = f"http://127.0.0.1:{web_port}/readyz"

        def answered() -> bool:
            assert web.alive(), web.tail()
            try:
                httpx.get(readyz, timeout=0.5)
            except httpx.HTTPError:
                return False
            return True

        wait_until(answered, 20, "the web process to answer /readyz")
        ready = httpx.get(readyz, timeout=5)
        assert ready.status_code == 503, ready.text
        assert "maxmemory-policy" in ready.json()["error"] and "eviction" in ready.json()["redis_config"]["risks"]

        for proc in (worker, clock, web):
            wait_until(lambda p=proc: any(line["level"] == "error" and line.get("risk") == "eviction"
                                          for line in _log_lines(p.log_path, "redis_config_risk")),
                       20, f"{proc.name} to log the eviction risk")
        web_metrics, worker_metrics = f"http://127.0.0.1:{web_port}/metrics", f"http://127.0.0.1:{metrics_port}/metrics"
        assert _gauge(web_metrics, "sms_redis_config_risk", 'risk="eviction"') == 1.0
        wait_until(lambda: _gauge(worker_metrics, "sms_redis_config_risk", 'risk="eviction"') == 1.0,
                   20, "the worker's metrics to carry the eviction risk")
        assert _gauge(worker_metrics, "sms_redis_config_risk", 'risk="no_persistence"') == 0.0
        status = orjson.loads(_cli(env, "status", "--json").stdout)
        assert "eviction" in [f["risk"] for f in status["redis"]["findings"]], status["redis"]

        # Fixed live: readiness follows at once, and check passes.
        admin.config_set("maxmemory-policy", "noeviction")
        fixed = httpx.get(readyz, timeout=5)
        assert fixed.status_code == 200, fixed.text
        again = _cli(env, "check")
        assert again.returncode == 0, again.stdout + again.stderr
        assert _gauge(web_metrics, "sms_redis_config_risk", 'risk="eviction"') == 0.0
        admin.close()
        crashed = [p.name for p in stack.procs if p.name != "redis" and not p.alive()]
        assert not crashed, stack.logs()
    record.fault("maxmemory-policy allkeys-lru")


def _lost_by(system: System) -> dict[str, int]:
    """How many `redis_state_lost` lines each worker and clock process logged."""
    return {path.stem: len(_log_lines(path, "redis_state_lost"))
            for path in sorted(system.stack.log_dir.glob("*.log")) if path.stem.startswith(("worker-", "clock"))}


def _failures(system: System, text: str) -> Counter[str]:
    """Worker log lines that mention `text`, counted by the line's event and its exception's last line."""
    found: Counter[str] = Counter()
    for path in sorted(system.stack.log_dir.glob("worker-*.log")):
        for line in path.read_text(errors="replace").splitlines():
            if text in line:
                try:
                    entry = orjson.loads(line)
                except orjson.JSONDecodeError:
                    found[line[:120]] += 1
                    continue
                last = str(entry.get("exception", "")).strip().splitlines()[-1:] or [""]
                found[f"{entry.get('event', '')[:60]} -> {last[0][:160]}"] += 1
    return found


def test_redis_restarted_empty_is_survived_and_said_loudly(size: Size, record: Row, tmp_path: Path) -> None:
    """Redis killed, its data deleted, restarted empty: processes log redis_state_lost; later jobs are all sent."""
    record.suite = "redis restarted empty"
    before, after, rate = 2000, 500, 500
    env = {"SMS_RATE_LIMIT_MPS": str(rate), "SMS_RATE_LIMIT_BURST_S": "0.2",
           # Reports of messages sent before the restart arrive for states Redis forgot: they are parked,
           # then published as unknown_message; a short timeout lets the run settle within the test.
           "SMS_REPORT_PARK_TIMEOUT_S": "2"}
    # One worker process: it certainly used both consumer groups (outbox and raw reports) before they
    # vanish, so it cannot get by on a group another process had not made yet (with two, which of them
    # ran the report processor first is luck). Several processes noticing a loss: the AOF test below.
    with running(env, seed=size.seed, log_dir=tmp_path, workers=1) as system:
        stack = system.stack
        system.outbox.enqueue_many(jobs(before, prefix="before"), "bulk")
        assert poll(lambda: bool(_log_lines(stack.log_dir / "worker-1.log", "reports_processed")), 30, 0.05), (
            f"the worker processed no report before the restart\n{stack.logs()}")
        accepted_before = system.stats()["messages_accepted"]
        [server] = [p for p in stack.procs if p.name == "redis" and p.alive()]
        server.kill()
        shutil.rmtree(stack.log_dir / "redis-data")  # nothing to come back from
        stack.start_redis(port=stack.redis_port)  # no persistence, empty
        record.fault("redis SIGKILL + data deleted + restart empty")
        assert int(system.client.dbsize()) < 50, "Redis came back with data: the scenario needs it empty"

        expected = [f"after-{i}" for i in range(after)]
        system.outbox.enqueue_many(jobs(after, prefix="after"), "bulk")
        wait_until(lambda: len(_lost_by(system)) == 2 and all(_lost_by(system).values()), 20,
                   f"the worker and the clock to log redis_state_lost: {_lost_by(system)}")
        took = wait_settled(system, 45)
        verdict = verify(system, expected, key="id")
        lost_lines = _lost_by(system)
        crashed = system.dead_processes(killed=[server])
        tracebacks = system.worker_log_errors()
        stats = system.stats(per_message=True)
        events = system.events()
        after_mids = {e["message_id"] for e in events if str(e.get("id", "")).startswith("after-")}
        twice_at_provider = sorted(m for m in after_mids if stats["accepted_per_message_id"].get(m, 0) > 1)
        finals: Counter[str] = Counter(e["message_id"] for e in events
                                       if e["type"] in {"delivered", "undeliverable", "expired", "rejected"}
                                       and e.get("done_at") is not None and e["message_id"] in after_mids)
        nogroup = _failures(system, "NOGROUP")
        logs = stack.logs() if crashed or took is None else ""
    record.add(verdict)
    record.note = (f"{before} jobs queued before the restart ({accepted_before} accepted by then; the rest lost "
                   f"with it, by design), {after} after; redis_state_lost lines per process {lost_lines}; worker log "
                   f"lines with tracebacks: {len(tracebacks)}; NOGROUP failures: {dict(nogroup)}")
    assert not crashed, f"processes died: {crashed}\n{logs}"
    assert not verdict.lost, f"jobs enqueued after the restart were lost: {verdict.summary()}"
    assert not verdict.twice and not twice_at_provider, f"sent twice: {verdict.twice[:3]} {twice_at_provider[:3]}"
    assert verdict.outcomes == {"accepted": after}, verdict.summary()
    missing = sorted(m for m in after_mids if finals[m] != 1)
    assert took is not None and not missing, (
        f"the run did not settle after the restart ({len(missing)} after-restart messages without exactly one "
        f"final report event, e.g. {missing[:3]}); NOGROUP failures in the worker logs: {dict(nogroup)}\n{logs}")


def test_a_restart_with_persistence_is_not_reported_as_a_loss(size: Size, record: Row, tmp_path: Path) -> None:
    """Redis SIGKILLed and restarted from its AOF: the processes log redis_restarted, never redis_state_lost."""
    record.suite = "redis restarted with AOF (no false alarm)"
    with running({}, seed=size.seed, log_dir=tmp_path, appendonly=True) as system:
        stack = system.stack
        system.outbox.enqueue_many(jobs(200, prefix="pre"), "bulk")
        # Every process has marked (or seen) the instance before the restart.
        wait_until(lambda: system.events_len() >= 200, 30, "the first jobs to be sent")
        names = [p for p in stack.procs if p.name.startswith(("worker-", "clock"))]
        wait_until(lambda: all(_log_lines(p.log_path, "redis_instance_seen") for p in names), 20,
                   "every process to know the Redis instance")
        [server] = [p for p in stack.procs if p.name == "redis" and p.alive()]
        server.kill()
        stack.start_redis(appendonly=True, port=stack.redis_port)
        record.fault("redis SIGKILL + restart from AOF")
        wait_until(lambda: all(_log_lines(p.log_path, "redis_restarted") for p in names), 20,
                   "every process to notice the restart")
        system.outbox.enqueue_many(jobs(200, prefix="post"), "bulk")
        wait_until(lambda: system.events_len() >= 400, 30, "the jobs after the restart to be sent")
        lost = {p.name: len(_log_lines(p.log_path, "redis_state_lost")) for p in names}
        crashed = system.dead_processes(killed=[server])
    assert not crashed, crashed
    assert not any(lost.values()), f"a restart with persistence was reported as a loss: {lost}"

