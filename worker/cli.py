"""The `sms-worker` command: run the processes, enqueue, inspect and repair. Errors are one line."""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import signal
import string
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import orjson

from worker.errors import JobValidationError, SmsWorkerError
from worker.settings import Settings, load_settings

EPILOG_ENQUEUE = """examples:
  sms-worker enqueue --to 41793026727 --text "Your code is 123456" --lane otp
  sms-worker enqueue --to 41793026727 --text "Hi" --id order-42 --metadata '{"order": 42}'
  sms-worker enqueue --csv people.csv --text-template "Hello {name}, your table is ready"
    (CSV with a header row; column `to` is required, `text` is used when no template is given)
"""
EPILOG_DLQ = """examples:
  sms-worker dlq list --lane bulk --reason bad_request
  sms-worker dlq show sw-bulk-1764230000000-0
  sms-worker dlq replay --all --reason retries_exhausted
  sms-worker dlq purge --before-ms 1764230000000
"""


def _settings() -> Settings:
    return load_settings()


def _store(settings: Settings) -> Any:
    from worker.store import Store, connect

    return Store(connect(settings.redis_url), settings.sms_key_prefix, settings.sms_message_id_prefix)


def _triggers(settings: Settings, store: Any) -> Any:
    from worker.runtime import make_broker
    from worker.triggers import Triggers

    broker, _ = make_broker(settings)
    return Triggers(store, broker)


def _print_json(value: Any) -> None:
    sys.stdout.write(orjson.dumps(value, option=orjson.OPT_INDENT_2, default=str).decode() + "\n")


# --- processes -------------------------------------------------------------------------------------
def cmd_sandbox(args: argparse.Namespace) -> int:
    from worker.sandbox import server
    from worker.sandbox.config import config_from_args

    server.run(args.port, args.api_key, host=args.host, config=config_from_args(args), allow_remote=args.allow_remote)
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    settings = _settings()  # fail here, with the clear message, before dramatiq forks
    settings.require_api_key()
    if settings.sms_metrics_port:
        # Counters of all forked worker processes are summed from files here (prometheus_client's
        # multiprocess mode); it must be set before any process imports prometheus_client.
        metrics_dir = Path(tempfile.gettempdir()) / f"sms-worker-metrics-{os.getpid()}"
        shutil.rmtree(metrics_dir, ignore_errors=True)
        metrics_dir.mkdir(parents=True)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    # Dramatiq polls each idle queue (one per lane, and the shared one) with a backoff up to this
    # many ms. Immediate lanes do not wait for it (their dispatchers listen on the outbox), so
    # the polling can be rare: it only delays a bulk batch's start and report processing.
    os.environ.setdefault("dramatiq_worker_timeout", "100")
    # glibc gives each thread its own malloc arena; with a dozen worker threads that alone added
    # ~40 MB of peak RSS per process (docs/performance.md, scenario 6).
    os.environ.setdefault("MALLOC_ARENA_MAX", "2")
    lanes, queues = _worker_queues(settings, args.lanes, args.skip_lanes)
    threads = args.threads or sum(settings.sms_lanes[lane].concurrency for lane in lanes) + 4
    argv = ["dramatiq", "worker.actors", "--processes", str(args.processes), "--threads", str(threads),
            "--worker-shutdown-timeout", str(int(settings.sms_shutdown_timeout_s * 1000)), "--skip-logging"]
    if queues is not None:
        argv += ["--queues", *queues]
    os.execvp(sys.executable, [sys.executable, "-m", *argv])


def _worker_queues(settings: Settings, only: str | None, skip: str | None) -> tuple[list[str], list[str] | None]:
    """(lanes this worker dispatches, Dramatiq queues it consumes or None for all of them).

    `--lanes otp`: only those lanes' dispatches (a dedicated, never-busy otp process).
    `--skip-lanes otp`: everything else, report work included (the bulk workers beside it).
    """
    from worker.triggers import QUEUE, lane_queue

    if only and skip:
        raise SmsWorkerError("give --lanes or --skip-lanes, not both")
    known = list(settings.sms_lanes)
    named = [lane.strip() for lane in (only or skip or "").split(",") if lane.strip()]
    unknown = [lane for lane in named if lane not in known]
    if unknown:
        raise SmsWorkerError(f"unknown lane(s) {', '.join(unknown)}; SMS_LANES has {', '.join(known)}")
    if only:
        return named, [lane_queue(lane) for lane in named]
    if skip:
        lanes = [lane for lane in known if lane not in named]
        return lanes, [QUEUE, *(lane_queue(lane) for lane in lanes)]
    return known, None


def cmd_clock(args: argparse.Namespace) -> int:
    from worker import logs
    from worker.clock import Clock

    settings = _settings()
    logs.configure_from(settings)
    store = _store(settings)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    Clock(settings, store, _triggers(settings, store)).run(stop)
    return 0


