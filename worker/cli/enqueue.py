"""`sms-worker enqueue`: one SMS from flags, or a CSV file of them, queued whole or not at all."""

from __future__ import annotations

import argparse
import csv
import io
import string
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from worker.cli import common
from worker.cli.errors import UsageError
from worker.errors import EnqueueIncomplete, JobValidationError, SmsWorkerError, StoreError

if TYPE_CHECKING:
    from worker.outbox import Outbox

EPILOG = """examples:
  sms-worker enqueue --to 41793026727 --text "Your code is 123456" --lane otp
  sms-worker enqueue --to 41793026727 --text "Hi" --id order-42 --metadata '{"order": 42}'
  sms-worker enqueue --to 41793026727 --text "See you at 9" --send-at 2026-12-01T08:30:00+01:00
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
META_PREFIX = "meta."
CSV_WRITE_CHUNK = 10_000  # rows per enqueue_many call: the progress bar moves, the calls stay fast

Row = tuple[int, dict[str, Any]]  # (the line a row starts on, its job)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--to")
    p.add_argument("--text")
    p.add_argument("--csv", metavar="FILE", help="CSV file, one row per recipient (columns below)")
    p.add_argument("--text-template", help="text with {column} placeholders, for --csv")
    p.add_argument("--lane", help="default: SMS_DEFAULT_LANE")
    p.add_argument("--id", help="producer id (idempotency key); in a CSV file, its `id` column")
    p.add_argument("--sender")
    p.add_argument("--metadata", help="JSON object echoed in every status event")
    p.add_argument("--send-at", metavar="TIME",
                   help="send at this RFC 3339 time with an offset (e.g. 2026-12-01T08:30:00Z); held until "
                        "then, at most SMS_SCHEDULE_HORIZON_S ahead; a past time sends at once")
    p.add_argument("--dry-run", action="store_true", help="check everything, report, and write nothing")


def cmd_enqueue(args: argparse.Namespace) -> int:
    from worker.producer import producer

    settings = common.settings()
    with producer(settings, wake=not args.dry_run) as queue:
        lane = args.lane or settings.sms_default_lane
        if lane not in settings.sms_lanes:
            raise UsageError(f"--lane {lane}: unknown lane; SMS_LANES has {', '.join(settings.sms_lanes)}")
        base = _base_job(args)
        if args.csv is None:
            return _enqueue_one(queue.outbox, args, base, lane)
        if args.id:
            raise UsageError("--id is for one job; a CSV file gives each row's producer id in its `id` column")
        return enqueue_csv(queue.outbox, Path(args.csv), args.text_template, base, lane, dry_run=args.dry_run)


def _base_job(args: argparse.Namespace) -> dict[str, Any]:
    """What every job of this command has: --sender, --metadata."""
    base: dict[str, Any] = {}
    if args.sender:
        base["sender"] = args.sender
    if args.send_at:
        base["send_at"] = args.send_at
    if args.metadata:
        try:
            base["metadata"] = orjson.loads(args.metadata)
        except orjson.JSONDecodeError as error:
            raise UsageError(f"--metadata is not JSON: {error}") from None
        if not isinstance(base["metadata"], dict):
            raise UsageError('--metadata must be a JSON object, like \'{"order": 42}\'')
    return base


def _enqueue_one(outbox: Outbox, args: argparse.Namespace, base: dict[str, Any], lane: str) -> int:
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
    what = "queued" if result.queued else "duplicate (already queued)"
    if result.queued and _later(job):
        what = f"scheduled for {job['send_at']}"
    print(f"{what}: {result.message_id} lane={result.lane}")
    return 0


def _later(job: dict[str, Any]) -> bool:
    """Whether a valid job's send_at is still ahead (it was scheduled, not appended)."""
    import time

    from worker.models import parse_send_at

    return "send_at" in job and parse_send_at(str(job["send_at"])) > time.time() * 1000


# --- reading the file ------------------------------------------------------------------------------
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


@dataclass(frozen=True)
class _Layout:
    """What the header row says: where each column is, and how a row becomes a job."""

    header: list[str]
    col: dict[str, int]
    pieces: list[tuple[str, str | None]] | None  # the parsed --text-template, None for a `text` column
    meta_columns: list[tuple[int, str]]  # (column, metadata key) of the meta.<key> columns
    base: dict[str, Any]

    @classmethod
    def of(cls, header: list[str], path: Path, template: str | None, base: dict[str, Any]) -> _Layout:
        """The layout of a header; SmsWorkerError when no row of the file could be used."""
        if "to" not in header:
            raise SmsWorkerError(f"{path}: the first row must be a header with a `to` column"
                                 + (f" (it has: {', '.join(header)})" if header else " (the file is empty)"))
        repeated = sorted({name for name in header if header.count(name) > 1})
        if repeated:
            raise SmsWorkerError(f"{path}: the header repeats column(s) {', '.join(repeated)}")
        if template is None and "text" not in header:
            raise SmsWorkerError(f"{path}: no `text` column: add one, or give --text-template")
        return cls(
            header=header, col={name: i for i, name in enumerate(header)},
            pieces=_template_fields(template, header, path) if template is not None else None,
            meta_columns=[(i, name[len(META_PREFIX):]) for i, name in enumerate(header)
                          if name.startswith(META_PREFIX)],
            base=base,
        )

    def job(self, cells: list[str]) -> dict[str, Any] | str:
        """A row's job, or why it is refused."""
        if len(cells) > len(self.header):
            return f"{len(cells)} fields, the header has {len(self.header)} (a comma in an unquoted field?)"
        cells = cells + [""] * (len(self.header) - len(cells))
        empty = [name for _, name in self.pieces or [] if name is not None and not cells[self.col[name]]]
        if empty:
            return "; ".join(f"{name}: empty (used by --text-template)" for name in dict.fromkeys(empty))
        job: dict[str, Any] = {**self.base, "to": cells[self.col["to"]].strip(), "text": self._text(cells)}
        if "id" in self.col and cells[self.col["id"]].strip():
            job["id"] = cells[self.col["id"]].strip()
        meta = {key: cells[i] for i, key in self.meta_columns if cells[i] != ""}
        if meta:
            job["metadata"] = {**self.base.get("metadata", {}), **meta}
        return job

    def _text(self, cells: list[str]) -> str:
        """The row's text: its `text` cell, or the template filled in."""
        if self.pieces is None:
            return cells[self.col["text"]]
        return "".join(literal + (cells[self.col[name]] if name is not None else "") for literal, name in self.pieces)


