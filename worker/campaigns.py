"""Campaigns: the counters of the jobs that share a `campaign_reference_id`, as plain typed data.

Every script that changes a message's state moves its campaign's counters in the same atomic call
(worker/lua/lib/ledger.lua), and the producer API counts a campaign's jobs in the same transaction
that appends them (worker/store/outbox.py), so the counts are exact, never estimated. They live in
`{p}:campaign:{id}` (a hash: see worker/store/keys.py) for at least the state TTL after the last
change; `Store.list_campaigns()` and `Store.campaign_counts(id)` read them as `Campaign`s.

A message is counted in exactly one state field at a time (`STATE_FIELDS`); `total` is every
message of the campaign, `sent` how many times the provider accepted one of them. The campaign is
complete when every message is in a final field. Campaign ids are labels producers choose, without
bound: they are never Prometheus labels.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from worker.models import State

# The counter each state is counted under (SUBMITTING and AMBIGUOUS are both "sending"), as ledger.lua.
STATE_FIELD: Mapping[State, str] = {
    State.SCHEDULED: "scheduled", State.QUEUED: "queued", State.SUBMITTING: "sending", State.AMBIGUOUS: "sending",
    State.ACCEPTED: "accepted", State.REJECTED: "rejected", State.DELIVERED: "delivered",
    State.UNDELIVERABLE: "undeliverable", State.EXPIRED: "expired", State.FAILED: "failed",
    State.CANCELLED: "cancelled",
}
STATE_FIELDS = ("scheduled", "queued", "sending", "accepted", "rejected", "delivered", "undeliverable", "expired",
                "failed", "cancelled")
# Nothing more happens to a message counted here (but an `expired` for no report may still become
# `delivered` when a late report comes: the campaign is then complete again a moment later).
FINAL_FIELDS = ("rejected", "delivered", "undeliverable", "expired", "failed", "cancelled")
# Prices are summed in millionths of the currency unit (integers, exact in Redis).
PRICE_PREFIX = "price:"
PRICE_SCALE = Decimal(1_000_000)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _int(value: Any) -> int:
    try:
        return int(_text(value))
    except ValueError:
        return 0


@dataclass(frozen=True, slots=True)
class Campaign:
    """One campaign's counters as read from its hash (see the module docstring)."""

    id: str
    total: int = 0
    counts: Mapping[str, int] = field(default_factory=dict)  # STATE_FIELDS -> current count
    sent: int = 0  # times the provider accepted one of its messages (cumulative)
    prices: Mapping[str, Decimal] = field(default_factory=dict)  # currency -> summed price of its reports
    first_ms: int | None = None
    updated_ms: int | None = None

    @classmethod
    def from_fields(cls, campaign_id: str, fields: Mapping[Any, Any]) -> Campaign:
        """From the hash's fields (bytes or str, as a client returns them)."""
        raw = {_text(k): _text(v) for k, v in fields.items()}
        prices = {name[len(PRICE_PREFIX):]: Decimal(_int(value)) / PRICE_SCALE
                  for name, value in sorted(raw.items()) if name.startswith(PRICE_PREFIX)}
        return cls(
            id=campaign_id, total=_int(raw.get("total", 0)),
            counts={name: _int(raw.get(name, 0)) for name in STATE_FIELDS}, sent=_int(raw.get("sent", 0)),
            prices=prices, first_ms=_int(raw["first_ms"]) if "first_ms" in raw else None,
            updated_ms=_int(raw["updated_ms"]) if "updated_ms" in raw else None,
        )

    def count(self, name: str) -> int:
        return self.counts.get(name, 0)

    @property
    def final(self) -> int:
        """Messages in a final state."""
        return sum(self.count(name) for name in FINAL_FIELDS)

    @property
    def waiting(self) -> int:
        """Messages not sent yet: scheduled or queued."""
        return self.count("scheduled") + self.count("queued")

    @property
    def failed_total(self) -> int:
        """Messages that will not be (or were not) delivered: failed, rejected, undeliverable, expired."""
        return sum(self.count(name) for name in ("failed", "rejected", "undeliverable", "expired"))

    @property
    def complete(self) -> bool:
        return self.total > 0 and self.final == self.total

    @property
    def progress(self) -> float:
        """final / total, 0.0 to 1.0 (0.0 for an empty campaign)."""
        return min(1.0, self.final / self.total) if self.total > 0 else 0.0

    def price_text(self) -> str:
        """`0.0225 EUR`, several currencies joined with ` + `, "" without any."""
        return " + ".join(f"{_decimal_text(amount)} {currency}" for currency, amount in self.prices.items())

    def to_json(self) -> dict[str, Any]:
        """For `--json`: the counters, derived values and prices (as decimal strings, exact)."""
        return {
            "id": self.id, "total": self.total, **{name: self.count(name) for name in STATE_FIELDS},
            "sent": self.sent, "final": self.final, "complete": self.complete, "progress": round(self.progress, 4),
            "prices": {currency: _decimal_text(amount) for currency, amount in self.prices.items()},
            "first_ms": self.first_ms, "updated_ms": self.updated_ms,
        }


def _decimal_text(amount: Decimal) -> str:
    """A price without trailing zeros or an exponent: 0.0075, 12, 0."""
    text = f"{amount.normalize():f}"
    return "0" if text in ("-0", "") else text
