"""`sms-worker trace`'s pure part (worker/trace.py): trail lines parsed, the timeline built from a
record, its events and dead letters, rendered as text and JSON, numbers masked; and the command's
usage mistakes, which are refused before anything is reached."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from worker.cli import build_parser, main
from worker.trace import (
    Found,
    Trace,
    as_json,
    build_trace,
    iso_ms,
    linked_ids,
    normalise_number,
    origin,
    parse_line,
    parse_since,
    parse_trail,
    provider_view,
    render_list,
    render_text,
    same_number,
)

NUMBER = "41793026727"
MASKED = "41*******27"
MID = "sw-bulk-1764230000000-0"
T0 = 1764230000000
JOB = orjson.dumps({"to": NUMBER, "text": "Your code is 123456", "id": "order-42", "metadata": {"n": 1},
                    "campaign_reference_id": "spring"}).decode()
# A life with a failed first attempt: ambiguous, reconciled, absent, resent, accepted, delivered.
TRAIL = "\n".join([
    f"{T0 + 5} submit attempt=1 by=host-1 fence=f1 entry=1764230000000-0",
    f"{T0 + 1005} state to=AMBIGUOUS note=HTTP 500 from the provider",
    f"{T0 + 1600} reconcile state=AMBIGUOUS by=host-2",
    f"{T0 + 1610} absent check=1 by=host-2",
    f"{T0 + 2700} absent check=2 by=host-2",
    f"{T0 + 3800} resend attempt=2 by=host-2 fence=f2",
    f"{T0 + 3900} state to=ACCEPTED event={T0 + 3900}-0",
    f"{T0 + 9000} report to=DELIVERED status=DELIVERED_TO_HANDSET source=drain event={T0 + 9000}-0",
])
RECORD = {"state": "DELIVERED", "lane": "bulk", "entry": "1764230000000-0", "job": JOB, "attempts": "2",
          "bulk_id": "b-1", "status": "DELIVERED_TO_HANDSET", "campaign": "spring", "trail": TRAIL}


def _event(kind: str, **extra: Any) -> bytes:
    return orjson.dumps({"v": 1, "event_id": f"{MID}:{kind}", "type": kind, "message_id": MID, "to": NUMBER,
                         "lane": "bulk", **extra})


EVENTS = {
    f"{T0 + 3900}-0": _event("accepted", status={"name": "PENDING_ENROUTE"}),
    f"{T0 + 9000}-0": _event("delivered", status={"name": "DELIVERED_TO_HANDSET"},
                             price={"pricePerMessage": 0.0075, "currency": "EUR"}),
}


def _delivered(events: dict[str, bytes | None] | None = None) -> Trace:
    return build_trace(MID, RECORD, mid_prefix="sw", events=EVENTS if events is None else events)


# --- the trail -------------------------------------------------------------------------------------
def test_a_trail_line_has_its_time_step_fields_and_note() -> None:
    line = parse_line("1764230001005 state to=QUEUED dlq=1-0 note=HTTP 503: service x=1 note=again")
    assert (line.ms, line.step, line.fields) == (1764230001005, "state", {"to": "QUEUED", "dlq": "1-0"})
    assert line.note == "HTTP 503: service x=1 note=again", "the note runs to the end of the line"
    bare = parse_line("1764230001005 trimmed")
    assert (bare.step, bare.fields, bare.note) == ("trimmed", {}, None)


def test_an_unreadable_line_is_kept_in_its_place() -> None:
    lines = parse_trail("100 submit attempt=1\n\ngarbage without a time\n300 state to=ACCEPTED\n")
    assert [(x.ms, x.step) for x in lines] == [(100, "submit"), (100, "unreadable"), (300, "state")]
    assert lines[1].note == "garbage without a time"


def test_the_trail_names_events_and_dead_letters_to_look_up() -> None:
    lines = parse_trail("1 state to=FAILED event=5-0 dlq=6-0\n2 report to=X event=5-0\n3 state to=Y event=nope")
    assert linked_ids(lines) == (["5-0"], ["6-0"]), "each once, malformed ids never sent to Redis"


@pytest.mark.parametrize(("message_id", "expected"), [
    ("sw-bulk-1764230000000-0", ("bulk", 1764230000000, "1764230000000-0", False)),
    ("sw-bulk-1764230000000-p1a2b3c4f", ("bulk", 1764230000000, None, False)),
    ("sw-bulk-1764230000000-p1a2b3c4s0", ("bulk", 1764230000000, None, False)),  # scheduled
    ("sw-otp-1764230000000-r1a2b3c4", ("otp", 1764230000000, None, True)),  # replayed under a new id
    ("sw-my-lane-1764230000000-3", ("my-lane", 1764230000000, "1764230000000-3", False)),
])
def test_a_message_id_tells_its_lane_and_enqueue_time(message_id: str, expected: tuple[Any, ...]) -> None:
    found = origin(message_id, "sw")
    assert found is not None
    assert (found.lane, found.ms, found.entry_id, found.replayed) == expected


def test_a_foreign_id_tells_nothing() -> None:
    assert origin("other-bulk-1764230000000-0", "sw") is None
    assert origin("sw-bulk-1764230000000-0\n", "sw") is None
    assert origin("sw-bulk-notatime", "sw") is None


# --- the timeline ----------------------------------------------------------------------------------
def test_the_timeline_is_the_whole_life_in_order_with_its_events() -> None:
    trace = _delivered()
    assert [s.step for s in trace.timeline] == ["enqueued", "submit", "state", "reconcile", "absent", "absent",
                                                "resend", "state", "report"]
    assert [s.ms for s in trace.timeline] == sorted(s.ms for s in trace.timeline)
    assert (trace.state, trace.recorded, trace.attempts, trace.campaign, trace.producer_id) == (
        "DELIVERED", True, 2, "spring", "order-42")
    accepted, report = trace.timeline[7], trace.timeline[8]
    assert accepted.event is not None and accepted.event.found and accepted.event.data is not None
    assert accepted.event.data["type"] == "accepted"
    assert report.fields == {"to": "DELIVERED", "status": "DELIVERED_TO_HANDSET", "source": "drain"}


def test_an_event_trimmed_from_the_stream_says_so() -> None:
    trace = _delivered({f"{T0 + 3900}-0": None, f"{T0 + 9000}-0": EVENTS[f"{T0 + 9000}-0"]})
    text = render_text(trace)
    assert f"event {T0 + 3900}-0: trimmed from the events stream" in text
    assert f"event {T0 + 9000}-0: delivered, status DELIVERED_TO_HANDSET, price 0.0075 EUR" in text
    assert as_json(trace)["timeline"][7]["event"] == {"entry_id": f"{T0 + 3900}-0", "found": False, "data": None}


def test_a_dead_letter_is_shown_without_the_job_or_said_gone() -> None:
    record = {"state": "FAILED", "lane": "bulk", "job": JOB, "attempts": "10",
              "trail": f"{T0 + 5} submit attempt=1 by=w fence=f entry=1-0\n"
                       f"{T0 + 9} state to=FAILED event=7-0 dlq=8-0 note=retries_exhausted\n"
                       f"{T0 + 99} requeued dlq=8-0"}
    letter = {b"message_id": MID.encode(), b"entry": orjson.dumps(
        {"reason": "retries_exhausted", "detail": "HTTP 503", "attempts": 10, "job": JOB})}
    trace = build_trace(MID, record, mid_prefix="sw", events={"7-0": _event("failed")}, dead_letters={"8-0": letter})
    failed = trace.timeline[2]
    assert failed.dead_letter is not None and failed.dead_letter.data == {
        "reason": "retries_exhausted", "detail": "HTTP 503", "attempts": 10}
    text = render_text(trace)
    assert "dead letter 8-0: retries_exhausted: HTTP 503 (attempts 10)" in text
    assert "requeued by an operator from dead letter 8-0" in text
    assert "123456" not in text and "123456" not in orjson.dumps(as_json(trace)).decode(), "the text never shows"

    gone = build_trace(MID, record, mid_prefix="sw", events={}, dead_letters={"8-0": None})
    assert "dead letter 8-0: no longer in the dead letters (replayed or purged)" in render_text(gone)


def test_a_message_in_its_outbox_without_a_record_is_queued_not_claimed() -> None:
    trace = build_trace(MID, {}, mid_prefix="sw", outbox_entry=("bulk", "1764230000000-0", JOB.encode()))
    assert (trace.state, trace.recorded, trace.lane, trace.entry_id) == ("QUEUED", False, "bulk", "1764230000000-0")
    assert [(s.step, s.ms) for s in trace.timeline] == [("enqueued", T0)]
    text = render_text(trace)
    assert "QUEUED: queued, not claimed yet" in text and "outbox entry 1764230000000-0" in text
    assert as_json(trace)["recorded"] is False


def test_a_record_without_a_trail_still_shows_its_state() -> None:
    trace = build_trace(MID, {"state": "ACCEPTED", "lane": "bulk", "updated_ms": str(T0 + 50), "job": JOB},
                        mid_prefix="sw")
    assert [(s.step, s.ms, s.fields) for s in trace.timeline] == [
        ("enqueued", T0, {"lane": "bulk", "entry": "1764230000000-0", "id": "order-42"}),
        ("record", T0 + 50, {"state": "ACCEPTED"})]


def test_a_scheduled_then_cancelled_message() -> None:
    mid = "sw-bulk-1764230000000-pab12cd34s0"
    record = {"state": "CANCELLED", "lane": "bulk", "job": JOB,
              "trail": f"{T0 + 1} scheduled due={T0 + 60_000}\n{T0 + 5000} cancelled event=9-0"}
    trace = build_trace(mid, record, mid_prefix="sw", events={"9-0": _event("cancelled", reason="cancelled")})
    text = render_text(trace)
    assert f"held in the schedule until {iso_ms(T0 + 60_000)}" in text
    assert "-> CANCELLED: never sent" in text and "event 9-0: cancelled, reason cancelled" in text
    doc = as_json(trace)
    assert doc["timeline"][1]["due"] == T0 + 60_000 and doc["timeline"][1]["due_at"] == iso_ms(T0 + 60_000)


def test_a_step_this_version_does_not_know_shows_its_fields() -> None:
    record = {"state": "ACCEPTED", "lane": "bulk", "job": JOB,
              "trail": f"{T0 + 1} teleported where=mars\n{T0 + 2} submit attempt=1 by=w fence=f entry=1-0 shard=3"}
    text = render_text(build_trace(MID, record, mid_prefix="sw"))
    assert "teleported  where=mars" in text
    assert "[shard=3]" in text, "a field added later is shown, not dropped"


def test_an_event_id_that_cannot_be_looked_up_is_shown_as_written() -> None:
    record = {"state": "ACCEPTED", "lane": "bulk", "job": JOB, "trail": f"{T0 + 1} state to=ACCEPTED event=nope"}
    trace = build_trace(MID, record, mid_prefix="sw", events={})
    assert as_json(trace)["timeline"][1]["event"] == "nope"
    assert "-> ACCEPTED [event=nope]" in render_text(trace)


# --- rendering ---------------------------------------------------------------------------------------
def test_text_is_in_utc_with_milliseconds_and_numbers_masked() -> None:
    text = render_text(_delivered())
    assert f"{iso_ms(T0 + 5)}  submit      claimed, attempt 1 by host-1: submitting (fence f1" in text
    assert iso_ms(T0 + 5) == "2025-11-27T07:53:20.005Z"
    assert "-> AMBIGUOUS (HTTP 500 from the provider)" in text
    assert "not found in the provider's logs (check 2 by host-2)" in text
    assert "resend: attempt 2 by host-2 (fence f2)" in text
    assert "report -> DELIVERED (DELIVERED_TO_HANDSET) from drain" in text
    assert MASKED in text and NUMBER not in text
    shown = render_text(_delivered(), show_numbers=True)
    assert NUMBER in shown and MASKED not in shown


def test_json_is_one_document_with_typed_steps_and_masked_numbers() -> None:
    doc = orjson.loads(orjson.dumps(as_json(_delivered())))
    assert {k: doc[k] for k in ("message_id", "state", "lane", "campaign", "attempts")} == {
        "message_id": MID, "state": "DELIVERED", "lane": "bulk", "campaign": "spring", "attempts": 2}
    submit = doc["timeline"][1]
    assert submit == {"at": iso_ms(T0 + 5), "ms": T0 + 5, "step": "submit", "attempt": 1, "by": "host-1",
                      "fence": "f1", "entry": "1764230000000-0"}
    assert doc["timeline"][2]["note"] == "HTTP 500 from the provider"
    assert doc["to"] == MASKED and doc["timeline"][8]["event"]["data"]["to"] == MASKED
    assert NUMBER not in orjson.dumps(doc).decode()
    assert as_json(_delivered(), show_numbers=True)["timeline"][8]["event"]["data"]["to"] == NUMBER


def test_a_note_with_a_number_is_masked() -> None:
    record = {"state": "REJECTED", "lane": "bulk", "job": JOB,
              "trail": f"{T0 + 1} state to=REJECTED note=destination {NUMBER} is blocked"}
    trace = build_trace(MID, record, mid_prefix="sw")
    assert f"destination {MASKED} is blocked" in render_text(trace)
    assert as_json(trace)["timeline"][1]["note"] == f"destination {MASKED} is blocked"


def test_the_provider_entry_is_shown_masked_or_said_missing() -> None:
    trace = _delivered()
    trace.provider = provider_view({"messageId": MID, "destination": NUMBER, "sentAt": "2025-11-27T07:53:24.000+0000",
                                    "status": {"groupName": "DELIVERED", "name": "DELIVERED_TO_HANDSET"},
                                    "price": {"pricePerMessage": 0.0075, "currency": "EUR"}})
    text = render_text(trace)
    assert "provider's log (GET /sms/3/logs)\n  status DELIVERED_TO_HANDSET (DELIVERED)" in text
    assert f"to {MASKED}" in text and "price 0.0075 EUR" in text and NUMBER not in text
    assert as_json(trace)["provider"]["entry"]["destination"] == MASKED
    trace.provider = provider_view(None)
    assert "no entry: the provider keeps its logs 48 h" in render_text(trace)
    trace.provider = provider_view(None, "GET /sms/3/logs: HTTP 503")
    assert "could not be read: GET /sms/3/logs: HTTP 503" in render_text(trace)
    assert as_json(trace)["provider"] == {"found": False, "error": "GET /sms/3/logs: HTTP 503"}


def test_many_messages_are_listed_one_line_each() -> None:
    queued = build_trace("sw-bulk-1764230005000-0", {}, mid_prefix="sw",
                         outbox_entry=("bulk", "1764230005000-0", JOB.encode()))
    text = render_list([queued, _delivered()])
    lines = text.splitlines()
    assert lines[1].split()[:3] == ["sw-bulk-1764230005000-0", "QUEUED*", "bulk"]
    assert lines[2].split()[:3] == [MID, "DELIVERED", "bulk"] and lines[2].split()[-2] == "report"
    assert lines[-1] == "  * queued, not claimed yet"


# --- --to and --since --------------------------------------------------------------------------------
def test_since_is_a_duration_or_an_rfc3339_time() -> None:
    now = T0
    assert parse_since("2h", now) == now - 7_200_000
    assert parse_since("1h30m", now) == now - 5_400_000
    assert parse_since("45s", now) == now - 45_000 and parse_since("7d", now) == now - 7 * 86_400_000
    assert parse_since("2025-11-27T07:53:20Z", now) == T0
    assert parse_since("2025-11-27T08:53:20.000+01:00", now) == T0
    for bad in ("2025-11-27T07:53:20", "yesterday", "2x", "h", ""):
        with pytest.raises(ValueError, match="--since"):
            parse_since(bad, now)


def test_numbers_are_compared_as_jobs_hold_them() -> None:
    assert normalise_number("+41 79 302 67 27") == NUMBER
    assert same_number("+41793026727", NUMBER) and same_number(NUMBER, NUMBER)
    assert not same_number("41793026728", NUMBER) and not same_number(None, NUMBER)
    for bad in ("12", "0041793026727", "4179302672a"):
        with pytest.raises(ValueError, match="--to"):
            normalise_number(bad)


def test_found_messages_are_newest_first_and_limited() -> None:
    found = Found()
    found.add("sw-bulk-1764230000000-0", "sw", 0)
    found.add("sw-bulk-1764230009000-0", "sw", 0)
    found.add("foreign-id", "sw", T0 + 5000)
    found.add("sw-bulk-1764230000000-0", "sw", T0 + 99_999)  # seen again in another stream: one message
    assert found.newest(10) == ["sw-bulk-1764230009000-0", "foreign-id", "sw-bulk-1764230000000-0"]
    assert found.newest(1) == ["sw-bulk-1764230009000-0"]


# --- the command line ---------------------------------------------------------------------------------
@pytest.mark.parametrize("argv", [
    ["trace"],
    ["trace", MID, "--id", "order-42"],
    ["trace", "--to", NUMBER],
    ["trace", MID, "--since", "2h"],
    ["trace", "--to", NUMBER, "--since", "2h", "--limit", "0"],
    ["trace", "--to", "12", "--since", "2h"],
    ["trace", "--to", NUMBER, "--since", "yesterday"],
])
def test_usage_mistakes_are_one_line_and_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("sms-worker: trace: ") and err.count("\n") == 1


def test_the_help_says_what_it_scans() -> None:
    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices["trace"]  # type: ignore[union-attr]
    text = " ".join(sub.format_help().split())
    for scanned in ("the events stream", "every lane's outbox", "every lane's schedule", "--scan-limit",
                    "masked unless --show-numbers"):
        assert scanned in text
