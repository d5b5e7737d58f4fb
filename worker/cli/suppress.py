"""`sms-worker suppress`: the suppression list (opt-outs): add, remove, list, import a file, check numbers.

Every number is normalised (worker.numbers) before it is stored or looked up, so "+41 79 302 67 27",
"0041793026727" and "41793026727" are one entry; the store (worker.store.suppression) holds one set.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from worker.cli import common
from worker.cli.errors import UsageError
from worker.errors import SmsWorkerError

if TYPE_CHECKING:
    from worker.store import Store

EPILOG = """examples:
  sms-worker suppress add 41793026727 "+49 151 23456789"
  sms-worker suppress add "079 302 67 27" --region CH
  sms-worker suppress remove 41793026727
  sms-worker suppress check 41793026727 --json
  sms-worker suppress list --limit 20
  sms-worker suppress list --limit 0 --show-numbers > opt-outs.txt
  sms-worker suppress import opt-outs.csv
  sms-worker suppress import former-opt-outs.txt --remove

Numbers on the list are not sent to on the lanes that respect it (`suppression`, on by default
for bulk, off for otp): such a job is rejected with reason "suppressed". Numbers are stored in
normal form, the job's `to` (E.164 digits without '+'): any spelling of a number finds its entry.
Without --region a number is international, with or without '+' ("41793026727", "+41 79 302 67 27",
"0041 79 302 67 27"); with --region CH a number without '+' is read as a Swiss national number
("079 302 67 27"). A number that is no possible number of its country is refused, named with why.

add, remove, check: any refused number refuses the command (exit 2); nothing is changed.

import FILE: one number per line, or CSV (comma, semicolon or tab) whose header names the number's
column (to, number, phone, msisdn, mobile, or --column NAME). Blank lines and lines starting with
'#' are skipped. Written 10,000 numbers a round trip as the file is read, so a file of millions
streams; a refused line is skipped and reported with its line number (exit 1 when any was).
Re-importing a file is harmless (a number already on the list stays once). --remove takes the
file's numbers off the list instead.

