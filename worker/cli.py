"""The `sms-worker` command: run the processes, enqueue, inspect and repair. Errors are one line."""

from __future__ import annotations

import argparse
import csv
import io
import os
import shutil
import signal
import string
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

import orjson

from worker.errors import ConfigError, EnqueueIncomplete, JobValidationError, SmsWorkerError, StoreError
from worker.settings import ENV_FILE_VARIABLE, Settings, load_settings

EPILOG_ENQUEUE = """examples:
  sms-worker enqueue --to 41793026727 --text "Your code is 123456" --lane otp
  sms-worker enqueue --to 41793026727 --text "Hi" --id order-42 --metadata '{"order": 42}'
  sms-worker enqueue --csv people.csv --text-template "Hello {name}, your table is ready" --dry-run
  sms-worker enqueue --csv people.csv --text-template "Hello {name}, your table is ready"

CSV files (UTF-8, a header row first):
  to              required: the number, e.g. 41793026727
  text            the message, when no --text-template is given
  id              optional producer id (idempotency key): a row whose id was queued before is a
                  duplicate and not sent again, so rerunning a file with ids is safe
  meta.<key>      optional: metadata "<key>": "<cell>" echoed in the row's status events
                  (over --metadata's keys); e.g. columns meta.customer,meta.segment
  anything else   for {column} placeholders in --text-template
  Empty cells are left out. The file is queued whole or not at all: one bad row refuses it, and
  every bad row is listed with its line number.
"""
EPILOG_DLQ = """examples:
  sms-worker dlq list --lane bulk --reason bad_request
  sms-worker dlq show sw-bulk-1764230000000-0
  sms-worker dlq replay --all --reason retries_exhausted
  sms-worker dlq replay --all --reason unknown_lane --lane marketing --to-lane bulk
  sms-worker dlq purge --all --before-ms 1764230000000 --yes

A replay that would only be dead-lettered again (invalid_job, bad_request, a lane not configured)
is refused with the reason; --force replays it anyway. Report dead letters (report_*) are not jobs
and are never replayed. Each replay publishes a `requeued` status event.
"""


class UsageError(SmsWorkerError):
    """The command line itself is wrong (a flag, a file it names): exit 2, like argparse's errors."""


# The settings main() loaded (and configured logging from) for the running command.
_loaded: Settings | None = None


def _settings() -> Settings:
    return _loaded if _loaded is not None else load_settings()


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
    from worker.devtools.sandbox import server
    from worker.devtools.sandbox.config import config_from_args

    # The flags are checked here, so a mistake is one line (server.run raises ValueError for them).
    if not args.allow_remote:
        try:
            server._require_loopback(args.host)
        except ValueError as error:
            raise UsageError(f"{error}; --allow-remote binds it anyway (a private container network only: "
                             "the admin API has no auth)") from None
    if not args.api_key:
        raise UsageError("--api-key must not be empty")
    try:
        config = config_from_args(args)
    except ValueError as error:
        raise UsageError(str(error)) from None
    server.run(args.port, args.api_key, host=args.host, config=config, allow_remote=args.allow_remote)
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
META_PREFIX = "meta."
CSV_WRITE_CHUNK = 10_000  # rows per enqueue_many call: the progress bar moves, the calls stay fast


