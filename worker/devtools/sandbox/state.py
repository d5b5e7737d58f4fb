"""The sandbox account: accepted messages, their indexes, report queues and counters."""

from __future__ import annotations

import heapq
import itertools
import os
import random
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from typing import Any, Final

from worker.devtools.sandbox import codes
from worker.devtools.sandbox import records as rec
from worker.devtools.sandbox.codes import JsonObj
from worker.devtools.sandbox.config import SandboxConfig
from worker.devtools.sandbox.errors import Violation
from worker.devtools.sandbox.faults import FaultInjector, LogsLimiter
from worker.devtools.sandbox.filters import Check, log_checks, passes, report_checks
from worker.devtools.sandbox.records import (
    DONE_AT,
    ERROR,
    FETCHED,
    MESSAGE_ID,
    PREV,
    SCHEDULED,
    SILENT,
    STATE,
    STATUS,
    UNFETCHED,
    WEBHOOK,
    Record,
)
from worker.devtools.sandbox.reports import OutcomePicker
from worker.devtools.sandbox.segments import binary_parts, text_parts, text_too_long
from worker.devtools.sandbox.validation import (
    LogsQuery,
    ReportsQuery,
    parse_body_datetime,
    validate_message,
    validate_request_options,
    validate_send_request,
)

RETENTION_S: Final = 48 * 3600
Bulk = tuple[str, float, float]  # a request's (bulkId, sentAt, acceptedAt), shared by its records (records.BULK)
# Shared `details` objects for the usual part counts (the response never mutates them).
_DETAILS: Final = {count: {"messageCount": count} for count in range(1, 26)}


def _chain(record: Record | None) -> Iterator[Record]:
    """A record and the earlier sends with the same messageId, newest first."""
    while record is not None:
        yield record
        record = record[PREV]


def _plain_message(message: Any) -> bool:
    """True for the common shape, which needs no full validation: {"destinations": [...], "content":
    {"text": str}} and maybe a string sender, each destination {"to": str} or {"to": str, "messageId":
    str} within the length limits. (_refusal() still judges the number.)"""
    try:
        content = message["content"]
        destinations = message["destinations"]
        size = len(message)
        if not (
            type(content["text"]) is str
            and len(content) == 1
            and type(destinations) is list
            and destinations
            and (size == 2 or (size == 3 and type(message.get("sender")) is str))
        ):
            return False
        return all(map(_plain_destination, destinations))
    except (TypeError, KeyError, IndexError):
        return False


def _plain_destination(destination: Any) -> bool:
    """{"to": str} or {"to": str, "messageId": str} within the limits; may raise on other shapes."""
    to = destination["to"]
    size = len(destination)
    message_id = destination.get("messageId") if size == 2 else None
    return type(to) is str and len(to) <= 64 and (size == 1 or (type(message_id) is str and len(message_id) <= 200))


def _valid_message(message: Any) -> bool:
    """Full validation of one message (the paths are dropped: the caller re-runs the validator for them)."""
    problems: list[Violation] = []
    validate_message(message, 0, problems)
    return not problems


def _parts(content: dict[str, Any], text: str | None) -> tuple[int, bool]:
    """(messageCount, too long) of a valid message's content: binary without text, else text."""
    if text is None:
        return binary_parts(content["hex"]), False
    if len(text) <= 70 and text.isascii():
        return 1, False  # fits one part in either encoding
    count = text_parts(text)
    return count, text_too_long(text, count)


def _refusal(to: str, too_long: bool) -> JsonObj | None:
    """The status refusing a destination of a valid message (its number, or its text too long), or None."""
    # Inlined validation.valid_destination() (the unit tests check both agree).
    plain = 7 <= len(to) <= 15 and to.isdigit()
    if not ((plain or (to[:1] == "+" and 8 <= len(to) <= 16 and to[1:].isdigit())) and to.isascii()):
        return codes.REJECTED_DESTINATION if to else codes.MISSING_TO
    return codes.REJECTED_MESSAGE_TOO_LONG if too_long else None