def cmd_web(args: argparse.Namespace) -> int:
    import uvicorn

    from worker import logs
    from worker.web import create_app

    settings = _settings()
    logs.configure_from(settings)
    uvicorn.run(
        create_app(settings), host=args.host, port=args.port, loop="uvloop", http="httptools",
        lifespan="on", log_config=None,  # our logging (JSON, redaction) stays in charge
        access_log=False,  # in `path` auth mode the request line carries the secret
        timeout_graceful_shutdown=int(settings.sms_shutdown_timeout_s),
    )
    return 0


# --- producers -------------------------------------------------------------------------------------
def _csv_jobs(path: Path, template: str | None, base: dict[str, Any]) -> Iterator[tuple[int, dict[str, Any] | str]]:
    """(line number, job or the reason the row is refused) for each data row."""
    fields = [f for _, f, _, _ in string.Formatter().parse(template or "") if f]
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or "to" not in reader.fieldnames:
            raise SmsWorkerError(f"{path}: the header row must have a `to` column")
        for row in reader:
            line = reader.line_num
            missing = [f for f in fields if not row.get(f)]
            if missing:
                yield line, f"template column(s) empty or missing: {', '.join(missing)}"
                continue
            text = template.format(**row) if template else row.get("text")
            job = {**base, "to": (row.get("to") or "").strip(), "text": text}
            if row.get("id"):
                job["id"] = row["id"]
            yield line, job


def cmd_enqueue(args: argparse.Namespace) -> int:
    from worker.outbox import Outbox

    settings = _settings()
    store = _store(settings)
    triggers = _triggers(settings, store)
    outbox = Outbox(settings, store, wake=triggers.dispatch)
    base: dict[str, Any] = {}
    if args.sender:
        base["sender"] = args.sender
    if args.metadata:
        try:
            base["metadata"] = orjson.loads(args.metadata)
        except orjson.JSONDecodeError as error:
            raise SmsWorkerError(f"--metadata is not JSON: {error}") from None
    if args.csv is None:
        if not args.to or args.text is None:
            raise SmsWorkerError("give --to and --text, or --csv FILE")
        job = {**base, "to": args.to, "text": args.text}
        if args.id:
            job["id"] = args.id
        result = outbox.enqueue(job, args.lane)
        print(f"{'queued' if result.queued else 'duplicate (already queued)'}: {result.message_id} lane={result.lane}")
        return 0
    return _enqueue_csv(outbox, Path(args.csv), args.text_template, base, args.lane)


def _enqueue_csv(outbox: Any, path: Path, template: str | None, base: dict[str, Any], lane: str | None) -> int:
    from rich.progress import Progress

    if not path.is_file():
        raise SmsWorkerError(f"{path}: no such file")
    rows = list(_csv_jobs(path, template, base))
    refused: list[tuple[int, str]] = []
    queued = duplicates = 0
    batch: list[tuple[int, dict[str, Any]]] = []

    def flush() -> None:
        nonlocal queued, duplicates
        valid = []
        for line, job in batch:
            try:
                outbox.validate(job)
                valid.append(job)
            except JobValidationError as error:
                refused.append((line, "; ".join(str(p) for p in error.problems)))
        if valid:
            for result in outbox.enqueue_many(valid, lane):
                queued += result.queued
                duplicates += result.duplicate
        batch.clear()

    with Progress(transient=not sys.stderr.isatty()) as progress:
        task = progress.add_task(f"enqueue {path.name}", total=len(rows))
        for line, job in rows:
            if isinstance(job, str):
                refused.append((line, job))
            else:
                batch.append((line, job))
                if len(batch) >= 1000:
                    flush()
            progress.advance(task)
        flush()
    print(f"queued {queued}, duplicates {duplicates}, refused {len(refused)} of {len(rows)} rows")
    for line, reason in refused[:50]:
        print(f"  line {line}: {reason}")
    if len(refused) > 50:
        print(f"  ... and {len(refused) - 50} more")
    return 1 if refused else 0


