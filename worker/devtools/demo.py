"""`sms-worker demo` (and `./scripts/demo`): the whole system on this machine, sending SMS, explained.

It starts a private Redis, the sandbox (with a small fault mix), two workers, the clock and the web
process; enqueues a few thousand SMS in both lanes (and a few broken jobs the way a careless
producer would write them with plain Redis commands); shows a progress bar until every message has
its final status; prints the counts by status, says in plain words what they mean, and what to try
next. Then it stops everything, or with `--keep` leaves it running and prints the commands to poke
at it (and the one that stops it: `python -m worker.devtools.demo --stop <dir>`, written to `<dir>/stop`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import secrets
import shlex
import signal
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import orjson
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from worker import logs
from worker.devtools.devstack import DevStack, free_port, wait_until
from worker.devtools.sandbox.config import DEFAULT_OUTCOME_MIX
from worker.producer import Producer, producer
from worker.settings import settings_from_env
from worker.store import Store, connect

FINAL = {"delivered", "undeliverable", "expired", "rejected", "failed"}
TIMEOUT_S = 120
# What the sandbox reports for the SMS it accepted, drawn at random per message: the fate real
# phones give SMS (off, out of coverage, a number that no longer exists...), simulated.
OUTCOME_MIX = dict(DEFAULT_OUTCOME_MIX)
STACK_FILE = "stack.json"
ENV_FILE = "demo.env"
# Jobs a careless producer writes with plain Redis commands: each ends in the dead letters with a reason.
BROKEN_JOBS = (b"not json", b'{"to":"12","text":"bad number"}', b'{"to":"41790000000"}')


def _jobs(n: int, rng: random.Random) -> list[tuple[str, dict[str, Any]]]:
    jobs = []
    for i in range(n):
        lane = "otp" if i % 10 == 0 else "bulk"
        text = f"Your code is {rng.randint(100000, 999999)}" if lane == "otp" else f"Hello #{i}, your order shipped"
        jobs.append((lane, {"to": f"4179{rng.randint(0, 9_999_999):07d}", "text": text, "id": f"demo-{i}",
                            "metadata": {"n": i}}))
    return jobs


def _plural(n: int, one: str, many: str | None = None) -> str:
    return f"{n} {one if n == 1 else (many or one + 's')}"


def _times(n: int) -> str:
    return {1: "once", 2: "twice"}.get(n, f"{n} times")


def describe_faults(faults: dict[str, int], duplicates: Any = 0) -> str:
    """The sandbox's injected faults (its /_sandbox/stats `faults`) and what became of them, in words a
    newcomer reads."""
    faults = dict(faults)
    faults.pop("429_retry_after", None)  # a detail of the 429s
    parts = []
    throttled = faults.pop("429", 0) + faults.pop("rate_limit", 0)
    if throttled:
        parts.append(f"answered \"too many requests, slow down\" (HTTP 429) {_times(throttled)}")
    server = sum(faults.pop(key) for key in [k for k in faults if k.startswith("5xx_")])
    if server:
        parts.append(f"failed with a server error (HTTP 5xx) {_times(server)}")
    timeouts = faults.pop("timeout", 0)
    if timeouts:
        parts.append(f"took SMS but answered too late {_times(timeouts)}")
    parts += [f"showed fault \"{key.replace('_', ' ')}\" {_times(n)}" for key, n in sorted(faults.items())]
    twice = ("No SMS was sent twice" if duplicates == 0
             else f"Sent twice: {duplicates} (that is a bug: see the logs)")
    twice += " (the sandbox counts every SMS it receives more than once)."
    if not parts:
        return f"The sandbox's deliberate misbehaviour (slow-downs, server errors) hit no request this time. {twice}"
    return ("The sandbox also misbehaved on purpose, as a real provider does on a bad day: it "
            + ", it ".join(parts) + ". The worker waited and tried again; where it could not tell whether the "
            "provider had taken a request (a server error, an answer too late), it asked the provider's logs "
            "before sending again. " + twice)


def _mix_words() -> str:
    return ", ".join(f"{share:.0%} {kind}" for kind, share in OUTCOME_MIX.items())


def _explain(counts: Counter[str], broken: int, duplicates: Any, stats: dict[str, Any]) -> list[str]:
    """The paragraphs under the table: what the numbers mean."""
    not_delivered = sum(counts.get(kind, 0) for kind in ("undeliverable", "expired", "rejected"))
    failed = counts.get("failed", 0)
    lines = [
        f"Not every SMS is delivered, on purpose: the sandbox stands in for the provider and decides each "
        f"SMS's fate at random, the way real phones do (switched off, out of coverage, number gone): about "
        f"{_mix_words()}. So the {not_delivered} undeliverable, expired and rejected above are that "
        f"simulated outcome mix, not errors of the worker; each got its final report.",
        f"The {_plural(broken, 'broken job')} were written on purpose with plain Redis commands, as a "
        f"careless producer would: they end as \"failed\" and wait in the dead letters with the reason "
        f"(sms-worker dlq list)."
        + (f" {failed - broken} other SMS failed too: that is not part of the demo, see the logs."
           if failed > broken else ""),
        describe_faults(stats.get("faults", {}), duplicates),
    ]
    return lines


def _bullets(paragraphs: list[str]) -> Table:
    """Paragraphs as a list with hanging indents, wrapped to the terminal."""
    grid = Table.grid(padding=(0, 1))
    grid.add_column(no_wrap=True)
    grid.add_column()
    for paragraph in paragraphs:
        grid.add_row("-", Text(paragraph))
    return grid


def _next_steps(keep: bool) -> list[str]:
    steps = [
        ("./scripts/demo --messages 20000", "more SMS (default 3000)"),
        ("./scripts/demo --keep", "leave everything running and poke at it"),
        ("honcho -f Procfile.dev -e config/dev.env start", "the same processes by hand (README, Development)"),
        ("docs/architecture.md", "how an SMS goes from the outbox to its final status"),
    ]
    if keep:
        steps = [s for s in steps if "--keep" not in s[0]]
    width = max(len(command) for command, _ in steps)
    return [f"  {command.ljust(width)}   {what}" for command, what in steps]


# --- --keep: the stack outlives the demo --------------------------------------------------------------
def _start_ticks(pid: int) -> str | None:
    """The process's start time (clock ticks since boot), to never signal a recycled pid."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, ticks: str | None) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z" and (ticks is None or _start_ticks(pid) == ticks)