def _csv_text(path: Path) -> str:
    """The file's text; one clear SmsWorkerError when it cannot be read or is not UTF-8."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UsageError(f"--csv {path}: no such file") from None
    except OSError as error:
        raise SmsWorkerError(f"{path}: cannot read it ({error.strerror or error})") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise SmsWorkerError(
            f"{path}: not UTF-8 text (byte 0x{data[error.start]:02x} on line {line}); save it as UTF-8 "
            f"(\"CSV UTF-8\" in a spreadsheet, or iconv -f WINDOWS-1252 -t UTF-8)") from None


def _template_fields(template: str, columns: list[str], path: Path) -> list[tuple[str, str | None]]:
    """The template as (literal text, column or None) pieces; SmsWorkerError naming what is wrong."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as error:
        raise UsageError(f"--text-template {template!r}: {error} (write {{{{ and }}}} for literal braces)") from None
    pieces: list[tuple[str, str | None]] = []
    for literal, name, spec, conversion in parsed:
        if name is not None:
            shown = "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
            if spec or conversion:
                raise UsageError(f"--text-template: {shown}: placeholders are a plain {{column}}, like {{name}}")
            if not name or name.isdigit():
                raise UsageError(f"--text-template: {shown}: a placeholder must name a column, like {{name}}")
            if name not in columns:
                raise UsageError(f"--text-template: {shown} is not a column of {path.name} "
                                     f"(columns: {', '.join(columns)})")
        pieces.append((literal, name))
    return pieces


def _csv_jobs(
    path: Path, template: str | None, base: dict[str, Any]
) -> Iterator[tuple[int, dict[str, Any] | str]]:
    """(line number a row starts on, its job or why it is refused) for each data row, in file order.

    Columns: `to` (required), `text` (when there is no template), `id` (the producer id: a rerun
    of the file does not send a row twice), `meta.<key>` (a metadata string, over --metadata's),
    anything else for the template. Empty cells are left out. A file or template that cannot be
    used at all raises SmsWorkerError, one line."""
    reader = csv.reader(io.StringIO(_csv_text(path), newline=""))
    try:
        header = [name.strip() for name in next(reader, [])]
        if "to" not in header:
            raise SmsWorkerError(f"{path}: the first row must be a header with a `to` column"
                                 + (f" (it has: {', '.join(header)})" if header else " (the file is empty)"))
        repeated = sorted({name for name in header if header.count(name) > 1})
        if repeated:
            raise SmsWorkerError(f"{path}: the header repeats column(s) {', '.join(repeated)}")
        if template is None and "text" not in header:
            raise SmsWorkerError(f"{path}: no `text` column: add one, or give --text-template")
        pieces = _template_fields(template, header, path) if template is not None else None
        meta_columns = [(i, name[len(META_PREFIX):]) for i, name in enumerate(header) if name.startswith(META_PREFIX)]
        col = {name: i for i, name in enumerate(header)}
        end = reader.line_num
        for cells in reader:
            line, end = end + 1, reader.line_num
            if not any(cell.strip() for cell in cells):
                continue  # a blank line, or a row of empty cells (spreadsheets write those)
            if len(cells) > len(header):
                yield line, f"{len(cells)} fields, the header has {len(header)} (a comma in an unquoted field?)"
                continue
            cells += [""] * (len(header) - len(cells))
            job: dict[str, Any] = {**base, "to": cells[col["to"]].strip()}
            if pieces is None:
                job["text"] = cells[col["text"]]
            else:
                empty = [name for _, name in pieces if name is not None and not cells[col[name]]]
                if empty:
                    yield line, "; ".join(f"{name}: empty (used by --text-template)" for name in dict.fromkeys(empty))
                    continue
                job["text"] = "".join(literal + (cells[col[name]] if name is not None else "")
                                      for literal, name in pieces)
            if "id" in col and cells[col["id"]].strip():
                job["id"] = cells[col["id"]].strip()
            meta = {key: cells[i] for i, key in meta_columns if cells[i] != ""}
            if meta:
                job["metadata"] = {**base.get("metadata", {}), **meta}
            yield line, job
    except csv.Error as error:
        raise SmsWorkerError(f"{path}, line {reader.line_num}: not readable as CSV ({error})") from None


def _lines(lines: Sequence[int], most: int = 8) -> str:
    """Line numbers as ranges: `2-1001, 3002-4001`, the first `most` of them."""
    spans: list[list[int]] = []
    for n in lines:
        if spans and n == spans[-1][1] + 1:
            spans[-1][1] = n
        else:
            spans.append([n, n])
    shown = ", ".join(f"{a}-{b}" if a != b else str(a) for a, b in spans[:most])
    return shown + (f" and {len(spans) - most} more range(s)" if len(spans) > most else "")