class SandboxState:
    """All mutable state of one sandbox lifetime (POST /_sandbox/reset replaces the whole object)."""

    def __init__(self, config: SandboxConfig, now: float) -> None:
        self.config = config
        seed = config.seed
        # Separate streams so enabling a fault does not change which outcomes messages get.
        self.outcome_rng = random.Random(f"{seed}:outcomes") if seed is not None else random.Random()
        self.fault_rng = random.Random(f"{seed}:faults") if seed is not None else random.Random()
        self._picker_mix = config.outcome_mix
        self._picker = OutcomePicker(config.outcome_mix, self.outcome_rng)
        self.faults = FaultInjector(config, self.fault_rng, now)
        self.logs_limiter = LogsLimiter(config, now)
        # Generated ids only need to be unique, and a fresh prefix keeps them unique across resets.
        prefix = os.urandom(4).hex()
        self._message_ids = (f"{prefix}-{n}" for n in itertools.count(1))
        self._bulk_ids = (f"bulk-{prefix}-{n}" for n in itertools.count(1))
        self._seq = itertools.count()

        self.by_message_id: dict[str, Record] = {}
        self.retired_ids: set[str] = set()  # ids past retention: still count as duplicates
        self.by_bulk: dict[str, list[Record]] = {}
        self.log: deque[Record] = deque()  # every accepted send, oldest first
        self.schedule: list[tuple[float, int, list[Record]]] = []  # heap of (due, seq, batch)
        self.unfetched: deque[Record] = deque()  # may hold already-fetched records (lazy removal)
        self.webhook_queue: deque[Record] = deque()

        self.requests: Counter[tuple[str, int]] = Counter()
        self.faults_injected: Counter[str] = Counter()
        self.rejected_by_status: Counter[str] = Counter()
        self.extra_sends: Counter[str] = Counter()  # messageId -> accepted sends beyond the first
        self.accepted_by_second: Counter[int] = Counter()
        self.messages_accepted = 0
        self.duplicate_rejections = 0
        self.scheduled = 0
        self.unfetched_live = 0
        self.reports_generated = 0
        self.reports_fetched = 0
        self.reports_pushed = 0
        self.reports_silent = 0
        self.webhook_attempts = 0
        self.webhook_failures = 0
        self.webhook_refused = 0
        self.webhook_dropped = 0
        self.logs_served = 0

    # --- sending ---------------------------------------------------------------------

    def accept(self, body: Any, now: float) -> tuple[JsonObj | None, list[Violation]]:
        """Validate and record a send request: (SmsResponse body, []) or (None, violations).

        This is the sandbox's hot loop, so validation and acceptance share one pass: a message of the
        common shape (_plain_message) is taken as it is, any other is checked by validate_message()
        first. On the first invalid message the request's records are rolled back and the full list
        of violations is returned.
        """
        bulk = self._bulk_of(body, now)
        if bulk is None:
            return None, validate_send_request(body, now)
        accepted: list[Record] = []
        rejected: list[str] = []  # the status name of each destination refused
        results: list[JsonObj] = []
        for message in body["messages"]:
            if not (_plain_message(message) or _valid_message(message)):
                self._roll_back(accepted)
                return None, validate_send_request(body, now)
            self._take(message, bulk, accepted, rejected, results)
        self._commit(accepted, rejected, bulk, now)
        return {"bulkId": bulk[0], "messages": results}, []

    def _take(
        self, message: Any, bulk: Bulk, accepted: list[Record], rejected: list[str], results: list[JsonObj]
    ) -> None:
        """Record one valid message's destinations: a record for each one accepted, a result for each."""
        content = message["content"]
        text = content.get("text")
        sender = message.get("sender")
        extra = message if "options" in message or "webhooks" in message else None
        count, too_long = _parts(content, text)
        details = _DETAILS.get(count) or {"messageCount": count}
        pending = codes.PENDING_ACCEPTED
        for destination in message["destinations"]:
            to = destination["to"]
            message_id = destination.get("messageId")
            if message_id is None:
                message_id = next(self._message_ids)
            status = _refusal(to, too_long)
            if status is None:
                # The record layout is documented in records.py.
                record = [message_id, to, sender, content, extra, bulk, count, SCHEDULED, None, None, 0.0, None]
                status = self._claim(record)
                if status is pending:
                    accepted.append(record)
            if status is not pending:
                rejected.append(status["name"])
            results.append({"messageId": message_id, "status": status, "destination": to, "details": details})

    def _claim(self, record: Record) -> JsonObj:
        """Index a new record under its messageId: PENDING_ACCEPTED, or the duplicate rejection when
        duplicates are refused and the id was taken (now, earlier in this request, or past retention)."""
        index = self.by_message_id
        message_id = record[MESSAGE_ID]
        if not self.config.reject_duplicate_ids:
            record[PREV] = index.get(message_id)
            index[message_id] = record
        elif message_id in self.retired_ids or index.setdefault(message_id, record) is not record:
            return codes.REJECTED_DUPLICATE_MESSAGE_ID
        return codes.PENDING_ACCEPTED

    def _bulk_of(self, body: Any, now: float) -> Bulk | None:
        """The request's (bulkId, sentAt, acceptedAt), or None when its top level is invalid.

        A bulkId is generated when the request names none; sentAt is now, or its later sendAt.
        """
        messages = body.get("messages") if type(body) is dict else None
        if type(messages) is not list or not messages:
            return None
        schedule = None
        if "options" in body:  # present: an explicit null is a violation too
            options = body["options"]
            problems: list[Violation] = []
            validate_request_options(options, now, problems)
            if problems:
                return None
            schedule = options.get("schedule")
        bulk_id = schedule.get("bulkId") if schedule else None
        if bulk_id is None:
            bulk_id = next(self._bulk_ids)
        sent_at = now
        send_at = schedule.get("sendAt") if schedule else None
        if send_at is not None:
            sent_at = max(now, parse_body_datetime(send_at))
        return bulk_id, sent_at, now

    def _roll_back(self, accepted: list[Record]) -> None:
        """Undo the index entries of a request found invalid part-way."""
        index = self.by_message_id
        for record in reversed(accepted):
            if index.get(record[MESSAGE_ID]) is record:
                if record[PREV] is None:
                    del index[record[MESSAGE_ID]]
                else:
                    index[record[MESSAGE_ID]] = record[PREV]

    def _commit(self, accepted: list[Record], rejected: list[str], bulk: Bulk, now: float) -> None:
        """Book a valid request's records into the log, bulk index, schedule and counters."""
        for name in rejected:
            self.rejected_by_status[name] += 1
        self.duplicate_rejections += rejected.count("REJECTED_DUPLICATE_MESSAGE_ID")
        if not accepted:
            return
        if not self.config.reject_duplicate_ids:
            for record in accepted:
                if record[PREV] is not None or record[MESSAGE_ID] in self.retired_ids:
                    self.extra_sends[record[MESSAGE_ID]] += 1
        bulk_id, sent_at, _ = bulk
        self.log.extend(accepted)
        in_bulk = self.by_bulk.get(bulk_id)
        if in_bulk is None:
            self.by_bulk[bulk_id] = list(accepted)
        else:
            in_bulk.extend(accepted)
        due = sent_at + self.config.report_delay_ms / 1000.0
        heapq.heappush(self.schedule, (due, next(self._seq), accepted))
        self.messages_accepted += len(accepted)
        self.scheduled += len(accepted)
        self.accepted_by_second[int(now)] += len(accepted)

    # --- report generation -------------------------------------------------------------

    def _picker_now(self) -> OutcomePicker:
        if self.config.outcome_mix is not self._picker_mix:
            self._picker_mix = self.config.outcome_mix
            self._picker = OutcomePicker(self._picker_mix, self.outcome_rng)
        return self._picker

    def reseed(self) -> None:
        """Restart both RNG streams from config.seed."""
        seed = self.config.seed
        self.outcome_rng.seed(f"{seed}:outcomes" if seed is not None else None)
        self.fault_rng.seed(f"{seed}:faults" if seed is not None else None)

    def generate_due(self, now: float, max_records: int) -> int:
        """Give due messages their outcome and queue their report; returns how many (about max_records)."""
        table = self._picker_now().table
        slots = OutcomePicker.SLOTS
        draw = self.outcome_rng.random
        heap = self.schedule
        unfetched = self.unfetched.append
        webhook = self.webhook_queue.append
        done = silent = to_pull = 0
        while heap and heap[0][0] <= now and done < max_records:
            due, _, batch = heapq.heappop(heap)
            for record in batch:
                record[STATUS], record[ERROR] = table[int(draw() * slots)]  # inlined OutcomePicker.pick()
                record[DONE_AT] = due
                if record[rec.EXTRA] is None:
                    record[STATE] = UNFETCHED
                    unfetched(record)
                    to_pull += 1
                    continue
                url, notify = rec.delivery(record)
                if not notify:
                    record[STATE] = SILENT
                    silent += 1
                elif url is not None:
                    record[STATE] = WEBHOOK
                    webhook(record)
                else:
                    record[STATE] = UNFETCHED
                    unfetched(record)
                    to_pull += 1
            done += len(batch)
        self.scheduled -= done
        self.reports_generated += done - silent
        self.reports_silent += silent
        self.unfetched_live += to_pull
        return done

    def prune(self, now: float) -> None:
        """Forget sends older than the 48 h retention (their ids still count as duplicates)."""
        cutoff = now - RETENTION_S
        log = self.log
        while log and rec.sent_at(log[0]) < cutoff and log[0][STATE] != SCHEDULED:
            record = log.popleft()
            message_id = record[MESSAGE_ID]
            if self.by_message_id.get(message_id) is record:
                del self.by_message_id[message_id]
                self.retired_ids.add(message_id)
            in_bulk = self.by_bulk.get(rec.bulk_id(record))
            if in_bulk is not None and in_bulk[-1] is record:
                del self.by_bulk[rec.bulk_id(record)]

    # --- GET /sms/3/reports ------------------------------------------------------------

    def fetch_reports(self, query: ReportsQuery, now: float) -> list[Record]:
        """Take up to query.limit unfetched reports matching the filters; each is returned once."""
        cutoff = now - RETENTION_S
        checks = report_checks(query)
        if checks:
            taken = self._take_matching(self._report_candidates(query), checks, query.limit, cutoff)
        else:
            taken = self._take_oldest(query.limit, cutoff)
        for record in taken:
            record[STATE] = FETCHED
        self.unfetched_live -= len(taken)
        self.reports_fetched += len(taken)
        # Filtered fetches leave dead entries behind; rebuild once they dominate the queue.
        if len(self.unfetched) > 1024 and len(self.unfetched) > 2 * self.unfetched_live:
            self.unfetched = deque(record for record in self.unfetched if record[STATE] == UNFETCHED)
        return taken

    def _take_oldest(self, limit: int, cutoff: float) -> list[Record]:
        """The unfiltered fetch, the drain's: the queue's oldest live reports, dead entries dropped on the way."""
        taken: list[Record] = []
        queue = self.unfetched
        while queue and len(taken) < limit:
            record = queue.popleft()
            if record[STATE] == UNFETCHED and record[DONE_AT] >= cutoff:
                taken.append(record)
        return taken

    def _report_candidates(self, query: ReportsQuery) -> Iterable[Record]:
        """Where a filtered fetch looks, oldest first: one messageId's sends, one bulk, or the whole queue."""
        if query.message_id is not None:
            return list(_chain(self.by_message_id.get(query.message_id)))[::-1]
        if query.bulk_id is not None:
            return self.by_bulk.get(query.bulk_id, ())
        return self.unfetched

    @staticmethod
    def _take_matching(candidates: Iterable[Record], checks: list[Check], limit: int, cutoff: float) -> list[Record]:
        """Up to `limit` live unfetched reports among the candidates that pass every check (left in the queue)."""
        taken: list[Record] = []
        for record in candidates:
            if record[STATE] == UNFETCHED and record[DONE_AT] >= cutoff and passes(record, checks):
                taken.append(record)
                if len(taken) >= limit:
                    break
        return taken

    # --- GET /sms/3/logs ---------------------------------------------------------------

    def query_logs(self, query: LogsQuery, now: float) -> list[Record]:
        """Up to query.limit sends of the last 48 h matching every filter, newest first.

        With the logs_lag_ms fault on, a send shows up only that long after its acceptance (the
        provider's logs are eventually consistent); each one held back from an answer is counted.
        """
        lag_s = self.config.logs_lag_ms / 1000.0
        visible_until = now - lag_s
        since = now - RETENTION_S
        if query.sent_since is not None:
            since = max(since, query.sent_since)
        checks = log_checks(query, since)
        lagged = 0
        found: list[Record] = []
        for record in self._log_candidates(query):
            if not passes(record, checks):
                continue
            if lag_s > 0 and rec.accepted_at(record) > visible_until:
                lagged += 1
                continue
            found.append(record)
            if len(found) >= query.limit:
                break
        if lagged:
            self.faults_injected["logs_lag"] += lagged
        self.logs_served += len(found)
        return found

    def _log_candidates(self, query: LogsQuery) -> Iterable[Record]:
        """Where a logs query looks, newest first: the sends of its messageIds, of its bulks, or all."""
        if query.message_ids:
            return (r for mid in query.message_ids for r in _chain(self.by_message_id.get(mid)))
        if query.bulk_ids:
            return (r for bid in query.bulk_ids for r in reversed(self.by_bulk.get(bid, ())))
        return reversed(self.log)

    # --- counters ----------------------------------------------------------------------

    def stats(self, per_message: bool) -> JsonObj:
        """The counters served by GET /_sandbox/stats."""
        requests: dict[str, dict[str, int]] = {}
        for (endpoint, status), count in sorted(self.requests.items()):
            requests.setdefault(endpoint, {})[str(status)] = count
        stats: JsonObj = {
            "requests": requests,
            "messages_accepted": self.messages_accepted,
            "messages_rejected": dict(self.rejected_by_status),
            "duplicate_rejections": self.duplicate_rejections,
            "duplicates": len(self.extra_sends),
            "reports": {
                "generated": self.reports_generated,
                "fetched": self.reports_fetched,
                "pushed": self.reports_pushed,
                "pending": self.scheduled,
                "unfetched": self.unfetched_live,
                "webhook_queued": len(self.webhook_queue),
                "suppressed": self.reports_silent,
            },
            "webhooks": {
                "attempts": self.webhook_attempts,
                "failures": self.webhook_failures,
                "refused": self.webhook_refused,
                "dropped": self.webhook_dropped,
            },
            "faults": dict(self.faults_injected),
            "logs_served": self.logs_served,
            "accepted_by_second": {str(second): n for second, n in sorted(self.accepted_by_second.items())},
        }
        if per_message:
            stats["accepted_per_message_id"] = {
                mid: 1 + self.extra_sends.get(mid, 0) for mid in itertools.chain(self.retired_ids, self.by_message_id)
            }
        return stats
