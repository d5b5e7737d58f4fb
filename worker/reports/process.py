"""Processing: raw pages from the consumer group -> parsed -> one fetch and one apply per batch.

    {p}:reports:raw --XREADGROUP / XAUTOCLAIM--> parse_page --> report_fetch.lua (rows)
        --> ops planned here (events built) --> report_apply.lua (states, events, parking, dead
            letters, XACK+XDEL, in one step per call)

A batch that fails because of what it holds is split, page by page and then report by report, so
one bad entry never holds back the rest; a failure of Redis itself leaves the pages pending for
XAUTOCLAIM. Parked reports (of messages not known yet) are retried by `retry_parked` (parked.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

import orjson
import structlog

from worker import events, metrics
from worker.deadletters import report_dead_letter
from worker.errors import StoreError
from worker.reports import parked
from worker.reports.drain import Wake
from worker.reports.ops import (
    APPLIED,
    CONFLICT,
    PARKED,
    PARKED_SOURCE,
    RAW_GROUP,
    Op,
    OpCode,
    ReportState,
    Row,
    is_open,
    job_of,
    price_spec,
)
from worker.reports.parse import FinalReport, Page, parse_page
from worker.settings import Settings
from worker.statuses import FINAL_GROUPS
from worker.store import Store, consumer_name
from worker.store.reports import RawEntry, lost_group, refused_for_its_arguments

log = structlog.get_logger("worker.reports")

# Reports per apply call: big enough to amortise the round trips, small enough that one Lua call
# holds Redis for only a few milliseconds.
BATCH_REPORTS: Final = 1000
READ_PAGES: Final = 16  # raw entries per XREADGROUP
# A raw entry pending this long belongs to a processor that died (a batch takes milliseconds).
CLAIM_IDLE_MS: Final = 10_000
RUN_BUDGET_S: Final = 2.0
APPLY_ATTEMPTS: Final = 4
# The event type of each final group.
_KIND: Final[dict[str, str]] = {str(group): group.lower() for group in FINAL_GROUPS}


@dataclass(frozen=True, slots=True)
class ProcessConfig:
    """The settings the processor (and its parked retries) reads."""

    events_maxlen: int
    park_timeout_ms: int
    emit_unknown: bool  # SMS_UNKNOWN_REPORTS=emit: a report parked too long becomes unknown_message

    @classmethod
    def from_settings(cls, settings: Settings) -> ProcessConfig:
        return cls(
            events_maxlen=settings.sms_events_stream_maxlen,
            park_timeout_ms=int(settings.sms_report_park_timeout_s * 1000),
            emit_unknown=settings.sms_unknown_reports == "emit",
        )


@dataclass
class Tally:
    """Counts for the canonical log lines."""

    pages: int = 0
    reports: int = 0
    applied: int = 0
    duplicates: int = 0
    intermediate: int = 0
    parked: int = 0
    dead_letters: int = 0
    conflicts: int = 0
    unacked: int = 0

    def add(self, other: Tally) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


def _observe_lag(done_at: object, now: float) -> None:
    """Report lag: from the provider's doneAt to our event (a clock skew makes it approximate).
    fromisoformat reads the API's `2026-11-27T10:00:00.000+0000` in C; strptime took a sixth of
    the processor's time."""
    if isinstance(done_at, str):
        try:
            done = datetime.fromisoformat(done_at)
        except ValueError:
            return
        if done.tzinfo is not None:
            metrics.REPORT_LAG.observe(max(0.0, now - done.timestamp()))


def _parse(entry_id: str, fields: dict[bytes, bytes] | None) -> Page:
    """parse_page, and should it ever raise, the whole entry as a dead letter with its body."""
    try:
        return parse_page(entry_id, fields)
    except Exception as error:  # noqa: BLE001 -- a page that breaks the parser must not block the others
        source = (fields or {}).get(b"src", b"?").decode("ascii", "replace")
        raw = (fields or {}).get(b"page") or b""
        detail = f"{type(error).__name__}: {error}"[:1000]
        log.error("report_page_unparsable", source=source, error=detail)
        entry = report_dead_letter("report_page_unprocessable", detail, source, entry_id,
                                   page=raw.decode("utf-8", "replace"))
        return Page(entry_id, source, dead=[("", entry)])