def cmd_enqueue(args: argparse.Namespace) -> int:
    from worker.outbox import Outbox

    settings = _settings()
    store = _store(settings)
    outbox = Outbox(settings, store, wake=None if args.dry_run else _triggers(settings, store).dispatch)
    lane = args.lane or settings.sms_default_lane
    if lane not in settings.sms_lanes:
        raise UsageError(f"--lane {lane}: unknown lane; SMS_LANES has {', '.join(settings.sms_lanes)}")
    base: dict[str, Any] = {}
    if args.sender:
        base["sender"] = args.sender
    if args.metadata:
        try:
            base["metadata"] = orjson.loads(args.metadata)
        except orjson.JSONDecodeError as error:
            raise UsageError(f"--metadata is not JSON: {error}") from None
        if not isinstance(base["metadata"], dict):
            raise UsageError('--metadata must be a JSON object, like \'{"order": 42}\'')
    if args.csv is None:
        if not args.to or args.text is None:
            raise UsageError("give --to and --text, or --csv FILE")
        job = {**base, "to": args.to, "text": args.text}
        if args.id:
            job["id"] = args.id
        if args.dry_run:
            outbox.validate(job)
            print(f"dry run: the job is valid (lane {lane}); nothing written")
            return 0
        try:
            result = outbox.enqueue(job, lane)
        except EnqueueIncomplete as error:
            raise SmsWorkerError(f"not queued: {error}") from None
        print(f"{'queued' if result.queued else 'duplicate (already queued)'}: {result.message_id} lane={result.lane}")
        return 0
    if args.id:
        raise UsageError("--id is for one job; a CSV file gives each row's producer id in its `id` column")
    return _enqueue_csv(outbox, Path(args.csv), args.text_template, base, lane, dry_run=args.dry_run)


def _enqueue_csv(outbox: Any, path: Path, template: str | None, base: dict[str, Any], lane: str, *,
                 dry_run: bool = False) -> int:
    """All or nothing: every row is checked before the first is written, and one bad row refuses
    the file. Redis failing part-way is reported exactly (what was queued, what not, if a rerun
    is safe)."""
    from rich.console import Console
    from rich.progress import Progress

    rows: list[tuple[int, dict[str, Any]]] = []
    refused: list[tuple[int, str]] = []
    # A progress display only for a person watching: a log or a pipe gets the report alone.
    watched = sys.stderr.isatty()
    with Progress(console=Console(stderr=True), transient=True, disable=not watched) as progress:
        task = progress.add_task(f"check {path.name}", total=None)
        for line, job in _csv_jobs(path, template, base):
            if isinstance(job, str):
                refused.append((line, job))
            else:
                try:
                    outbox.validate(job)
                    rows.append((line, job))
                except JobValidationError as error:
                    refused.append((line, "; ".join(str(p) for p in error.problems)))
            if (len(rows) + len(refused)) % 1000 == 0:
                progress.update(task, completed=len(rows) + len(refused))
    total = len(rows) + len(refused)
    if not total:
        raise SmsWorkerError(f"{path}: no rows under the header: nothing to queue")
    for line, reason in refused:
        print(f"{path.name} line {line}: {reason}", file=sys.stderr)
    if refused and dry_run:
        print(f"sms-worker: dry run: {len(refused)} of {total} rows refused; nothing written", file=sys.stderr)
        return 1
    if refused:
        print(f"sms-worker: nothing queued: {len(refused)} of {total} rows refused (a file is queued whole or not "
              f"at all: fix them and run again; --dry-run checks without queueing)", file=sys.stderr)
        return 1
    with_id = sum(1 for _, job in rows if "id" in job)
    if dry_run:
        ids = [job["id"] for _, job in rows if "id" in job]
        repeats = len(ids) - len(set(ids))
        note = f"; {repeats} row(s) repeat an earlier row's id and would be duplicates (not sent)" if repeats else ""
        print(f"dry run: {total} rows valid, {with_id} with an id (lane {lane}); nothing written{note}")
        return 0
    answers: list[tuple[str, bool] | None] = []
    failure: StoreError | None = None
    with Progress(console=Console(stderr=True), disable=not watched) as progress:
        task = progress.add_task(f"enqueue {path.name}", total=total)
        for start in range(0, total, CSV_WRITE_CHUNK):
            chunk = [job for _, job in rows[start : start + CSV_WRITE_CHUNK]]
            try:
                answers += [(r.message_id, r.queued) for r in outbox.enqueue_many(chunk, lane)]
            except EnqueueIncomplete as error:
                answers += error.queued
                failure = error
                break
            except StoreError as error:
                failure = error
                break
            progress.advance(task, len(chunk))
    if failure is None:
        queued = sum(1 for answer in answers if answer is not None and answer[1])
        print(f"queued {queued}, duplicates {total - queued} of {total} rows (lane {lane})")
        return 0
    return _report_incomplete(path, rows, answers, failure, with_id)


