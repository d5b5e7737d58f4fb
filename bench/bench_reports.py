"""Report processing rate: reports/s from the raw stream to status events (parse, fetch, apply, events).

Usage (from the repo root):

    .venv/bin/python bench/bench_reports.py                       # 200k reports, pages of 1000, 1 processor
    .venv/bin/python bench/bench_reports.py --page-size 100       # webhook-sized pages (the default bucket)
    .venv/bin/python bench/bench_reports.py --processors 2 --threads 2   # 2 processes x 2 threads
    .venv/bin/python bench/bench_reports.py --drain --reports 50000      # GET /sms/3/reports -> events

A private redis-server is started on a free loopback port. The message hashes (state ACCEPTED, a
producer job, as the dispatcher leaves them) and the raw pages (shaped like the sandbox's reports)
are written before the clock starts; the timed window is `Processor.process()` until the stream
is empty, and every report must have produced exactly one event. The CPU seconds of redis-server
and of the processors are printed too: on a shared machine they are steadier than the wall clock.

With --drain, the sandbox generates the reports instead (messages sent to it directly), and the
timed window runs `Drainer.drain()` (GET pages of 1000, appended to the raw stream) in one thread
while the processors apply them, until every report has its event.
"""

from __future__ import annotations

import argparse
import multiprocessing
import threading
import time
from typing import Any

import httpx
import orjson
import redis
from pydantic import SecretStr

from worker.devtools.devstack import DevStack
from worker.reports import ProcessConfig, Processor
from worker.settings import Settings
from worker.store import Store, connect

OUTCOMES = (
    ({"groupId": 3, "groupName": "DELIVERED", "id": 5, "name": "DELIVERED_TO_HANDSET",
      "description": "Message delivered to handset"},
     {"groupId": 0, "groupName": "OK", "id": 0, "name": "NO_ERROR", "description": "No Error", "permanent": False}),
    ({"groupId": 2, "groupName": "UNDELIVERABLE", "id": 4, "name": "UNDELIVERABLE_REJECTED_OPERATOR",
      "description": "Message rejected by operator"},
     {"groupId": 1, "groupName": "HANDSET_ERRORS", "id": 1, "name": "EC_UNKNOWN_SUBSCRIBER",
      "description": "Unknown subscriber", "permanent": True}),
)


def _report(mid: str, n: int) -> dict[str, Any]:
    status, error = OUTCOMES[0] if n % 20 else OUTCOMES[1]
    return {
        "bulkId": f"bulk-{n // 1000}", "messageId": mid, "to": f"4179{n % 10_000_000:07d}",
        "sentAt": "2026-11-27T10:00:00.000+0000", "doneAt": "2026-11-27T10:00:01.000+0000", "messageCount": 1,
        "price": {"pricePerMessage": 0.01, "currency": "EUR"}, "status": status, "error": error, "mccMnc": "22801",
    }


def prepare(store: Store, n: int, page_size: int, *, raw_pages: bool = True) -> None:
    pipe = store.r.pipeline(transaction=False)
    for i in range(n):
        mid = f"sw-bulk-{1764230000000 + i}-0"
        job = orjson.dumps({"to": f"4179{i % 10_000_000:07d}", "text": "Your order shipped", "id": f"order-{i}",
                            "metadata": {"order": i, "shop": "eu-1"}})
        pipe.hset(store.msg(mid), mapping={"state": "ACCEPTED", "lane": "bulk", "job": job,
                                           "bulk_id": f"bulk-{i // 1000}", "attempts": 1})
        pipe.zadd(store.awaiting, {mid: 4_000_000_000_000})
        if i % 5000 == 4999:
            pipe.execute()
    pipe.execute()
    if not raw_pages:
        return
    for start in range(0, n, page_size):
        page = [_report(f"sw-bulk-{1764230000000 + i}-0", i) for i in range(start, min(n, start + page_size))]
        pipe.xadd(store.reports_raw, {"page": orjson.dumps({"results": page}), "src": "drain"})
        if start % (page_size * 50) == 0:
            pipe.execute()
    pipe.execute()


def run_processor(redis_url: str, index: int, threads: int, start_at: float, out: Any) -> None:
    settings = Settings(redis_url=redis_url, icomm_api_key=SecretStr("bench"), log_level="WARNING")
    from worker import logs

    logs.configure(fmt="json", level="WARNING")
    store = Store(connect(redis_url))  # one pool per process, shared by its threads (as in a worker)
    config = ProcessConfig.from_settings(settings)
    processors = [Processor(config, store, consumer=f"bench-{index}") for _ in range(threads)]
    processors[0]._ensure_group()
    applied: list[int] = []

    def run(processor: Processor) -> None:
        applied.append(processor.process(budget_s=3600).applied)

    while time.time() < start_at:
        time.sleep(0.001)  # a start line, so all processors begin together
    began, cpu = time.perf_counter(), time.process_time()
    pool = [threading.Thread(target=run, args=(p,)) for p in processors]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    out.put((index, sum(applied), time.perf_counter() - began, time.process_time() - cpu))