def _caused_by_entries(error: Exception) -> bool:
    """Whether a batch failed because of what it holds (isolate it) rather than Redis (retry it)."""
    return not isinstance(error, StoreError) or refused_for_its_arguments(error)


@dataclass(slots=True)
class _Batch:
    """What one apply of pages carries: the raw entries to acknowledge and their dead letters (only
    when it acknowledges), and the final reports still to apply."""

    acks: list[str]
    dead: list[tuple[str, bytes]]
    todo: list[FinalReport]
    pages: int  # pages acknowledged (0 without ack)
    intermediate: int  # their intermediate reports (counted only with ack)

    @classmethod
    def of(cls, pages: Sequence[Page], *, ack: bool) -> _Batch:
        todo = [f for p in pages for f in p.finals]
        if not ack:
            return cls(acks=[], dead=[], todo=todo, pages=0, intermediate=0)
        return cls(acks=[p.entry_id for p in pages], dead=[d for p in pages for d in p.dead], todo=todo,
                   pages=len(pages), intermediate=sum(p.intermediate for p in pages))

    def tally(self) -> Tally:
        """The batch's counts before anything is applied."""
        return Tally(pages=self.pages, reports=len(self.todo) + self.intermediate + len(self.dead),
                     intermediate=self.intermediate)