def _report_incomplete(path: Path, rows: list[tuple[int, dict[str, Any]]], answers: list[tuple[str, bool] | None],
                       failure: StoreError, with_id: int) -> int:
    """What a CSV import that Redis stopped part-way left behind, line by line, and what to do."""
    known = isinstance(failure, EnqueueIncomplete)
    written = [line for (line, _), answer in zip(rows, answers, strict=False) if answer is not None]
    queued = sum(1 for answer in answers if answer is not None and answer[1])
    unknown = [] if known else [line for line, _ in rows[len(answers) : len(answers) + CSV_WRITE_CHUNK]]
    missing = [line for (line, _), answer in zip(rows, answers, strict=False) if answer is None]
    missing += [line for line, _ in rows[len(answers) + len(unknown) :]]
    print(f"sms-worker: Redis stopped the import part-way ({failure}): queued {queued} of {len(rows)} rows"
          + (f" ({len(written) - queued} duplicates)" if len(written) > queued else ""), file=sys.stderr)
    if unknown:
        print(f"  perhaps queued (Redis failed while writing them): lines {_lines(unknown)}", file=sys.stderr)
    if missing:
        print(f"  not queued: lines {_lines(missing)}", file=sys.stderr)
    if with_id == len(rows):
        print("  every row has an id: rerun the same command once Redis is fixed; rows already queued come back "
              "as duplicates and are not sent twice", file=sys.stderr)
    else:
        print(f"  {len(rows) - with_id} row(s) have no id: a rerun would queue those already queued again; rerun "
              f"only the lines not queued, or add an `id` column (producer ids make a rerun safe)", file=sys.stderr)
    return 1


# --- operators -------------------------------------------------------------------------------------
def _confirm(question: str, yes: bool, refusal: str) -> bool:
    """--yes, or a person at a terminal answering y; with neither, refuse (SmsWorkerError)."""
    if yes:
        return True
    if not sys.stdin.isatty():
        raise SmsWorkerError(f"{refusal}: give --yes (stdin is not a terminal, so there is no one to ask)")
    sys.stdout.write(f"{question} [y/N] ")
    sys.stdout.flush()
    return sys.stdin.readline().strip().lower() in ("y", "yes")


