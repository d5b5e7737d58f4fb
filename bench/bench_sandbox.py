"""Sandbox capacity: messages/s accepted in 1000-message bulk POSTs from several keep-alive client processes.

Usage (from the repo root):

    .venv/bin/python bench/bench_sandbox.py                   # 3 clients x 100 bulks of 1000, reports off
    .venv/bin/python bench/bench_sandbox.py --with-reports    # default 200 ms report delay: generation included

Without --with-reports the report delay is one hour, so report generation stays out of the measured
window; with it, every accepted message also gets its delivery report generated during the run.
"""

from __future__ import annotations

import argparse
import multiprocessing
import multiprocessing.synchronize
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson

from worker.devtools.sandbox import SandboxConfig, SandboxProcess

API_KEY = "bench-key"
_TEXTS = (
    "Your verification code is {n}. It expires in 10 minutes.",
    "Hi! Your order #{n} has shipped and will arrive tomorrow.",
    "Reminder: appointment on Friday at 10:00. Reply STOP to opt out. Ref {n}",
)


@dataclass(frozen=True)
class ClientJob:
    """What one client process sends."""

    url: str
    client: int
    bulks: int
    bulk_size: int


def build_bodies(job: ClientJob) -> list[bytes]:
    """Pre-serialised bulk bodies with unique messageIds, so the timed loop only does HTTP."""
    bodies = []
    for bulk in range(job.bulks):
        messages = []
        for i in range(job.bulk_size):
            n = (bulk * job.bulk_size + i) * 7 + job.client
            messages.append(
                {
                    "sender": "ACME",
                    "destinations": [{"to": f"4179{n % 10_000_000:07d}", "messageId": f"c{job.client}-{bulk}-{i}"}],
                    "content": {"text": _TEXTS[n % len(_TEXTS)].format(n=n)},
                }
            )
        bodies.append(
            orjson.dumps({"messages": messages, "options": {"schedule": {"bulkId": f"c{job.client}-{bulk}"}}})
        )
    return bodies


def run_client(job: ClientJob, ready: Any, start: multiprocessing.synchronize.Event, results: Any) -> None:
    """Send every bulk over one keep-alive connection; report (accepted, failures)."""
    bodies = build_bodies(job)
    headers = {"Authorization": f"App {API_KEY}", "Content-Type": "application/json"}
    failures = 0
    with httpx.Client(base_url=job.url, trust_env=False, timeout=30.0, headers=headers) as client:
        client.get("/_sandbox/stats")  # open the connection before the clock starts
        ready.put(job.client)
        start.wait()
        for body in bodies:
            response = client.post("/sms/3/messages", content=body)
            if response.status_code != 200:
                failures += 1
    results.put((job.client, failures))


def cpu_seconds(pid: int | None) -> float:
    """User+system CPU seconds a local process has used (0 when unknown)."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int | None) -> float:
    """Resident memory of a local process in MiB (0 when unknown)."""
    if pid is None:
        return 0.0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def measure(
    url: str, args: argparse.Namespace, pid: int | None = None
) -> tuple[int, int, float, float, dict[str, Any]]:
    """Run the clients against `url`; returns (accepted, failed requests, seconds, server CPU s, stats)."""
    context = multiprocessing.get_context("spawn")
    ready, results = context.Queue(), context.Queue()
    start = context.Event()
    jobs = [ClientJob(url, c, args.bulks, args.bulk_size) for c in range(args.clients)]
    procs = [context.Process(target=run_client, args=(job, ready, start, results)) for job in jobs]
    for proc in procs:
        proc.start()
    with httpx.Client(base_url=url, trust_env=False, timeout=10.0) as admin:
        for _ in procs:
            ready.get(timeout=120)
        before = admin.get("/_sandbox/stats").json()["messages_accepted"]
        cpu_before = cpu_seconds(pid)
        began = time.perf_counter()
        start.set()
        failures = sum(results.get(timeout=600)[1] for _ in procs)
        elapsed = time.perf_counter() - began
        server_cpu = cpu_seconds(pid) - cpu_before
        for proc in procs:
            proc.join(timeout=30)
        stats: dict[str, Any] = admin.get("/_sandbox/stats").json()
        stats["rss_mb"] = rss_mb(pid)
    return stats["messages_accepted"] - before, failures, elapsed, server_cpu, stats


def main() -> None:
    """Run the benchmark and print messages/s."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--bulks", type=int, default=100, help="bulks per client")
    parser.add_argument("--bulk-size", type=int, default=1000)
    parser.add_argument("--with-reports", action="store_true", help="keep the 200 ms report delay")
    parser.add_argument("--url", help="use an already running sandbox (its key must be bench-key)")
    parser.add_argument("--pid", type=int, help="with --url: the sandbox's pid, to report its CPU use")
    args = parser.parse_args()

    if args.url:
        accepted, failures, elapsed, server_cpu, stats = measure(args.url, args, args.pid)
    else:
        config = SandboxConfig(report_delay_ms=200.0 if args.with_reports else 3_600_000.0)
        with SandboxProcess(api_key=API_KEY, config=config) as sandbox:
            accepted, failures, elapsed, server_cpu, stats = measure(sandbox.url, args, sandbox.pid)
    total = args.clients * args.bulks * args.bulk_size
    print(
        f"clients={args.clients} bulks={args.clients * args.bulks} bulk_size={args.bulk_size} "
        f"reports={'on (200 ms)' if args.with_reports else 'off (1 h delay)'}"
    )
    print(
        f"sent={total} accepted={accepted} failed_requests={failures} reports_generated={stats['reports']['generated']}"
    )
    print(
        f"elapsed={elapsed:.2f}s  rate={accepted / elapsed:,.0f} messages/s  "
        f"({accepted / elapsed / args.bulk_size:.0f} req/s)"
    )
    if server_cpu:
        print(
            f"sandbox CPU: {server_cpu:.2f}s = {server_cpu / elapsed:.0%} of one core; "
            f"{server_cpu / max(accepted, 1) * 1e6:.2f} us per message; "
            f"RSS {stats['rss_mb']:.0f} MiB after {stats['messages_accepted']} messages"
        )


if __name__ == "__main__":
    main()