list: the numbers on the list, in no particular order (SSCAN: a walk of a list being changed may
miss numbers added or removed meanwhile), at most --limit (0: all). Numbers are masked
(41*******27) unless --show-numbers; the count goes to stderr, the numbers to stdout.
check: for each number, its normal form, whether it is suppressed, its region, type and validity.
"""

ACTIONS = ("add", "remove", "list", "import", "check")
# Header names of the number's column in an imported CSV file (compared case-insensitively).
NUMBER_COLUMNS = ("to", "number", "phone", "msisdn", "mobile", "phone_number", "destination")
IMPORT_CHUNK = 10_000  # numbers per write: one round trip (the store cuts it into commands of SUPPRESS_CHUNK)
PROGRESS_EVERY = 100_000  # lines between two plain progress lines (no terminal)
SHOWN_BAD = 50  # refused lines printed one by one; the rest are counted
SCAN_COUNT = 1000
LIST_LIMIT = 100


def register(sub: Any, command: Callable[..., argparse.ArgumentParser]) -> None:
    """Add `suppress` to the `sms-worker` parser (`command` is its subcommand maker)."""
    p = command(sub, "suppress", "the suppression list (opt-outs): add, remove, list, import, check", EPILOG)
    p.add_argument("action", choices=ACTIONS)
    p.add_argument("values", nargs="*", metavar="NUMBER|FILE", help="numbers (add, remove, check), a file (import)")
    p.add_argument("--region", metavar="CC", help="read numbers without '+' as national numbers of this region (CH)")
    p.add_argument("--remove", action="store_true", help="import: take the file's numbers off the list")
    p.add_argument("--column", metavar="NAME", help="import: the CSV header of the numbers' column")
    p.add_argument("--limit", type=int, help=f"list: at most this many numbers (default {LIST_LIMIT}; 0: all)")
    p.add_argument("--show-numbers", action="store_true", help="print numbers unmasked")
    p.add_argument("--json", action="store_true", help="list, check: one JSON document")
    p.set_defaults(func=cmd_suppress)


def cmd_suppress(args: argparse.Namespace) -> int:
    _check_flags(args)
    store = common.store(common.settings())
    try:
        if args.action == "list":
            return _list(store, args)
        if args.action == "import":
            return _import(store, Path(args.values[0]), args)
        normal = _normalise_all(args.values, args.region, args.action)
        if args.action == "check":
            return _check(store, normal, args)
        return _change(store, normal, add=args.action == "add")
    finally:
        store.close()


def _check_flags(args: argparse.Namespace) -> None:
    """Each flag only with its actions, and the values each action takes."""
    misplaced = [flag for flag, given, actions in (
        ("--remove", args.remove, {"import"}), ("--column", args.column is not None, {"import"}),
        ("--limit", args.limit is not None, {"list"}), ("--json", args.json, {"list", "check"}),
        ("--region", args.region is not None, {"add", "remove", "check", "import"}),
    ) if given and args.action not in actions]
    if misplaced:
        raise UsageError(f"suppress {args.action}: {', '.join(misplaced)} belong(s) to another action")
    if args.action == "list" and args.values:
        raise UsageError("suppress list takes no numbers (check NUMBER... looks numbers up)")
    if args.action == "list" and args.limit is not None and args.limit < 0:
        raise UsageError("suppress list: --limit is 0 (all) or more")
    if args.action == "import" and len(args.values) != 1:
        raise UsageError("suppress import takes one FILE")
    if args.action in ("add", "remove", "check") and not args.values:
        raise UsageError(f"suppress {args.action}: give one or more numbers")
    if args.region is not None:
        import phonenumbers

        if args.region.upper() not in phonenumbers.SUPPORTED_REGIONS:
            raise UsageError(f"--region {args.region}: not a region (an ISO 3166 code such as CH, DE, US)")


def _normalise_all(values: list[str], region: str | None, action: str) -> list[str]:
    """Every value in normal form; UsageError naming each refused one (and why) when any is."""
    from worker.numbers import normalise, problem

    normal = [normalise(value, region) for value in values]
    refused = [f"{value!r} ({problem(value, region)})" for value, n in zip(values, normal, strict=True) if n is None]
    if refused:
        raise UsageError(f"suppress {action}: refused {', '.join(refused)}; nothing changed")
    return [n for n in normal if n is not None]


def _shown(number: str, show: bool) -> str:
    from worker.logs import mask_phone

    return number if show else mask_phone(number)


# --- add, remove, check -------------------------------------------------------------------------
def _change(store: Store, numbers: list[str], *, add: bool) -> int:
    distinct = len(set(numbers))
    if add:
        changed = store.suppress(numbers)
        print(f"added {changed}" + (f" ({distinct - changed} already on the list)" if distinct > changed else "")
              + f"; list size {store.suppression_size():,}")
    else:
        changed = store.unsuppress(numbers)
        print(f"removed {changed}" + (f" ({distinct - changed} not on the list)" if distinct > changed else "")
              + f"; list size {store.suppression_size():,}")
    return 0


def _check(store: Store, normal: list[str], args: argparse.Namespace) -> int:
    from worker.numbers import facts

    found = store.suppressed(normal)
    rows = []
    for number, suppressed in zip(normal, found, strict=True):
        about = facts(number)
        rows.append({"number": _shown(number, args.show_numbers), "suppressed": suppressed,
                     "region": about.region, "number_type": about.number_type, "valid": about.valid})
    if args.json:
        common.print_json(rows)
        return 0
    for row in rows:
        state = "suppressed" if row["suppressed"] else "not suppressed"
        validity = "valid" if row["valid"] else "not valid"
        print(f"{row['number']:<17} {state:<15} {row['region'] or '-'} {row['number_type']} ({validity})")
    return 0


# --- list -----------------------------------------------------------------------------------------
def _list(store: Store, args: argparse.Namespace) -> int:
    """Walk the set with SSCAN (never SMEMBERS: the list may hold millions), text printed as it goes."""
    size = store.suppression_size()
    limit = (LIST_LIMIT if args.limit is None else args.limit) or None  # 0: all
    seen: set[str] = set()  # SSCAN may return a number twice while Redis resizes the set
    cursor = 0
    while limit is None or len(seen) < limit:
        cursor, numbers = store.scan_suppressed(cursor, SCAN_COUNT)
        for number in numbers:
            if number in seen:
                continue
            seen.add(number)
            if not args.json:
                print(_shown(number, args.show_numbers))
            if limit is not None and len(seen) >= limit:
                break
        if cursor == 0:
            break
    if args.json:
        common.print_json({"size": size, "shown": len(seen),
                           "numbers": [_shown(number, args.show_numbers) for number in seen]})
    else:
        more = f" (showing {len(seen):,}; --limit 0 for all)" if len(seen) < size else ""
        print(f"{size:,} numbers suppressed{more}", file=sys.stderr)
    return 0


# --- import ---------------------------------------------------------------------------------------
@dataclass
class _Imported:
    """What an import did so far."""

    lines: int = 0  # lines read (the last line number)
    bytes: int = 0  # of the file read
    numbers: int = 0  # numbers written
    changed: int = 0  # of them added (or removed) by this import
    bad: int = 0
    shown_bad: list[str] = field(default_factory=list)


def _lines(file: BinaryIO, done: _Imported) -> Iterator[str]:
    """The file's lines as text (newlines kept, as csv wants them), counting the bytes read."""
    first = True
    for number, raw in enumerate(file, 1):
        done.bytes += len(raw)
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise SmsWorkerError(f"{file.name}, line {number}: not UTF-8 text; save the file as UTF-8 "
                                 "(the numbers before this line were imported)") from None
        if first:
            line, first = line.removeprefix("\ufeff"), False  # a BOM (spreadsheets write one)
        yield line


