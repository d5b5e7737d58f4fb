"""The report-apply ops: their codes and answers (report_apply.lua), and the two round trips of report work.

Every change reports make to Redis is an op of report_apply.lua, run atomically with the state
check it depends on. The codes and answers here are the script's; its header comment carries the
same table, and tests/unit/test_report_ops.py checks that the two agree.

    OpCode  A  a final report from a raw page          ApplyResult  0 NOTHING    (a duplicate)
            P  park the report of an unknown message                1 APPLIED
            R  a parked report retried                              2 CONFLICT   (read again, retry)
            U  a parked report timed out                            3 PARKED
            N  no report before the deadline                        4 TIMED_OUT

`ReportState` reads the message hashes a batch needs (`fetch`) and applies its ops (`apply`), in
calls small enough that Redis never stalls an otp send behind one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from enum import IntEnum, StrEnum
from typing import Any, Final, NamedTuple

import orjson

from worker import events
from worker.models import State
from worker.store import Store
from worker.store.reports import ReportRow

RAW_GROUP: Final = "reports"  # the consumer group of the raw reports stream
NO_REPORT: Final = "no_report"  # the reason of an EXPIRED given because no report came
# Ops per report_apply.lua call (a batch takes several): each call holds Redis for a few ms at most.
APPLY_CALL_OPS: Final = 250
# States a final report may leave; EXPIRED(no_report) is checked separately.
OPEN_STATES: Final = frozenset({State.QUEUED, State.SUBMITTING, State.AMBIGUOUS, State.ACCEPTED})

Row = ReportRow  # what report_fetch.lua read from one message hash


class OpCode(StrEnum):
    """What one op asks of report_apply.lua (the payload each carries is in the script's header)."""

    APPLY = "A"  # a final report from a raw page; payload: its event JSON
    PARK = "P"  # the report of a message with no hash: park it; payload: the report JSON
    RETRY_PARKED = "R"  # a parked report retried: as A, and unparked once applied or a duplicate
    UNPARK_UNKNOWN = "U"  # a parked report timed out: unpark; payload: unknown_message event ("" = drop)
    NO_REPORT = "N"  # no report before the deadline: ACCEPTED -> EXPIRED(no_report); payload: its event


class ApplyResult(IntEnum):
    """What report_apply.lua answers per op."""

    NOTHING = 0  # nothing to do: a duplicate, or a message that moved on
    APPLIED = 1
    CONFLICT = 2  # the message changed since it was read: nothing done, and nothing acknowledged
    PARKED = 3
    TIMED_OUT = 4  # unknown_message emitted or dropped


# The answers under their old module-level names (tests and callers compare results with them).
NOTHING: Final = ApplyResult.NOTHING
APPLIED: Final = ApplyResult.APPLIED
CONFLICT: Final = ApplyResult.CONFLICT
PARKED: Final = ApplyResult.PARKED
TIMED_OUT: Final = ApplyResult.TIMED_OUT


class Op(NamedTuple):
    """One step for report_apply.lua, in the script's argument order."""

    code: str  # an OpCode (typed str: a test sends the script a code it must refuse)
    message_id: str
    state: str = ""
    status: str = ""
    payload: bytes = b""
    price: str = ""  # the report's price for its campaign's sum: "<millionths> <currency>" (price_spec)
    source: str = ""  # where the report came from (drain, webhook, logs...), for the message's trail


# The key a parked report's JSON carries its source under (the report's own keys are camelCase).
PARKED_SOURCE = "_source"


def price_spec(item: dict[str, Any]) -> str:
    """A report's `price` as the scripts sum it: "<pricePerMessage in millionths> <currency>", "" if
    it has none (or an unreadable one: a price is information, never a reason to refuse a report)."""
    price = item.get("price")
    if not isinstance(price, dict):
        return ""
    amount, currency = price.get("pricePerMessage"), price.get("currency")
    if not isinstance(currency, str) or not currency.isalnum():
        return ""
    if type(amount) is int:
        return f"{amount * 1_000_000} {currency[:16]}"
    if type(amount) is not float or not math.isfinite(amount):
        return ""
    # round(), not Decimal: a price has at most a few decimals, so the float's error (~1e-16 of it)
    # is far below half a millionth, and this runs for every report (Decimal cost ~3 us each).
    return f"{round(amount * 1_000_000)} {currency[:16]}"


def job_of(raw: bytes | None) -> dict[str, Any] | None:
    """The producer's job of a message hash, if it is readable JSON (events carry its id and metadata)."""
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
        kind, message_id, job_of(row.job) if row else None, lane=row.lane if row else None,
        bulk_id=(row.bulk_id or None) if row else None, status=item.get("status"), error=item.get("error"),
        report=item, at=at,
    )


def is_open(row: Row) -> bool:
    """Whether a final report may still change this message (see report_apply.lua's transitions)."""
    return row.state in OPEN_STATES or (row.state == State.EXPIRED and row.reason == NO_REPORT)


class ReportState:
    """The two round trips of report work: read message hashes, then apply ops atomically."""

    def __init__(self, store: Store, events_maxlen: int) -> None:
        self.store = store
        self.events_maxlen = events_maxlen

    def fetch(self, message_ids: Sequence[str]) -> dict[str, Row]:
        rows = self.store.fetch_report_rows(message_ids)
        return dict(zip(message_ids, rows, strict=True))

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
            acked, part = self.store.apply_reports(
                ops[start : start + APPLY_CALL_OPS], group=RAW_GROUP,
                now_ms=now_ms if now_ms is not None else events.now_ms(),
                events_maxlen=self.events_maxlen, ack=ack if finish else (), dead=dead if finish else ())
            results += part
        return acked and CONFLICT not in results, results

    def counters(self) -> dict[str, int]:
        return self.store.report_counters()