def _write_kept(stack: DevStack, sandbox: str, demo_env: dict[str, str]) -> tuple[Path, Path]:
    """Write `demo.env` (the stack's settings, for a shell), `stack.json` (its processes) and `stop` into
    the stack's directory; returns (env file, stop script)."""
    directory = stack.log_dir
    names = [name for name in demo_env if not name.startswith("LOG_")]
    names += ["REDIS_URL", "SMS_REDIS_ALLOW_VOLATILE", "ICOMM_BASE_URL", "ICOMM_API_KEY"]  # set by the stack
    env_file = directory / ENV_FILE
    lines = [f"# The settings of the stack `demo --keep` left running; in a shell: . {env_file}",
             f"export PATH={shlex.quote(str(Path(sys.executable).parent))}:\"$PATH\"",
             "export LOG_FORMAT=console LOG_LEVEL=WARNING"]
    lines += [f"export {name}={shlex.quote(stack.env[name])}" for name in names if name in stack.env]
    env_file.write_text("\n".join(lines) + "\n")
    env_file.chmod(0o600)  # holds the sandbox's API key and the webhook secret
    procs = [{"name": p.name, "pid": p.pid, "start": _start_ticks(p.pid)} for p in stack.procs]
    (directory / STACK_FILE).write_text(json.dumps({"sandbox": sandbox, "processes": procs}, indent=1))
    stop = directory / "stop"
    command = f"{shlex.quote(sys.executable)} -m worker.devtools.demo --stop {shlex.quote(str(directory))}"
    stop.write_text(f"#!/bin/sh\n# Stops the stack `demo --keep` left running.\nexec {command}\n")
    stop.chmod(0o755)
    return env_file, stop


def stop_kept(directory: Path, timeout_s: float = 20.0) -> int:
    """Stop what `--keep` left running in `directory`, newest first (Redis last); 0 when all stopped."""
    try:
        procs = json.loads((directory / STACK_FILE).read_text())["processes"]
    except (OSError, ValueError, KeyError):
        print(f"no stack left by `demo --keep` in {directory}", file=sys.stderr)
        return 1
    for proc in reversed(procs):
        pid, ticks = int(proc["pid"]), proc.get("start")
        if not _alive(pid, ticks):
            continue
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)  # the leader only: dramatiq forwards it to its children

        def gone(pid: int = pid, ticks: str | None = ticks) -> bool:
            return not _alive(pid, ticks)

        try:
            wait_until(gone, timeout_s, f"{proc['name']} to stop", interval_s=0.05)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)  # each was started in a session of its own
    (directory / STACK_FILE).unlink(missing_ok=True)
    print(f"stopped the demo's {len(procs)} processes; their logs stay in {directory}")
    return 0


