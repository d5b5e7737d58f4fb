"""Every status event the code builds validates against worker/schemas/event-v1.schema.json, every
type the code publishes is in it, and each state change has an event_id of its own (a replayed
message that fails again included) while the same change, settled again, keeps its id.

Events are built where the code builds them (the send-side decisions, the report and sweep
builders, the dead-letter replay); tests/integration/test_schema_streams.py checks the events a
real run wrote to the stream.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from tests.support.schema_strategies import json_values
from tests.unit.test_classify import CONFIG, NOW_MS, PENDING, REJECTED, _items, _response
from worker import events, schemas
from worker.dispatch.classify import classify_response, give_up
from worker.reports.ops import report_event
from worker.reports.sweep import no_report_event
from worker.store import Entry
from worker.store.reports import ReportRow

EVENT = schemas.load("event")
CHECK = Draft202012Validator(EVENT)
ROOT = Path(__file__).resolve().parents[2] / "worker"
JOB = {"to": "41790000000", "text": "hi", "id": "order-7", "metadata": {"customer": 7}}
ROW = ReportRow("ACCEPTED", None, orjson.dumps(JOB), "bulk", "bulk-1")
REPORT = {
    "bulkId": "bulk-1", "messageId": "sw-bulk-1", "to": "41790000000", "sentAt": "2026-11-27T10:00:00.000+0000",
    "doneAt": "2026-11-27T10:00:02.120+0000", "messageCount": 1, "mccMnc": "22801",
    "price": {"pricePerMessage": 0.01, "currency": "EUR"},
    "status": {"groupId": 3, "groupName": "DELIVERED", "id": 5, "name": "DELIVERED_TO_HANDSET", "description": "d"},
    "error": {"groupId": 0, "groupName": "OK", "id": 0, "name": "NO_ERROR", "description": "", "permanent": False},
}


def _valid(raw: bytes) -> dict[str, Any]:
    event = orjson.loads(raw)
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in CHECK.iter_errors(event)]
    assert not errors, f"{event['type']} event breaks the schema: {errors}"
    return dict(event)


def _built_types() -> set[str]:
    """Every type the product code passes to events.build / events.requeued, read from its source."""
    found: set[str] = set()
    for path in ROOT.rglob("*.py"):
        if "devtools" in path.parts:
            continue
        source = path.read_text(encoding="utf-8")
        found.update(re.findall(r"""(?:events\.build|report_event)\(\s*["']([a-z_]+)["']""", source))
        if "def requeued(" in source:
            found.add("requeued")
    from worker.reports.process import _KIND

    return found | set(_KIND.values())


def test_the_schema_lists_exactly_the_types_the_code_publishes() -> None:
    """A new event type (or a schema type nobody publishes) fails here until the schema says so."""
    assert _built_types() == set(EVENT["properties"]["type"]["enum"])


def test_send_side_events_validate() -> None:
    items = _items(2)
    accepted = classify_response(CONFIG, "bulk", items, _response(items, PENDING), resend=False, now_ms=NOW_MS)
    rejected = classify_response(CONFIG, "bulk", items, _response(items, REJECTED), resend=False, now_ms=NOW_MS)
    failed = give_up("bulk", items[0].entry, items[0].job, "retries_exhausted", "gave up", 10)
    for outcome in [*accepted.outcomes, *rejected.outcomes, *failed.outcomes]:
        assert outcome.event is not None
        event = _valid(outcome.event)
        assert event["lane"] == "bulk" and event["id"] == items[int(event["message_id"][-1])].job["id"]


@pytest.mark.parametrize("kind", ["delivered", "undeliverable", "expired", "rejected"])
def test_report_events_validate(kind: str) -> None:
    event = _valid(report_event(kind, "sw-bulk-1", ROW, REPORT, events.now_iso()))
    assert (event["id"], event["metadata"], event["price"], event["event_id"]) == (
        "order-7", {"customer": 7}, REPORT["price"], f"sw-bulk-1:{kind}")


def test_the_other_events_validate() -> None:
    """unknown_message (no job, no lane), expired no_report, requeued (both ways), cancelled."""
    unknown = _valid(report_event("unknown_message", "stranger", None, REPORT, events.now_iso()))
    assert unknown["lane"] is None and unknown["to"] == "41790000000"
    no_report = _valid(no_report_event("sw-bulk-1", ROW, events.now_iso()))
    assert (no_report["reason"], no_report["event_id"]) == ("no_report", "sw-bulk-1:expired:no_report")
    kept = _valid(events.requeued("sw-bulk-1", JOB, lane="bulk", reason="unknown_lane", replay_id="1-0"))
    moved = _valid(events.requeued("sw-bulk-1", JOB, lane="bulk", reason="bad_request", replay_id="2-0",
                                   requeued_as="sw-bulk-9-rab"))
    assert kept["requeued_as"] is None and moved["requeued_as"] == "sw-bulk-9-rab"
    # As worker/store/schedule.py builds it for cancel.lua.
    cancelled = _valid(events.build("cancelled", "sw-bulk-1", JOB, lane="bulk", reason="cancelled"))
    assert cancelled["type"] == "cancelled"


def test_a_wrong_event_is_refused_by_the_schema() -> None:
    """The schema can fail: a missing key, an unknown one, a type nobody publishes, requeued_as elsewhere."""
    good = orjson.loads(events.build("accepted", "m", JOB, lane="bulk", status=REPORT["status"]))
    assert CHECK.is_valid(good)
    for bad in ({k: v for k, v in good.items() if k != "to"}, {**good, "extra": 1}, {**good, "type": "sent"},
                {**good, "requeued_as": None}, {**good, "v": 2}, {**good, "at": "yesterday"}):
        assert not CHECK.is_valid(bad), bad


def _json(job: dict[str, Any]) -> bool:
    """What an outbox entry can hold: the send path reads jobs with orjson (no integer beyond 64 bits)."""
    try:
        orjson.dumps(job)
    except orjson.JSONEncodeError:
        return False
    return True


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(["accepted", "rejected", "failed", "delivered", "undeliverable", "expired"]),
       st.dictionaries(st.sampled_from(["to", "text", "id", "metadata", "v", "binary"]), json_values).filter(_json))
def test_an_event_echoes_only_what_has_the_schemas_type(kind: str, job: dict[str, Any]) -> None:
    """The job of an invalid_job `failed` is whatever a producer wrote (an `id` of 5, `metadata` of
    "x"): the event still validates, echoing only strings as id and to, objects as metadata."""
    reason = "invalid_job" if kind == "failed" else None
    status = None if kind == "failed" else REPORT["status"]
    event = _valid(events.build(kind, "sw-bulk-1", job, lane="bulk", reason=reason, status=status))
    assert event["id"] == (job.get("id") if isinstance(job.get("id"), str) else None)
    assert event["metadata"] == (job.get("metadata") if isinstance(job.get("metadata"), dict) else None)


def test_a_replayed_message_that_fails_again_has_a_new_failed_event_id() -> None:
    """The dead letter's replay appends a new outbox entry: its `failed` is a state change of its own.
    The same entry settled again (a retried settle) keeps its id, so consumers still drop repeats."""
    job = {"to": "12", "text": "bad"}
    first = Entry("1764230000000-0", "sw-bulk-1764230000000-0", orjson.dumps(job))
    replayed = Entry("1764230999000-0", first.message_id, first.job)
    ids = []
    for entry in (first, first, replayed):
        [outcome] = give_up("bulk", entry, job, "invalid_job", "to: bad", 0).outcomes
        assert outcome.event is not None
        ids.append(_valid(outcome.event)["event_id"])
    assert ids[0] == ids[1] == "sw-bulk-1764230000000-0:failed:1764230000000-0"
    assert ids[2] != ids[0] and ids[2].startswith(f"{first.message_id}:failed:")