def _number_column(first: list[str], column: str | None, path: Path) -> tuple[int, bool]:
    """(the index of the numbers' column, whether the first row is a header)."""
    names = [cell.strip().lower() for cell in first]
    if column is not None:
        if column.strip().lower() not in names:
            raise SmsWorkerError(f"{path}: --column {column}: the first row has no such column "
                                 f"(it has: {', '.join(cell.strip() for cell in first)})")
        return names.index(column.strip().lower()), True
    for name in NUMBER_COLUMNS:
        if name in names:
            return names.index(name), True
    if len(first) > 1:
        raise SmsWorkerError(f"{path}: {len(first)} columns and no header naming the numbers' column "
                             f"({', '.join(NUMBER_COLUMNS)}): add one, or give --column NAME")
    return 0, False


def _delimiter(line: str) -> str:
    for delimiter in (",", ";", "\t"):
        if delimiter in line:
            return delimiter
    return ","


def _rows(lines: Iterator[str]) -> Iterator[tuple[int, list[str]]]:
    """(the line a row starts on, its cells) for every row that is not blank or a '#' comment."""
    skipped = 0
    first = ""
    for text in lines:  # the first row tells the delimiter; blank and comment lines before it are skipped
        stripped = text.strip()
        if stripped and not stripped.startswith("#"):
            first = text
            break
        skipped += 1
    if not first:
        return
    reader = csv.reader(itertools.chain([first], lines), delimiter=_delimiter(first))
    end = skipped
    for cells in reader:
        start, end = end + 1, skipped + reader.line_num
        if any(cell.strip() for cell in cells) and not cells[0].lstrip().startswith("#"):
            yield start, cells


def _import(store: Store, path: Path, args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import Progress

    try:
        file = path.open("rb")
    except FileNotFoundError:
        raise UsageError(f"suppress import {path}: no such file") from None
    except OSError as error:
        raise SmsWorkerError(f"{path}: cannot read it ({error.strerror or error})") from None
    done = _Imported()
    # A progress bar only for a person watching; a log or a pipe gets a plain line now and then.
    watched = sys.stderr.isatty()
    started = time.monotonic()
    with file, Progress(console=Console(stderr=True), transient=True, disable=not watched) as progress:
        task = progress.add_task(f"import {path.name}", total=path.stat().st_size or None)
        chunk: list[tuple[int, str]] = []  # (line, cell) of the rows read since the last write
        column, header = -1, False
        for line, cells in _rows(_lines(file, done)):
            done.lines = line
            if column < 0:
                column, header = _number_column(cells, args.column, path)
                if header:
                    continue
            chunk.append((line, cells[column] if column < len(cells) else ""))
            if len(chunk) >= IMPORT_CHUNK:
                _write(store, chunk, done, path, args)
                chunk = []
                progress.update(task, completed=done.bytes)
                if not watched and done.lines // PROGRESS_EVERY > (done.lines - IMPORT_CHUNK) // PROGRESS_EVERY:
                    print(f"import {path.name}: line {done.lines:,}, {done.numbers:,} numbers written",
                          file=sys.stderr)
        if chunk:
            _write(store, chunk, done, path, args)
    return _report(store, path, done, args, time.monotonic() - started)


def _write(store: Store, chunk: list[tuple[int, str]], done: _Imported, path: Path, args: argparse.Namespace) -> None:
    """Normalise one chunk's cells, note the refused ones, and write the rest in one call."""
    from worker.numbers import normalise_many, problem

    numbers: list[str] = []
    for (line, value), number in zip(chunk, normalise_many([value for _, value in chunk], args.region), strict=True):
        if number is None:
            _refused(done, path, line, value, problem(value, args.region) or "refused", args.show_numbers)
        else:
            numbers.append(number)
    done.changed += store.unsuppress(numbers) if args.remove else store.suppress(numbers)
    done.numbers += len(numbers)


def _refused(done: _Imported, path: Path, line: int, value: str, why: str, show: bool) -> None:
    done.bad += 1
    if len(done.shown_bad) < SHOWN_BAD:
        done.shown_bad.append(f"{path.name} line {line}: {why}: {_shown_refused(value.strip(), show)!r}")


def _shown_refused(value: str, show: bool) -> str:
    """A refused cell with its digits masked but the last two, unless --show-numbers: a refused
    line is often a number all the same ("079 302 67 27" without --region)."""
    if show:
        return value
    return "".join("*" if c.isdigit() else c for c in value[:-2]) + value[-2:]


def _report(store: Store, path: Path, done: _Imported, args: argparse.Namespace, elapsed_s: float) -> int:
    for line in done.shown_bad:
        print(line, file=sys.stderr)
    if done.bad > len(done.shown_bad):
        print(f"... and {done.bad - len(done.shown_bad):,} more refused lines", file=sys.stderr)
    verb, other = ("removed", "not on the list") if args.remove else ("added", "already on the list")
    unchanged = done.numbers - done.changed
    print(f"imported {path.name}: {done.numbers:,} numbers in {elapsed_s:.1f} s, {verb} {done.changed:,}"
          + (f" ({unchanged:,} {other} or repeated)" if unchanged else "")
          + (f", {done.bad:,} lines refused" if done.bad else "")
          + f"; list size {store.suppression_size():,}")
    return 1 if done.bad else 0