def run_drain(args: argparse.Namespace) -> None:
    from worker.devtools.sandbox import SandboxConfig, SandboxProcess
    from worker.provider import Provider, ProviderConfig
    from worker.reports import DrainConfig, Drainer

    with DevStack() as stack, SandboxProcess(api_key="bench-key", config=SandboxConfig(report_delay_ms=0)) as sbx:
        url = stack.start_redis()
        store = Store(connect(url))
        settings = Settings(redis_url=url, icomm_base_url=sbx.url, icomm_api_key=SecretStr("bench-key"),
                            log_level="WARNING")
        from worker import logs

        logs.configure(fmt="json", level="WARNING")
        print(f"sending {args.reports} SMS to the sandbox and writing their message hashes ...")
        prepare(store, args.reports, args.page_size, raw_pages=False)
        with httpx.Client(base_url=sbx.url, headers=sbx.auth_header, timeout=30) as client:
            for start in range(0, args.reports, 1000):
                messages = [{"destinations": [{"to": f"4179{i % 10_000_000:07d}",
                                               "messageId": f"sw-bulk-{1764230000000 + i}-0"}],
                             "content": {"text": "Your order shipped"}}
                            for i in range(start, min(args.reports, start + 1000))]
                client.post("/sms/3/messages", json={"messages": messages}).raise_for_status()
        while sbx.stats()["reports"]["generated"] < args.reports:
            time.sleep(0.05)
        config = ProcessConfig.from_settings(settings)
        processors = [Processor(config, store, consumer=f"bench-{i}") for i in range(args.threads)]
        processors[0]._ensure_group()
        done = threading.Event()

        def process(processor: Processor) -> None:
            while not done.is_set():
                if not processor.process(budget_s=3600).reports:
                    time.sleep(0.001)

        began = time.perf_counter()
        pool = [threading.Thread(target=process, args=(p,)) for p in processors]
        for t in pool:
            t.start()
        with Provider(ProviderConfig.from_settings(settings)) as provider:
            drained = Drainer(DrainConfig.from_settings(settings), store, provider,
                              max_pages=args.reports // 1000 + 2).drain()
        drained_s = time.perf_counter() - began
        while store.r.xlen(store.events) < args.reports:
            time.sleep(0.001)
        wall = time.perf_counter() - began
        done.set()
        for t in pool:
            t.join()
        print(f"{args.reports} reports drained ({drained.pages} pages, {drained_s:.2f} s) and processed by "
              f"{args.threads} thread(s): {wall:.2f} s -> {args.reports / wall:,.0f} reports/s from GET to events "
              f"(events {store.r.xlen(store.events)})")
        store.r.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reports", type=int, default=200_000)
    parser.add_argument("--page-size", type=int, default=1000)
    parser.add_argument("--processors", type=int, default=1, help="processes")
    parser.add_argument("--threads", type=int, default=1, help="processor threads per process")
    parser.add_argument("--drain", action="store_true", help="from the sandbox's reports endpoint to events")
    args = parser.parse_args()
    if args.drain:
        run_drain(args)
        return

    with DevStack() as stack:
        url = stack.start_redis()
        store = Store(connect(url))
        print(f"preparing {args.reports} message hashes and {args.reports // args.page_size} raw pages ...")
        prepare(store, args.reports, args.page_size)
        queue: Any = multiprocessing.Queue()
        start_at = time.time() + 1.0
        procs = [multiprocessing.Process(target=run_processor, args=(url, i, args.threads, start_at, queue))
                 for i in range(args.processors)]
        cpu_before = store.r.info("cpu")
        for p in procs:
            p.start()
        results = [queue.get(timeout=600) for _ in procs]
        cpu_after = store.r.info("cpu")
        redis_cpu = sum(cpu_after[k] - cpu_before[k] for k in ("used_cpu_user", "used_cpu_sys"))
        for p in procs:
            p.join()
        wall = max(r[2] for r in results)
        applied = sum(r[1] for r in results)
        events = store.r.xlen(store.events)
        left = store.r.xlen(store.reports_raw)
        ids = set()
        for _, fields in store.r.xrange(store.events, "-", "+"):
            ids.add(orjson.loads(fields[b"event"])["event_id"])
        ok = applied == events == len(ids) == args.reports and left == 0
        print(f"{args.reports} reports in pages of {args.page_size}, "
              f"{args.processors} process(es) x {args.threads} thread(s): "
              f"{wall:.2f} s -> {args.reports / wall:,.0f} reports/s "
              f"(events {events}, distinct event_ids {len(ids)}, raw entries left {left}; "
              f"CPU: redis-server {redis_cpu:.2f} s, processors {sum(r[3] for r in results):.2f} s) "
              f"{'OK' if ok else 'MISMATCH'}")
        redis_us = redis_cpu / args.reports * 1e6
        python_us = sum(r[3] for r in results) / args.reports * 1e6
        print(f"CPU per report: redis-server {redis_us:.1f} us + processors {python_us:.1f} us; cores used "
              f"{(redis_cpu + sum(r[3] for r in results)) / wall:.2f}; with 2 idle cores the ceiling is about "
              f"{2e6 / (redis_us + python_us):,.0f} reports/s")
        store.r.close()
        if not ok:
            raise SystemExit(1)


if __name__ == "__main__":
    try:
        main()
    except redis.ConnectionError as error:
        raise SystemExit(f"redis: {error}") from None
