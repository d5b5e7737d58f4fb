"""Campaigns without Redis: the counters' model (final, complete, progress, prices), the enqueue chunk's
counting commands, and what `sms-worker campaigns` / `campaign X` print."""

from __future__ import annotations

import itertools
from decimal import Decimal

import hiredis
import orjson

from worker.campaigns import FINAL_FIELDS, STATE_FIELD, STATE_FIELDS, Campaign
from worker.cli.campaigns import render_one, render_table, summary, watch_line
from worker.models import State
from worker.outbox import Outbox
from worker.store.outbox import _ChunkPacker


def _campaign(**fields: object) -> Campaign:
    return Campaign.from_fields("xmas", {k.replace("_", ":") if k.startswith("price_") else k: str(v).encode()
                                         for k, v in fields.items()})


# --- the model ------------------------------------------------------------------------------------------
def test_counts_final_and_progress_from_the_hash() -> None:
    c = _campaign(total=10, queued=2, sending=1, accepted=3, delivered=2, failed=1, cancelled=1, sent=5,
                  first_ms=1_764_230_000_000, updated_ms=1_764_230_060_000)
    assert c.total == 10 and c.sent == 5
    assert c.count("queued") == 2 and c.count("scheduled") == 0
    assert c.final == 4  # delivered 2 + failed 1 + cancelled 1
    assert c.waiting == 2 and c.failed_total == 1
    assert not c.complete
    assert c.progress == 0.4
    assert c.first_ms == 1_764_230_000_000 and c.updated_ms == 1_764_230_060_000


def test_complete_only_when_every_message_is_final() -> None:
    assert _campaign(total=3, delivered=1, rejected=1, expired=1).complete
    assert not _campaign(total=3, delivered=1, rejected=1, accepted=1).complete
    empty = _campaign(total=0)
    assert not empty.complete and empty.progress == 0.0
    # A late report turned an expired message delivered: still one final message each.
    assert _campaign(total=2, delivered=2).progress == 1.0


def test_prices_are_exact_decimals_per_currency() -> None:
    c = _campaign(total=3, delivered=3, price_EUR=22500, price_CHF=10_000_000)
    assert c.prices == {"CHF": Decimal(10), "EUR": Decimal("0.0225")}
    assert c.price_text() == "10 CHF + 0.0225 EUR"
    assert c.to_json()["prices"] == {"CHF": "10", "EUR": "0.0225"}
    assert _campaign(total=1).price_text() == ""


def test_json_has_every_counter_and_the_derived_values() -> None:
    c = _campaign(total=4, scheduled=1, delivered=3, sent=3)
    data = c.to_json()
    assert set(STATE_FIELDS) <= data.keys()
    assert data["total"] == 4 and data["scheduled"] == 1 and data["sent"] == 3
    assert data["final"] == 3 and data["complete"] is False and data["progress"] == 0.75
    orjson.dumps(data)  # JSON as it is


def test_every_state_has_one_counter_and_the_final_ones_are_the_terminal_states() -> None:
    assert set(STATE_FIELD) == set(State)
    assert set(STATE_FIELD.values()) == set(STATE_FIELDS)
    from worker.models import TERMINAL_STATES

    assert {STATE_FIELD[s] for s in TERMINAL_STATES} == set(FINAL_FIELDS)


def test_unreadable_counters_read_as_zero() -> None:
    c = Campaign.from_fields("x", {b"total": b"2", b"queued": b"oops", "delivered": "2"})
    assert c.total == 2 and c.count("queued") == 0 and c.complete


# --- the enqueue chunk -------------------------------------------------------------------------------------
def _commands(packed: bytes) -> list[list[bytes]]:
    reader = hiredis.Reader()
    reader.feed(packed)
    commands = []
    while (command := reader.gets()) is not False:
        commands.append(command)
    return commands


JOBS = [(b'{"to":"41790000001","text":"a"}', None), (b'{"to":"41790000002","text":"b"}', "order-2"),
        (b'{"to":"41790000003","text":"c"}', None)]


def _packer() -> _ChunkPacker:
    return _ChunkPacker("sms:outbox:bulk", "sms:idem:", 3600, "sms:campaign:", "sms:campaigns", 7200)


def test_a_chunk_without_campaign_jobs_is_packed_as_before() -> None:
    """All None campaigns pack the very bytes of a plain chunk: the campaign path adds nothing to it."""
    plain = _packer().pack(JOBS, "sw-bulk-1-pab", itertools.count())
    counted = _packer().pack(JOBS, "sw-bulk-1-pab", itertools.count(), [None, None, None])
    assert counted == plain
    assert [c[0] for c in _commands(plain[0])] == [b"MULTI", b"XADD", b"XADD", b"SET", b"XADD", b"EXEC"]