def _poke_commands(stack: DevStack, sandbox: str, env_file: Path, stop: Path, events_key: str) -> list[str]:
    commands = [
        (f". {env_file}", "first, in each new shell: the demo's settings (Redis, sandbox, lanes)"),
        ("sms-worker status", "outbox depth per lane, in flight, awaiting a report, dead letters"),
        ('sms-worker enqueue --to 41793026727 --text "Hello" --lane otp', "send one more SMS"),
        ("sms-worker dlq list", "the dead letters, each with its reason"),
        (f"redis-cli -p {stack.redis_port} XREVRANGE {events_key} + - COUNT 3", "the latest status events"),
        (f"curl -s {sandbox}/_sandbox/stats", "the sandbox's counters: received, faults, duplicates"),
        (f"tail -f {stack.log_dir}/*.log", "the processes' logs"),
        (str(stop), "stop it all (the demo's Redis forgets everything)"),
    ]
    width = max(len(command) for command, _ in commands)
    return [f"  {command.ljust(width)}   # {what}" for command, what in commands]


def _demo_env(web_port: int, secret: str) -> dict[str, str]:
    """The settings of the demo's processes: short timeouts and small bulks, so faults show and resolve."""
    return {
        "LOG_FORMAT": "json",
        "LOG_LEVEL": "WARNING",
        # Short timeouts so "accept then time out" faults resolve within the demo.
        "ICOMM_READ_TIMEOUT_S": "1", "ICOMM_CONNECT_TIMEOUT_S": "1", "ICOMM_WRITE_TIMEOUT_S": "1",
        "ICOMM_RETRY_BACKOFF_BASE_S": "0.05", "ICOMM_RETRY_BACKOFF_MAX_S": "0.5", "ICOMM_SEND_RETRY_ATTEMPTS": "3",
        "SMS_LEASE_S": "15", "SMS_RECONCILE_DELAY_S": "1", "SMS_OUTAGE_PAUSE_S": "1",
        # A batch the sandbox answered with a 5xx after reading it is resent once the provider's logs
        # showed it missing for this long (default 60 s: longer than the whole demo).
        "SMS_RECONCILE_WINDOW_S": "3",
        "SMS_DISPATCH_TICK_MS": "200", "SMS_REPORTS_DRAIN_INTERVAL_S": "1", "SMS_LOGS_RATE_PER_MIN": "600",
        "SMS_WEBHOOK_PUBLIC_URL": f"http://127.0.0.1:{web_port}", "SMS_WEBHOOK_SECRET": secret,
        "SMS_WEBHOOK_AUTH": "basic",
        # Small bulks, so the sandbox's fault mix touches a fair number of requests.
        "SMS_LANES": '{"otp":{"batch_size":20,"max_wait_ms":0},"bulk":{"batch_size":100,"max_wait_ms":100}}',
    }


def _start_stack(stack: DevStack, api_key: str, web_port: int) -> tuple[str, str]:
    """Redis, the sandbox with a small fault mix, two workers, the clock and the web process; returns
    (Redis URL, sandbox URL)."""
    redis_url = stack.start_redis()
    sandbox = stack.start_sandbox(
        api_key, "--seed", "7", "--report-delay-ms", "300", "--rate-429", "0.05",
        "--retry-after-share", "0.5", "--error-5xx-rate", "0.04", "--accept-then-timeout-rate", "0.03",
        "--timeout-delay-ms", "1500",
        "--outcome-mix", ",".join(f"{kind}={share}" for kind, share in OUTCOME_MIX.items()),
    )
    stack.start_worker("worker-1")
    stack.start_worker("worker-2")
    stack.start_clock()
    stack.start_web(web_port)
    return redis_url, sandbox


def _enqueue(wired: Producer, client: Any, messages: int) -> int:
    """Enqueue the demo's jobs in both lanes, and the broken ones; returns how many SMS to follow."""
    jobs = _jobs(messages, random.Random(7))
    # A careless producer writing plain Redis commands: these end in dead letters with a reason.
    for raw in BROKEN_JOBS:
        client.xadd(wired.store.outbox("bulk"), {"job": raw})
    for lane in ("otp", "bulk"):
        wired.outbox.enqueue_many([job for jl, job in jobs if jl == lane], lane)
    wired.wake("bulk")
    return len(jobs) + len(BROKEN_JOBS)


def _all_final(last: dict[str, str], total: int) -> bool:
    return len(last) >= total and all(t in FINAL for t in last.values())


def _read_events(client: Any, store: Store, cursor: str, last: dict[str, str]) -> str:
    """Note each message's latest event type (a final one is kept) from the events after `cursor`;
    returns the new cursor."""
    for _stream, items in client.xread({store.events: cursor}, count=5000, block=200) or []:
        for entry_id, fields in items:
            cursor = entry_id.decode()
            event = orjson.loads(fields[b"event"])
            if last.get(event["message_id"]) not in FINAL:
                last[event["message_id"]] = event["type"]
    return cursor


