"""Where the time goes: py-spy samples the worker processes, Redis's SLOWLOG times every script call.

    .venv/bin/pip install py-spy                        # optional; the harness itself never needs it
    .venv/bin/python -m bench.profile                   # scenario 1, our pipeline, 100,000 SMS
    .venv/bin/python -m bench.profile --what baseline   # the baseline design, 5,000 SMS
    .venv/bin/python -m bench.profile --what reports    # scenario 5, 100,000 reports

py-spy records collapsed stacks (`--format raw --gil`: only samples holding the GIL, i.e. Python
CPU) of every forked worker process. The summary gives per module group, and per function, the
share of samples where it is on top of the stack (self) and anywhere on it (inclusive). Redis's
side: with `slowlog-log-slower-than 0` every top-level command is logged with its duration, and
EVALSHA calls are named by script (worker/lua/*.lua, dramatiq's dispatch.lua), so the table
shows Redis time per script per message and the longest calls (which every other client, the
otp lane's included, waits behind). The raw files stay in bench/results/ for speedscope or
flamegraph.pl.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from bench import scenarios
from bench.system import NO_REPORTS, BenchStack

RESULTS = Path(__file__).resolve().parent / "results"
# Calls under this many us are not logged: it keeps the log small (Redis 7 also logs the commands a
# script runs, each a few us) while every script call and every slow command is kept.
SLOWLOG_MIN_US = 20
SLOWLOG_LEN = 200_000

# (substring of a frame, group name); the first match from the top of the stack names the sample.
GROUPS = (
    ("idle", "idle (waiting for work)"),
    ("read_replies", "Redis round trips (socket wait + hiredis parse)"),
    ("redis/", "Redis round trips (redis-py)"),
    ("hiredis", "Redis round trips (hiredis pack/parse)"),
    ("httpcore", "HTTP (httpx/httpcore)"),
    ("httpx", "HTTP (httpx/httpcore)"),
    ("h11", "HTTP (httpx/httpcore)"),
    ("structlog", "logging (structlog)"),
    ("logging", "logging (structlog)"),
    ("orjson", "JSON"),
    ("events.py", "event building (worker/events.py)"),
    ("reports/", "report parsing and planning (worker/reports/)"),
    ("ratelimit.py", "rate limiter (worker/ratelimit.py)"),
    ("metrics.py", "metrics (worker/metrics.py)"),
    ("prometheus", "metrics (worker/metrics.py)"),
    ("provider/", "wire request/response (worker/provider/)"),
    ("dispatch/", "dispatch logic (worker/dispatch/)"),
    ("store.py", "Redis arguments (worker/store.py)"),
    ("dramatiq", "dramatiq"),
)
_IDLE_TOPS = ("wait (threading.py", "select (", "poll (", "_worker (", "sleep", "get (queue.py",
              "epoll", "accept (")


def parse_raw(lines: Iterable[str]) -> Counter[tuple[str, ...]]:
    """py-spy raw output: `frame;frame;...;leaf count` per line -> stack tuple (root first) -> samples."""
    stacks: Counter[tuple[str, ...]] = Counter()
    for line in lines:
        line = line.rstrip()
        if not line:
            continue
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        stacks[tuple(stack.split(";"))] += int(count)
    return stacks


def _idle(stack: tuple[str, ...]) -> bool:
    return any(stack[-1].startswith(top) or top in stack[-1] for top in _IDLE_TOPS)


def summarise(stacks: Counter[tuple[str, ...]], top: int = 25) -> str:
    """Text summary: busy share, top self and inclusive functions, and module groups (busy samples only)."""
    total = sum(stacks.values())
    busy = Counter({s: c for s, c in stacks.items() if not _idle(s)})
    n = sum(busy.values()) or 1
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    groups: Counter[str] = Counter()
    for stack, count in busy.items():
        own[stack[-1]] += count
        for frame in set(stack):
            inclusive[frame] += count
        for frame in reversed(stack):
            name = next((g for key, g in GROUPS if key in frame), None)
            if name is not None:
                groups[name] += count
                break
        else:
            groups["other"] += count
    lines = [f"samples: {total}, busy (not waiting for work): {sum(busy.values())} "
             f"({sum(busy.values()) / max(total, 1):.0%})", "", "by group (share of busy samples):"]
    lines += [f"  {c / n:6.1%}  {g}" for g, c in groups.most_common()]
    lines += ["", f"top {top} self (share of busy samples):"]
    lines += [f"  {c / n:6.1%}  {f}" for f, c in own.most_common(top)]
    lines += ["", f"top {top} inclusive (share of busy samples):"]
    lines += [f"  {c / n:6.1%}  {f}" for f, c in inclusive.most_common(top + 10)
              if "<module>" not in f and "_bootstrap" not in f and "run (threading" not in f][:top]
    return "\n".join(lines)


def record(pids: list[int], out_dir: Path, rate_hz: int, tag: str) -> list[tuple[subprocess.Popen[bytes], Path]]:
    binary = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(binary).exists():
        raise SystemExit("py-spy is not installed: .venv/bin/pip install py-spy")
    running = []
    for pid in pids:
        path = out_dir / f"{tag}-worker-{pid}.txt"
        argv = [binary, "record", "--pid", str(pid), "--format", "raw", "--rate", str(rate_hz), "--gil",
                "--output", str(path)]
        running.append((subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), path))
    time.sleep(1.0)  # py-spy attaches asynchronously
    return running


def stop(running: list[tuple[subprocess.Popen[bytes], Path]]) -> list[Path]:
    paths = []
    for proc, path in running:
        proc.send_signal(2)  # SIGINT: py-spy writes its output and exits
        proc.wait(timeout=30)
        paths.append(path)
    return paths


def script_names() -> dict[str, str]:
    """EVALSHA sha -> script name, for our Lua scripts and dramatiq's."""
    import dramatiq.brokers.redis as dramatiq_redis

    names = {}
    lua = Path(__file__).resolve().parent.parent / "worker" / "lua"
    for path in lua.glob("*.lua"):
        names[hashlib.sha1(path.read_bytes()).hexdigest()] = path.stem  # noqa: S324 -- Redis names scripts by SHA-1
    for path in (Path(dramatiq_redis.__file__).parent / "redis").glob("*.lua"):
        names[hashlib.sha1(path.read_bytes()).hexdigest()] = f"dramatiq:{path.stem}"  # noqa: S324
    return names


