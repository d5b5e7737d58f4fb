"""Delivery reports: drain + webhook ingestion -> idempotent processing -> events; parking; sweeps.

    GET /sms/3/reports (once-only) --Drainer--> report_append.lua (fence checked) --+
    POST webhook (web.py) ----------ingest_webhook----> XADD -----------------------+--> {p}:reports:raw
                                    (its malformed reports -> dead letters, in the same MULTI)
    {p}:reports:raw --Processor (XREADGROUP / XAUTOCLAIM)--> report_fetch.lua --> events built here
        --> report_apply.lua: states, events, parking, dead letters, XACK+XDEL, in one step
    Sweeper: accepted an hour ago and no report -> looked up in GET /sms/3/logs (a page, src `logs`);
             awaiting deadlines passed -> EXPIRED(no_report); parked reports retried or timed out

Keys (besides the message hashes, events, dead letters and awaiting set of worker.store):
    {p}:reports:raw            stream, one entry per raw page (`page` bytes, `src` drain|webhook|logs,
                               `fence` for drained pages), consumer group `reports`
    {p}:reports:parked         hash, messageId -> report JSON of a message not known (yet)
    {p}:reports:parked:since   sorted set, messageId -> first seen (ms)
    {p}:reports:stats          hash, counters (applied, duplicates, parked, unknown_emitted, ...)
    {p}:reports:lookup         sorted set, messageId -> next look in GET /sms/3/logs due (ms), of
                               accepted messages still without a final report SMS_REPORT_LOOKUP_AFTER_S
                               after acceptance; {p}:reports:lookup:tries their lookups so far, and
                               {p}:reports:lookup:cursor where the sweep's pass over the awaiting set is
    {p}:lease:reports-drain    the drain lease, {p}:fence:reports-drain its fencing counter

Idempotency: a final state never changes again (except EXPIRED with reason no_report, which a
real report replaces), and the state check and the event write happen in the same Lua call, so a
report that comes twice (webhook and drain, a replayed page, a recovered page) gives one event.

Nothing a provider handed out is ever given up: a fetched page is kept in memory until Redis takes
it (and no further page is fetched meanwhile), a page fetched by a drainer that lost its lease is
stored like any other (idempotency makes that safe), a report or page that cannot be processed
goes to the dead letters with its body and the reason, while the rest of its batch (or webhook body)
flows on, and a report that never came at all is looked up in the provider's logs.
"""

from __future__ import annotations

import atexit
import contextlib
import re
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final, NamedTuple, Protocol

import orjson
import redis
import structlog
from prometheus_client import Counter