def _follow(console: Console, client: Any, store: Store, total: int) -> dict[str, str]:
    """Show progress bars until every message has its final status (or TIMEOUT_S); returns each
    message's last event type."""
    last: dict[str, str] = {}
    cursor = "0-0"
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        sent = progress.add_task("sent to the provider", total=total)
        final = progress.add_task("final status", total=total)
        deadline = time.monotonic() + TIMEOUT_S
        while time.monotonic() < deadline:
            cursor = _read_events(client, store, cursor, last)
            progress.update(sent, completed=len(last))
            progress.update(final, completed=sum(1 for t in last.values() if t in FINAL))
            if _all_final(last, total):
                break
    return last


def _results_table(counts: Counter[str], total: int, messages: int, seconds: float, duplicates: Any,
                   dead_letters: int) -> Table:
    """Final statuses with their counts, then the duplicates and dead letters."""
    table = Table(title=f"{total} SMS in {seconds:.1f} s",
                  caption=f"{messages} sent through the Python API + {len(BROKEN_JOBS)} broken jobs")
    table.add_column("final status")
    table.add_column("messages", justify="right")
    for status, n in sorted(counts.items(), key=lambda kv: -kv[1]):
        table.add_row(status, str(n))
    table.add_row("no status yet", str(total - sum(counts.values())))
    table.add_section()
    table.add_row("sent twice (sandbox duplicates)", str(duplicates))
    table.add_row("dead letters", str(dead_letters))
    return table


def _print_kept(out: Console, stack: DevStack, sandbox: str, env: dict[str, str], events_key: str) -> None:
    """--keep: write the stack's files and print the commands to poke at it."""
    env_file, stop = _write_kept(stack, sandbox, env)
    out.print("[bold]Everything is still running (--keep).[/bold] Poke at it from another shell:")
    for line in _poke_commands(stack, sandbox, env_file, stop, events_key):
        out.print(line, highlight=False, soft_wrap=True)
    out.print()


def run_demo(messages: int = 3000, keep_logs: bool = False, keep: bool = False) -> int:
    """The demo: start the stack, send, follow, explain; 0 when every SMS got its final status once."""
    console = Console(stderr=True)
    out = Console()
    api_key = f"demo-{secrets.token_hex(8)}"
    web_port = free_port()
    secret = secrets.token_hex(16)
    logs.configure(fmt="console", level="WARNING", secrets=[api_key, secret])  # this process: warnings only
    env = _demo_env(web_port, secret)
    started = time.monotonic()
    stack = DevStack(env=env)
    kept = False
    try:
        with console.status("starting Redis, the sandbox, 2 workers, the clock and the web process"):
            redis_url, sandbox = _start_stack(stack, api_key, web_port)
        wired = producer(settings_from_env(stack.env))
        store = wired.store
        # The demo's own client plays the careless producer and follows the events stream, as
        # redis-cli would: plain commands, next to the Store the real producer writes through.
        client: Any = connect(redis_url)
        total = _enqueue(wired, client, messages)
        last = _follow(console, client, store, total)
        stats = httpx.get(f"{sandbox}/_sandbox/stats", timeout=5).json()
        counts = Counter(last.values())
        duplicates = stats.get("duplicates", "?")
        out.print(_results_table(counts, total, messages, time.monotonic() - started, duplicates,
                                 client.xlen(store.dlq)))
        out.print()
        ok = len(last) == total and _all_final(last, total) and duplicates == 0
        paragraphs = _explain(counts, len(BROKEN_JOBS), duplicates, stats)
        if not ok:
            paragraphs.append(f"Something did not finish as it should: the processes' logs are in {stack.log_dir}")
        out.print("[bold]What these numbers mean[/bold]")
        out.print(_bullets(paragraphs))
        client.close()
        wired.close()
        out.print()
        if keep:
            _print_kept(out, stack, sandbox, env, store.events)
            kept = True
        out.print("[bold]Try next[/bold]")
        for line in _next_steps(keep):
            out.print(line, highlight=False, soft_wrap=True)
        if keep_logs and not keep:
            console.print(f"process logs: {stack.log_dir}")
    finally:
        if not kept:
            stack.stop()
    return 0 if ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m worker.devtools.demo`, what ./scripts/demo runs: the same options as `sms-worker demo`."""
    parser = argparse.ArgumentParser(prog="demo", description="Run the whole system locally and send a few "
                                     "thousand SMS through the sandbox.")
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--keep-logs", action="store_true", help="print where the processes' logs are")
    parser.add_argument("--keep", action="store_true",
                        help="leave the stack running afterwards and print the commands to poke at it and stop it")
    parser.add_argument("--stop", metavar="DIR", type=Path, help="stop the stack a `--keep` run left in DIR")
    args = parser.parse_args(argv)
    if args.stop is not None:
        return stop_kept(args.stop)
    try:
        return run_demo(messages=args.messages, keep_logs=args.keep_logs, keep=args.keep)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