def csv_jobs(path: Path, template: str | None, base: dict[str, Any]) -> Iterator[tuple[int, dict[str, Any] | str]]:
    """(line number a row starts on, its job or why it is refused) for each data row, in file order.

    Columns: `to` (required), `text` (when there is no template), `id` (the producer id: a rerun
    of the file does not send a row twice), `meta.<key>` (a metadata string, over --metadata's),
    anything else for the template. Empty cells are left out. A file or template that cannot be
    used at all raises SmsWorkerError, one line."""
    reader = csv.reader(io.StringIO(_csv_text(path), newline=""))
    try:
        layout = _Layout.of([name.strip() for name in next(reader, [])], path, template, base)
        end = reader.line_num
        for cells in reader:
            line, end = end + 1, reader.line_num
            if any(cell.strip() for cell in cells):  # not a blank line, nor a row of empty cells (spreadsheets)
                yield line, layout.job(cells)
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


# --- queueing it -----------------------------------------------------------------------------------
def enqueue_csv(outbox: Outbox, path: Path, template: str | None, base: dict[str, Any], lane: str, *,
                dry_run: bool = False) -> int:
    """All or nothing: every row is checked before the first is written, and one bad row refuses
    the file. Redis failing part-way is reported exactly (what was queued, what not, if a rerun
    is safe)."""
    # A progress display only for a person watching: a log or a pipe gets the report alone.
    watched = sys.stderr.isatty()
    rows, refused = _check_rows(outbox, path, template, base, watched)
    total = len(rows) + len(refused)
    if not total:
        raise SmsWorkerError(f"{path}: no rows under the header: nothing to queue")
    if refused:
        return _refuse(path, refused, total, dry_run=dry_run)
    with_id = sum(1 for _, job in rows if "id" in job)
    if dry_run:
        ids = [job["id"] for _, job in rows if "id" in job]
        repeats = len(ids) - len(set(ids))
        note = f"; {repeats} row(s) repeat an earlier row's id and would be duplicates (not sent)" if repeats else ""
        print(f"dry run: {total} rows valid, {with_id} with an id (lane {lane}); nothing written{note}")
        return 0
    answers, failure = _write_rows(outbox, path, rows, lane, watched)
    if failure is None:
        queued = sum(1 for answer in answers if answer is not None and answer[1])
        print(f"queued {queued}, duplicates {total - queued} of {total} rows (lane {lane})")
        return 0
    return _report_incomplete(path, rows, answers, failure, with_id)


def _refuse(path: Path, refused: list[tuple[int, str]], total: int, *, dry_run: bool) -> int:
    """Every refused row with why, then that nothing was queued."""
    for line, reason in refused:
        print(f"{path.name} line {line}: {reason}", file=sys.stderr)
    if dry_run:
        print(f"sms-worker: dry run: {len(refused)} of {total} rows refused; nothing written", file=sys.stderr)
    else:
        print(f"sms-worker: nothing queued: {len(refused)} of {total} rows refused (a file is queued whole or not "
              f"at all: fix them and run again; --dry-run checks without queueing)", file=sys.stderr)
    return 1


def _check_rows(outbox: Outbox, path: Path, template: str | None, base: dict[str, Any],
                watched: bool) -> tuple[list[Row], list[tuple[int, str]]]:
    """(the valid rows, the refused ones with why), every row of the file validated."""
    from rich.console import Console
    from rich.progress import Progress

    rows: list[Row] = []
    refused: list[tuple[int, str]] = []
    with Progress(console=Console(stderr=True), transient=True, disable=not watched) as progress:
        task = progress.add_task(f"check {path.name}", total=None)
        for line, job in csv_jobs(path, template, base):
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
    return rows, refused


def _write_rows(outbox: Outbox, path: Path, rows: list[Row], lane: str,
                watched: bool) -> tuple[list[tuple[str, bool] | None], StoreError | None]:
    """(an answer per row written: (message id, queued) or None, the failure that stopped it if one did)."""
    from rich.console import Console
    from rich.progress import Progress

    answers: list[tuple[str, bool] | None] = []
    with Progress(console=Console(stderr=True), disable=not watched) as progress:
        task = progress.add_task(f"enqueue {path.name}", total=len(rows))
        for start in range(0, len(rows), CSV_WRITE_CHUNK):
            chunk = [job for _, job in rows[start : start + CSV_WRITE_CHUNK]]
            try:
                answers += [(r.message_id, r.queued) for r in outbox.enqueue_many(chunk, lane)]
            except EnqueueIncomplete as error:
                answers += error.queued
                return answers, error
            except StoreError as error:
                return answers, error
            progress.advance(task, len(chunk))
    return answers, None


def _report_incomplete(path: Path, rows: list[Row], answers: list[tuple[str, bool] | None],
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
