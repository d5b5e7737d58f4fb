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
from worker.devtools.sandbox.codes import JsonObj, mcc_mnc_for
from worker.devtools.sandbox.config import SandboxConfig
from worker.devtools.sandbox.errors import Violation
from worker.devtools.sandbox.faults import FaultInjector, LogsLimiter
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
    TO,
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

        Validation and acceptance share one pass because this is the sandbox's hot loop: a message
        of the common shape is checked inline, anything else goes through validate_message(). On
        the first violation the request's records are rolled back and the full list is returned.
        """
        bulk = self._bulk_of(body, now)
        if bulk is None:
            return None, validate_send_request(body, now)
        bulk_id = bulk[0]
        messages = body["messages"]
        reject_duplicates = self.config.reject_duplicate_ids
        index = self.by_message_id
        claim = index.setdefault
        retired = self.retired_ids
        new_id = self._message_ids
        pending = codes.PENDING_ACCEPTED
        accepted: list[Record] = []
        keep = accepted.append
        out: list[JsonObj] = []
        respond = out.append
        rejected: list[str] = []
        for message in messages:
            # Fast path: {"destinations": [...], "content": {"text": str}} plus maybe a string
            # sender, i.e. nothing that needs the full validator; anything else goes through it.
            extra = None
            sender = None
            try:
                content = message["content"]
                text = content["text"]
                destinations = message["destinations"]
                size = len(message)
                fast = (
                    type(text) is str
                    and len(content) == 1
                    and type(destinations) is list
                    and destinations
                    and (size == 2 or (size == 3 and type(sender := message.get("sender")) is str))
                )
            except (TypeError, KeyError, IndexError):
                fast = False
            checked = not fast  # the slow path validates the whole message, destinations included
            if checked:
                if self._invalid(message, accepted):
                    return None, validate_send_request(body, now)
                content = message["content"]
                destinations = message["destinations"]
                text = content.get("text")
                sender = message.get("sender")
                if "options" in message or "webhooks" in message:
                    extra = message
            if text is None:
                count, too_long = binary_parts(content["hex"]), False
            elif len(text) <= 70 and text.isascii():
                count, too_long = 1, False  # fits one part in either encoding
            else:
                count = text_parts(text)
                too_long = text_too_long(text, count)
            details = _DETAILS.get(count) or {"messageCount": count}
            for destination in destinations:
                if checked:
                    to = destination["to"]
                    message_id = destination.get("messageId")
                else:
                    # Fast path: {"to": str} or {"to": str, "messageId": str} within the limits.
                    try:
                        to = destination["to"]
                        size = len(destination)
                        message_id = destination.get("messageId") if size == 2 else None
                        fast = (
                            type(to) is str
                            and len(to) <= 64
                            and (size == 1 or (type(message_id) is str and len(message_id) <= 200))
                        )
                    except (TypeError, KeyError, IndexError):
                        fast = False
                    if not fast:
                        if self._invalid(message, accepted):
                            return None, validate_send_request(body, now)
                        checked = True
                        to = destination["to"]
                        message_id = destination.get("messageId")
                if message_id is None:
                    message_id = next(new_id)
                # Inlined validation.valid_destination() (the unit tests check both agree).
                plain = 7 <= len(to) <= 15 and to.isdigit()
                if not ((plain or (to[:1] == "+" and 8 <= len(to) <= 16 and to[1:].isdigit())) and to.isascii()):
                    status = codes.REJECTED_DESTINATION if to else codes.MISSING_TO
                elif too_long:
                    status = codes.REJECTED_MESSAGE_TOO_LONG
                else:
                    # The record layout is documented in records.py.
                    record = [message_id, to, sender, content, extra, bulk, count, SCHEDULED, None, None, 0.0, None]
                    if reject_duplicates:
                        if (retired and message_id in retired) or claim(message_id, record) is not record:
                            status = codes.REJECTED_DUPLICATE_MESSAGE_ID
                            rejected.append(status["name"])
                            respond({"messageId": message_id, "status": status, "destination": to, "details": details})
                            continue
                    else:
                        record[PREV] = index.get(message_id)
                        index[message_id] = record
                    keep(record)
                    respond({"messageId": message_id, "status": pending, "destination": to, "details": details})
                    continue
                rejected.append(status["name"])
                respond({"messageId": message_id, "status": status, "destination": to, "details": details})
        self._commit(accepted, rejected, bulk, now)
        return {"bulkId": bulk_id, "messages": out}, []

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

    def _invalid(self, message: Any, accepted: list[Record]) -> bool:
        """Full validation of one message; on violations, undo this request's index entries."""
        problems: list[Violation] = []
        # The property paths are thrown away: the caller re-runs the full validator for them.
        validate_message(message, 0, problems)
        if not problems:
            return False
        index = self.by_message_id
        for record in reversed(accepted):
            if index.get(record[MESSAGE_ID]) is record:
                if record[PREV] is None:
                    del index[record[MESSAGE_ID]]
                else:
                    index[record[MESSAGE_ID]] = record[PREV]
        return True

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
        taken: list[Record] = []
        limit = query.limit
        filtered = (
            query.bulk_id is not None
            or query.message_id is not None
            or query.entity_id is not None
            or query.application_id is not None
            or query.campaign_reference_id is not None
        )
        if not filtered:
            queue = self.unfetched
            while queue and len(taken) < limit:
                record = queue.popleft()
                if record[STATE] == UNFETCHED and record[DONE_AT] >= cutoff:
                    taken.append(record)
        else:
            candidates: Iterable[Record]
            if query.message_id is not None:
                candidates = list(_chain(self.by_message_id.get(query.message_id)))[::-1]
            elif query.bulk_id is not None:
                candidates = self.by_bulk.get(query.bulk_id, ())
            else:
                candidates = self.unfetched
            for record in candidates:
                if record[STATE] != UNFETCHED or record[DONE_AT] < cutoff:
                    continue
                platform = rec.platform(record)
                if (
                    (query.bulk_id is None or rec.bulk_id(record) == query.bulk_id)
                    and (query.message_id is None or record[MESSAGE_ID] == query.message_id)
                    and (query.entity_id is None or platform.get("entityId") == query.entity_id)
                    and (query.application_id is None or platform.get("applicationId") == query.application_id)
                    and (
                        query.campaign_reference_id is None
                        or rec.campaign_reference_id(record) == query.campaign_reference_id
                    )
                ):
                    taken.append(record)
                    if len(taken) >= limit:
                        break
        for record in taken:
            record[STATE] = FETCHED
        self.unfetched_live -= len(taken)
        self.reports_fetched += len(taken)
        # Filtered fetches leave dead entries behind; rebuild once they dominate the queue.
        if len(self.unfetched) > 1024 and len(self.unfetched) > 2 * self.unfetched_live:
            self.unfetched = deque(record for record in self.unfetched if record[STATE] == UNFETCHED)
        return taken

    # --- GET /sms/3/logs ---------------------------------------------------------------

    def query_logs(self, query: LogsQuery, now: float) -> list[Record]:
        """Up to query.limit sends of the last 48 h matching every filter, newest first.

        With the logs_lag_ms fault on, a send shows up only that long after its acceptance (the
        provider's logs are eventually consistent); each one held back from an answer is counted.
        """
        lag_s = self.config.logs_lag_ms / 1000.0
        visible_until = now - lag_s
        lagged = 0
        since = now - RETENTION_S
        if query.sent_since is not None:
            since = max(since, query.sent_since)
        until = query.sent_until
        candidates: Iterable[Record]
        if query.message_ids:
            candidates = (r for mid in query.message_ids for r in _chain(self.by_message_id.get(mid)))
        elif query.bulk_ids:
            candidates = (r for bid in query.bulk_ids for r in reversed(self.by_bulk.get(bid, ())))
        else:
            candidates = reversed(self.log)
        bulk_ids = set(query.bulk_ids)
        campaigns = set(query.campaign_reference_ids)
        found: list[Record] = []
        for record in candidates:
            sent_at = rec.sent_at(record)
            if sent_at < since or (until is not None and sent_at > until):
                continue
            if bulk_ids and rec.bulk_id(record) not in bulk_ids:
                continue
            if campaigns and rec.campaign_reference_id(record) not in campaigns:
                continue
            if query.sender is not None and rec.sender(record) != query.sender:
                continue
            if query.destination is not None and record[TO] != query.destination:
                continue
            if query.entity_id is not None and rec.platform(record).get("entityId") != query.entity_id:
                continue
            if query.application_id is not None and rec.platform(record).get("applicationId") != query.application_id:
                continue
            if query.general_status is not None:
                status = record[STATUS] or codes.PENDING_ACCEPTED
                if status["groupName"] != query.general_status:
                    continue
            if query.mcc is not None:
                mcc_mnc = mcc_mnc_for(record[TO])
                if mcc_mnc[:3] != query.mcc or (query.mnc is not None and mcc_mnc[3:] != query.mnc):
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
