"""The sweep: overdue reports looked up in the provider's logs, no_report at the deadline, parked retries.

GET /sms/3/reports hands a report out once and a webhook the provider gave up on delivers none, but
the provider's logs keep each message's final status for 48 h. A final status found there is
appended as a page with source `logs` and goes through the processor like any report.

Keys (worker.store.reports): the awaiting set (by no-report deadline), reports_lookup (the lookup
schedule), reports_lookup_tries, reports_lookup_cursor (the pass over the awaiting set).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import orjson
import structlog
from prometheus_client import Counter

from worker import events
from worker.clock import sweep_interval_s
from worker.errors import ProviderError
from worker.models import State
from worker.provider import chunk_message_ids
from worker.reports.ops import APPLIED, NO_REPORT, Op, OpCode, Row, job_of
from worker.reports.process import Processor
from worker.settings import Settings
from worker.statuses import FINAL_GROUPS, group_of
from worker.store import Store

log = structlog.get_logger("worker.reports")

SWEEP_CHUNK: Final = 1000  # awaiting entries settled per round trip
SWEEP_MAX_CHUNKS: Final = 20
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

# Fields a log entry shares with a delivery report (GET /sms/3/logs has `destination` for `to`).
_LOG_AS_REPORT: Final = frozenset({"bulkId", "messageId", "to", "sentAt", "doneAt", "messageCount", "price",
                                   "status", "error", "mccMnc", "platform", "campaignReferenceId"})


@dataclass(frozen=True, slots=True)
class SweepConfig:
    """The settings the sweep reads."""

    logs_rate_per_min: int
    sweep_interval_s: float  # how often the clock sends the sweep (worker.clock.sweep_interval_s)
    lookup_after_s: float
    lookup_batch: int
    no_report_grace_s: float
    unknown_reports: str  # SMS_UNKNOWN_REPORTS, for the sweep's log line

    @classmethod
    def from_settings(cls, settings: Settings) -> SweepConfig:
        return cls(
            logs_rate_per_min=settings.sms_logs_rate_per_min,
            sweep_interval_s=sweep_interval_s(settings),
            lookup_after_s=settings.sms_report_lookup_after_s,
            lookup_batch=settings.sms_report_lookup_batch,
            no_report_grace_s=settings.sms_no_report_grace_s,
            unknown_reports=settings.sms_unknown_reports,
        )


def no_report_event(message_id: str, row: Row, at: str) -> bytes:
    """`expired` with reason no_report; its event_id has a suffix, so a late real `expired` report
    (which replaces this provisional verdict) still has an event_id of its own."""
    event = orjson.loads(events.build("expired", message_id, job_of(row.job), lane=row.lane,
                                      bulk_id=row.bulk_id or None, reason=NO_REPORT, at=at))
    event["event_id"] = f"{message_id}:expired:{NO_REPORT}"
    return orjson.dumps(event)


def _loggable(message_id: str) -> bool:
    """Whether a messageId can go into a logs filter (no comma, not too long)."""
    try:
        chunk_message_ids([message_id])
    except ValueError:
        return False
    return True


def _as_report(message_id: str, raw: dict[str, Any]) -> dict[str, Any] | None:
    """A log entry as a delivery report, if its status is final (else None: nothing to apply)."""
    item = {k: v for k, v in raw.items() if k in _LOG_AS_REPORT}
    if group_of(item.get("status")) not in FINAL_GROUPS:
        return None
    item["messageId"] = message_id
    if "to" not in item and raw.get("destination"):
        item["to"] = raw["destination"]
    return item


class Sweeper:
    """Looks up accepted messages whose report is overdue, settles those whose report deadline
    passed, and retries parked reports.

    With a provider given:

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
        self, config: SweepConfig, store: Store, processor: Processor, provider: Any = None,
        before_logs_call: Callable[[], None] | None = None,
        lane_logs: Mapping[str, tuple[Any, Callable[[], None] | None]] | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.processor = processor
        self.state = processor.state
        self.provider = provider
        self.before_logs_call = before_logs_call
        # With several accounts (worker.accounts): lane -> (its account's provider, its logs limiter's
        # wait); a message is looked up in the logs of its lane's account. Lanes not named here (and
        # every message without this) go to `provider`.
        self.lane_logs = dict(lane_logs or {})

    def recover_from_logs(self, message_ids: Sequence[str], *, raise_errors: bool = False) -> set[str]:
        """Append the final statuses the provider's logs hold for these messages; returns their ids.

        A provider error is logged and nothing is found (raised instead with `raise_errors`)."""
        wanted = [mid for mid in message_ids if _loggable(mid)]
        if len(wanted) < len(message_ids):
            log.warning("reports_recovery_skipped", messages=len(message_ids) - len(wanted),
                        detail="messageIds a logs filter cannot carry (a comma, or too long)")
        if self.provider is None or not wanted:
            return set()
        found: dict[str, Any] = {}
        failed: ProviderError | None = None
        for provider, before, group in self._by_account(wanted):
            try:
                found.update(provider.logs_for_message_ids(group, before_request=before))
            except ProviderError as error:
                log.warning("reports_recovery_failed", messages=len(group), error_class=type(error).__name__)
                failed = error
        if failed is not None and raise_errors:
            raise failed
        items = [item for mid, entry in found.items() if (item := _as_report(mid, entry.raw)) is not None]
        if items:
            self.store.add_report_page(orjson.dumps({"results": items}), "logs")
            log.warning("reports_recovered_from_logs", reports=len(items),
                        detail="final statuses that never arrived as reports (a webhook the provider gave up "
                               "on, a drain killed before storing its page)")
        return {item["messageId"] for item in items}

    def _by_account(self, message_ids: list[str]) -> list[tuple[Any, Callable[[], None] | None, list[str]]]:
        """(provider, before each logs call, message ids) per account the messages were sent
        through: their lane's (one more round trip, only with several accounts)."""
        if not self.lane_logs:
            return [(self.provider, self.before_logs_call, message_ids)]
        groups: dict[int, tuple[Any, Callable[[], None] | None, list[str]]] = {}
        for mid, row in self.state.fetch(message_ids).items():
            provider, before = self.lane_logs.get(row.lane or "", (self.provider, self.before_logs_call))
            groups.setdefault(id(provider), (provider, before, []))[2].append(mid)
        return list(groups.values())

    # --- the early lookup ------------------------------------------------------------------------
    def lookup_calls_per_sweep(self) -> int:
        """Logs calls one sweep's lookups may make: LOOKUP_SHARE of those granted per sweep interval."""
        per_s = self.config.logs_rate_per_min / 60.0
        return max(1, int(per_s * self.config.sweep_interval_s * LOOKUP_SHARE))

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
        after_ms = int(self.config.lookup_after_s * 1000)
        slack_ms = int((MAX_VALIDITY_S + self.config.no_report_grace_s) * 1000)
        horizon = now_ms + slack_ms - after_ms
        if horizon <= now_ms:
            return 0  # looked up no earlier than the deadline: the expiry does that
        entries = self.store.scan_awaiting(now_ms, horizon, LOOKUP_SCAN)
        visible = [(m.decode(), int(score)) for m, score in entries if now_ms < score <= horizon]
        if not visible:
            return 0
        candidates = self.store.lookup_candidates([mid for mid, _ in visible])
        due: dict[str, int] = {}
        for (mid, deadline), (scheduled, state, updated) in zip(visible, candidates, strict=True):
            if scheduled is not None or state != State.ACCEPTED.encode():
                continue
            try:
                accepted = int(updated or b"")
            except ValueError:
                accepted = deadline - slack_ms  # the earliest it can have been accepted
            if accepted + after_ms <= now_ms:
                due[mid] = accepted + after_ms
        self.store.schedule_lookups(due)
        return len(due)

    def look_up_overdue(self, now_ms: int) -> tuple[int, int]:
        """Look the overdue accepted messages up in the logs, oldest first, a bounded batch per sweep;
        returns (looked up, final status found)."""
        if self.provider is None or self.config.lookup_batch <= 0:
            return 0, 0
        self._schedule_overdue(now_ms)
        claimed = self._claim_due(now_ms)
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
        after_s = self.config.lookup_after_s
        cap_s = max(after_s, LOOKUP_BACKOFF_MAX_S)
        self.store.reschedule_lookups({mid: now_ms + int(min(cap_s, after_s * 2 ** min(n - 1, 30)) * 1000)
                                       for mid, n in claimed.items()})
        REPORT_LOOKUPS.labels("final").inc(len(found))
        REPORT_LOOKUPS.labels("not_final").inc(len(claimed) - len(found))
        return len(claimed), len(found)

    def _claim_due(self, now_ms: int) -> dict[str, int]:
        """The due lookups this sweep takes (messageId -> its lookups so far); drops those settled
        meanwhile (a report came, the deadline passed: the expiry's, or the message is gone)."""
        due = self.store.due_lookups(now_ms, self.config.lookup_batch)
        if not due:
            return {}
        overdue: list[str] = []
        settled: list[str] = []
        for mid, (state, deadline) in zip(due, self.store.lookup_states(due), strict=True):
            ok = state == State.ACCEPTED.encode() and deadline is not None and deadline > now_ms and _loggable(mid)
            (overdue if ok else settled).append(mid)
        self.store.drop_lookups(settled)
        picked = [mid for chunk in chunk_message_ids(overdue)[: self.lookup_calls_per_sweep()] for mid in chunk]
        if not picked:
            return {}
        tries = self.store.claim_lookups(now_ms, now_ms + LOOKUP_CLAIM_MS, picked)
        return {mid: n for mid, n in zip(picked, tries, strict=True) if n > 0}

    # --- the sweep -------------------------------------------------------------------------------
    def _expire_due(self, now_ms: int, at: str) -> tuple[int, int]:
        """Messages past their report deadline: asked in the logs once more, then given
        `expired`/no_report; returns (expired, recovered from the logs)."""
        expired = recovered = 0
        for _ in range(SWEEP_MAX_CHUNKS):
            due = self.store.due_awaiting(now_ms, SWEEP_CHUNK)
            if not due:
                break
            rows = self.state.fetch(due)
            from_logs = self.recover_from_logs([mid for mid in due if rows[mid].state == State.ACCEPTED])
            recovered += len(from_logs)
            ops = [Op(OpCode.NO_REPORT, mid,
                      payload=no_report_event(mid, rows[mid], at) if rows[mid].state == State.ACCEPTED else b"")
                   for mid in due if mid not in from_logs]
            _, results = self.state.apply(ops, now_ms=now_ms)
            expired += sum(1 for r in results if r == APPLIED)
            if len(due) < SWEEP_CHUNK or from_logs:
                break  # recovered pages are processed first; their messages leave the set then
        return expired, recovered

    def sweep(self, now_ms: int | None = None) -> dict[str, int]:
        started = time.perf_counter()
        now_ms = now_ms if now_ms is not None else events.now_ms()
        expired, recovered = self._expire_due(now_ms, events.now_iso())
        looked_up, found = self.look_up_overdue(now_ms)
        if (recovered or found) and self.processor.wake is not None:
            self.processor.wake.process_reports()
        parked = self.processor.retry_parked(now_ms)
        log.info("reports_swept", expired_no_report=expired, recovered_from_logs=recovered,
                 looked_up=looked_up, found_by_lookup=found, parked_resolved=parked["resolved"],
                 parked_duplicates=parked["duplicates"], unknown=parked["unknown"],
                 still_parked=parked["still_parked"], unknown_reports=self.config.unknown_reports,
                 duration_ms=round((time.perf_counter() - started) * 1000, 1))
        return {"expired_no_report": expired, "recovered_from_logs": recovered, "looked_up": looked_up,
                "found_by_lookup": found, **parked}