def start_slowlog(stack: BenchStack) -> None:
    stack.client.config_set("slowlog-log-slower-than", SLOWLOG_MIN_US)
    stack.client.config_set("slowlog-max-len", SLOWLOG_LEN)
    stack.client.slowlog_reset()


def redis_summary(stack: BenchStack, messages: int) -> str:
    """Redis time per script (and per slow plain command) per message, and the longest calls."""
    entries = stack.client.slowlog_get(SLOWLOG_LEN)
    stack.client.config_set("slowlog-log-slower-than", 10_000)
    names = script_names()
    calls: dict[str, list[int]] = {}
    for entry in entries:
        command = entry["command"]
        parts = (command.decode(errors="replace") if isinstance(command, bytes) else str(command)).split(" ")
        name = parts[0].lower()
        if name in ("evalsha", "eval") and len(parts) > 1:
            name = "script " + names.get(parts[1], parts[1][:8])
        calls.setdefault(name, []).append(int(entry["duration"]))
    scripts = sum(sum(d) for name, d in calls.items() if name.startswith("script ")) or 1
    lines = [f"Redis SLOWLOG (calls of {SLOWLOG_MIN_US} us or more; {len(entries)} logged"
             f"{', log full: the oldest were dropped' if len(entries) >= SLOWLOG_LEN else ''}): "
             f"scripts took {scripts / 1e6:.2f} s, {scripts / max(messages, 1):.1f} us per message "
             "(wall time inside Redis, so it includes preemption on a busy machine)",
             f"  {'script / command':32s} {'calls':>7s} {'us/msg':>7s} {'of scripts':>10s} {'p50 us':>7s} "
             f"{'max us':>7s}"]
    for name, durations in sorted(calls.items(), key=lambda kv: -sum(kv[1]))[:15]:
        durations.sort()
        share = f"{sum(durations) / scripts:.1%}" if name.startswith("script ") else "(inside)"
        lines.append(f"  {name:32s} {len(durations):7d} {sum(durations) / max(messages, 1):7.2f} {share:>10s} "
                     f"{durations[len(durations) // 2]:7d} {durations[-1]:7d}")
    long_calls = [d for name, ds in calls.items() if name.startswith("script ") for d in ds if d >= 5_000]
    lines.append(f"  script calls of 5 ms or more: {len(long_calls)}, {sum(long_calls) / 1e6:.2f} s in all "
                 "(Redis serves nobody else meanwhile: the otp lane's commands wait behind them)")
    lines.append("  (plain commands marked `(inside)` are mostly run by the scripts above: Redis 7 logs both)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--what", choices=("ours", "baseline", "reports"), default="ours")
    parser.add_argument("--messages", type=int, help="SMS (or reports); default 100,000 (baseline: 5,000)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)
    n = args.messages or (5_000 if args.what == "baseline" else 100_000)
    RESULTS.mkdir(parents=True, exist_ok=True)
    tag = f"{time.strftime('%Y%m%dT%H%M%S')}-{args.what}"
    env = {"SMS_REPORTS_DRAIN_INTERVAL_S": "3600"} if args.what == "reports" else {}
    flags = ("--report-delay-ms", "0") if args.what == "reports" else NO_REPORTS
    with BenchStack(env=env, sandbox_flags=flags) as stack:
        if args.what == "baseline":
            stack.start_baseline(args.workers)
            start_slowlog(stack)
            running = record(stack.worker_children(), RESULTS, args.rate, tag)
            result = scenarios.run_baseline_started(stack, n)
        elif args.what == "ours":
            stack.start_ours(args.workers)
            start_slowlog(stack)
            running = record(stack.worker_children(), RESULTS, args.rate, tag)
            result = scenarios.run_ours(stack, n)
        else:
            stack.start_ours(args.workers)
            scenarios.run_ours(stack, n)
            start_slowlog(stack)
            running = record(stack.worker_children(), RESULTS, args.rate, tag)
            result = scenarios.drain_reports(stack, n)
        paths = stop(running)
        redis_text = redis_summary(stack, n)
    stacks: Counter[tuple[str, ...]] = Counter()
    for path in paths:
        if path.exists():
            stacks += parse_raw(path.read_text().splitlines())
    cpu = result.get("cpu_us_per_msg") or result.get("cpu_us_per_report")
    summary = "\n\n".join([
        f"{args.what}: {n:,} messages, {result['rate']:,.0f}/s under profiling; CPU us per message: {cpu}",
        "worker processes (py-spy --gil: Python CPU):\n" + summarise(stacks, args.top),
        redis_text,
    ])
    (RESULTS / f"{tag}-summary.txt").write_text(summary + "\n")
    print(summary)
    print(f"\nraw stacks: {', '.join(str(p) for p in paths)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
