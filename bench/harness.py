"""`python -m bench`: run the scenarios, print the results table, write bench/results/<timestamp>.json.

    .venv/bin/python -m bench                        # every scenario, 3 repetitions each (~10 min)
    .venv/bin/python -m bench --scenarios 1,2 -r 1   # a subset, one repetition
    .venv/bin/python -m bench --quick                # tiny sizes: checks the harness, measures nothing

Scenario 6 (peak RSS) is measured during scenario 1. Each repetition starts a fresh stack (private
redis-server, sandbox, workers, clock on free loopback ports); medians of the repetitions are
reported, and the ratio ours/baseline is taken within each repetition before its median.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import scenarios
from bench.report import Row, format_table, machine, timestamp, write_json
from bench.stats import median_run

RESULTS = Path(__file__).resolve().parent / "results"
ALL = ("1", "2", "3", "4", "5", "7")
NAMES = {"1": "end-to-end throughput vs baseline (+6 peak RSS)", "2": "producer rate", "3": "latency",
         "4": "slow provider", "5": "delivery reports",
         "7": "traffic policy: every guard on vs off"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--scenarios", default=",".join(ALL), help="comma-separated subset of 1,2,3,4,5")
    parser.add_argument("-r", "--repeat", type=int, default=3, help="repetitions per scenario (medians)")
    parser.add_argument("--e2e-repeat", type=int, help="repetitions of scenario 1 (default: --repeat)")
    parser.add_argument("--messages", type=int, default=100_000, help="scenario 1: SMS through our pipeline")
    parser.add_argument("--baseline-messages", type=int, default=5_000, help="scenario 1: SMS through the baseline")
    parser.add_argument("--producer-jobs", type=int, default=100_000, help="scenario 2: jobs per enqueue_many")
    parser.add_argument("--latency-bulk", type=int, default=100_000, help="scenario 3: bulk campaign size")
    parser.add_argument("--otp-rate", type=float, default=200.0, help="scenario 3: otp SMS/s offered")
    parser.add_argument("--slow-messages", type=int, default=100_000, help="scenario 4: SMS at +100 ms per POST")
    parser.add_argument("--slow-latency-ms", type=float, default=100.0, help="scenario 4: sandbox latency")
    parser.add_argument("--reports", type=int, default=100_000, help="scenario 5: pending reports")
    parser.add_argument("--guard-messages", type=int, default=100_000,
                        help="scenario 7: SMS per run, guards off and on")
    parser.add_argument("--suppressed", type=int, default=1_000_000,
                        help="scenario 7: numbers on the suppression list")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (ours and the baseline)")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="extra environment for every process of the stack, e.g. MALLOC_ARENA_MAX=2 or "
                             "SMS_LANES='{...}' (to try a setting; repeatable)")
    parser.add_argument("--campaign", metavar="NAME", help="jobs of scenarios 1-4 carry this campaign_reference_id "
                        "(their messages then keep campaign counters)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one repetition (smoke test)")
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeat, args.e2e_repeat = 1, 1
        args.messages, args.baseline_messages, args.producer_jobs = 300, 100, 300
        args.latency_bulk, args.otp_rate, args.slow_messages, args.reports = 2_000, 100.0, 2_000, 2_000
        args.guard_messages, args.suppressed = 2_000, 10_000
    args.e2e_repeat = args.e2e_repeat or args.repeat
    scenarios.CAMPAIGN = args.campaign
    args.extra_env = {}
    for item in args.env:
        name, sep, value = item.partition("=")
        if not sep or not name:
            parser.error(f"--env wants NAME=VALUE, got {item!r}")
        args.extra_env[name] = value
    args.selected = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = set(args.selected) - set(ALL)
    if unknown:
        parser.error(f"unknown scenario(s) {', '.join(sorted(unknown))}; known: {', '.join(ALL)}")
    return args


def _values(runs: list[dict[str, Any]], *path: str) -> list[float]:
    values = []
    for run in runs:
        value: Any = run
        for key in path:
            value = value.get(key, float("nan")) if isinstance(value, dict) else float("nan")
        values.append(float(value))
    return values


def _row(scenario: str, what: str, runs: list[dict[str, Any]], path: tuple[str, ...], unit: str,
         target: str | None = None, note: str = "") -> Row:
    values = _values(runs, *path)
    clean = [v for v in values if v == v]
    return Row(scenario, what, statistics.median(clean) if clean else float("nan"), unit, target, values, note)


def _cpu_text(cpu: dict[str, float]) -> str:
    return ", ".join(f"{name} {us:.1f}" for name, us in sorted(cpu.items(), key=lambda kv: -kv[1]))


def rows_e2e(runs: list[dict[str, Any]], args: argparse.Namespace) -> list[Row]:
    med = median_run(runs)
    ours, base = med["ours"], med.get("baseline") or {}
    ok = all(r["ours"]["ok"] and (not r["baseline"] or r["baseline"]["ok"]) for r in runs)
    note = (f"{ours['cores_busy']:.2f} of {os.cpu_count()} cores busy; all cores busy at this CPU cost would be "
            f"{ours['cpu_ceiling_rate']:,.0f} SMS/s")
    rows = [
        _row("1", f"e2e throughput, ours: {args.messages:,} SMS, bulk lane, {args.workers} workers", runs,
             ("ours", "rate"), "SMS/s", "e2e_rate",
             note=note if ok else "CORRECTNESS CHECK FAILED (missing events, other types or duplicates)"),
    ]
    if base:
        rows += [
            _row("1", f"e2e throughput, baseline: {args.baseline_messages:,} SMS, 1 Dramatiq message + 1 POST each",
                 runs, ("baseline", "rate"), "SMS/s"),
            _row("1", "ratio ours / baseline (within each run)", runs, ("ratio",), "x", "e2e_ratio"),
        ]
    rows.append(_row("1", f"CPU per SMS, ours ({_cpu_text(ours['cpu_us_per_msg'])})", runs,
                     ("ours", "cpu_us_per_msg_total"), "us"))
    if base:
        rows.append(_row("1", f"CPU per SMS, baseline ({_cpu_text(base['cpu_us_per_msg'])})", runs,
                         ("baseline", "cpu_us_per_msg_total"), "us"))
    rows.append(_row("6", "peak RSS of one worker process (VmHWM, scenario 1)", runs, ("ours", "peak_rss_mb"),
                     "MB", "peak_rss"))
    return rows


def rows_guards(runs: list[dict[str, Any]], args: argparse.Namespace) -> list[Row]:
    med = median_run(runs)
    ok = all(r["on"]["ok"] and r["off"]["ok"] for r in runs)
    check = "" if ok else "CORRECTNESS CHECK FAILED (missing events, other types or duplicates)"
    size = f"2 x {args.guard_messages:,} SMS, bulk lane, {args.workers} workers"
    return [
        _row("7", f"guards off: {size}", runs, ("off", "rate"), "SMS/s", note=check),
        _row("7", f"every guard on (velocity, countries, number types, parts, caps, suppression list of "
                  f"{args.suppressed:,})", runs, ("on", "rate"), "SMS/s"),
        _row("7", "ratio on / off (within each repetition: off, on, on, off)", runs, ("ratio",), "x",
             "guards_ratio"),
        _row("7", f"CPU per SMS, guards off ({_cpu_text(med['off']['cpu_us_per_msg'])})", runs,
             ("off", "cpu_us_per_msg_total"), "us"),
        _row("7", f"CPU per SMS, guards on ({_cpu_text(med['on']['cpu_us_per_msg'])})", runs,
             ("on", "cpu_us_per_msg_total"), "us"),
    ]


def rows_producer(runs: list[dict[str, Any]], args: argparse.Namespace) -> list[Row]:
    med = median_run(runs)
    rows = []
    for key, label in (("plain", "no producer ids"), ("with_ids", "with producer ids")):
        cost = med[key]
        rows.append(_row("2", f"enqueue_many, {args.producer_jobs:,} jobs, {label}", runs, (key, "rate"), "jobs/s",
                         "producer_rate",
                         note=f"CPU per job: producer {cost['producer_cpu_us_per_job']:.1f} us + Redis "
                              f"{cost['redis_cpu_us_per_job']:.1f} us; 1 / that = "
                              f"{cost['sequential_rate']:,.0f} jobs/s if nothing overlapped"))
    return rows


def rows_latency(runs: list[dict[str, Any]], args: argparse.Namespace) -> list[Row]:
    med = median_run(runs)
    during = f"{args.otp_rate:g}/s offered during a {args.latency_bulk:,}-SMS bulk drain"
    rows = []
    for key, how in (("shared", f"{args.workers} workers"), ("split", f"{args.workers} workers + 1 otp-only")):
        note = (f"{med[key]['otp_during_drain']:.0f} otp samples per run during the drain "
                f"({med[key]['bulk_drain_s']:.1f} s); enqueue -> `accepted` event published")
        rows += [
            _row("3", f"otp p50, {during}, {how}", runs, (key, "otp_p50_ms"), "ms"),
            _row("3", f"otp p99, {during}, {how}", runs, (key, "otp_p99_ms"), "ms", "otp_p99", note=note),
            _row("3", f"bulk p50 (XADD -> `accepted` event), {how}", runs, (key, "bulk_p50_ms"), "ms"),
            _row("3", f"bulk p99, {how}", runs, (key, "bulk_p99_ms"), "ms"),
        ]
    return rows


def rows_slow(runs: list[dict[str, Any]], args: argparse.Namespace) -> list[Row]:
    med = median_run(runs)
    return [_row("4", f"slow provider (+{args.slow_latency_ms:g} ms per POST), {args.slow_messages:,} SMS, "
                      "default concurrency", runs, ("rate",), "SMS/s", "slow_rate",
                 note=f"CPU per SMS: {_cpu_text(med['cpu_us_per_msg'])}; {med['cores_busy']:.2f} cores busy")]


def rows_reports(runs: list[dict[str, Any]], args: argparse.Namespace) -> list[Row]:
    med = median_run(runs)
    if med.get("unavailable"):
        return [Row("5", f"reports: {args.reports:,} pending, drained -> events", float("nan"), "reports/s",
                    "reports_rate", None, f"not available: {med['unavailable']}")]
    return [
        _row("5", f"reports: {args.reports:,} pending at the sandbox, drained -> events", runs, ("rate",),
             "reports/s", "reports_rate",
             note=f"CPU per report: {_cpu_text(med['cpu_us_per_report'])}; all cores busy at this CPU cost "
                  f"would be {med['cpu_ceiling_rate']:,.0f} reports/s"),
        Row("5", "  of which the drain alone (GET pages -> raw stream)",
            args.reports / med["drain_s"] if med["drain_s"] else float("nan"), "reports/s", None,
            [args.reports / r["drain_s"] for r in runs if r.get("drain_s")]),
    ]


def _reports_unavailable() -> str | None:
    """Why scenario 5 cannot run (worker.reports missing or without Drainer/Processor), else None."""
    if importlib.util.find_spec("worker.reports") is None:
        return "worker.reports does not exist yet"
    try:
        from worker import reports
    except Exception as error:  # noqa: BLE001 -- any import failure of a module in progress means "not yet"
        return f"worker.reports does not import: {type(error).__name__}: {error}"
    missing = [name for name in ("Drainer", "Processor") if not hasattr(reports, name)]
    return f"worker.reports has no {', '.join(missing)}" if missing else None


def plan(args: argparse.Namespace) -> dict[str, tuple[int, Callable[[], dict[str, Any]], Callable[..., list[Row]]]]:
    """scenario -> (repetitions, one run, rows from the runs)."""
    def producer() -> dict[str, Any]:
        return {"plain": scenarios.producer_rate(args.producer_jobs, with_ids=False, env=env),
                "with_ids": scenarios.producer_rate(args.producer_jobs, with_ids=True, env=env)}

    def reports() -> dict[str, Any]:
        why = _reports_unavailable()
        return {"unavailable": why} if why else scenarios.reports(args.reports, workers=args.workers, env=env)

    env = args.extra_env
    guard_order = itertools.cycle((False, True))
    return {
        "1": (args.e2e_repeat, lambda: scenarios.e2e(args.messages, args.baseline_messages, args.workers, env),
              rows_e2e),
        "2": (args.repeat, producer, rows_producer),
        "3": (args.repeat, lambda: {
            "shared": scenarios.latency(args.latency_bulk, args.otp_rate, args.workers, env),
            "split": scenarios.latency(args.latency_bulk, args.otp_rate, args.workers, env, otp_worker=True),
        }, rows_latency),
        "4": (args.repeat,
              lambda: scenarios.slow_provider(args.slow_messages, args.slow_latency_ms, args.workers, env), rows_slow),
        "5": (args.repeat, reports, rows_reports),
        # The order alternates between repetitions, so neither side always runs on a warmer stack.
        "7": (args.repeat, lambda: scenarios.guards(args.guard_messages, args.workers, env, args.suppressed,
                                                    on_first=next(guard_order)), rows_guards),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.time()
    sizes = {k: v for k, v in vars(args).items() if k not in ("results_dir", "selected", "env")}
    payload: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join(["python -m bench", *(sys.argv[1:] if argv is None else argv)]),
        "machine": machine(), "sizes": sizes, "scenarios": {}, "errors": {},
    }
    print(f"machine: {payload['machine']}", flush=True)
    rows: list[Row] = []
    steps = plan(args)
    for scenario in args.selected:
        repeat, run, to_rows = steps[scenario]
        runs: list[dict[str, Any]] = []
        try:
            for i in range(repeat):
                began = time.perf_counter()
                print(f"[{scenario}] {NAMES[scenario]}: run {i + 1}/{repeat} ...", end=" ", flush=True)
                runs.append(run())
                print(f"{time.perf_counter() - began:.0f} s", flush=True)
            new = to_rows(runs, args)
        except Exception as error:  # noqa: BLE001 -- one failing scenario must not lose the others' results
            print("FAILED", flush=True)
            traceback.print_exc()
            payload["errors"][scenario] = f"{type(error).__name__}: {error}"
            new = [Row(scenario, f"{NAMES[scenario]}: did not complete", float("nan"), "", None, None,
                       f"{type(error).__name__}: {str(error)[:200]}")]
        payload["scenarios"][scenario] = {"runs": runs, "median": median_run(runs), "loadavg_after": os.getloadavg()}
        rows += new
        print(format_table(new), flush=True)
    payload["rows"] = [r.as_dict() for r in rows]
    payload["seconds"] = round(time.time() - started, 1)
    payload["machine"]["loadavg_at_end"] = os.getloadavg()
    path = write_json(args.results_dir / f"{timestamp()}.json", payload)
    print()
    print(format_table(rows))
    print(f"\nresults: {path}  ({payload['seconds']:.0f} s)")
    if payload["errors"]:
        return 2
    if args.check and any(r.verdict().startswith("FAIL") for r in rows):
        return 1
    return 0
