"""Delivery outcomes and the wire shapes built from a record: DeliveryReport and Log."""

from __future__ import annotations

import functools
import random
from typing import Any

from worker.devtools.sandbox import records as rec
from worker.devtools.sandbox.codes import (
    NO_ERROR,
    OUTCOME_KINDS,
    OUTCOME_VARIANTS,
    PENDING_ACCEPTED,
    JsonObj,
    mcc_mnc_for,
)
from worker.devtools.sandbox.records import (
    BULK,
    CONTENT,
    COUNT,
    DONE_AT,
    ERROR,
    EXTRA,
    MESSAGE_ID,
    SENDER,
    STATUS,
    TO,
    Record,
)
from worker.devtools.sandbox.validation import format_datetime


class OutcomePicker:
    """Draws (status, error) pairs from the outcome mix with the given RNG (deterministic when seeded)."""

    # The mix is laid out over this many slots, so a draw is one random() and one index:
    # the report generator calls it 150k times a second. Weights resolve to 1/10000.
    SLOTS = 10_000

    def __init__(self, mix: dict[str, float], rng: random.Random) -> None:
        self._random = rng.random
        weights = {kind: mix.get(kind, 0.0) for kind in OUTCOME_KINDS}
        total = sum(weights.values())
        counts = {kind: round(weight / total * self.SLOTS) for kind, weight in weights.items()}
        heaviest = max(counts, key=lambda kind: weights[kind])
        counts[heaviest] += self.SLOTS - sum(counts.values())
        table: list[tuple[JsonObj, JsonObj]] = []
        for kind in OUTCOME_KINDS:
            variants = OUTCOME_VARIANTS[kind]
            table.extend(variants[slot % len(variants)] for slot in range(counts[kind]))
        self.table = table

    def pick(self) -> tuple[JsonObj, JsonObj]:
        """One (status, error) pair."""
        return self.table[int(self._random() * self.SLOTS)]


@functools.lru_cache(maxsize=16)
def _prices(price_per_message: float, currency: str) -> tuple[JsonObj, JsonObj]:
    # Shared (charged, free) objects: reports are rendered by the thousand and never mutated.
    return {"pricePerMessage": price_per_message, "currency": currency}, {"pricePerMessage": 0.0, "currency": currency}


def _price(status: JsonObj | None, price_per_message: float, currency: str) -> JsonObj:
    # The platform does not charge what it rejected.
    charged, free = _prices(price_per_message, currency)
    return free if status is not None and status["groupId"] == 5 else charged


def _add_optional(shape: JsonObj, record: Record) -> None:
    sender = record[SENDER]
    if sender is not None:
        shape["sender"] = sender
    if record[EXTRA] is None:
        return  # the common case: no options, no webhooks
    platform = rec.platform(record)
    if platform:
        shape["platform"] = {
            key: platform[key] for key in ("entityId", "applicationId") if platform.get(key) is not None
        }
    campaign = rec.campaign_reference_id(record)
    if campaign is not None:
        shape["campaignReferenceId"] = campaign


def report_of(record: Record, price_per_message: float, currency: str) -> JsonObj:
    """The DeliveryReport of a record whose outcome was generated."""
    bulk_id, sent_at, _ = record[BULK]
    status = record[STATUS]
    report: JsonObj = {
        "bulkId": bulk_id,
        "messageId": record[MESSAGE_ID],
        "to": record[TO],
        "sentAt": format_datetime(sent_at),
        "doneAt": format_datetime(record[DONE_AT]),
        "messageCount": record[COUNT],
        "price": _price(status, price_per_message, currency),
        "status": status,
        "error": record[ERROR],
        "mccMnc": mcc_mnc_for(record[TO]),
    }
    if record[EXTRA] is not None:
        callback_data = rec.callback_data(record)
        if callback_data is not None:
            report["callbackData"] = callback_data
    _add_optional(report, record)
    return report


def _log_content(content: dict[str, Any]) -> JsonObj:
    # Binary exactly when state.accept() sends it as binary: no text ({"text": "a", "hex": null} is text).
    if content.get("text") is None:
        return {
            "hex": content["hex"],
            # int(): validation accepts 8.0 for an integer; the platform's int32 fields echo 8.
            "dataCoding": int(content.get("dataCoding", 0)),
            "esmClass": int(content.get("esmClass", 0)),
        }
    shown: JsonObj = {"text": content["text"]}
    for key in ("transliteration", "language"):
        if key in content:
            shown[key] = content[key]
    return shown


def log_of(record: Record, price_per_message: float, currency: str) -> JsonObj:
    """The Log entry of a record; its status is PENDING_ACCEPTED until the outcome is generated."""
    bulk_id, sent_at, _ = record[BULK]
    status = record[STATUS]
    log: JsonObj = {
        "destination": record[TO],
        "bulkId": bulk_id,
        "messageId": record[MESSAGE_ID],
        "sentAt": format_datetime(sent_at),
        "messageCount": record[COUNT],
        "price": _price(status, price_per_message, currency),
        "status": status or PENDING_ACCEPTED,
        "error": record[ERROR] or NO_ERROR,
        "content": _log_content(record[CONTENT]),
        "mccMnc": mcc_mnc_for(record[TO]),
    }
    if status is not None:
        log["doneAt"] = format_datetime(record[DONE_AT])
    _add_optional(log, record)
    return log
