"""Delivery reports: drain + webhook ingestion -> idempotent processing -> events; parking; sweeps.

    GET /sms/3/reports (once-only) --Drainer--> report_append.lua (fenced) --+
    POST webhook (web.py) ----------ingest_webhook----> XADD ----------------+--> {p}:reports:raw
    {p}:reports:raw --Processor (XREADGROUP / XAUTOCLAIM)--> report_fetch.lua --> events built here
        --> report_apply.lua: states, events, parking, dead letters, XACK+XDEL, in one step
    Sweeper: awaiting deadlines passed -> EXPIRED(no_report); parked reports retried or timed out

Keys (besides the message hashes, events, dead letters and awaiting set of worker.store):
    {p}:reports:raw            stream, one entry per raw page (`page` bytes, `src` drain|webhook,
                               `fence` for drained pages), consumer group `reports`
    {p}:reports:parked         hash, messageId -> report JSON of a message not known (yet)
    {p}:reports:parked:since   sorted set, messageId -> first seen (ms)
    {p}:reports:stats          hash, counters (applied, duplicates, parked, unknown_emitted, ...)
    {p}:lease:reports-drain    the drain lease, {p}:fence:reports-drain its fencing counter

Idempotency: a final state never changes again (except EXPIRED with reason no_report, which a
real report replaces), and the state check and the event write happen in the same Lua call, so a
report that comes twice (webhook and drain, a replayed page, a recovered page) gives one event.
"""

from __future__ import annotations

import contextlib
import re
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final, NamedTuple, Protocol

import orjson
import structlog

from worker import events, metrics
from worker.errors import ProviderAuthError, ProviderError, StoreError
from worker.settings import Settings
from worker.store import Store, consumer_name, redis_errors
from worker.triggers import DRAIN_REPORTS

log = structlog.get_logger(__name__)

RAW_GROUP: Final = "reports"
DRAIN_LEASE: Final = "reports-drain"
PAGE_SIZE: Final = 1000  # the reports endpoint's maximum `limit`
# A drain stops after this many full pages and hands over to a fresh actor message, so one message
# never holds the lease (and a worker thread) for long while a big backlog comes in.
MAX_PAGES_PER_DRAIN: Final = 50
# Reports per apply call: big enough to amortise the round trips, small enough that one Lua call
# holds Redis for only a few milliseconds.
BATCH_REPORTS: Final = 1000
# Ops per report_apply.lua call (a batch takes several): each call holds Redis for a few ms at most.
APPLY_CALL_OPS: Final = 250
READ_PAGES: Final = 16  # raw entries per XREADGROUP
# A raw entry pending this long belongs to a processor that died (a batch takes milliseconds).
CLAIM_IDLE_MS: Final = 10_000
RUN_BUDGET_S: Final = 2.0
# Appending a page the provider already handed out is retried through a Redis blip (~3 s in all).
APPEND_ATTEMPTS: Final = 5
APPEND_BACKOFF_S: Final = 0.2
APPLY_ATTEMPTS: Final = 4
SWEEP_CHUNK: Final = 1000
SWEEP_MAX_CHUNKS: Final = 20
PARKED_MAX_CHUNKS: Final = 10
NO_REPORT: Final = "no_report"

FINAL_GROUPS: Final = frozenset({"DELIVERED", "UNDELIVERABLE", "EXPIRED", "REJECTED"})
INTERMEDIATE_GROUPS: Final = frozenset({"PENDING", "ACCEPTED"})
_GROUP_BY_ID: Final = {0: "ACCEPTED", 1: "PENDING", 2: "UNDELIVERABLE", 3: "DELIVERED", 4: "EXPIRED", 5: "REJECTED"}
_KIND: Final = {group: group.lower() for group in FINAL_GROUPS}  # the event type of each final group
# States a final report may leave; EXPIRED(no_report) is checked separately.
OPEN_STATES: Final = frozenset({"QUEUED", "SUBMITTING", "AMBIGUOUS", "ACCEPTED"})

# An empty page, recognised without parsing it: an idle drain stores nothing.
_EMPTY_PAGE: Final = re.compile(rb'\s*\{\s*"results"\s*:\s*\[\s*\]\s*\}\s*')