from worker import events, metrics
from worker.clock import sweep_interval_s
from worker.errors import ProviderAuthError, ProviderError, StoreError
from worker.provider import chunk_message_ids
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
# Storing a page the provider already handed out is retried for as long as Redis refuses it (out
# of memory, restarting, unreachable), backing off up to STORE_BACKOFF_MAX_S between attempts.
STORE_BACKOFF_S: Final = 0.05
STORE_BACKOFF_MAX_S: Final = 1.0
# Bounds on what any entry may hold (webhook bodies are refused past them, other pages isolated).
# A report page is 4 levels deep ({results: [{status: {...}}]}); orjson reads 1,024 levels but
# writes only 254, so a report nested deeper than that could be parsed and never published.
MAX_DEPTH: Final = 32
# A full page of 1,000 reports is ~0.6 MB (~5 MB with 4,000-character callbackData on each).
MAX_PAGE_BYTES: Final = 16 * 1024 * 1024
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
    lookup: str
    lookup_tries: str
    lookup_cursor: str

    @classmethod
    def of(cls, store: Store) -> ReportKeys:
        return cls(
            raw=store.reports_raw,
            parked=store.reports_parked,
            parked_since=store.reports_parked_since,
            stats=store.reports_stats,
            lookup=store.reports_lookup,
            lookup_tries=store.reports_lookup_tries,
            lookup_cursor=store.reports_lookup_cursor,
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
    unknown_status: dict[str, int] = field(default_factory=dict)  # status group -> reports (dead-lettered)


def _group_of(status: object) -> str | None:
    """The status group of a report, if it is one this code knows (final or intermediate).

    The group's name decides when there is one: a name this code does not know (a group added
    to the API later, e.g. SCHEDULED) is unknown even when its groupId is that of a known group,
    because a guess could make a report final that is not. Only a status without a name is read by
    its groupId (the contract's table)."""
    if not isinstance(status, dict):
        return None
    name = status.get("groupName")
    if name is not None:
        return name if isinstance(name, str) and (name in FINAL_GROUPS or name in INTERMEDIATE_GROUPS) else None
    group_id = status.get("groupId")
    if isinstance(group_id, int) and not isinstance(group_id, bool):
        return _GROUP_BY_ID.get(group_id)
    return None


def _unknown_group(status: object) -> str | None:
    """The name (or groupId) of a status group that is readable but not known here, else None."""
    if not isinstance(status, dict) or _group_of(status) is not None:
        return None
    name = status.get("groupName")
    if isinstance(name, str) and name.strip():
        return name[:64]
    group_id = status.get("groupId")
    if name is None and isinstance(group_id, int) and not isinstance(group_id, bool):
        return f"groupId {group_id}"
    return None


_CONTAINERS: Final = (dict, list)


def _too_deep(value: object, limit: int) -> bool:
    """Whether `value` nests more than `limit` containers deep (a scalar is 0, `{}` is 1)."""
    # The common report first, without a stack: an object whose objects (price, status, error,
    # platform) hold scalars only is two levels deep.
    if limit >= 2 and type(value) is dict:
        for child in value.values():
            if type(child) is dict:
                for grandchild in child.values():
                    if type(grandchild) in _CONTAINERS:
                        break
                else:
                    continue
            elif type(child) is not list:
                continue
            break  # a list, or an object holding containers: walk it below
        else:
            return False
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if type(node) not in _CONTAINERS:
            continue
        if depth > limit:
            return True
        children = node.values() if type(node) is dict else node
        stack.extend((child, depth + 1) for child in children)
    return False


def _clip(value: Any, depth: int = MAX_DEPTH) -> Any:
    """A copy of `value` cut at `depth` levels, for dead letters of bodies orjson cannot write whole."""
    if type(value) not in _CONTAINERS:
        return value
    if depth <= 0:
        return f"<cut: nested deeper than {MAX_DEPTH} levels>"
    if type(value) is dict:
        return {key: _clip(child, depth - 1) for key, child in value.items()}
    return [_clip(child, depth - 1) for child in value]


def _dead_letter(reason: str, detail: str, source: str, entry_id: str, **extra: Any) -> bytes:
    entry = {"kind": "report", "reason": reason, "detail": detail, "source": source, "raw_entry": entry_id,
             "at": events.now_iso(), "lane": "", "job": "", **extra}
    try:
        return orjson.dumps(entry, default=str)
    except TypeError:  # orjson.JSONEncodeError: nested deeper than orjson writes (254 levels)
        return orjson.dumps({**entry, **{k: _clip(v) for k, v in extra.items()}}, default=str)


def parse_page(entry_id: str, fields: dict[bytes, bytes] | None) -> Page:
    """A raw entry -> Page; never raises: malformed pages and items become dead letters.

    Deliberately leaner than worker.provider.parse_reports (which builds a typed object per report,
    ~13 us each): the processor only needs the messageId and the status group, at 50k reports/s.
    Every page is held to the same bounds as a webhook body whatever its source (drain, webhook,
    logs, a plain XADD): a report nested deeper than MAX_DEPTH is dead-lettered alone (~2 us per
    report to check), a page larger than MAX_PAGE_BYTES whole, unparsed.
    """
    fields = fields or {}
    source = fields.get(b"src", b"?").decode("ascii", "replace")
    page = Page(entry_id, source)
    raw = fields.get(b"page")
    if raw is None:
        page.dead.append(("", _dead_letter("report_page_malformed", "raw entry has no page field", source,
                                           entry_id, page=None)))
        return page
    if len(raw) > MAX_PAGE_BYTES:
        page.dead.append(("", _dead_letter("report_page_too_large", f"{len(raw)} bytes, at most {MAX_PAGE_BYTES}",
                                           source, entry_id, page=raw.decode("utf-8", "replace"))))
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
    item_depth = MAX_DEPTH - 2  # the page's object and its results list are two levels
    for item in results:
        if _too_deep(item, item_depth):
            message_id = item.get("messageId") if type(item) is dict else None
            page.dead.append((message_id if type(message_id) is str else "", _dead_letter(
                "report_too_deep", f"nested deeper than {MAX_DEPTH} levels", source, entry_id, item=item)))
            continue
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
                unknown = _unknown_group(status)
                if unknown is not None:
                    # Not final, so it changes nothing and publishes nothing: the message waits for its
                    # final report (or the no-report sweep). Kept in the dead letters rather than parked:
                    # parking is for reports whose message is not known yet, and retrying would not
                    # make this group known. An operator sees it there (`sms-worker dlq list`).
                    page.unknown_status[unknown] = page.unknown_status.get(unknown, 0) + 1
                    page.dead.append((message_id, _dead_letter(
                        "report_unknown_status", f"status group {unknown!r} is not known: not final, nothing changed",
                        source, entry_id, item=item)))
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


def _webhook_results(body: bytes) -> list[Any]:
    """The `results` list of a webhook body; WebhookBodyError when the envelope itself is wrong (not
    JSON, not `{results: [...]}`, nested deeper than MAX_DEPTH): refused whole, nothing stored."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as error:
        raise WebhookBodyError(f"body is not JSON: {error}") from None
    if not isinstance(data, dict):
        raise WebhookBodyError("body must be a JSON object {\"results\": [...]}")
    # Refused here rather than dead-lettered later: the caller is told, and nothing is stored.
    if _too_deep(data, MAX_DEPTH):
        raise WebhookBodyError(f"body is nested deeper than {MAX_DEPTH} levels")
    results = data.get("results")
    if not isinstance(results, list):
        raise WebhookBodyError("'results' must be a list of delivery reports")
    return results


def _webhook_report_problem(i: int, item: object) -> str | None:
    """Why results[i] is not a DeliveryReport (contract section 5), or None when it is one."""
    if not isinstance(item, dict):
        return f"results[{i}] must be an object"
    message_id = item.get("messageId")
    if not isinstance(message_id, str) or not message_id:
        return f"results[{i}].messageId must be a non-empty string"
    for name in _STRING_FIELDS:
        value = item.get(name)
        if value is not None and not isinstance(value, str):
            return f"results[{i}].{name} must be a string"
    for name in _OBJECT_FIELDS:
        value = item.get(name)
        if value is not None and not isinstance(value, dict):
            return f"results[{i}].{name} must be an object"
    count = item.get("messageCount")
    if count is not None and (not isinstance(count, int) or isinstance(count, bool)):
        return f"results[{i}].messageCount must be an integer"
    return None


class WebhookBody(NamedTuple):
    """A webhook body sorted out: the page to store, and the reports to dead-letter instead."""

    page: bytes | None  # the body itself when every report is good, else the good ones; None: none
    reports: int  # good reports in `page`
    dead: list[tuple[str, bytes]]  # (messageId or "", dead-letter JSON) per malformed report


def validate_webhook_body(body: bytes) -> int:
    """Check the envelope of a webhook body (contract section 5); returns its number of reports.

    Raises WebhookBodyError only for the envelope: a malformed report in it does not make the body
    a bad one (see sort_webhook_body)."""
    return len(_webhook_results(body))


def sort_webhook_body(body: bytes) -> WebhookBody:
    """Validate a webhook body: the envelope (WebhookBodyError), then each report on its own.

    One malformed report must not cost the others: answered 400, the provider retries the whole
    body and then gives up on it, good reports and all. So the good reports are kept (the body
    verbatim when all are good), and each malformed one becomes a dead letter with its reason and
    the report as it came; retrying it could not make it right."""
    results = _webhook_results(body)
    good: list[Any] = []
    dead: list[tuple[str, bytes]] = []
    for i, item in enumerate(results):
        problem = _webhook_report_problem(i, item)
        if problem is None:
            good.append(item)
            continue
        message_id = item.get("messageId") if isinstance(item, dict) else None
        dead.append((message_id if isinstance(message_id, str) else "",
                     _dead_letter("report_malformed", problem, "webhook", "", item=item)))
    if not good:
        return WebhookBody(None, 0, dead)
    return WebhookBody(body if not dead else orjson.dumps({"results": good}), len(good), dead)


def ingest_webhook(store: Store, body: bytes) -> WebhookBody:
    """Validate a webhook body and store it: its good reports in the raw stream (the body verbatim
    when all are good), its malformed ones in the dead letters, in one MULTI/EXEC.

    Raises WebhookBodyError (nothing stored) or StoreError (a Redis that refuses writes, out of memory
    or read-only, discards the whole transaction; should a part ever be written, the provider's retry
    repeats it, and processing is idempotent). The caller answers 200 only after this returns, so the
    provider retries whatever did not reach Redis.
    """
    sorted_out = sort_webhook_body(body)
    if sorted_out.page is None and not sorted_out.dead:
        return sorted_out  # `{results: []}`: nothing to keep
    with redis_errors():
        pipe = store.r.pipeline(transaction=True)
        if sorted_out.page is not None:
            pipe.xadd(ReportKeys.of(store).raw, {"page": sorted_out.page, "src": "webhook"})
        for message_id, entry in sorted_out.dead:
            pipe.xadd(store.dlq, {"message_id": message_id, "entry": entry})
        if sorted_out.dead:
            pipe.hincrby(ReportKeys.of(store).stats, "dead_letters", len(sorted_out.dead))
        pipe.execute()
    if sorted_out.dead:
        problems = [orjson.loads(entry)["detail"] for _, entry in sorted_out.dead]
        log.warning("webhook_reports_dead_lettered", reason="report_malformed", reports=len(problems),
                    kept=sorted_out.reports, details=problems[:5],
                    detail="kept in the dead letters (`sms-worker dlq list`); the body's good reports are stored")
        metrics.REPORTS.labels("webhook", "dead_letters").inc(len(problems))
    return sorted_out


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
    outcome: str  # drained, page_limit, busy, lease_lost, fenced (page stored), auth_error, provider_error
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


@dataclass(slots=True)
class _Held:
    """A page the provider handed out that is not in Redis yet: it lives only in this process."""

    page: bytes
    reports: int
    holder: str  # the drain lease's holder id of the drain that fetched it
    token: int
    since: float = field(default_factory=time.monotonic)


# The drainers of this process, for the last words of one that exits with a page unstored (its
# reports are then only in the provider's logs, which the no-report sweep asks).
_DRAINERS: weakref.WeakSet[Drainer] = weakref.WeakSet()


def _last_words() -> None:
    for drainer in list(_DRAINERS):
        if drainer._held is not None:
            log.error("reports_page_unstored", reports=drainer._held.reports, reason="process exiting",
                      detail="a fetched page never reached Redis; the no-report sweep recovers its reports "
                             "from GET /sms/3/logs once their deadline passes")


# threading's exit hooks run however a Python process ends normally, Dramatiq's forked worker
# processes included (multiprocessing leaves them with os._exit, which skips atexit).
getattr(threading, "_register_atexit", atexit.register)(_last_words)


class Drainer:
    """Drains of the once-only reports endpoint under the `reports-drain` lease (one per process)."""

    def __init__(
        self, settings: Settings, store: Store, provider: ReportSource, wake: Wake | None = None,
        *, max_pages: int = MAX_PAGES_PER_DRAIN, stopping: Callable[[], bool] | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.provider = provider
        self.wake = wake
        self.max_pages = max_pages
        # True once the process is shutting down: a page still unstored is then given up, loudly.
        self.stopping = stopping or (lambda: False)
        self.keys = ReportKeys.of(store)
        # The lease outlives the longest reports GET (SMS_LEASE_S is validated against the request
        # timeouts), and it is renewed before each page.
        self.lease_ms = int(settings.sms_lease_s * 1000)
        self.filters = {
            "entity_id": settings.sms_reports_entity_id,
            "application_id": settings.sms_reports_application_id,
            "campaign_reference_id": settings.sms_reports_campaign_reference_id,
        }
        self._held: _Held | None = None
        self._draining = threading.Lock()
        _DRAINERS.add(self)

    def append(self, page: bytes, token: int) -> bool:
        """Write one raw page; returns whether `token` is still the current fencing token.

        The page is written either way: the provider handed it out once and for all, and
        processing is idempotent, so a page fetched by a drainer that lost its lease during the GET
        is applied like any other (it used to be dead-lettered as drain_fenced, where nothing read
        it). A stale token only tells this drainer to stop fetching."""
        keys = [self.keys.raw, self.store.fence_key(DRAIN_LEASE)]
        current, _ = self.store.run("report_append", keys, [token, page])
        return bool(current)

    def _store(self, held: _Held) -> bool:
        """Write the fetched page `held`, retrying for as long as Redis refuses it; returns whether
        its token is still current.

        Until it is written the page is kept in self._held, and the caller fetches no further page,
        so at most one page per process is ever at risk. Between attempts the lease is renewed
        (PEXPIRE is allowed even out of memory), so no other drainer fetches meanwhile either. Only a
        process that stops gives it up, loudly; an interrupted call (Dramatiq's time limit) leaves it
        held, and this process's next drain writes it before fetching anything."""
        self._held = held
        attempt = 0
        try:
            while True:
                try:
                    current = self.append(held.page, held.token)
                    break
                except StoreError as error:
                    attempt += 1
                    metrics.REPORT_PAGE_STORE_RETRIES.inc()
                    held_s = round(time.monotonic() - held.since, 1)
                    if self.stopping():
                        log.error("reports_page_unstored", reports=held.reports, reason="process stopping",
                                  held_s=held_s, error=str(error))
                        raise
                    log.warning("reports_page_store_retry", reports=held.reports, attempt=attempt, held_s=held_s,
                                error=str(error), detail="kept in memory; no page is fetched until it is stored")
                    time.sleep(min(STORE_BACKOFF_MAX_S, STORE_BACKOFF_S * 2 ** min(attempt, 10)))
                    with contextlib.suppress(StoreError):
                        token = self.store.lease(DRAIN_LEASE, held.holder, self.lease_ms)
                        held.token = token or held.token
        except BaseException as error:
            if not isinstance(error, StoreError):
                log.error("reports_page_unstored", reports=held.reports, reason=type(error).__name__,
                          detail="interrupted; kept in memory, the next drain of this process stores it first")
            raise
        self._held = None
        if attempt:
            log.warning("reports_page_stored", reports=held.reports, attempts=attempt + 1,
                        held_s=round(time.monotonic() - held.since, 1))
        return current

    def drain(self) -> DrainResult:
        # One drain at a time in a process: a held page is this process's alone to store first.
        if not self._draining.acquire(blocking=False):
            return DrainResult("busy")
        try:
            return self._drain()
        finally:
            self._draining.release()

    def _drain(self) -> DrainResult:
        started = time.perf_counter()
        held = self._held
        holder = held.holder if held else f"{consumer_name()}:{uuid.uuid4().hex[:12]}"
        token = self.store.lease(DRAIN_LEASE, holder, self.lease_ms)
        if not token and held is None:
            log.debug("reports_drain_skipped", reason="another drainer holds the lease")
            return DrainResult("busy")
        pages = reports = 0
        outcome = "page_limit"
        try:
            if held is not None:
                # Fetched by an earlier drain of this process that could not store it: first of all,
                # whoever holds the lease now.
                held.token = token or held.token
                stored_current = self._store(held)
                pages, reports = 1, held.reports
                if self.wake is not None:
                    self.wake.process_reports()
                if not token or not stored_current:
                    outcome = "lease_lost"
            while outcome == "page_limit" and pages < self.max_pages:
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
                count = _count_results(raw)
                current = self._store(_Held(raw, count, holder, token))
                pages += 1
                reports += count
                if not current:
                    outcome = "fenced"
                    log.error("reports_drain_lease_lost", reports=count, token=token,
                              detail="the lease was taken over during the GET (a pause?): the page is stored "
                                     "and will be applied; this drainer fetches no further page")
                    break
                if self.wake is not None:
                    self.wake.process_reports()  # processing overlaps the next GET (kicks are de-duplicated)
                if count < PAGE_SIZE:
                    outcome = "drained"
                    break
        finally:
            if self._held is None:
                # (With a page still held the lease is kept until it expires: nobody fetches meanwhile.)
                with contextlib.suppress(StoreError):
                    self.store.release_lease(DRAIN_LEASE, holder)
            if self.wake is not None and outcome == "page_limit":
                self.wake.send(DRAIN_REPORTS)  # more may be waiting: a fresh message carries on
            log.info("reports_drained", pages=pages, reports=reports, outcome=outcome,
                     duration_ms=round((time.perf_counter() - started) * 1000, 1))
        if outcome in ("drained", "page_limit"):
            # For `sms-worker status`: when the endpoint last answered, and what it gave.
            with contextlib.suppress(StoreError), redis_errors():
                self.store.r.hset(self.store.last_drain, mapping={
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


def _parse(entry_id: str, fields: dict[bytes, bytes] | None) -> Page:
    """parse_page, and should it ever raise, the whole entry as a dead letter with its body."""
    try:
        return parse_page(entry_id, fields)
    except Exception as error:  # noqa: BLE001 -- a page that breaks the parser must not block the others
        source = (fields or {}).get(b"src", b"?").decode("ascii", "replace")
        raw = (fields or {}).get(b"page") or b""
        detail = f"{type(error).__name__}: {error}"[:1000]
        log.error("report_page_unparsable", source=source, error=detail)
        return Page(entry_id, source, dead=[("", _dead_letter("report_page_unprocessable", detail, source, entry_id,
                                                              page=raw.decode("utf-8", "replace")))])


# Error codes of a Redis that cannot serve now (memory, loading, a failover, a lost group...): the
# batch is retried later. Any other error reply (a script refusing its arguments, a runtime error)
# is about what the call carried.
_REDIS_STATE_ERRORS: Final = ("OOM", "LOADING", "BUSY", "READONLY", "MASTERDOWN", "MISCONF", "NOGROUP", "NOSCRIPT",
                              "TRYAGAIN", "CLUSTERDOWN", "NOREPLICAS", "NOAUTH", "NOPERM", "WRONGPASS", "EXECABORT")


def _caused_by_entries(error: Exception) -> bool:
    """Whether a batch failed because of what it holds (isolate it) rather than Redis (retry it)."""
    if not isinstance(error, StoreError):
        return True
    cause = error.__cause__
    # redis-py gives the error replies it recognises (OOM, LOADING, READONLY...) their own subclasses.
    return type(cause) is redis.ResponseError and not str(cause).startswith(_REDIS_STATE_ERRORS)


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
    def _create_group(self) -> None:
        try:
            with redis_errors():
                # From the start of the stream: pages written before any processor ran count too.
                self.store.r.xgroup_create(self.keys.raw, RAW_GROUP, id="0", mkstream=True)
        except StoreError as error:
            if "BUSYGROUP" not in str(error):
                raise

    def _ensure_group(self) -> None:
        if not self._group_ready:
            self._create_group()
            self._group_ready = True

    def _grouped(self, call: Callable[[], Any]) -> Any:
        """Run a read of the consumer group; if the group is gone, recreate it and retry once.

        It disappears when Redis lost its data (restarted without persistence, flushed, failed over
        to an empty replica): every read then fails with NOGROUP until someone recreates it, so the
        group made once at start-up is not enough. Said loudly, because everything else Redis held
        (unprocessed pages, message states, parked reports) is gone too."""
        try:
            return call()
        except StoreError as error:
            if "NOGROUP" not in str(error):
                raise
        with redis_errors():
            stream_exists = bool(self.store.r.exists(self.keys.raw))
        log.error("redis_state_lost", missing=f"consumer group {RAW_GROUP!r} of {self.keys.raw}",
                  stream_missing=not stream_exists, action="recreated; reading on",
                  detail="Redis lost its data (restarted without persistence?): reports, states and events "
                         "it held are gone")
        metrics.REPORTS_STATE_RECREATED.labels("reports_group").inc()
        self._create_group()
        return call()

    def _read(self, count: int) -> list[tuple[str, dict[bytes, bytes] | None]]:
        def read() -> Any:
            with redis_errors():
                return self.store.r.xreadgroup(RAW_GROUP, self.consumer, {self.keys.raw: ">"}, count=count)

        reply = self._grouped(read)
        return [(eid.decode(), fields) for _, entries in reply or [] for eid, fields in entries]

    def _claim_stale(self, limit: int = 100) -> list[tuple[str, dict[bytes, bytes] | None]]:
        """Entries a dead processor read but never acknowledged (XAUTOCLAIM), oldest first."""
        def claim() -> list[tuple[str, dict[bytes, bytes] | None]]:
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

        result: list[tuple[str, dict[bytes, bytes] | None]] = self._grouped(claim)
        return result

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
            page = _parse(entry_id, fields)
            batch.append(page)
            size += len(page.finals)
            if size >= self.batch_reports:
                total.add(self._apply_isolating(batch))
                batch, size = [], 0
        if batch:
            total.add(self._apply_isolating(batch))
        return total

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
                dead.append((final.message_id, _dead_letter(
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

    def _apply_pages(self, pages: list[Page], *, ack: bool = True) -> Tally:
        """Apply the final reports of `pages`, and (with `ack`) write their dead letters and
        acknowledge them in the same last call. Without `ack` only the reports are applied (the
        ops are idempotent): the caller acknowledges the pages afterwards."""
        started = time.perf_counter()
        at = events.now_iso()
        acks = [p.entry_id for p in pages] if ack else []
        dead = [d for p in pages for d in p.dead] if ack else []
        todo = [f for p in pages for f in p.finals]
        intermediate = sum(p.intermediate for p in pages) if ack else 0
        tally = Tally(pages=len(pages) if ack else 0, reports=len(todo) + intermediate + len(dead),
                      intermediate=intermediate)
        acked = False
        now = time.time()
        for _ in range(APPLY_ATTEMPTS):
            rows = self.state.fetch(list(dict.fromkeys(f.message_id for f in todo)))
            ops, sources, duplicates = self._plan(todo, rows, at)
            tally.duplicates += duplicates
            acked, results = self.state.apply(ops, ack=acks, dead=dead)
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
        for page in pages if acked and ack else ():
            for group, n in page.unknown_status.items():
                log.warning("report_unknown_status", group=group, reports=n, source=page.source,
                            detail="not a final status: no event, no state change; kept in the dead letters")
                metrics.REPORTS_UNKNOWN_STATUS.inc(n)
        for name in ("applied", "duplicates", "intermediate", "parked", "dead_letters"):
            if getattr(tally, name):
                metrics.REPORTS.labels("all", name).inc(getattr(tally, name))
        if tally.applied:
            metrics.EVENTS.labels("report").inc(tally.applied)
        (log.info if ack else log.debug)(
                 "reports_processed", pages=tally.pages, reports=tally.reports, applied=tally.applied,
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


# The longest validity the dispatcher gives a message (worker.dispatch caps it at 48 h): a no-report
# deadline is at most this plus SMS_NO_REPORT_GRACE_S after the message's acceptance.
MAX_VALIDITY_S: Final = 48 * 3600
# Awaiting entries one sweep's pass visits to find accepted messages due for a lookup.
LOOKUP_SCAN: Final = 2000
# A claimed lookup that never finished (a crash, the provider down) is due again after this.
LOOKUP_CLAIM_MS: Final = 300_000
# A message the logs show not final yet is looked up again after SMS_REPORT_LOOKUP_AFTER_S, then
# twice that, and so on, up to this (or SMS_REPORT_LOOKUP_AFTER_S when that is longer).
LOOKUP_BACKOFF_MAX_S: Final = 8 * 3600
# The share of the logs calls the limiter grants over one sweep interval that lookups may take:
# reconciliation (sends whose outcome is unknown) always keeps the rest.
LOOKUP_SHARE: Final = 0.5

REPORT_LOOKUPS: Final = Counter(
    "sms_report_lookups_total",
    "Accepted messages without a final report looked up in GET /sms/3/logs by the sweep, by result "
    "(final: a final status found and processed as a report; not_final: looked up again later; failed)",
    ["result"],
)


def _loggable(message_id: str) -> bool:
    """Whether a messageId can go into a logs filter (no comma, not too long)."""
    try:
        chunk_message_ids([message_id])
    except ValueError:
        return False
    return True


class Sweeper:
    """Looks up accepted messages whose report is overdue, settles those whose report deadline
    passed, and retries parked reports.

    GET /sms/3/reports hands a report out once and a webhook the provider gave up on delivers none,
    but the provider's logs keep each message's final status for 48 h. So (with a provider given):

    - an accepted message still without a final report SMS_REPORT_LOOKUP_AFTER_S after acceptance
      is looked up in the logs, and again later with backoff while the logs show it not final;
      at most SMS_REPORT_LOOKUP_BATCH per sweep, and never more than LOOKUP_SHARE of the logs calls
      the shared limiter grants over a sweep interval;
    - before a message is given `expired`/no_report at its deadline, the logs are asked once more.

    A final status found in the logs goes through the processor like any report (a page with source
    `logs`): idempotent, one event whichever source comes first. Only messages the logs cannot settle
    get no_report.
    """

    def __init__(
        self, settings: Settings, store: Store, processor: Processor, provider: Any = None,
        before_logs_call: Callable[[], None] | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.processor = processor
        self.state = processor.state
        self.keys = processor.keys
        self.provider = provider
        self.before_logs_call = before_logs_call

    def recover_from_logs(self, message_ids: Sequence[str], *, raise_errors: bool = False) -> set[str]:
        """Append the final statuses the provider's logs hold for these messages; returns their ids.

        A provider error is logged and nothing is found (raised instead with `raise_errors`)."""
        wanted = [mid for mid in message_ids if _loggable(mid)]
        if len(wanted) < len(message_ids):
            log.warning("reports_recovery_skipped", messages=len(message_ids) - len(wanted),
                        detail="messageIds a logs filter cannot carry (a comma, or too long)")
        if self.provider is None or not wanted:
            return set()
        try:
            found = self.provider.logs_for_message_ids(wanted, before_request=self.before_logs_call)
        except ProviderError as error:
            log.warning("reports_recovery_failed", messages=len(wanted), error_class=type(error).__name__)
            if raise_errors:
                raise
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
                self.store.r.xadd(self.keys.raw, {"page": orjson.dumps({"results": items}), "src": "logs"})
            log.warning("reports_recovered_from_logs", reports=len(items),
                        detail="final statuses that never arrived as reports (a webhook the provider gave up "
                               "on, a drain killed before storing its page)")
        return {item["messageId"] for item in items}

    # --- the early lookup ------------------------------------------------------------------------
    def lookup_calls_per_sweep(self) -> int:
        """Logs calls one sweep's lookups may make: LOOKUP_SHARE of those granted per sweep interval."""
        per_s = self.settings.sms_logs_rate_per_min / 60.0
        return max(1, int(per_s * sweep_interval_s(self.settings) * LOOKUP_SHARE))

    def _schedule_overdue(self, now_ms: int) -> int:
        """One step of the pass over the awaiting set: put accepted messages SMS_REPORT_LOOKUP_AFTER_S
        past their acceptance on the lookup schedule; returns how many.

        The awaiting set is ordered by no-report deadline, and a message's validity sets how far its
        deadline lies from its acceptance: a deadline before now + MAX_VALIDITY_S + grace - lookup_after
        marks a message that may be that overdue, and its hash (updated_ms, written when it became
        ACCEPTED) says whether it is. The pass visits LOOKUP_SCAN entries per sweep from where the last
        one stopped and starts over once past the end, so a message not overdue yet when visited (a
        shorter validity puts it early in the set) is found on a later round. Messages past their
        deadline are the expiry's."""
        s, r, keys = self.settings, self.store.r, self.keys
        after_ms = int(s.sms_report_lookup_after_s * 1000)
        slack_ms = int((MAX_VALIDITY_S + s.sms_no_report_grace_s) * 1000)
        horizon = now_ms + slack_ms - after_ms
        if horizon <= now_ms:
            return 0  # looked up no earlier than the deadline: the expiry does that
        with redis_errors():
            cursor_score, cursor_member = r.hmget(keys.lookup_cursor, ["score", "member"])
            rank = r.zrank(self.store.awaiting, cursor_member) if cursor_member is not None else None
            if rank is not None:
                entries = r.zrange(self.store.awaiting, rank + 1, rank + LOOKUP_SCAN, withscores=True)
            else:
                # (The cursor's message left the set: on from its deadline.)
                low = f"({cursor_score.decode()}" if cursor_score is not None else f"({now_ms}"
                entries = r.zrangebyscore(self.store.awaiting, low, horizon, start=0, num=LOOKUP_SCAN,
                                          withscores=True)
            if len(entries) < LOOKUP_SCAN or entries[-1][1] > horizon:
                r.delete(keys.lookup_cursor)  # the end of this round: the next starts over
            else:
                r.hset(keys.lookup_cursor, mapping={"score": repr(entries[-1][1]), "member": entries[-1][0]})
        visible = [(m.decode(), int(score)) for m, score in entries if now_ms < score <= horizon]
        if not visible:
            return 0
        with redis_errors():
            pipe = r.pipeline(transaction=False)
            for mid, _ in visible:
                pipe.zscore(keys.lookup, mid)
                pipe.hmget(self.store.msg(mid), ["state", "updated_ms"])
            replies = pipe.execute()
        due: dict[str, int] = {}
        for (mid, deadline), scheduled, (state, updated) in zip(visible, replies[::2], replies[1::2], strict=True):
            if scheduled is not None or state != b"ACCEPTED":
                continue
            try:
                accepted = int(updated)
            except (TypeError, ValueError):
                accepted = deadline - slack_ms  # the earliest it can have been accepted
            if accepted + after_ms <= now_ms:
                due[mid] = accepted + after_ms
        if due:
            with redis_errors():
                r.zadd(keys.lookup, due, nx=True)
        return len(due)

    def look_up_overdue(self, now_ms: int) -> tuple[int, int]:
        """Look the overdue accepted messages up in the logs, oldest first, a bounded batch per sweep;
        returns (looked up, final status found)."""
        batch = self.settings.sms_report_lookup_batch
        if self.provider is None or batch <= 0:
            return 0, 0
        r, keys = self.store.r, self.keys
        self._schedule_overdue(now_ms)
        with redis_errors():
            due = [m.decode() for m in r.zrangebyscore(keys.lookup, "-inf", now_ms, start=0, num=batch)]
            if not due:
                return 0, 0
            pipe = r.pipeline(transaction=False)
            for mid in due:
                pipe.hget(self.store.msg(mid), "state")
                pipe.zscore(self.store.awaiting, mid)
            replies = pipe.execute()
        overdue: list[str] = []
        settled: list[str] = []  # a report came, the deadline passed (the expiry's), or it is gone
        for mid, state, deadline in zip(due, replies[::2], replies[1::2], strict=True):
            ok = state == b"ACCEPTED" and deadline is not None and deadline > now_ms and _loggable(mid)
            (overdue if ok else settled).append(mid)
        if settled:
            with redis_errors():
                r.zrem(keys.lookup, *settled)
                r.hdel(keys.lookup_tries, *settled)
        picked = [mid for chunk in chunk_message_ids(overdue)[: self.lookup_calls_per_sweep()] for mid in chunk]
        if not picked:
            return 0, 0
        tries = self.store.run("report_lookup", [keys.lookup, keys.lookup_tries],
                               [now_ms, now_ms + LOOKUP_CLAIM_MS, *picked])
        claimed = {mid: int(n) for mid, n in zip(picked, tries, strict=True) if int(n) > 0}
        if not claimed:
            return 0, 0
        try:
            found = self.recover_from_logs(list(claimed), raise_errors=True)
        except ProviderError:
            REPORT_LOOKUPS.labels("failed").inc(len(claimed))
            return 0, 0  # due again after LOOKUP_CLAIM_MS
        # Found or not, the next look is backed off: a found status is applied by the processor (and
        # the entry dropped at its next due time); one that could not be applied is not asked again
        # every sweep.
        after_s = self.settings.sms_report_lookup_after_s
        cap_s = max(after_s, LOOKUP_BACKOFF_MAX_S)
        with redis_errors():
            pipe = r.pipeline(transaction=False)
            for mid, n in claimed.items():
                pipe.zadd(keys.lookup, {mid: now_ms + int(min(cap_s, after_s * 2 ** min(n - 1, 30)) * 1000)},
                          xx=True)
            pipe.execute()
        REPORT_LOOKUPS.labels("final").inc(len(found))
        REPORT_LOOKUPS.labels("not_final").inc(len(claimed) - len(found))
        return len(claimed), len(found)

    # --- the sweep -------------------------------------------------------------------------------
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
        looked_up, found = self.look_up_overdue(now_ms)
        if (recovered or found) and self.processor.wake is not None:
            self.processor.wake.process_reports()
        parked = self.processor.retry_parked(now_ms)
        log.info("reports_swept", expired_no_report=expired, recovered_from_logs=recovered,
                 looked_up=looked_up, found_by_lookup=found, parked_resolved=parked["resolved"],
                 parked_duplicates=parked["duplicates"], unknown=parked["unknown"],
                 still_parked=parked["still_parked"], unknown_reports=self.settings.sms_unknown_reports,
                 duration_ms=round((time.perf_counter() - started) * 1000, 1))
        return {"expired_no_report": expired, "recovered_from_logs": recovered, "looked_up": looked_up,
                "found_by_lookup": found, **parked}