# --- operators -------------------------------------------------------------------------------------
def cmd_dlq(args: argparse.Namespace) -> int:
    from worker.deadletters import DeadLetters

    settings = _settings()
    dlq = DeadLetters(_store(settings))
    items = list(dlq.iterate(lane=args.lane, reason=args.reason, since_ms=args.since_ms))
    if args.before_ms:
        items = [i for i in items if int(i.dlq_id.split("-")[0]) < args.before_ms]
    if args.action == "list":
        if args.json:
            _print_json([i.as_dict() for i in items])
        else:
            for i in items:
                print(f"{i.dlq_id}  {i.message_id}  lane={i.lane}  reason={i.reason}  attempts={i.attempts}  "
                      f"{i.detail[:80]}")
            print(f"{len(items)} dead letter(s)")
        return 0
    if args.action == "show":
        if not args.ids:
            raise SmsWorkerError("dlq show needs a dead-letter id or messageId")
        found = dlq.get(args.ids[0])
        if found is None:
            raise SmsWorkerError(f"no dead letter {args.ids[0]!r}")
        _print_json(found.as_dict())
        return 0
    chosen = items if args.all else [d for d in (dlq.get(x) for x in args.ids) if d is not None]
    if not chosen:
        raise SmsWorkerError(f"dlq {args.action}: nothing selected (give ids, or --all with filters)")
    if args.action == "replay":
        store = dlq.store
        triggers = _triggers(settings, store)
        jobs = [i for i in chosen if i.lane]
        for item in jobs:
            dlq.replay(item, new_message_id=args.new_message_id)
        for lane in {i.lane for i in jobs}:
            triggers.dispatch(lane)
        skipped = len(chosen) - len(jobs)
        note = f", skipped {skipped} report dead letter(s) (nothing to send)" if skipped else ""
        print(f"replayed {len(jobs)}{note}")
        return 0
    print(f"purged {dlq.purge(chosen)}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from worker.status import collect, render

    status = collect(_settings(), _store(_settings()))
    if args.json:
        _print_json(status.as_dict())
    else:
        print(render(status))
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    from datetime import datetime

    from worker.provider import Provider

    def when(value: str | None) -> datetime | None:
        if value is None:
            return None
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            raise SmsWorkerError(f"not an ISO date-time: {value!r} (e.g. 2026-11-27T10:00:00+00:00)") from None
        if parsed.tzinfo is None:
            raise SmsWorkerError(f"give a time zone: {value!r} (e.g. 2026-11-27T10:00:00+00:00)")
        return parsed

    settings = _settings()
    settings.require_api_key()
    with Provider(settings) as provider:
        try:
            entries = provider.logs(
                message_id=args.message_id, bulk_id=args.bulk_id, campaign_reference_id=args.campaign_reference_id,
                mcc=args.mcc, mnc=args.mnc, sender=args.sender, destination=args.destination,
                general_status=args.general_status, sent_since=when(args.sent_since),
                sent_until=when(args.sent_until), limit=args.limit, entity_id=args.entity_id,
                application_id=args.application_id,
            )
        except ValueError as error:
            raise SmsWorkerError(str(error)) from None
    if args.json:
        _print_json([e.raw for e in entries])
        return 0
    print(f"{'messageId':<40}{'bulkId':<28}{'destination':<16}{'status':<28}sentAt")
    for e in entries:
        status = e.status.name if e.status else "?"
        print(f"{e.message_id or '':<40}{e.bulk_id or '':<28}{e.destination or '':<16}{status:<28}{e.sent_at or ''}")
    print(f"{len(entries)} log entr{'y' if len(entries) == 1 else 'ies'}")
    return 0


def cmd_reconcile(args: argparse.Namespace) -> int:
    from worker.reconcile import force_reconcile

    settings = _settings()
    store = _store(settings)
    result = force_reconcile(settings, store, message_ids=args.message_id, bulk_ids=args.bulk_id)
    if args.json:
        _print_json(result)
    else:
        print(f"checked {result['checked']}: reconciled {result['reconciled']} (now {result['now']}), "
              f"already settled {result['already_settled']}, unknown here {result['unknown']}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from worker.provider import Provider
    from worker.redis_health import inspect

    settings = _settings()
    print("configuration: ok")
    store = _store(settings)
    from worker.store import redis_errors

    with redis_errors():
        store.r.ping()
    print(f"redis: ok ({settings.redis_url.split('@')[-1]})")
    # Reachable is not enough: a Redis that evicts keys or keeps nothing across a restart loses jobs
    # silently. One line per problem, naming the setting and its fix; the API is checked anyway.
    health = inspect(store.r, settings.sms_redis_allow_volatile)
    print(f"redis config: {health.summary()}")
    problems = health.blocking()
    for finding in health.findings:
        if finding not in problems:
            print(f"redis {'accepted' if finding.acknowledged else finding.level}: {finding.line()}")
    for finding in problems:
        print(f"sms-worker: {finding.line()}", file=sys.stderr)
    settings.require_api_key()
    with Provider(settings) as provider:
        # GET /sms/3/logs is read-only and re-readable; GET /sms/3/reports would consume reports.
        provider.logs(limit=1)
    print(f"icomm API: ok ({settings.icomm_base_url})")
    return 1 if problems else 0


def cmd_demo(args: argparse.Namespace) -> int:
    from worker.demo import run_demo

    return run_demo(messages=args.messages, keep_logs=args.keep_logs)


# --- parser ----------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sms-worker",
        description="SMS dispatch worker for the icomm SMS API. Settings come from environment variables "
        "(see config/example.env).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("sandbox", help="run the local icomm API sandbox",
                       epilog="example:\n  sms-worker sandbox --port 8900 --api-key dev-key --rate-429 0.05",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    from worker.sandbox.config import add_arguments as add_sandbox_arguments

    p.add_argument("--port", type=int, default=8900)
    p.add_argument("--api-key", required=True)
    p.add_argument("--host", default="127.0.0.1", help="loopback only unless --allow-remote")
    p.add_argument("--allow-remote", action="store_true",
                   help="bind a non-loopback host (a private container network only: the admin API has no auth)")
    add_sandbox_arguments(p)
    p.set_defaults(func=cmd_sandbox)

    p = sub.add_parser("worker", help="run Dramatiq worker processes over the actors",
                       epilog="examples:\n  sms-worker worker --processes 2\n"
                              "  sms-worker worker --lanes otp               # a dedicated otp process\n"
                              "  sms-worker worker --processes 2 --skip-lanes otp   # and the rest beside it",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--processes", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="threads per process (default: lanes' concurrency + 4)")
    p.add_argument("--lanes", help="only dispatch these lanes (comma-separated), e.g. a dedicated otp worker")
    p.add_argument("--skip-lanes", help="everything except these lanes, e.g. the workers beside an otp worker")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("clock", help="run the scheduler that enqueues periodic actor messages",
                       epilog="example:\n  sms-worker clock", formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(func=cmd_clock)

    p = sub.add_parser("web", help="run the webhook receiver for delivery reports (and /healthz, /readyz)",
                       epilog="example:\n  sms-worker web --host 127.0.0.1 --port 8080",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.set_defaults(func=cmd_web)

    p = sub.add_parser("enqueue", help="queue one SMS or a CSV file of them", epilog=EPILOG_ENQUEUE,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--to")
    p.add_argument("--text")
    p.add_argument("--csv", help="CSV file, one row per recipient")
    p.add_argument("--text-template", help="text with {column} placeholders, for --csv")
    p.add_argument("--lane")
    p.add_argument("--id", help="producer id (idempotency key)")
    p.add_argument("--sender")
    p.add_argument("--metadata", help="JSON object echoed in every status event")
    p.set_defaults(func=cmd_enqueue)

    p = sub.add_parser("dlq", help="list, show, replay or purge dead letters", epilog=EPILOG_DLQ,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["list", "show", "replay", "purge"])
    p.add_argument("ids", nargs="*", help="dead-letter ids or messageIds")
    p.add_argument("--all", action="store_true", help="every dead letter matching the filters")
    p.add_argument("--lane")
    p.add_argument("--reason")
    p.add_argument("--since-ms", type=int)
    p.add_argument("--before-ms", type=int)
    p.add_argument("--new-message-id", action="store_true", help="replay under a new messageId")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_dlq)

    p = sub.add_parser("status", help="outbox, in flight, ambiguous, dead letters, limiter, drain, workers",
                       epilog="examples:\n  sms-worker status\n  sms-worker status --json | jq .lanes",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("logs", help="query the provider's GET /sms/3/logs (last 48 h)",
                       epilog="examples:\n  sms-worker logs --message-id sw-bulk-1764230000000-0\n"
                       "  sms-worker logs --bulk-id b1 --bulk-id b2 --general-status DELIVERED --limit 100\n"
                       "  sms-worker logs --sent-since 2026-11-27T08:00:00+00:00 --json",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    for flag in ("--message-id", "--bulk-id", "--campaign-reference-id"):
        p.add_argument(flag, action="append", default=[], help="repeat for several")
    for flag in ("--mcc", "--mnc", "--sender", "--destination", "--entity-id", "--application-id",
                 "--sent-since", "--sent-until"):
        p.add_argument(flag)
    p.add_argument("--general-status", choices=["ACCEPTED", "PENDING", "UNDELIVERABLE", "DELIVERED", "EXPIRED",
                                                "REJECTED"])
    p.add_argument("--limit", type=int)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_logs)

    p = sub.add_parser("reconcile", help="check messages against the provider's logs now and settle them",
                       epilog="examples:\n  sms-worker reconcile --message-id sw-bulk-1764230000000-0\n"
                       "  sms-worker reconcile --bulk-id 2034072219640523072",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--message-id", action="append", default=[])
    p.add_argument("--bulk-id", action="append", default=[])
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_reconcile)

    p = sub.add_parser("check", help="validate settings, vet Redis (eviction, persistence), verify the API key",
                       epilog="example:\n  sms-worker check", formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("demo", help="run the whole system locally and send a few thousand SMS",
                       epilog="example:\n  sms-worker demo --messages 3000",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--messages", type=int, default=3000)
    p.add_argument("--keep-logs", action="store_true", help="print where the processes' logs are")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except SmsWorkerError as error:
        print(f"sms-worker: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