# What report_apply.lua answers per op.
NOTHING: Final = 0
APPLIED: Final = 1
CONFLICT: Final = 2
PARKED: Final = 3
TIMED_OUT: Final = 4

# DeliveryReport fields and their JSON types (api/contract.md section 3); None is allowed for each.
_STRING_FIELDS: Final = ("bulkId", "to", "sender", "sentAt", "doneAt", "mccMnc", "callbackData",
                         "campaignReferenceId")
_OBJECT_FIELDS: Final = ("price", "status", "error", "platform")


class Wake(Protocol):
    """How report code wakes other actors (worker.triggers.Triggers in production)."""

    def process_reports(self) -> None: ...

    def send(self, actor: str, *args: Any, delay_ms: int = 0) -> None: ...


class ReportSource(Protocol):
    """The one provider call the drainer needs (worker.provider.Provider)."""

    def reports_raw(
        self,
        *,
        limit: int = PAGE_SIZE,
        entity_id: str | None = None,
        application_id: str | None = None,
        campaign_reference_id: str | None = None,
    ) -> bytes: ...


class WebhookBodyError(ValueError):
    """A webhook body that is not `{results: [DeliveryReport, ...]}`; the message says why."""


@dataclass(frozen=True, slots=True)
class ReportKeys:
    """The report keys of one namespace."""

    raw: str
    parked: str
    parked_since: str
    stats: str

    @classmethod
    def of(cls, store: Store) -> ReportKeys:
        return cls(
            raw=store.key("reports", "raw"),
            parked=store.key("reports", "parked"),
            parked_since=store.key("reports", "parked", "since"),
            stats=store.key("reports", "stats"),
        )


# --- parsing -----------------------------------------------------------------------------------------


class FinalReport(NamedTuple):
    """A report with a final status group, as the processor needs it."""

    message_id: str
    group: str
    status_name: str
    item: dict[str, Any]


@dataclass(slots=True)
class Page:
    """One raw stream entry, parsed: final reports, intermediate count, and what to dead-letter."""

    entry_id: str
    source: str
    finals: list[FinalReport] = field(default_factory=list)
    intermediate: int = 0
    dead: list[tuple[str, bytes]] = field(default_factory=list)


def _group_of(status: object) -> str | None:
    if not isinstance(status, dict):
        return None
    name = status.get("groupName")
    if isinstance(name, str) and (name in FINAL_GROUPS or name in INTERMEDIATE_GROUPS):
        return name
    group_id = status.get("groupId")
    if isinstance(group_id, int) and not isinstance(group_id, bool):
        return _GROUP_BY_ID.get(group_id)
    return None


def _dead_letter(reason: str, detail: str, source: str, entry_id: str, **extra: Any) -> bytes:
    return orjson.dumps(
        {"kind": "report", "reason": reason, "detail": detail, "source": source, "raw_entry": entry_id,
         "at": events.now_iso(), "lane": "", "job": "", **extra},
        default=str,
    )


def parse_page(entry_id: str, fields: dict[bytes, bytes] | None) -> Page:
    """A raw entry -> Page; never raises: malformed pages and items become dead letters.

    Deliberately leaner than worker.provider.parse_reports (which builds a typed object per report,
    ~13 us each): the processor only needs the messageId and the status group, at 50k reports/s.
    """
    fields = fields or {}
    source = fields.get(b"src", b"?").decode("ascii", "replace")
    page = Page(entry_id, source)
    raw = fields.get(b"page")
    if raw is None:
        page.dead.append(("", _dead_letter("report_page_malformed", "raw entry has no page field", source,
                                           entry_id, page=None)))
        return page
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as error:
        page.dead.append(("", _dead_letter("report_page_malformed", f"not JSON: {error}", source, entry_id,
                                           page=raw.decode("utf-8", "replace"))))
        return page
    results = data.get("results") if isinstance(data, dict) else None
    if not isinstance(results, list):
        page.dead.append(("", _dead_letter("report_page_malformed", "no 'results' list", source, entry_id,
                                           page=raw.decode("utf-8", "replace"))))
        return page
    finals = page.finals
    for item in results:
        # The common case first, with as few calls as possible: this loop runs 50k times a second.
        if type(item) is dict:
            message_id = item.get("messageId")
            status = item.get("status")
            if type(message_id) is str and message_id and type(status) is dict:
                group = status.get("groupName")
                if group not in FINAL_GROUPS and group not in INTERMEDIATE_GROUPS:
                    group = _group_of(status)
                if group in FINAL_GROUPS:
                    name = status.get("name")
                    finals.append(FinalReport(message_id, group, name if type(name) is str else group, item))
                    continue
                if group is not None:
                    page.intermediate += 1  # PENDING/ACCEPTED change nothing: the send already said so
                    continue
        problem, message_id = _problem(item)
        page.dead.append((message_id, _dead_letter("report_malformed", problem, source, entry_id, item=item)))
    return page


