"""The scenarios of issue 6, one function per repetition; each returns a flat dict of measurements.

Times come from two clocks of the same machine: `time.time()` in this process (when the producer
starts) and Redis's clock (the ms part of stream entry ids: when a job was appended, when its
event was published). Throughput is "first enqueue -> the last `accepted` event published", so it
includes enqueueing, dispatch, the provider call, recording, and publishing.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import multiprocessing.synchronize
import os
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any

import orjson

from bench import baseline
from bench.procs import CpuMeter, cpu_seconds, status_kb
from bench.stats import percentile
from bench.system import NO_REPORTS, BenchStack, entry_ms
from worker.devtools.devstack import wait_until
from worker.outbox import Outbox, OutboxConfig
from worker.producer import producer
from worker.settings import settings_from_env
from worker.triggers import DRAIN_REPORTS

# A producer streaming a campaign hands it over in chunks; each chunk wakes a dispatcher.
CHUNK = 10_000
# Enough threads that an otp enqueue waiting behind a long Redis script never holds up the next one.
OTP_PRODUCER_THREADS = 32
REPORT_GROUPS = frozenset({"delivered", "undeliverable", "expired", "rejected"})


# `--campaign NAME`: every job of the bulk scenarios carries this campaign_reference_id, so its
# messages move campaign counters in every state change (worker/lua/lib/ledger.lua).
CAMPAIGN: str | None = None


def jobs(n: int, start: int = 0, ids: bool = False) -> list[dict[str, Any]]:
    """`n` ordinary jobs (Swiss mobile numbers, a one-part text, a little metadata)."""
    made = []
    for i in range(start, start + n):
        job: dict[str, Any] = {"to": f"4179{i % 10_000_000:07d}", "text": f"Hello, your order {i} has shipped.",
                               "metadata": {"order": i}}
        if ids:
            job["id"] = f"order-{i}"
        if CAMPAIGN:
            job["campaign_reference_id"] = CAMPAIGN
        made.append(job)
    return made


def _per_message_us(cpu_s: dict[str, float], n: int) -> dict[str, float]:
    return {name: round(seconds / n * 1e6, 2) for name, seconds in cpu_s.items()}


def _ceiling(cpu_s: dict[str, float], n: int) -> float:
    """The rate at which every core of this machine would be busy: n / (CPU seconds / cores)."""
    used = sum(cpu_s.values())
    return round(n / (used / (os.cpu_count() or 1)), 1) if used else float("nan")


def _event_types(stack: BenchStack, stream: str, skip: int = 0) -> Counter[str]:
    """Event types on `stream`, after its first `skip` entries."""
    types: Counter[str] = Counter()
    last, seen = b"-", 0
    while True:
        batch = stack.client.xrange(stream, min=last, max="+", count=20_000)
        if not batch:
            return types
        for _, fields in batch:
            seen += 1
            if seen > skip:
                types[orjson.loads(fields[b"event"])["type"]] += 1
        last = b"(" + batch[-1][0]


def _redis_us_per_msg(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]], n: int,
                      top: int = 10) -> dict[str, float]:
    """Redis time per message by command (INFO commandstats; `evalsha` includes the commands its
    scripts run, so script overhead = evalsha minus the commands scripts call)."""
    used = {name: after[name][1] - before.get(name, (0, 0))[1] for name in after}
    ranked = sorted(used.items(), key=lambda kv: kv[1], reverse=True)[:top]
    return {name: round(usec / n, 2) for name, usec in ranked if usec > 0}


def _peak_rss_mb(stack: BenchStack) -> float:
    """The largest VmHWM among the forked dramatiq worker processes, in MB."""
    peaks = [status_kb(pid, "VmHWM") for pid in stack.worker_children()]
    return round(max(peaks, default=0) / 1024, 1)


# --- scenario 1 (and 4, 6): our pipeline, end to end ---------------------------------------------------


def run_ours(stack: BenchStack, n: int, *, chunk: int = CHUNK, timeout_s: float = 600, start: int = 0
             ) -> dict[str, Any]:
    """Enqueue `n` bulk jobs (`jobs(n, start)`) in chunks and wait for `n` accepted events; rate, CPU
    per message, RSS."""
    outbox = stack.outbox()
    batch = jobs(n, start)
    events = stack.store.events
    before = int(stack.client.xlen(events))
    components = {k: v for k, v in stack.components().items() if k != "producer"}
    meter = CpuMeter(components)
    commands = stack.redis_commandstats()
    meter.start()
    cpu0 = time.process_time()
    t0 = time.time()
    for start in range(0, n, chunk):
        outbox.enqueue_many(batch[start : start + chunk], "bulk")
    enqueue_s = time.time() - t0
    producer_cpu_s = time.process_time() - cpu0
    stack.wait_for_events(events, before + n, timeout_s)
    cpu = meter.stop()
    redis_by_command = _redis_us_per_msg(commands, stack.redis_commandstats(), n)
    end_s = stack.nth_event_ms(events, before + n) / 1000
    cpu["producer"] = producer_cpu_s
    seconds = max(end_s - t0, 1e-3)
    sandbox = stack.sandbox.stats()
    types = _event_types(stack, events, skip=before)
    ok = types == Counter({"accepted": n}) and sandbox["duplicates"] == 0
    return {
        "messages": n, "seconds": round(seconds, 3), "rate": round(n / seconds, 1),
        "enqueue_s": round(enqueue_s, 3),
        "cpu_us_per_msg": _per_message_us(cpu, n),
        "cpu_us_per_msg_total": round(sum(cpu.values()) / n * 1e6, 2),
        "cores_busy": round(sum(cpu.values()) / seconds, 2),
        "cpu_ceiling_rate": _ceiling(cpu, n),
        "peak_rss_mb": _peak_rss_mb(stack),
        "redis_us_per_msg_by_command": redis_by_command,
        "ok": ok,
    }


def run_baseline(stack: BenchStack, n: int, *, workers: int, timeout_s: float = 600) -> dict[str, Any]:
    """The baseline on the same Redis and sandbox: one Dramatiq message and one POST per SMS."""
    stack.stop_workers()
    stack.sandbox.reset()
    stack.start_baseline(workers)
    return run_baseline_started(stack, n, timeout_s=timeout_s)


def run_baseline_started(stack: BenchStack, n: int, *, timeout_s: float = 600) -> dict[str, Any]:
    """Produce `n` baseline messages (one Dramatiq message each) and wait for their events."""
    broker = baseline.make_broker(stack.settings.redis_url)
    batch = jobs(n)
    stream = baseline.EVENTS
    before = int(stack.client.xlen(stream))
    meter = CpuMeter({k: v for k, v in stack.components().items() if k != "producer"})
    try:
        meter.start()
        cpu0 = time.process_time()
        t0 = time.time()
        for i, job in enumerate(batch):
            # What `send_sms.send(...)` does: build the message, enqueue it (one round trip).
            broker.enqueue(baseline.message(f"bl-{t0:.0f}-{i}", job["to"], job["text"], job["metadata"]))
        producer_cpu_s = time.process_time() - cpu0
        stack.wait_for_events(stream, before + n, timeout_s)
        cpu = meter.stop()
    finally:
        broker.close()
    cpu["producer"] = producer_cpu_s
    seconds = max(stack.nth_event_ms(stream, before + n) / 1000 - t0, 1e-3)
    sandbox = stack.sandbox.stats()
    return {
        "messages": n, "seconds": round(seconds, 3), "rate": round(n / seconds, 1),
        "cpu_us_per_msg": _per_message_us(cpu, n),
        "cpu_us_per_msg_total": round(sum(cpu.values()) / n * 1e6, 2),
        "cores_busy": round(sum(cpu.values()) / seconds, 2),
        "peak_rss_mb": _peak_rss_mb(stack),
        "ok": sandbox["messages_accepted"] == n and sandbox["duplicates"] == 0,
    }


def e2e(n: int, baseline_n: int, workers: int = 2, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Scenario 1 (and 6): ours on `n` messages, then the baseline on `baseline_n`, same Redis and sandbox."""
    with BenchStack(env=env) as stack:
        stack.start_ours(workers)
        ours = run_ours(stack, n)
        base = run_baseline(stack, baseline_n, workers=workers) if baseline_n else {}
    ratio = ours["rate"] / base["rate"] if base else float("nan")
    return {"ours": ours, "baseline": base, "ratio": round(ratio, 2)}