def cmd_dlq(args: argparse.Namespace) -> int:
    from worker.deadletters import DeadLetters

    settings = _settings()
    dlq = DeadLetters(_store(settings), settings)
    filters = {"lane": args.lane, "reason": args.reason, "since_ms": args.since_ms, "before_ms": args.before_ms}
    misplaced = [flag for flag, value, actions in (
        ("--force", args.force, {"replay"}), ("--new-message-id", args.new_message_id, {"replay"}),
        ("--to-lane", args.to_lane, {"replay"}), ("--yes", args.yes, {"purge"}),
        ("--all", args.all, {"replay", "purge"}),
    ) if value and args.action not in actions]
    if misplaced:
        raise UsageError(f"dlq {args.action}: {', '.join(misplaced)} belong(s) to another action")
    if args.action == "list":
        items = list(dlq.iterate(**filters))
        if args.json:
            _print_json([i.as_dict() for i in items])
        else:
            for i in items:
                print(f"{i.dlq_id}  {i.message_id or '-'}  lane={i.lane or '-'}  reason={i.reason}  "
                      f"attempts={i.attempts}  {i.detail[:80]}")
            print(f"{len(items)} dead letter(s)")
        return 0
    if args.action == "show":
        if len(args.ids) != 1:
            raise UsageError("dlq show needs one dead-letter id or messageId")
        found = dlq.get(args.ids[0])
        if found is None:
            raise SmsWorkerError(f"no dead letter {args.ids[0]!r}")
        _print_json(found.as_dict())
        return 0
    # replay and purge: the dead letters named, or --all of those the filters match.
    if args.ids and args.all:
        raise UsageError(f"dlq {args.action}: give dead-letter ids or --all, not both")
    if args.ids and any(value is not None for value in filters.values()):
        raise UsageError(f"dlq {args.action}: --lane, --reason, --since-ms and --before-ms narrow --all, not ids")
    if not args.ids and not args.all:
        raise UsageError(f"dlq {args.action}: give dead-letter ids, or --all (narrowed by --lane, --reason, "
                         "--since-ms, --before-ms)")
    if args.to_lane is not None and args.to_lane not in settings.sms_lanes:
        raise UsageError(f"--to-lane {args.to_lane}: unknown lane; SMS_LANES has {', '.join(settings.sms_lanes)}")
    if args.all:
        chosen = list(dlq.iterate(**filters))
    else:
        named = {name: dlq.get(name) for name in dict.fromkeys(args.ids)}
        missing = [name for name, item in named.items() if item is None]
        if missing:
            raise SmsWorkerError(f"no dead letter {', '.join(map(repr, missing))}: nothing done")
        chosen = list({item.dlq_id: item for item in named.values() if item is not None}.values())
    if not chosen:
        print(f"no dead letters match: nothing to {args.action}")
        return 0
    if args.action == "replay":
        return _replay(settings, dlq, chosen, args)
    described = ", ".join(f"{k.replace('_', '-')} {v}" for k, v in filters.items() if v is not None)
    question = f"purge {len(chosen)} dead letter(s){f' ({described})' if described else ''}? They cannot be restored."
    if args.all and not _confirm(question, args.yes, f"dlq purge --all would delete {len(chosen)} dead letter(s)"):
        print("nothing purged")
        return 1
    print(f"purged {dlq.purge(chosen)}")
    return 0


def _replay(settings: Settings, dlq: Any, chosen: list[Any], args: argparse.Namespace) -> int:
    """Replay what can do some good; say for each other one why not (and if --force would do it)."""
    import contextlib

    refusals = dlq.refusals(chosen, lane=args.to_lane)
    blocked = {dlq_id for dlq_id, refusal in refusals.items() if not (refusal.forceable and args.force)}
    not_replayed = 0
    lanes: dict[str, int] = {}
    for item in chosen:
        label = f"{item.dlq_id} ({item.reason}){' ' + item.message_id if item.message_id else ''}"
        if item.dlq_id in blocked:
            refusal = refusals[item.dlq_id]
            hint = "; --force replays it anyway" if refusal.forceable else ""
            print(f"sms-worker: not replayed: {label}: {refusal.why}{hint}", file=sys.stderr)
            not_replayed += 1
            continue
        try:
            dlq.replay(item, new_message_id=args.new_message_id, lane=args.to_lane)
        except SmsWorkerError as error:
            print(f"sms-worker: not replayed: {label}: {error}", file=sys.stderr)
            not_replayed += 1
            continue
        lane = args.to_lane or item.lane
        lanes[lane] = lanes.get(lane, 0) + 1
    if lanes:
        triggers = _triggers(settings, dlq.store)
        for lane in lanes:
            with contextlib.suppress(StoreError):  # the clock's tick wakes the lane anyway
                triggers.dispatch(lane)
    per_lane = ", ".join(f"{lane} {n}" for lane, n in lanes.items())
    print(f"replayed {sum(lanes.values())}" + (f" ({per_lane})" if per_lane else "")
          + (f", not replayed {not_replayed} (see above)" if not_replayed else ""))
    return 1 if not_replayed else 0


