"""The client's pure parts: how a message is looked up (the steps, fed replies by hand), what a status
says, and how `send`'s arguments become a job."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from worker.client.common import MessageStatus, make_job
from worker.models import State
from worker.store.keys import Keys
from worker.store.lookup import Located, locate_steps

KEYS = Keys()


def _run(message_id: str, replies: list[Any]) -> tuple[Located, list[tuple[Any, ...]]]:
    """Drive the steps with canned replies; (the answer, the commands asked for)."""
    steps = locate_steps(KEYS, message_id)
    commands = [steps.send(None)]
    try:
        for reply in replies:
            commands.append(steps.send(reply))
    except StopIteration as done:
        return done.value, commands
    raise AssertionError(f"the steps wanted more than {len(replies)} replies: {commands}")


def test_a_record_answers_at_once_without_its_job() -> None:
    located, commands = _run("sw-bulk-1700000000000-0", [{b"state": b"ACCEPTED", b"lane": b"bulk", b"job": b"{}"}])
    assert commands == [("HGETALL", "sms:msg:sw-bulk-1700000000000-0")]
    assert (located.fields, located.lane, located.in_outbox) == ({"state": "ACCEPTED", "lane": "bulk"}, "bulk", False)


def test_no_record_and_an_outbox_entry_is_queued() -> None:
    entry = [("1700000000000-0", {b"job": b'{"to":"41793026727","text":"hi"}'})]
    located, commands = _run("sw-bulk-1700000000000-0", [{}, entry])
    assert commands[1][:2] == ("XRANGE", "sms:outbox:bulk")
    assert MessageStatus.of(located) == MessageStatus("sw-bulk-1700000000000-0", State.QUEUED, "bulk", {})


def test_an_entry_settled_during_the_search_is_found_by_the_second_read() -> None:
    """No record, then no entry (a dispatcher submitted, settled and deleted it meanwhile): the
    record is read again, and it exists now. Never "unknown" for a message that exists."""
    located, commands = _run("sw-bulk-1700000000000-0", [{}, [], {b"state": b"DELIVERED", b"lane": b"bulk"}])
    assert [c[0] for c in commands] == ["HGETALL", "XRANGE", "HGETALL"]
    assert MessageStatus.of(located).state is State.DELIVERED


def test_nothing_anywhere_is_unknown() -> None:
    located, _ = _run("sw-bulk-1700000000000-0", [{}, [], {}])
    status = MessageStatus.of(located)
    assert (status.known, status.state, status.final) == (False, None, False)


def test_a_state_this_version_does_not_know_is_unknown_with_its_record_kept() -> None:
    status = MessageStatus.of(Located("m", "bulk", {"state": "TELEPORTED"}, False))
    assert status.state is None and status.fields == {"state": "TELEPORTED"}


def test_send_arguments_become_the_wire_job() -> None:
    when = datetime(2030, 1, 1, 9, 30, tzinfo=timezone(timedelta(hours=1)))
    job = make_job("41793026727", "hi", id="o-1", metadata={"a": 1}, sender=None, send_at=when,
                   fields={"campaign_reference_id": "c"})
    assert job == {"to": "41793026727", "text": "hi", "id": "o-1", "metadata": {"a": 1},
                   "send_at": "2030-01-01T09:30:00+01:00", "campaign_reference_id": "c"}
    assert make_job("41793026727", None, id=None, metadata=None, sender=None, send_at=None,
                    fields={"binary": {"hex": "0f"}}) == {"to": "41793026727", "binary": {"hex": "0f"}}
    utc = make_job("1", "x", id=None, metadata=None, sender=None, send_at=datetime(2030, 1, 1, tzinfo=UTC), fields={})
    assert utc["send_at"] == "2030-01-01T00:00:00+00:00"