def slow_provider(n: int, latency_ms: float = 100.0, workers: int = 2, env: dict[str, str] | None = None,
                  ) -> dict[str, Any]:
    """Scenario 4: the sandbox holds every POST for `latency_ms`; default lanes and concurrency."""
    with BenchStack(env=env, sandbox_flags=(*NO_REPORTS, "--latency-ms", str(latency_ms))) as stack:
        stack.start_ours(workers)
        return run_ours(stack, n)


# --- scenario 2: the producer ------------------------------------------------------------------------


def producer_rate(n: int, with_ids: bool, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Scenario 2: one `Outbox.enqueue_many` call of `n` jobs (validated, encoded, pipelined); no workers."""
    with BenchStack(env=env, sandbox_flags=None) as stack:
        outbox = Outbox(OutboxConfig.from_settings(stack.settings), stack.store)  # no wake-up: nothing consumes here
        batch = jobs(n, ids=with_ids)
        redis0 = cpu_seconds(stack.redis_pid)
        cpu0 = time.process_time()
        started = time.perf_counter()
        results = outbox.enqueue_many(batch, "bulk")
        seconds = time.perf_counter() - started
        cpu_s = time.process_time() - cpu0
        redis_s = cpu_seconds(stack.redis_pid) - redis0
        queued = int(stack.client.xlen(stack.store.outbox("bulk")))
    cost_us = (cpu_s + redis_s) / n * 1e6
    return {
        "jobs": n, "seconds": round(seconds, 3), "rate": round(n / seconds, 1),
        "producer_cpu_us_per_job": round(cpu_s / n * 1e6, 2), "redis_cpu_us_per_job": round(redis_s / n * 1e6, 2),
        # The producer validates every job before it writes any (Redis idle), then writes with two
        # chunks in flight (producer and Redis overlap): the measured rate beats this floor by
        # the overlap.
        "sequential_rate": round(1e6 / cost_us, 1) if cost_us else float("nan"),
        "ok": queued == n and all(r.queued for r in results),
    }


# --- scenario 3: latency ------------------------------------------------------------------------------


def _bulk_campaign(env: dict[str, str], n: int, chunk: int, ready: Any, go: multiprocessing.synchronize.Event,
                   done: Any) -> None:
    """Child process: enqueue a bulk campaign when told to; report when it started and finished."""
    settings = settings_from_env(env)
    wired = producer(settings)
    outbox = wired.outbox
    batch = jobs(n, start=1_000_000)
    ready.put(True)
    go.wait()
    started = time.time()
    for start in range(0, n, chunk):
        outbox.enqueue_many(batch[start : start + chunk], "bulk")
    done.put((started, time.time()))
    wired.close()


def latency(bulk_n: int, otp_rate: float, workers: int = 2, env: dict[str, str] | None = None, tail_s: float = 0.5,
            warmup_s: float = 0.5, timeout_s: float = 300, otp_worker: bool = False) -> dict[str, Any]:
    """Scenario 3: `otp` jobs one at a time at `otp_rate`/s while a `bulk_n` campaign drains.

    otp latency = the `accepted` event's publication (Redis clock, 1 ms resolution) minus the time
    stamped into the job's metadata just before `Outbox.enqueue`; the event is published right
    after the sandbox answered the POST. bulk latency = the event's publication minus the job's
    XADD (both Redis's clock). `otp_worker`: `workers` processes for everything but otp, and one
    more for otp alone (the split deployment).
    """
    with BenchStack(env=env) as stack:
        stack.start_ours(workers, otp_worker=otp_worker)
        context = multiprocessing.get_context("spawn")
        ready, done = context.Queue(), context.Queue()
        go = context.Event()
        child = context.Process(target=_bulk_campaign,
                                args=(dict(stack.dev.env), bulk_n, CHUNK, ready, go, done))
        child.start()
        try:
            ready.get(timeout=120)
            stamps = _offer_otp(stack, otp_rate, go, done, bulk_n, warmup_s, tail_s, timeout_s)
            _, bulk_started = stamps.pop()
            child.join(timeout=30)
        finally:
            if child.is_alive():
                child.kill()
        n_otp = len(stamps)
        stack.wait_for_events(stack.store.events, bulk_n + n_otp, timeout_s)
        otp_ms: list[tuple[float, float]] = []  # (enqueued at, latency)
        bulk_ms: list[float] = []
        bulk_end = 0.0
        for entry_id, fields in stack.events():
            event = orjson.loads(fields[b"event"])
            if event["type"] != "accepted":
                continue
            published = entry_ms(entry_id)
            if event["lane"] == "otp":
                t = event["metadata"]["t"] * 1000
                otp_ms.append((t, published - t))
            else:
                bulk_ms.append(published - entry_ms(event["message_id"]))
                bulk_end = max(bulk_end, published)
        during = [lat for t, lat in otp_ms if bulk_started * 1000 <= t <= bulk_end]
        every = [lat for _, lat in otp_ms]
        sandbox = stack.sandbox.stats()
    return {
        "otp_offered_per_s": otp_rate, "otp_sent": n_otp, "otp_during_drain": len(during),
        "otp_p50_ms": percentile(during, 50), "otp_p99_ms": percentile(during, 99),
        "otp_max_ms": max(during, default=float("nan")),
        "otp_all_p50_ms": percentile(every, 50), "otp_all_p99_ms": percentile(every, 99),
        "bulk_messages": len(bulk_ms), "bulk_drain_s": round(bulk_end / 1000 - bulk_started, 3),
        "bulk_p50_ms": percentile(bulk_ms, 50), "bulk_p99_ms": percentile(bulk_ms, 99),
        "ok": len(otp_ms) == n_otp and len(bulk_ms) == bulk_n and sandbox["duplicates"] == 0,
    }


def _offer_otp(stack: BenchStack, rate: float, go: multiprocessing.synchronize.Event, done: Any, bulk_n: int,
               warmup_s: float, tail_s: float, timeout_s: float) -> list[tuple[str, float]]:
    """Open-loop otp producer: one job every 1/rate s until the campaign has drained plus `tail_s`.

    Jobs are handed to a thread pool at their due time, so an enqueue that waits on a busy Redis
    does not delay the next one (no coordinated omission: the offered rate stays `rate`).
    Returns (message id, enqueue time) per otp job, then a last item ("", campaign start time).
    """
    outbox = stack.outbox()
    outbox_bulk = stack.store.outbox("bulk")
    period = 1.0 / rate

    def send(i: int) -> tuple[str, float]:
        t = time.time()
        job = {"to": f"4178{i % 10_000_000:07d}", "text": f"Your code is {100000 + i % 900000}",
               "metadata": {"t": t}}
        return outbox.enqueue(job, "otp").message_id, t

    futures: list[concurrent.futures.Future[tuple[str, float]]] = []
    campaign: tuple[float, float] | None = None
    drained_at: float | None = None
    with concurrent.futures.ThreadPoolExecutor(max_workers=OTP_PRODUCER_THREADS) as pool:
        began = time.perf_counter()
        i = 0
        while True:
            due = began + i * period
            now = time.perf_counter()
            if due > now:
                time.sleep(due - now)
            futures.append(pool.submit(send, i))
            i += 1
            elapsed = time.perf_counter() - began
            if elapsed > timeout_s:
                raise TimeoutError(f"the bulk campaign did not drain in {timeout_s:g} s")
            if not go.is_set():
                if elapsed >= warmup_s:
                    go.set()
                continue
            if campaign is None:
                if not done.empty():
                    campaign = done.get()
                continue
            if drained_at is None:
                # Entries are deleted when settled: an empty outbox after the last chunk means drained.
                if i % 10 == 0 and int(stack.client.xlen(outbox_bulk)) == 0:
                    drained_at = time.perf_counter()
            elif time.perf_counter() - drained_at >= tail_s:
                break
    assert campaign is not None
    return [f.result() for f in futures] + [("", campaign[0])]


# --- scenario 5: delivery reports ------------------------------------------------------------------------


def reports(n: int, workers: int = 2, env: dict[str, str] | None = None, timeout_s: float = 600) -> dict[str, Any]:
    """Scenario 5: `n` reports pending at the sandbox, drained (GET /sms/3/reports) and turned into events.

    The messages are sent first (reports generated at once, but not drained: the clock's drain
    interval is an hour); the clock starts when one drain message is sent, and stops at the event
    of the last report. Reports are drained by the worker processes (worker.reports.Drainer,
    50 pages per drain message) and processed by worker.reports.Processor in the same workers.
    """
    env = {**(env or {}), "SMS_REPORTS_DRAIN_INTERVAL_S": "3600"}
    with BenchStack(env=env, sandbox_flags=("--report-delay-ms", "0")) as stack:
        stack.start_ours(workers)
        sent = run_ours(stack, n)
        result = drain_reports(stack, n, timeout_s=timeout_s)
    result["ok"] = result["ok"] and sent["ok"]
    return result


def drain_reports(stack: BenchStack, n: int, timeout_s: float = 600) -> dict[str, Any]:
    """Once the sandbox holds `n` unfetched reports: one drain message, then wait for `n` report events."""
    wait_until(lambda: stack.sandbox.stats()["reports"]["generated"] >= n, 120, "the sandbox's reports",
               interval_s=0.1)
    events = stack.store.events
    before = int(stack.client.xlen(events))
    meter = CpuMeter({k: v for k, v in stack.components().items() if k != "producer"})
    meter.start()
    t0 = time.time()
    stack.triggers().send(DRAIN_REPORTS)
    drained_s = None
    deadline = time.monotonic() + timeout_s
    while int(stack.client.xlen(events)) < before + n:
        if drained_s is None and stack.sandbox.stats()["reports"]["fetched"] >= n:
            drained_s = time.time() - t0
        if time.monotonic() > deadline:
            print(stack.dev.logs())
            raise TimeoutError(f"{n} report events did not appear in {timeout_s:g} s")
        time.sleep(0.05)
    cpu = meter.stop()
    seconds = max(stack.nth_event_ms(events, before + n) / 1000 - t0, 1e-3)
    types = _event_types(stack, events, skip=before)
    fetched = stack.sandbox.stats()["reports"]["fetched"]
    return {
        "reports": n, "seconds": round(seconds, 3), "rate": round(n / seconds, 1),
        "drain_s": round(drained_s, 3) if drained_s is not None else round(seconds, 3),
        "cpu_us_per_report": _per_message_us(cpu, n),
        "cpu_ceiling_rate": _ceiling(cpu, n),
        "event_types": dict(types),
        "ok": fetched == n and sum(types.values()) == n and set(types) <= REPORT_GROUPS,
    }


# --- scenario 7: the traffic policy's cost --------------------------------------------------------------

# Scenario 1's lanes without any guard (the bulk lane checks the suppression list by default).
GUARDS_OFF: dict[str, Any] = {
    "otp": {"batch_size": 100, "max_wait_ms": 0, "concurrency": 2, "block_number_types": []},
    "bulk": {"batch_size": 1000, "max_wait_ms": 250, "concurrency": 8, "suppression": False},
}
# Every guard on the bulk lane, none of them refusing a job of `jobs()`: each number gets one message
# (per-number limit 5), each 1000-number range at most 1000 (`jobs` numbers are sequential), all Swiss
# mobiles (allow-list CH; premium-rate and shared-cost blocked), one part of GSM-7, caps far away, and
# the suppression list holds numbers none of them has.
GUARDS_ON: dict[str, Any] = {
    "otp": GUARDS_OFF["otp"],
    "bulk": {"batch_size": 1000, "max_wait_ms": 250, "concurrency": 8, "suppression": True,
             "velocity": {"per_number": {"limit": 5, "window_s": 3600},
                          "per_prefix": {"digits_dropped": 3, "limit": 1000, "window_s": 3600}},
             "countries": {"allow": ["CH"]}, "block_number_types": ["PREMIUM_RATE", "SHARED_COST"],
             "max_parts": 3, "allow_ucs2": False,
             "daily_cap": {"messages": 1_000_000_000, "parts": 1_000_000_000}},
}
SUPPRESS_CHUNK = 10_000


def suppress(stack: BenchStack, n: int) -> float:
    """Put `n` numbers on the suppression list (none of them a `jobs()` number); seconds taken."""
    t0 = time.time()
    for start in range(0, n, SUPPRESS_CHUNK):
        stack.store.suppress([f"4176{i:07d}" for i in range(start, min(n, start + SUPPRESS_CHUNK))])
    return time.time() - t0


def guards(n: int, workers: int = 2, env: dict[str, str] | None = None, suppressed: int = 1_000_000,
           on_first: bool = False) -> dict[str, Any]:
    """Scenario 7: scenario 1's run with every guard off and on, on the same Redis (its suppression
    list of `suppressed` numbers loaded for both) and sandbox, in the order off, on, on, off (or on,
    off, off, on): this machine is shared, and its speed drifts within a repetition by as much as the
    guards cost; around the middle, a drift adds as much to each side. Each run has `n` messages of
    numbers of their own (so no velocity rule refuses a job), each side is the two runs pooled, and
    the ratio is within this repetition."""
    order = ("on", "off") if on_first else ("off", "on")
    with BenchStack(env=env) as stack:
        load_s = suppress(stack, suppressed)
        done: dict[str, list[dict[str, Any]]] = {"off": [], "on": []}
        for k, name in enumerate((*order, *reversed(order))):
            stack.dev.env["SMS_LANES"] = orjson.dumps(GUARDS_ON if name == "on" else GUARDS_OFF).decode()
            stack.sandbox.reset()
            stack.start_ours(workers)
            done[name].append(run_ours(stack, n, start=k * n))
            keep_logs_of_a_stall(stack, done[name][-1], f"7-{name}")
            stack.stop_workers()
    runs: dict[str, Any] = {"suppressed": suppressed, "suppress_load_s": round(load_s, 2), "order": order,
                            "off": _pooled(done["off"]), "on": _pooled(done["on"])}
    runs["ratio"] = round(runs["on"]["rate"] / runs["off"]["rate"], 3)
    runs["cpu_ratio"] = round(runs["on"]["cpu_us_per_msg_total"] / runs["off"]["cpu_us_per_msg_total"], 3)
    return runs


# A run this much slower than its expected seconds waited on something (a batch left ambiguous
# waits minutes for the provider's logs, by design): the logs say what, so they are kept.
STALL_S = 30.0
STALL_LOGS = Path(__file__).resolve().parent / "results"


def keep_logs_of_a_stall(stack: BenchStack, run: dict[str, Any], label: str) -> None:
    """Copy every process's whole log of a stalled run next to the results (`run["stall_logs"]`)."""
    if run["seconds"] <= STALL_S:
        return
    folder = STALL_LOGS / f"stall-{time.strftime('%Y%m%dT%H%M%S')}-{label}"
    folder.mkdir(parents=True, exist_ok=True)
    for proc in stack.dev.procs:
        shutil.copyfile(proc.log_path, folder / proc.log_path.name)
    run["stall_logs"] = str(folder)
    print(f"a run took {run['seconds']:.0f} s: its logs are in {folder}", flush=True)


def _pooled(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Runs of one configuration as one: messages over seconds, CPU per message over all of them."""
    messages = sum(p["messages"] for p in parts)
    seconds = sum(p["seconds"] for p in parts)
    cpu = {name: round(sum(p["cpu_us_per_msg"][name] * p["messages"] for p in parts) / messages, 2)
           for name in parts[0]["cpu_us_per_msg"]}
    return {"messages": messages, "seconds": round(seconds, 3), "rate": round(messages / seconds, 1),
            "cpu_us_per_msg": cpu, "cpu_us_per_msg_total": round(sum(cpu.values()), 2),
            "ok": all(p["ok"] for p in parts), "runs": parts}