def cmd_status(args: argparse.Namespace) -> int:
    from worker.status import collect, render

    settings = _settings()
    status = collect(settings, _store(settings), all_outboxes=True)
    if args.json:
        _print_json(status.as_dict())
    else:
        print(render(status))
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    """Lift lanes' pauses now (after fixing an API key, or once the provider is back)."""
    import contextlib

    settings = _settings()
    store = _store(settings)
    if args.all and args.lane:
        raise UsageError("resume: give --lane or --all, not both")
    if not args.all and not args.lane:
        raise UsageError("resume: give --lane LANE (repeat it for several) or --all")
    lanes = list(settings.sms_lanes) if args.all else list(dict.fromkeys(args.lane))
    for lane in lanes:
        if lane not in settings.sms_lanes and store.paused(lane) is None:
            raise UsageError(f"--lane {lane}: unknown lane {lane!r}; SMS_LANES has {', '.join(settings.sms_lanes)}")
    triggers = _triggers(settings, store)
    lifted = []
    for lane in lanes:
        reason = store.paused(lane)
        if reason is None:
            print(f"{lane}: not paused")
            continue
        store.resume(lane)
        lifted.append(reason)
        print(f"{lane}: lifted the pause ({reason}); its dispatcher is woken now")
        if lane in settings.sms_lanes:
            with contextlib.suppress(StoreError):  # the clock's tick wakes the lane anyway
                triggers.dispatch(lane)
    if "auth" in lifted:
        print("if the API key is still refused, the next batch pauses the lane again (`sms-worker check` "
              "verifies the key the workers would use, from the same settings)")
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
    from worker.settings import unknown_variables
    from worker.store import redis_errors

    # The configuration first, whole: a wrong or missing setting stops the check before anything is
    # reached (ConfigError, exit 2). Variables that are no setting (misspelt ones) are warnings.
    settings = _settings()
    settings.require_api_key()
    print("configuration: ok")
    for unknown in unknown_variables():
        print(f"configuration warning: {unknown.line()}")
    store = _store(settings)
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
    with Provider(settings) as provider:
        # GET /sms/3/logs is read-only and re-readable; GET /sms/3/reports would consume reports.
        provider.logs(limit=1)
    print(f"icomm API: ok ({settings.icomm_base_url})")
    return 1 if problems else 0


def cmd_demo(args: argparse.Namespace) -> int:
    from worker.devtools.demo import run_demo

    return run_demo(messages=args.messages, keep_logs=args.keep_logs, keep=args.keep)


# --- parser ----------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    """A usage mistake is one line, like every other mistake (subcommands' parsers are this class too)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # No prefix matching: `demo --keep` must not quietly mean `--keep-logs` (or fail the day a
        # flag sharing its prefix is added).
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"sms-worker: {message} (see {self.prog} --help)\n")