def test_campaign_jobs_carry_c_and_are_counted_once_per_campaign_and_chunk() -> None:
    packed, mids, count = _packer().pack(JOBS, "sw-bulk-1-pab", itertools.count(), ["xmas", "xmas", "promo"])
    commands = _commands(packed)
    assert count == len(commands)
    assert mids == [None, "sw-bulk-1-pab0", None]
    xadds = [c for c in commands if c[0] == b"XADD"]
    assert xadds[0] == [b"XADD", b"sms:outbox:bulk", b"*", b"job", JOBS[0][0], b"c", b"xmas"]
    assert xadds[1] == [b"XADD", b"sms:outbox:bulk", b"*", b"job", JOBS[1][0], b"mid", b"sw-bulk-1-pab0", b"c", b"xmas"]
    assert xadds[2][-2:] == [b"c", b"promo"]
    counters = [c for c in commands if c[0] not in (b"MULTI", b"XADD", b"SET", b"EXEC")]
    xmas = [c for c in counters if b"sms:campaign:xmas" in c or c[-1] == b"xmas"]
    assert [c[:4] for c in xmas[:2]] == [[b"HINCRBY", b"sms:campaign:xmas", b"total", b"2"],
                                         [b"HINCRBY", b"sms:campaign:xmas", b"queued", b"2"]]
    assert [c[0] for c in xmas] == [b"HINCRBY", b"HINCRBY", b"HSETNX", b"HSET", b"EXPIRE", b"EXPIRE", b"ZADD"]
    assert [c[3:] for c in xmas if c[0] == b"EXPIRE"] == [[b"NX"], [b"GT"]]
    assert all(c[2] == b"7200" for c in xmas if c[0] == b"EXPIRE")
    assert next(c for c in xmas if c[0] == b"ZADD")[:3] == [b"ZADD", b"sms:campaigns", b"GT"]
    assert any(c[:4] == [b"HINCRBY", b"sms:campaign:promo", b"total", b"1"] for c in counters)
    assert commands[0] == [b"MULTI"] and commands[-1] == [b"EXEC"]


def test_campaigns_of_reads_the_campaign_back_from_the_wire_json() -> None:
    encoded = [(b'{"to":"1","text":"campaign_reference_id"}', None),
               (orjson.dumps({"to": "2", "text": "x", "campaign_reference_id": "xmas"}), None),
               (orjson.dumps({"to": "3", "text": "x", "campaign_reference_id": ""}), None)]
    assert Outbox.campaigns_of(encoded) == [None, "xmas", None]
    assert Outbox.campaigns_of(encoded[:1]) is None


# --- what the CLI prints -------------------------------------------------------------------------------
def test_the_campaigns_table_aligns_its_columns() -> None:
    rows = [_campaign(total=1200, queued=100, scheduled=50, sending=10, accepted=40, delivered=990, undeliverable=5,
                      failed=5, cancelled=0, price_EUR=9_900_000, updated_ms=1_764_230_060_000),
            Campaign.from_fields("a-much-longer-campaign-id", {b"total": b"3", b"cancelled": b"3"})]
    table = render_table(rows).splitlines()
    assert table[0].split() == ["CAMPAIGN", "TOTAL", "WAITING", "SENDING", "ACCEPTED", "DELIVERED", "FAILED",
                                "CANCELLED", "PRICE", "UPDATED", "(UTC)"]
    assert table[1].split() == ["xmas", "1200", "150", "10", "40", "990", "10", "0", "9.9", "EUR", "2025-11-27",
                                "07:54:20"]
    assert table[2].split()[:9] == ["a-much-longer-campaign-id", "3", "0", "0", "0", "0", "0", "3", "-"]
    # Numbers are right-aligned under their header.
    assert table[1].index("1200") + 4 == table[0].index("TOTAL") + 5


def test_one_campaign_and_its_watch_line() -> None:
    c = _campaign(total=4, queued=1, delivered=2, rejected=1, sent=3, price_EUR=20_000)
    text = render_one(c)
    assert text.splitlines()[0] == "campaign xmas: 3 of 4 final (75.0%), in progress"
    assert "  delivered              2  (final)" in text
    assert "  queued                 1" in text
    assert "sent                   3" in text and "0.02 EUR" in text
    assert summary(c) == "1 queued, 1 rejected, 2 delivered"
    assert watch_line(c) == "campaign xmas: 3/4 final (75.0%): 1 queued, 1 rejected, 2 delivered"
    assert "complete" in render_one(_campaign(total=1, delivered=1)).splitlines()[0]
