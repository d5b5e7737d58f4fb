"""`sms-worker demo`: the whole system on this machine, a few thousand SMS, and what became of them.

Starts a private Redis, the sandbox (with a small fault mix), two workers, the clock and the web
process; enqueues SMS in both lanes (and a few broken jobs the way a careless producer would
write them with plain Redis commands); shows a progress bar until every message has its final
status; prints the counts by status and the sandbox's duplicate count; stops everything.
"""

from __future__ import annotations

import random
import secrets
import time
from collections import Counter
from typing import Any

import httpx
import orjson
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from worker.devstack import DevStack, free_port
from worker.outbox import Outbox
from worker.runtime import make_broker
from worker.settings import settings_from_env
from worker.store import Store, connect
from worker.triggers import Triggers

FINAL = {"delivered", "undeliverable", "expired", "rejected", "failed"}
TIMEOUT_S = 120


def _jobs(n: int, rng: random.Random) -> list[tuple[str, dict[str, Any]]]:
    jobs = []
    for i in range(n):
        lane = "otp" if i % 10 == 0 else "bulk"
        text = f"Your code is {rng.randint(100000, 999999)}" if lane == "otp" else f"Hello #{i}, your order shipped"
        jobs.append((lane, {"to": f"4179{rng.randint(0, 9_999_999):07d}", "text": text, "id": f"demo-{i}",
                            "metadata": {"n": i}}))
    return jobs


def run_demo(messages: int = 3000, keep_logs: bool = False) -> int:
    console = Console(stderr=True)
    rng = random.Random(7)
    api_key = f"demo-{secrets.token_hex(8)}"
    web_port = free_port()
    secret = secrets.token_hex(16)
    env = {
        "LOG_FORMAT": "json",
        "LOG_LEVEL": "WARNING",
        # Short timeouts so "accept then time out" faults resolve within the demo.
        "ICOMM_READ_TIMEOUT_S": "1", "ICOMM_CONNECT_TIMEOUT_S": "1", "ICOMM_WRITE_TIMEOUT_S": "1",
        "ICOMM_RETRY_BACKOFF_BASE_S": "0.05", "ICOMM_RETRY_BACKOFF_MAX_S": "0.5", "ICOMM_SEND_RETRY_ATTEMPTS": "3",
        "SMS_LEASE_S": "15", "SMS_RECONCILE_DELAY_S": "1", "SMS_OUTAGE_PAUSE_S": "1",
        "SMS_DISPATCH_TICK_MS": "200", "SMS_REPORTS_DRAIN_INTERVAL_S": "1", "SMS_LOGS_RATE_PER_MIN": "600",
        "SMS_WEBHOOK_PUBLIC_URL": f"http://127.0.0.1:{web_port}", "SMS_WEBHOOK_SECRET": secret,
        "SMS_WEBHOOK_AUTH": "basic",
        # Small bulks, so the sandbox's fault mix touches a fair number of requests.
        "SMS_LANES": '{"otp":{"batch_size":20,"max_wait_ms":0},"bulk":{"batch_size":100,"max_wait_ms":100}}',
    }
    started = time.monotonic()
    with DevStack(env=env) as stack:
        with console.status("starting Redis, the sandbox, 2 workers, the clock and the web process"):
            redis_url = stack.start_redis()
            sandbox = stack.start_sandbox(
                api_key, "--seed", "7", "--report-delay-ms", "300", "--rate-429", "0.05",
                "--retry-after-share", "0.5", "--error-5xx-rate", "0.04", "--accept-then-timeout-rate", "0.03",
                "--timeout-delay-ms", "1500",
            )
            stack.start_worker("worker-1")
            stack.start_worker("worker-2")
            stack.start_clock()
            stack.start_web(web_port)
        settings = settings_from_env(stack.env)
        client: Any = connect(redis_url)
        store = Store(client, settings.sms_key_prefix, settings.sms_message_id_prefix)
        broker, _ = make_broker(settings)
        triggers = Triggers(store, broker)
        outbox = Outbox(settings, store, wake=triggers.dispatch)

        jobs = _jobs(messages, rng)
        # A careless producer writing plain Redis commands: these end in dead letters with a reason.
        broken = [b"not json", b'{"to":"12","text":"bad number"}', b'{"to":"41790000000"}']
        for raw in broken:
            client.xadd(store.outbox("bulk"), {"job": raw})
        total = len(jobs) + len(broken)
        for lane in ("otp", "bulk"):
            outbox.enqueue_many([job for jl, job in jobs if jl == lane], lane)
        triggers.dispatch("bulk")

        last: dict[str, str] = {}
        cursor = "0-0"
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=console) as progress:
            sent = progress.add_task("sent to the provider", total=total)
            final = progress.add_task("final status", total=total)
            deadline = time.monotonic() + TIMEOUT_S
            while time.monotonic() < deadline:
                for _stream, items in client.xread({store.events: cursor}, count=5000, block=200) or []:
                    for entry_id, fields in items:
                        cursor = entry_id.decode()
                        event = orjson.loads(fields[b"event"])
                        if last.get(event["message_id"]) not in FINAL:
                            last[event["message_id"]] = event["type"]
                progress.update(sent, completed=len(last))
                progress.update(final, completed=sum(1 for t in last.values() if t in FINAL))
                if len(last) >= total and all(t in FINAL for t in last.values()):
                    break
        stats = httpx.get(f"{sandbox}/_sandbox/stats", timeout=5).json()
        counts = Counter(last.values())
        faults = ", ".join(f"{k} {v}" for k, v in sorted(stats.get("faults", {}).items())) or "none"
        table = Table(title=f"{total} SMS in {time.monotonic() - started:.1f} s",
                      caption=f"{messages} queued through the API + {len(broken)} broken jobs written with "
                              f"plain XADD; sandbox faults injected: {faults}")
        table.add_column("final status")
        table.add_column("messages", justify="right")
        for status, n in sorted(counts.items(), key=lambda kv: -kv[1]):
            table.add_row(status, str(n))
        table.add_row("no status yet", str(total - len(last)))
        table.add_section()
        table.add_row("sent twice (sandbox duplicates)", str(stats.get("duplicates", "?")))
        table.add_row("dead letters", str(client.xlen(store.dlq)))
        Console().print(table)
        if keep_logs:
            console.print(f"process logs: {stack.log_dir}")
        ok = len(last) == total and all(t in FINAL for t in last.values()) and stats.get("duplicates") == 0
        client.close()
    return 0 if ok else 1