def _problem(item: object) -> tuple[str, str]:
    """Why an item cannot be processed, and its messageId if it has one."""
    if not isinstance(item, dict):
        return "report is not a JSON object", ""
    message_id = item.get("messageId")
    if not isinstance(message_id, str) or not message_id:
        return "report has no messageId", ""
    return "report has no readable status", message_id


def validate_webhook_body(body: bytes) -> int:
    """Check the shape of a webhook body (contract section 5); returns its number of reports."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as error:
        raise WebhookBodyError(f"body is not JSON: {error}") from None
    if not isinstance(data, dict):
        raise WebhookBodyError("body must be a JSON object {\"results\": [...]}")
    results = data.get("results")
    if not isinstance(results, list):
        raise WebhookBodyError("'results' must be a list of delivery reports")
    for i, item in enumerate(results):
        if not isinstance(item, dict):
            raise WebhookBodyError(f"results[{i}] must be an object")
        message_id = item.get("messageId")
        if not isinstance(message_id, str) or not message_id:
            raise WebhookBodyError(f"results[{i}].messageId must be a non-empty string")
        for name in _STRING_FIELDS:
            value = item.get(name)
            if value is not None and not isinstance(value, str):
                raise WebhookBodyError(f"results[{i}].{name} must be a string")
        for name in _OBJECT_FIELDS:
            value = item.get(name)
            if value is not None and not isinstance(value, dict):
                raise WebhookBodyError(f"results[{i}].{name} must be an object")
        count = item.get("messageCount")
        if count is not None and (not isinstance(count, int) or isinstance(count, bool)):
            raise WebhookBodyError(f"results[{i}].messageCount must be an integer")
    return len(results)


def ingest_webhook(store: Store, body: bytes) -> int:
    """Validate a webhook body and append it, verbatim, to the raw stream; returns its report count.

    Raises WebhookBodyError (nothing stored) or StoreError. The caller answers 200 only after this
    returns, so the provider retries whatever did not reach Redis.
    """
    n = validate_webhook_body(body)
    if n:
        with redis_errors():
            store.r.xadd(ReportKeys.of(store).raw, {"page": body, "src": "webhook"})
    return n


# --- applying outcomes -------------------------------------------------------------------------------


class Row(NamedTuple):
    """What report_fetch.lua read from one message hash (None: missing)."""

    state: str | None
    reason: str | None
    job: bytes | None
    lane: str | None
    bulk_id: str | None


class Op(NamedTuple):
    """One step for report_apply.lua (see its header for the codes)."""

    code: str
    message_id: str
    state: str = ""
    status: str = ""
    payload: bytes = b""


def _job(raw: bytes | None) -> dict[str, Any] | None:
    if not raw:
        return None
    try:
        job = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    return job if isinstance(job, dict) else None


def report_event(kind: str, message_id: str, row: Row | None, item: dict[str, Any], at: str) -> bytes:
    """The status event of one report (the job gives the producer's id, metadata and `to`)."""
    return events.build(
        kind, message_id, _job(row.job) if row else None, lane=row.lane if row else None,
        bulk_id=(row.bulk_id or None) if row else None, status=item.get("status"), error=item.get("error"),
        report=item, at=at,
    )


def _is_open(row: Row) -> bool:
    return row.state in OPEN_STATES or (row.state == "EXPIRED" and row.reason == NO_REPORT)


class ReportState:
    """The two round trips of report work: read message hashes, then apply ops atomically."""

    def __init__(self, settings: Settings, store: Store) -> None:
        self.settings = settings
        self.store = store
        self.keys = ReportKeys.of(store)

    def fetch(self, message_ids: Sequence[str]) -> dict[str, Row]:
        if not message_ids:
            return {}
        reply = self.store.run("report_fetch", [self.store.msg(m) for m in message_ids], [])
        return {
            mid: Row(state and state.decode(), reason and reason.decode(), job, lane and lane.decode(),
                     bulk_id and bulk_id.decode())
            for mid, (state, reason, job, lane, bulk_id) in zip(message_ids, reply, strict=True)
        }

    def apply(
        self, ops: Sequence[Op], *, ack: Sequence[str] = (), dead: Sequence[tuple[str, bytes]] = (),
        now_ms: int | None = None,
    ) -> tuple[bool, list[int]]:
        """Run report_apply.lua in calls of APPLY_CALL_OPS ops; returns (raw entries acknowledged,
        result per op). One call for 1,000 reports held Redis ~17 ms, and every otp send waited
        behind it. The raw entries are acknowledged (and the dead letters written) by the last call,
        and only if no op of an earlier call conflicted; a crash between calls replays the pages,
        and every op is idempotent."""
        results: list[int] = []
        acked = False
        for start in range(0, max(len(ops), 1), APPLY_CALL_OPS):  # one call even with no ops: the ack
            finish = start + APPLY_CALL_OPS >= len(ops) and CONFLICT not in results
            acked, part = self._apply_call(ops[start : start + APPLY_CALL_OPS], ack=ack if finish else (),
                                           dead=dead if finish else (), now_ms=now_ms)
            results += part
        return acked and CONFLICT not in results, results

    def _apply_call(
        self, ops: Sequence[Op], *, ack: Sequence[str], dead: Sequence[tuple[str, bytes]], now_ms: int | None,
    ) -> tuple[bool, list[int]]:
        store, keys = self.store, self.keys
        redis_keys = [keys.raw, store.events, store.awaiting, store.dlq, keys.parked, keys.parked_since,
                      keys.stats]
        redis_keys += [store.msg(op.message_id) for op in ops]
        args: list[Any] = [RAW_GROUP, now_ms if now_ms is not None else events.now_ms(),
                           self.settings.sms_events_stream_maxlen, len(ack), *ack, len(dead)]
        for message_id, entry in dead:
            args += [message_id, entry]
        for op in ops:
            args += op  # code, messageId, state, status, payload: the script's order
        reply = store.run("report_apply", redis_keys, args)
        return reply[0] == 1, [int(x) for x in reply[1:]]

    def counters(self) -> dict[str, int]:
        with redis_errors():
            raw = self.store.r.hgetall(self.keys.stats)
        return {k.decode(): int(v) for k, v in raw.items()}


# --- the drain ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DrainResult:
    outcome: str  # drained, page_limit, busy, lease_lost, fenced, auth_error, provider_error
    pages: int = 0
    reports: int = 0


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


def _count_results(raw: bytes) -> int:
    """Reports in a raw page, by their `messageId` keys: parsing a 1000-report page just to count it
    cost 4 ms on the drain's critical path. An item without one is under-counted, which at worst
    ends this drain a page early; the next drain fetches the rest."""
    return raw.count(b'"messageId"')


class Drainer:
    """One drain of the once-only reports endpoint under the `reports-drain` lease."""

    def __init__(
        self, settings: Settings, store: Store, provider: ReportSource, wake: Wake | None = None,
        *, max_pages: int = MAX_PAGES_PER_DRAIN,
    ) -> None:
        self.settings = settings
        self.store = store
        self.provider = provider
        self.wake = wake
        self.max_pages = max_pages
        self.keys = ReportKeys.of(store)
        # The lease outlives the longest reports GET (SMS_LEASE_S is validated against the request
        # timeouts), and it is renewed before each page.
        self.lease_ms = int(settings.sms_lease_s * 1000)
        self.filters = {
            "entity_id": settings.sms_reports_entity_id,
            "application_id": settings.sms_reports_application_id,
            "campaign_reference_id": settings.sms_reports_campaign_reference_id,
        }

    def append(self, page: bytes, token: int) -> bool:
        """Write one raw page if `token` is still the current fencing token (else dead-letter it)."""
        keys = [self.keys.raw, self.store.key("fence", DRAIN_LEASE), self.store.dlq]
        for attempt in range(APPEND_ATTEMPTS):
            try:
                stored, _ = self.store.run("report_append", keys, [token, page, events.now_iso()])
                return bool(stored)
            except StoreError as error:
                # The provider will never return this page again: a Redis blip must not cost it.
                if attempt == APPEND_ATTEMPTS - 1:
                    log.error("reports_page_lost", reports=_count_results(page), error=str(error))
                    raise
                log.warning("reports_page_append_retry", attempt=attempt + 1, error=str(error))
                time.sleep(APPEND_BACKOFF_S * 2**attempt)
        raise AssertionError("unreachable")

    def drain(self) -> DrainResult:
        started = time.perf_counter()
        holder = f"{consumer_name()}:{uuid.uuid4().hex[:12]}"
        token = self.store.lease(DRAIN_LEASE, holder, self.lease_ms)
        if not token:
            log.debug("reports_drain_skipped", reason="another drainer holds the lease")
            return DrainResult("busy")
        pages = reports = 0
        outcome = "page_limit"
        try:
            while pages < self.max_pages:
                token = self.store.lease(DRAIN_LEASE, holder, self.lease_ms)
                if not token:
                    outcome = "lease_lost"
                    break
                try:
                    raw = self.provider.reports_raw(limit=PAGE_SIZE, **self.filters)
                except ProviderAuthError as error:
                    outcome = "auth_error"
                    log.error("reports_drain_auth_failed", status=error.status_code, error=str(error))
                    break
                except ProviderError as error:
                    # An ambiguous GET may have handed out a page we never saw: nothing can bring
                    # it back (the logs endpoint can, per message, for 48 h).
                    outcome = "provider_error"
                    log.warning("reports_drain_failed", error_class=type(error).__name__,
                                status=error.status_code, error=str(error))
                    break
                if _EMPTY_PAGE.fullmatch(raw):
                    outcome = "drained"
                    break
                # Durable first: only then is the page parsed (here, just counted).
                stored = self.append(raw, token)
                pages += 1
                count = _count_results(raw)
                reports += count
                if not stored:
                    outcome = "fenced"
                    log.error("reports_page_fenced", reports=count, token=token,
                              detail="lease taken over during the GET; page kept in dead letters")
                    break
                if self.wake is not None:
                    self.wake.process_reports()  # processing overlaps the next GET (kicks are de-duplicated)
                if count < PAGE_SIZE:
                    outcome = "drained"
                    break
        finally:
            self.store.release_lease(DRAIN_LEASE, holder)
            if self.wake is not None and outcome == "page_limit":
                self.wake.send(DRAIN_REPORTS)  # more may be waiting: a fresh message carries on
            log.info("reports_drained", pages=pages, reports=reports, outcome=outcome,
                     duration_ms=round((time.perf_counter() - started) * 1000, 1))
        if outcome in ("drained", "page_limit"):
            # For `sms-worker status`: when the endpoint last answered, and what it gave.
            with contextlib.suppress(StoreError), redis_errors():
                self.store.r.hset(self.store.key("reports", "last_drain"), mapping={
                    "at": events.now_iso(), "pages": pages, "reports": reports, "outcome": outcome})
        return DrainResult(outcome, pages, reports)


# --- processing --------------------------------------------------------------------------------------


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


class Processor:
    """Reads raw pages with a consumer group and applies them, one fetch and one apply per batch."""

    def __init__(
        self, settings: Settings, store: Store, wake: Wake | None = None, *, consumer: str | None = None,
        claim_idle_ms: int = CLAIM_IDLE_MS, batch_reports: int = BATCH_REPORTS,
    ) -> None:
        self.settings = settings
        self.store = store
        self.wake = wake
        self.consumer = consumer or consumer_name()
        self.claim_idle_ms = claim_idle_ms
        self.batch_reports = batch_reports
        self.state = ReportState(settings, store)
        self.keys = self.state.keys
        self._group_ready = False

    # --- reading the raw stream ----------------------------------------------------------------
    def _ensure_group(self) -> None:
        if self._group_ready:
            return
        try:
            with redis_errors():
                # From the start of the stream: pages written before any processor ran count too.
                self.store.r.xgroup_create(self.keys.raw, RAW_GROUP, id="0", mkstream=True)
        except StoreError as error:
            if "BUSYGROUP" not in str(error):
                raise
        self._group_ready = True

    def _read(self, count: int) -> list[tuple[str, dict[bytes, bytes] | None]]:
        with redis_errors():
            reply = self.store.r.xreadgroup(RAW_GROUP, self.consumer, {self.keys.raw: ">"}, count=count)
        return [(eid.decode(), fields) for _, entries in reply or [] for eid, fields in entries]

    def _claim_stale(self, limit: int = 100) -> list[tuple[str, dict[bytes, bytes] | None]]:
        """Entries a dead processor read but never acknowledged (XAUTOCLAIM), oldest first."""
        claimed: list[tuple[str, dict[bytes, bytes] | None]] = []
        start = "0-0"
        with redis_errors():
            while len(claimed) < limit:
                reply = self.store.r.xautoclaim(self.keys.raw, RAW_GROUP, self.consumer, self.claim_idle_ms,
                                                start_id=start, count=limit)
                start = reply[0].decode() if isinstance(reply[0], bytes) else str(reply[0])
                claimed += [(eid.decode(), fields) for eid, fields in reply[1]]
                if start == "0-0":
                    break
        return claimed

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

    def handle(self, entries: Iterable[tuple[str, dict[bytes, bytes] | None]]) -> Tally:
        """Parse entries and apply them in batches of about `batch_reports` reports."""
        total = Tally()
        batch: list[Page] = []
        size = 0
        for entry_id, fields in entries:
            page = parse_page(entry_id, fields)
            batch.append(page)
            size += len(page.finals)
            if size >= self.batch_reports:
                total.add(self._apply_pages(batch))
                batch, size = [], 0
        if batch:
            total.add(self._apply_pages(batch))
        return total

    def _apply_pages(self, pages: list[Page]) -> Tally:
        started = time.perf_counter()
        at = events.now_iso()
        ack = [p.entry_id for p in pages]
        dead = [d for p in pages for d in p.dead]
        todo = [f for p in pages for f in p.finals]
        tally = Tally(pages=len(pages), reports=len(todo) + sum(p.intermediate for p in pages) + len(dead),
                      intermediate=sum(p.intermediate for p in pages))
        acked = False
        now = time.time()
        for _ in range(APPLY_ATTEMPTS):
            rows = self.state.fetch(list(dict.fromkeys(f.message_id for f in todo)))
            ops, sources, duplicates = self._plan(todo, rows, at)
            tally.duplicates += duplicates
            acked, results = self.state.apply(ops, ack=ack, dead=dead)
            todo = []
            for result, final in zip(results, sources, strict=True):
                if result == APPLIED:
                    tally.applied += 1
                    _observe_lag(final.item.get("doneAt"), now)
                elif result == PARKED:
                    tally.parked += 1
                elif result == CONFLICT:
                    tally.conflicts += 1
                    todo.append(final)
                else:
                    tally.duplicates += 1
            if acked:
                tally.dead_letters = len(dead)
                break
        if not acked:
            # Left pending: XAUTOCLAIM hands the pages to a processor again after claim_idle_ms.
            tally.unacked = len(pages)
            log.warning("reports_apply_conflicts", pages=len(pages), conflicts=len(todo))
        for _, entry in dead:
            if acked:
                detail = orjson.loads(entry)
                log.warning("report_dead_lettered", reason=detail["reason"], detail=detail["detail"],
                            source=detail["source"])
        for name in ("applied", "duplicates", "intermediate", "parked", "dead_letters"):
            if getattr(tally, name):
                metrics.REPORTS.labels("all", name).inc(getattr(tally, name))
        if tally.applied:
            metrics.EVENTS.labels("report").inc(tally.applied)
        log.info("reports_processed", pages=tally.pages, reports=tally.reports, applied=tally.applied,
                 duplicates=tally.duplicates, intermediate=tally.intermediate, parked=tally.parked,
                 dead_letters=tally.dead_letters, conflicts=tally.conflicts,
                 sources=sorted({p.source for p in pages}),
                 duration_ms=round((time.perf_counter() - started) * 1000, 1))
        return tally

    @staticmethod
    def _plan(finals: Sequence[FinalReport], rows: dict[str, Row], at: str) -> tuple[list[Op], list[FinalReport], int]:
        """Ops for final reports from raw pages; returns (ops, the report of each op, duplicates)."""
        ops: list[Op] = []
        sources: list[FinalReport] = []
        closed: set[str] = set()  # moved to a final state earlier in this batch
        duplicates = 0
        build = events.build
        loads = orjson.loads
        for f in finals:
            mid = f.message_id
            row = rows[mid]
            if row.state is None:
                op = Op("P", mid, payload=orjson.dumps(f.item))
            elif mid in closed or not (
                row.state in OPEN_STATES or (row.state == "EXPIRED" and row.reason == NO_REPORT)
            ):
                duplicates += 1
                continue
            else:
                closed.add(mid)
                item = f.item
                # report_event(), inlined: one call less per report on the hot path.
                try:
                    job = loads(row.job) if row.job else None
                except orjson.JSONDecodeError:
                    job = None
                event = build(_KIND[f.group], mid, job if type(job) is dict else None, lane=row.lane,
                              bulk_id=row.bulk_id or None, status=item.get("status"), error=item.get("error"),
                              report=item, at=at)
                op = Op("A", mid, f.group, f.status_name, event)
            ops.append(op)
            sources.append(f)
        return ops, sources, duplicates

    # --- parked reports ------------------------------------------------------------------------
    def retry_parked(self, now_ms: int | None = None) -> dict[str, int]:
        """Apply parked reports whose message exists now; give up on those parked too long."""
        now_ms = now_ms if now_ms is not None else events.now_ms()
        timeout_ms = int(self.settings.sms_report_park_timeout_s * 1000)
        emit = self.settings.sms_unknown_reports == "emit"
        at = events.now_iso()
        counts = {"resolved": 0, "duplicates": 0, "unknown": 0, "still_parked": 0}
        offset = 0
        for _ in range(PARKED_MAX_CHUNKS):
            with redis_errors():
                pairs = self.store.r.zrange(self.keys.parked_since, offset, offset + SWEEP_CHUNK - 1,
                                            withscores=True)
                if not pairs:
                    break
                mids = [m.decode() for m, _ in pairs]
                payloads = self.store.r.hmget(self.keys.parked, mids)
            rows = self.state.fetch(mids)
            ops: list[Op] = []
            stays = 0
            unreadable: list[str] = []
            for (mid, (_, since)), payload in zip(zip(mids, pairs, strict=True), payloads, strict=True):
                item = _parked_item(payload)
                row = rows[mid]
                if item is None:
                    unreadable.append(mid)  # only final reports are parked; nothing to apply
                elif row.state is not None:
                    group = _group_of(item.get("status")) or ""
                    name = item["status"].get("name") if isinstance(item.get("status"), dict) else None
                    event = report_event(group.lower(), mid, row, item, at) if _is_open(row) else b""
                    ops.append(Op("R", mid, group, name if isinstance(name, str) else group, event))
                elif now_ms - since > timeout_ms:
                    event = report_event("unknown_message", mid, None, item, at) if emit else b""
                    ops.append(Op("U", mid, payload=event))
                else:
                    stays += 1
            if unreadable:
                with redis_errors():
                    self.store.r.zrem(self.keys.parked_since, *unreadable)
                    self.store.r.hdel(self.keys.parked, *unreadable)
            if ops:
                _, results = self.state.apply(ops, now_ms=now_ms)
                for op, result in zip(ops, results, strict=True):
                    if result == CONFLICT:
                        stays += 1
                    elif op.code == "R":
                        counts["resolved" if result == APPLIED else "duplicates"] += 1
                    else:
                        counts["unknown"] += 1
            counts["still_parked"] += stays
            offset += stays
            if len(pairs) < SWEEP_CHUNK:
                break
        return counts


def _parked_item(payload: bytes | None) -> dict[str, Any] | None:
    if payload is None:
        return None
    try:
        item = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    return item if isinstance(item, dict) and _group_of(item.get("status")) in FINAL_GROUPS else None


# --- the sweep ---------------------------------------------------------------------------------------


# Fields a log entry shares with a delivery report (GET /sms/3/logs has `destination` for `to`).
_LOG_AS_REPORT: Final = frozenset({"bulkId", "messageId", "to", "sentAt", "doneAt", "messageCount", "price",
                                   "status", "error", "mccMnc", "platform", "campaignReferenceId"})


def no_report_event(message_id: str, row: Row, at: str) -> bytes:
    """`expired` with reason no_report; its event_id has a suffix, so a late real `expired` report
    (which replaces this provisional verdict) still has an event_id of its own."""
    event = orjson.loads(events.build("expired", message_id, _job(row.job), lane=row.lane,
                                      bulk_id=row.bulk_id or None, reason=NO_REPORT, at=at))
    event["event_id"] = f"{message_id}:expired:{NO_REPORT}"
    return orjson.dumps(event)


class Sweeper:
    """Settles accepted messages whose report deadline passed, and retries parked reports.

    Before a message is given `expired`/no_report, the provider's logs are asked (when a provider
    is given): GET /sms/3/reports hands a report out once, and one that only ever reached the memory
    of a process killed before storing it is gone from there, but the logs keep the final status
    for 48 h. A final status found in the logs goes through the processor like any report (a page
    with source `logs`); only messages the logs cannot settle get no_report.
    """

    def __init__(
        self, settings: Settings, store: Store, processor: Processor, provider: Any = None,
        before_logs_call: Callable[[], None] | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.processor = processor
        self.state = processor.state
        self.provider = provider
        self.before_logs_call = before_logs_call

    def recover_from_logs(self, message_ids: Sequence[str]) -> set[str]:
        """Append the final statuses the provider's logs hold for these messages; returns their ids."""
        if self.provider is None or not message_ids:
            return set()
        try:
            found = self.provider.logs_for_message_ids(list(message_ids), before_request=self.before_logs_call)
        except ProviderError as error:
            log.warning("reports_recovery_failed", messages=len(message_ids), error_class=type(error).__name__)
            return set()
        items = []
        for mid, entry in found.items():
            item = {k: v for k, v in entry.raw.items() if k in _LOG_AS_REPORT}
            if _group_of(item.get("status")) in FINAL_GROUPS:
                item["messageId"] = mid
                if "to" not in item and entry.raw.get("destination"):
                    item["to"] = entry.raw["destination"]
                items.append(item)
        if items:
            with redis_errors():
                self.store.r.xadd(ReportKeys.of(self.store).raw,
                                  {"page": orjson.dumps({"results": items}), "src": "logs"})
            log.warning("reports_recovered_from_logs", reports=len(items),
                        detail="final statuses that never arrived as reports (e.g. lost with a killed drain)")
        return {item["messageId"] for item in items}

    def sweep(self, now_ms: int | None = None) -> dict[str, int]:
        started = time.perf_counter()
        now_ms = now_ms if now_ms is not None else events.now_ms()
        at = events.now_iso()
        expired = recovered = 0
        for _ in range(SWEEP_MAX_CHUNKS):
            with redis_errors():
                due = [m.decode() for m in self.store.r.zrangebyscore(
                    self.store.awaiting, "-inf", now_ms, start=0, num=SWEEP_CHUNK)]
            if not due:
                break
            rows = self.state.fetch(due)
            from_logs = self.recover_from_logs([mid for mid in due if rows[mid].state == "ACCEPTED"])
            recovered += len(from_logs)
            ops = [
                Op("N", mid, payload=no_report_event(mid, rows[mid], at) if rows[mid].state == "ACCEPTED" else b"")
                for mid in due if mid not in from_logs
            ]
            _, results = self.state.apply(ops, now_ms=now_ms)
            expired += sum(1 for r in results if r == APPLIED)
            if len(due) < SWEEP_CHUNK or from_logs:
                break  # recovered pages are processed first; their messages leave the set then
        if recovered and self.processor.wake is not None:
            self.processor.wake.process_reports()
        parked = self.processor.retry_parked(now_ms)
        log.info("reports_swept", expired_no_report=expired, recovered_from_logs=recovered,
                 parked_resolved=parked["resolved"],
                 parked_duplicates=parked["duplicates"], unknown=parked["unknown"],
                 still_parked=parked["still_parked"], unknown_reports=self.settings.sms_unknown_reports,
                 duration_ms=round((time.perf_counter() - started) * 1000, 1))
        return {"expired_no_report": expired, "recovered_from_logs": recovered, **parked}