class Processor:
    """Reads raw pages with a consumer group and applies them, one fetch and one apply per batch."""

    def __init__(
        self, config: ProcessConfig, store: Store, wake: Wake | None = None, *, consumer: str | None = None,
        claim_idle_ms: int = CLAIM_IDLE_MS, batch_reports: int = BATCH_REPORTS, state: ReportState | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.wake = wake
        self.consumer = consumer or consumer_name()
        self.claim_idle_ms = claim_idle_ms
        self.batch_reports = batch_reports
        # A seam: a test passes a ReportState that fails where a crash would cut the work.
        self.state = state or ReportState(store, config.events_maxlen)
        self._group_ready = False

    # --- reading the raw stream ----------------------------------------------------------------
    def _ensure_group(self) -> None:
        if not self._group_ready:
            self.store.create_report_group(RAW_GROUP)
            self._group_ready = True

    def _grouped(self, call: Callable[[], list[RawEntry]]) -> list[RawEntry]:
        """Run a read of the consumer group; if the group is gone, recreate it and retry once.

        It disappears when Redis lost its data (restarted without persistence, flushed, failed over
        to an empty replica): every read then fails with NOGROUP until someone recreates it, so the
        group made once at start-up is not enough. Said loudly, because everything else Redis held
        (unprocessed pages, message states, parked reports) is gone too."""
        try:
            return call()
        except StoreError as error:
            if not lost_group(error):
                raise
        stream_exists = self.store.report_stream_exists()
        log.error("redis_state_lost", missing=f"consumer group {RAW_GROUP!r} of {self.store.reports_raw}",
                  stream_missing=not stream_exists, action="recreated; reading on",
                  detail="Redis lost its data (restarted without persistence?): reports, states and events "
                         "it held are gone")
        metrics.REPORTS_STATE_RECREATED.labels("reports_group").inc()
        self.store.create_report_group(RAW_GROUP)
        return call()

    def _read(self, count: int) -> list[RawEntry]:
        return self._grouped(lambda: self.store.read_report_pages(RAW_GROUP, self.consumer, count))

    def _claim_stale(self, limit: int = 100) -> list[RawEntry]:
        """Entries a dead processor read but never acknowledged (XAUTOCLAIM), oldest first."""
        return self._grouped(lambda: self.store.claim_stale_report_pages(
            RAW_GROUP, self.consumer, self.claim_idle_ms, limit))

    def process(self, budget_s: float = RUN_BUDGET_S) -> Tally:
        """Apply raw pages until the stream is empty or the budget is spent (then wake a successor)."""
        self._ensure_group()
        deadline = time.monotonic() + budget_s
        total = Tally()
        stale = self._claim_stale()
        if stale:
            log.warning("reports_pages_recovered", pages=len(stale))
            total.add(self.handle(stale))
        while True:
            if time.monotonic() > deadline:
                if self.wake is not None:
                    self.wake.process_reports()
                break
            entries = self._read(READ_PAGES)
            if not entries:
                break
            if len(entries) == READ_PAGES and self.wake is not None:
                # A backlog: let a sibling (another thread or worker) take pages in parallel.
                self.wake.process_reports()
            total.add(self.handle(entries))
        return total

    def handle(self, entries: Iterable[RawEntry]) -> Tally:
        """Parse entries and apply them in batches of about `batch_reports` reports."""
        total = Tally()
        batch: list[Page] = []
        size = 0
        for entry_id, fields in entries:
            page = _parse(entry_id, fields)
            batch.append(page)
            size += len(page.finals)
            if size >= self.batch_reports:
                total.add(self._apply_isolating(batch))
                batch, size = [], 0
        if batch:
            total.add(self._apply_isolating(batch))
        return total

    # --- applying, isolating what fails --------------------------------------------------------
    def _apply_isolating(self, pages: list[Page]) -> Tally:
        """Apply a batch; if it fails because of what it holds, apply its pages one by one, and a
        failing page report by report, so one bad entry never holds back the rest.

        A failure of Redis itself (unreachable, out of memory, loading) is raised instead: the
        pages stay pending and are taken up again (XAUTOCLAIM), nothing is dead-lettered."""
        try:
            return self._apply_pages(pages)
        except Exception as error:  # whatever an entry makes fail must not block the others
            if not _caused_by_entries(error):
                raise
            log.error("reports_batch_failed", pages=len(pages), error_class=type(error).__name__,
                      error=str(error)[:500], isolating="pages" if len(pages) > 1 else "reports")
        if len(pages) > 1:
            total = Tally()
            for page in pages:
                total.add(self._apply_isolating([page]))
            return total
        return self._apply_one_by_one(pages[0])

    def _apply_one_by_one(self, page: Page) -> Tally:
        """A page that failed to apply: each final report alone; one that fails goes to the dead
        letters with its report and the reason; then the page is acknowledged with them."""
        total = Tally()
        dead = list(page.dead)
        for final in page.finals:
            try:
                one = self._apply_pages([Page(page.entry_id, page.source, [final])], ack=False)
            except Exception as error:  # see _apply_isolating
                if not _caused_by_entries(error):
                    raise
                dead.append((final.message_id, report_dead_letter(
                    "report_unprocessable", f"{type(error).__name__}: {error}"[:1000], page.source, page.entry_id,
                    item=final.item)))
                continue
            total.add(one)
            if one.unacked:  # a conflict that did not settle: the whole page is retried later
                total.unacked = 1
                return total
        rest = Page(page.entry_id, page.source, intermediate=page.intermediate, dead=dead,
                    unknown_status=page.unknown_status)
        total.add(self._apply_pages([rest]))
        return total

    # --- one apply -------------------------------------------------------------------------------
    def _apply_pages(self, pages: list[Page], *, ack: bool = True) -> Tally:
        """Apply the final reports of `pages`, and (with `ack`) write their dead letters and
        acknowledge them in the same last call. Without `ack` only the reports are applied (the
        ops are idempotent): the caller acknowledges the pages afterwards."""
        started = time.perf_counter()
        batch = _Batch.of(pages, ack=ack)
        tally = batch.tally()
        acked = self._apply_until_settled(batch, tally)
        if acked:
            tally.dead_letters = len(batch.dead)
            _log_dead_letters(batch.dead)
            if ack:
                _log_unknown_statuses(pages)
        else:
            # Left pending: XAUTOCLAIM hands the pages to a processor again after claim_idle_ms.
            tally.unacked = len(pages)
            log.warning("reports_apply_conflicts", pages=len(pages), conflicts=len(batch.todo))
        _count(tally)
        (log.info if ack else log.debug)(
                 "reports_processed", pages=tally.pages, reports=tally.reports, applied=tally.applied,
                 duplicates=tally.duplicates, intermediate=tally.intermediate, parked=tally.parked,
                 dead_letters=tally.dead_letters, conflicts=tally.conflicts,
                 sources=sorted({p.source for p in pages}),
                 duration_ms=round((time.perf_counter() - started) * 1000, 1))
        return tally

    def _apply_until_settled(self, batch: _Batch, tally: Tally) -> bool:
        """Fetch, plan and apply until no op conflicts (at most APPLY_ATTEMPTS rounds); each round
        retries only the reports whose message changed meanwhile. Returns whether it acknowledged."""
        at = events.now_iso()
        now = time.time()
        acked = False
        for _ in range(APPLY_ATTEMPTS):
            rows = self.state.fetch(list(dict.fromkeys(f.message_id for f in batch.todo)))
            ops, sources, duplicates = self._plan(batch.todo, rows, at)
            tally.duplicates += duplicates
            acked, results = self.state.apply(ops, ack=batch.acks, dead=batch.dead)
            batch.todo = _tally_results(results, sources, tally, now)
            if acked:
                break
        return acked

    @staticmethod
    def _plan(finals: Sequence[FinalReport], rows: dict[str, Row], at: str) -> tuple[list[Op], list[FinalReport], int]:
        """Ops for final reports from raw pages; returns (ops, the report of each op, duplicates)."""
        ops: list[Op] = []
        sources: list[FinalReport] = []
        closed: set[str] = set()  # moved to a final state earlier in this batch
        duplicates = 0
        for f in finals:
            mid = f.message_id
            row = rows[mid]
            if row.state is None:
                # The source rides with the parked report, for the trail when it is applied.
                op = Op(OpCode.PARK, mid, payload=orjson.dumps({**f.item, PARKED_SOURCE: f.source}))
            elif mid in closed or not is_open(row):
                duplicates += 1
                continue
            else:
                closed.add(mid)
                op = Op(OpCode.APPLY, mid, f.group, f.status_name, _final_event(f, row, at),
                        price_spec(f.item) if row.campaign else "", f.source)
            ops.append(op)
            sources.append(f)
        return ops, sources, duplicates

    # --- parked reports ------------------------------------------------------------------------
    def retry_parked(self, now_ms: int | None = None) -> dict[str, int]:
        """Apply parked reports whose message exists now; give up on those parked too long."""
        return parked.retry_parked(self.state, self.store, self.config.park_timeout_ms, self.config.emit_unknown,
                                   now_ms if now_ms is not None else events.now_ms())


def _final_event(final: FinalReport, row: Row, at: str) -> bytes:
    """The event of a final report (ops.report_event, with the job read inline: the hot path)."""
    item = final.item
    return events.build(_KIND[final.group], final.message_id, job_of(row.job), lane=row.lane,
                        bulk_id=row.bulk_id or None, status=item.get("status"), error=item.get("error"),
                        report=item, at=at)


def _tally_results(
    results: Sequence[int], sources: Sequence[FinalReport], tally: Tally, now: float,
) -> list[FinalReport]:
    """Count one apply's answers into `tally`; returns the reports that conflicted (to retry)."""
    conflicted: list[FinalReport] = []
    for result, final in zip(results, sources, strict=True):
        if result == APPLIED:
            tally.applied += 1
            _observe_lag(final.item.get("doneAt"), now)
        elif result == PARKED:
            tally.parked += 1
        elif result == CONFLICT:
            tally.conflicts += 1
            conflicted.append(final)
        else:
            tally.duplicates += 1
    return conflicted


def _log_dead_letters(dead: Sequence[tuple[str, bytes]]) -> None:
    for _, entry in dead:
        detail: dict[str, Any] = orjson.loads(entry)
        log.warning("report_dead_lettered", reason=detail["reason"], detail=detail["detail"],
                    source=detail["source"])


def _log_unknown_statuses(pages: Sequence[Page]) -> None:
    for page in pages:
        for group, n in page.unknown_status.items():
            log.warning("report_unknown_status", group=group, reports=n, source=page.source,
                        detail="not a final status: no event, no state change; kept in the dead letters")
            metrics.REPORTS_UNKNOWN_STATUS.inc(n)


def _count(tally: Tally) -> None:
    for name in ("applied", "duplicates", "intermediate", "parked", "dead_letters"):
        if getattr(tally, name):
            metrics.REPORTS.labels("all", name).inc(getattr(tally, name))
    if tally.applied:
        metrics.EVENTS.labels("report").inc(tally.applied)
