"""Delivery outcomes and the wire shapes built from a record: DeliveryReport and Log."""

from __future__ import annotations

import random
from bisect import bisect_right
from itertools import accumulate
from typing import Any

from worker.sandbox import records as rec
from worker.sandbox.codes import (
    NO_ERROR,
    OUTCOME_KINDS,
    OUTCOME_VARIANTS,
    PENDING_ACCEPTED,
    JsonObj,
    mcc_mnc_for,
)
from worker.sandbox.records import COUNT, DONE_AT, ERROR, MESSAGE_ID, STATUS, TO, Record
from worker.sandbox.validation import format_datetime


class OutcomePicker:
    """Draws (status, error) pairs from the outcome mix with the given RNG (deterministic when seeded)."""

    def __init__(self, mix: dict[str, float], rng: random.Random) -> None:
        self._rng = rng
        kinds = [kind for kind in OUTCOME_KINDS if mix.get(kind, 0.0) > 0.0]
        self._kinds = [OUTCOME_VARIANTS[kind] for kind in kinds]
        total = sum(mix[kind] for kind in kinds)
        self._cumulative = list(accumulate(mix[kind] / total for kind in kinds))

    def pick(self) -> tuple[JsonObj, JsonObj]:
        """One (status, error) pair."""
        draw = self._rng.random()
        index = min(bisect_right(self._cumulative, draw), len(self._kinds) - 1)
        variants = self._kinds[index]
        if len(variants) == 1:
            return variants[0]
        return variants[int(self._rng.random() * len(variants))]


def _price(record: Record, price_per_message: float, currency: str) -> JsonObj:
    # The platform does not charge what it rejected.
    status = record[STATUS]
    charged = status is None or status["groupName"] != "REJECTED"
    return {"pricePerMessage": price_per_message if charged else 0.0, "currency": currency}


def _add_optional(shape: JsonObj, record: Record) -> None:
    sender = rec.sender(record)
    if sender is not None:
        shape["sender"] = sender
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
    report: JsonObj = {
        "bulkId": rec.bulk_id(record),
        "messageId": record[MESSAGE_ID],
        "to": record[TO],
        "sentAt": format_datetime(rec.sent_at(record)),
        "doneAt": format_datetime(record[DONE_AT]),
        "messageCount": record[COUNT],
        "price": _price(record, price_per_message, currency),
        "status": record[STATUS],
        "error": record[ERROR],
        "mccMnc": mcc_mnc_for(record[TO]),
    }
    callback_data = rec.callback_data(record)
    if callback_data is not None:
        report["callbackData"] = callback_data
    _add_optional(report, record)
    return report


def _log_content(content: dict[str, Any]) -> JsonObj:
    if "hex" in content:
        return {
            "hex": content["hex"],
            "dataCoding": content.get("dataCoding", 0),
            "esmClass": content.get("esmClass", 0),
        }
    shown: JsonObj = {"text": content["text"]}
    for key in ("transliteration", "language"):
        if key in content:
            shown[key] = content[key]
    return shown


def log_of(record: Record, price_per_message: float, currency: str) -> JsonObj:
    """The Log entry of a record; its status is PENDING_ACCEPTED until the outcome is generated."""
    log: JsonObj = {
        "destination": record[TO],
        "bulkId": rec.bulk_id(record),
        "messageId": record[MESSAGE_ID],
        "sentAt": format_datetime(rec.sent_at(record)),
        "messageCount": record[COUNT],
        "price": _price(record, price_per_message, currency),
        "status": record[STATUS] or PENDING_ACCEPTED,
        "error": record[ERROR] or NO_ERROR,
        "content": _log_content(rec.content(record)),
        "mccMnc": mcc_mnc_for(record[TO]),
    }
    if record[STATUS] is not None:
        log["doneAt"] = format_datetime(record[DONE_AT])
    _add_optional(log, record)
    return log
