"""Parked reports: reports that came before their message was known, retried by the sweep.

A report of a message with no hash yet (a webhook faster than the send's own answer) is parked
(op P). Each sweep retries the parked ones: once the message exists the report is applied (op R),
and one parked longer than SMS_REPORT_PARK_TIMEOUT_S is given up (op U), as an `unknown_message`
event or dropped (SMS_UNKNOWN_REPORTS).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

import orjson

from worker import events
from worker.reports.ops import (
    APPLIED,
    CONFLICT,
    PARKED_SOURCE,
    Op,
    OpCode,
    ReportState,
    Row,
    is_open,
    price_spec,
    report_event,
)
from worker.statuses import FINAL_GROUPS, group_of
from worker.store import Store

SWEEP_CHUNK: Final = 1000  # parked reports read per round trip
PARKED_MAX_CHUNKS: Final = 10


def parked_item(payload: bytes | None) -> dict[str, Any] | None:
    """A parked report, if it reads as one with a final status (only those are parked)."""
    if payload is None:
        return None
    try:
        item = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    return item if isinstance(item, dict) and group_of(item.get("status")) in FINAL_GROUPS else None


def retry_parked(state: ReportState, store: Store, timeout_ms: int, emit: bool, now_ms: int) -> dict[str, int]:
    """Apply parked reports whose message exists now; give up on those parked over `timeout_ms`
    (an unknown_message event with `emit`, else dropped). Returns counts for the sweep's log line."""
    at = events.now_iso()
    counts = {"resolved": 0, "duplicates": 0, "unknown": 0, "still_parked": 0}
    offset = 0
    for _ in range(PARKED_MAX_CHUNKS):
        entries = store.parked_reports(offset, SWEEP_CHUNK)
        if not entries:
            break
        rows = state.fetch([mid for mid, _, _ in entries])
        ops, stays, unreadable = _plan(entries, rows, timeout_ms, emit, now_ms, at)
        store.drop_parked(unreadable)  # only final reports are parked; nothing to apply
        if ops:
            _, results = state.apply(ops, now_ms=now_ms)
            stays += _count(ops, results, counts)
        counts["still_parked"] += stays
        offset += stays
        if len(entries) < SWEEP_CHUNK:
            break
    return counts


def _plan(
    entries: Sequence[tuple[str, float, bytes | None]], rows: dict[str, Row], timeout_ms: int, emit: bool,
    now_ms: int, at: str,
) -> tuple[list[Op], int, list[str]]:
    """Ops for one chunk of parked reports; returns (ops, how many stay parked, unreadable ids)."""
    ops: list[Op] = []
    stays = 0
    unreadable: list[str] = []
    for mid, since, payload in entries:
        item = parked_item(payload)
        row = rows[mid]
        if item is None:
            unreadable.append(mid)
        elif row.state is not None:
            ops.append(_retry_op(mid, row, item, at))
        elif now_ms - since > timeout_ms:
            event = report_event("unknown_message", mid, None, item, at) if emit else b""
            ops.append(Op(OpCode.UNPARK_UNKNOWN, mid, payload=event))
        else:
            stays += 1
    return ops, stays, unreadable


def _retry_op(mid: str, row: Row, item: dict[str, Any], at: str) -> Op:
    """Op R for a parked report whose message exists now (its event only if the message is open)."""
    group = group_of(item.get("status")) or ""
    status = item.get("status")
    name = status.get("name") if isinstance(status, dict) else None
    event = report_event(group.lower(), mid, row, item, at) if is_open(row) else b""
    source = item.get(PARKED_SOURCE)
    return Op(OpCode.RETRY_PARKED, mid, group, name if isinstance(name, str) else group, event, price_spec(item),
              f"{source if isinstance(source, str) else '?'}+parked")


def _count(ops: Sequence[Op], results: Sequence[int], counts: dict[str, int]) -> int:
    """Count one apply's answers into `counts`; returns how many stay parked (conflicts)."""
    stays = 0
    for op, result in zip(ops, results, strict=True):
        if result == CONFLICT:
            stays += 1
        elif op.code == OpCode.RETRY_PARKED:
            counts["resolved" if result == APPLIED else "duplicates"] += 1
        else:
            counts["unknown"] += 1
    return stays