def _port(value: str) -> int:
    try:
        port = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {value!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 0 to 65535, not {port}")
    return port


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="sms-worker",
        description="SMS dispatch worker for the icomm SMS API. Settings come from environment variables "
        "and an env file (.env here, or --env-file FILE; see config/example.env).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("sandbox", help="run the local icomm API sandbox",
                       epilog="example:\n  sms-worker sandbox --port 8900 --api-key dev-key --rate-429 0.05",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    from worker.devtools.sandbox.config import add_arguments as add_sandbox_arguments

    p.add_argument("--port", type=_port, default=8900)
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
    p.add_argument("--port", type=_port, default=8080)
    p.set_defaults(func=cmd_web)

    p = sub.add_parser("enqueue", help="queue one SMS or a CSV file of them", epilog=EPILOG_ENQUEUE,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--to")
    p.add_argument("--text")
    p.add_argument("--csv", metavar="FILE", help="CSV file, one row per recipient (columns below)")
    p.add_argument("--text-template", help="text with {column} placeholders, for --csv")
    p.add_argument("--lane", help="default: SMS_DEFAULT_LANE")
    p.add_argument("--id", help="producer id (idempotency key); in a CSV file, its `id` column")
    p.add_argument("--sender")
    p.add_argument("--metadata", help="JSON object echoed in every status event")
    p.add_argument("--dry-run", action="store_true", help="check everything, report, and write nothing")
    p.set_defaults(func=cmd_enqueue)

    p = sub.add_parser("dlq", help="list, show, replay or purge dead letters", epilog=EPILOG_DLQ,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["list", "show", "replay", "purge"])
    p.add_argument("ids", nargs="*", help="dead-letter ids or messageIds")
    p.add_argument("--all", action="store_true", help="replay/purge every dead letter matching the filters")
    p.add_argument("--lane", help="filter: dead letters of this lane")
    p.add_argument("--reason", help="filter: e.g. retries_exhausted, invalid_job, bad_request, unknown_lane")
    p.add_argument("--since-ms", type=int, help="filter: dead-lettered at or after this time (ms since epoch)")
    p.add_argument("--before-ms", type=int, help="filter: dead-lettered before this time (ms since epoch)")
    p.add_argument("--new-message-id", action="store_true",
                   help="replay under a new messageId (only for messages known never to have reached the provider)")
    p.add_argument("--to-lane", help="replay onto this lane instead of the dead letter's own")
    p.add_argument("--force", action="store_true", help="replay even those that would be dead-lettered again")
    p.add_argument("--yes", action="store_true", help="purge --all without asking")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_dlq)

    p = sub.add_parser("status", help="outbox, in flight, ambiguous, dead letters, limiter, drain, workers",
                       epilog="examples:\n  sms-worker status\n  sms-worker status --json | jq .lanes",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("resume", help="lift a lane's pause (auth, provider_unavailable) now",
                       epilog="examples:\n  sms-worker resume --lane bulk\n  sms-worker resume --lane otp --lane bulk\n"
                              "  sms-worker resume --all",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lane", action="append", help="a lane to resume (repeat for several)")
    p.add_argument("--all", action="store_true", help="every configured lane")
    p.set_defaults(func=cmd_resume)

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
    p.add_argument("--keep", action="store_true",
                   help="leave the stack running afterwards and print the commands to poke at it and stop it")
    p.set_defaults(func=cmd_demo)
    return parser


# --- the entry point: shared options, logging, and one line per mistake ------------------------------
ENV_FILE_HELP = "read settings from FILE (default: .env in the working directory); the environment wins over it"
# Commands that run without the worker's settings: the sandbox has its own flags, the demo its own stack.
_NO_SETTINGS = frozenset({"sandbox", "demo"})
# Commands that report variables that are no setting themselves (not as a log warning).
_OWN_WARNINGS = frozenset({"check"})


def _with_shared_options(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """`--env-file FILE` before the command or after it, for every command."""
    parser.add_argument("--env-file", metavar="FILE", help=ENV_FILE_HELP)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                sub.add_argument("--env-file", metavar="FILE", default=argparse.SUPPRESS, help=ENV_FILE_HELP)
    return parser


def _use_env_file(path: str | None) -> None:
    """Make FILE the env file of this command and of every process it starts (they inherit SMS_ENV_FILE)."""
    if path is None:
        return
    file = Path(path)
    if not file.exists():
        raise UsageError(f"--env-file {path}: no such file")
    if not file.is_file():
        raise UsageError(f"--env-file {path}: not a file")
    os.environ[ENV_FILE_VARIABLE] = str(file.resolve())


def _start(command: str) -> None:
    """Load the settings once and configure logging from them (LOG_LEVEL, LOG_FORMAT) for every command:
    unconfigured, structlog would print every level, debug included, to stdout."""
    global _loaded
    from worker import logs

    # Not cached: the long-running commands (clock, web; the workers in worker.broker) configure
    # again, cached, once they start.
    if command in _NO_SETTINGS:
        try:
            logs.configure_from(load_settings(), warn_unknown=False, cache=False)
        except ConfigError:
            logs.configure(cache=False)
        return
    _loaded = load_settings()
    logs.configure_from(_loaded, warn_unknown=command not in _OWN_WARNINGS, cache=False)


def _redis_hint(error: BaseException) -> str:
    redis = sys.modules.get("redis")
    cause = error.__cause__ if isinstance(error, StoreError) else error
    if redis is None or not isinstance(cause, redis.ConnectionError | redis.TimeoutError):
        return ""
    if isinstance(cause, redis.AuthenticationError):
        return " (Redis refused the credentials: check the user and password in REDIS_URL)"
    if _loaded is None:
        return " (Redis is unreachable: is it running, and is REDIS_URL right?)"
    from urllib.parse import urlsplit

    url = urlsplit(_loaded.redis_url)  # host and port only: never the URL's password
    where = url.path if url.scheme == "unix" else f"{url.hostname}:{url.port or 6379}"
    return f" (Redis is unreachable at {where}: is it running, and is REDIS_URL right?)"


def _user_error(error: Exception) -> tuple[str, int] | None:
    """(the line to print, the exit code) for an expected mistake; None for a bug (it keeps its traceback)."""
    if isinstance(error, UsageError | ConfigError):
        return str(error), 2
    if isinstance(error, StoreError):
        return f"{error}{_redis_hint(error)}", 1
    if isinstance(error, SmsWorkerError):  # JobValidationError, ProviderError, ...
        return str(error), 1
    redis = sys.modules.get("redis")
    if redis is not None and isinstance(error, redis.ConnectionError | redis.TimeoutError):
        return f"Redis: {type(error).__name__}: {error}{_redis_hint(error)}", 1
    # Input the user gave (a file, a template, a value): what is wrong with it, in one line.
    if isinstance(error, UnicodeDecodeError):
        return f"not UTF-8 text ({error.reason}: byte 0x{error.object[error.start]:02x} at {error.start}); " \
               "save it as UTF-8", 1
    if isinstance(error, OSError):
        where = f"{error.filename}: " if error.filename else ""
        return f"{where}{error.strerror or error}", 1
    if isinstance(error, ValueError):
        return str(error) or type(error).__name__, 1
    return None


def _stdout_closed() -> int:
    """The reader of stdout went away (`sms-worker status | head -4`): stop quietly, as cat or grep do.

    What is still buffered goes to /dev/null, so the interpreter's last flush does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # stdout is no file (captured): nothing is left to fail
        pass
    return 141  # 128 + SIGPIPE, what a shell reports for a writer killed by a closed pipe


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. A user's mistake (a wrong setting or flag, Redis unreachable, a bad file or
    value) is one line `sms-worker: ...` on stderr and exit 2 (usage, configuration) or 1; Ctrl-C is
    130; a closed stdout is a quiet 141. Any other exception is a bug and keeps its traceback."""
    global _loaded
    try:
        args = _with_shared_options(build_parser()).parse_args(argv)
        _use_env_file(args.env_file)
        _start(args.command)
        func: Callable[[argparse.Namespace], int] = args.func
        code = func(args)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's last flush
        return code
    except BrokenPipeError:
        return _stdout_closed()
    except KeyboardInterrupt:
        return 130
    except SystemExit:  # argparse's --help or usage error, or a server's exit
        try:
            sys.stdout.flush()
        except BrokenPipeError:
            return _stdout_closed()
        raise
    except Exception as error:
        known = _user_error(error)
        if known is None:
            raise
        message, code = known
        lines = message.splitlines() if isinstance(error, ConfigError) else [" ".join(message.split())]
        for line in lines or [type(error).__name__]:
            print(f"sms-worker: {line}", file=sys.stderr)
        return code
    finally:
        _loaded = None


if __name__ == "__main__":
    sys.exit(main())
