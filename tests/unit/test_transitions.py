"""worker.transitions agrees with the Lua scripts: each script is driven from every state (against the
real Redis of tests/conftest.py) and every state change it makes must be in the table, and every
entry of the table must be made by some call. A change to one side alone fails here."""

from __future__ import annotations

from typing import Any

import orjson

from worker.models import State
from worker.store import AbsentVerdict, Entry, Outcome, Store, SubmitAnswer
from worker.transitions import TRANSITIONS, Script, Transition, allowed

FROM: list[State | None] = [None, *State]
FAR_MS = 10**13  # a lease or send_by far in the future
JOB = orjson.dumps({"to": "41790000000", "text": "hi"})


def _entry(n: int) -> Entry:
    return Entry(f"1-{n}", f"sw-bulk-{n}", JOB)


def _put(store: Store, entry: Entry, state: State | None, **fields: Any) -> None:
    """The message's record as a test starts it (raw Redis: a state no public call sets directly)."""
    store.r.delete(store.msg(entry.message_id))
    if state is not None:
        store.r.hset(store.msg(entry.message_id), mapping={"state": state, "lane": "bulk", "entry": entry.entry_id,
                                                           "attempts": 1, **fields})


def _state(store: Store, entry: Entry) -> State | None:
    raw = store.r.hget(store.msg(entry.message_id), "state")
    return None if raw is None else State(raw.decode())


class Seen:
    """The state changes one script made over a test's calls."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.changes: set[Transition] = set()

    def record(self, before: State | None, after: State | None) -> None:
        assert allowed(self.script, before, after), f"{self.script}.lua moved a message {before} -> {after}"
        if before != after:
            assert after is not None, f"{self.script}.lua deleted a {before} message"
            self.changes.add((before, after))

    def covers_the_table(self) -> None:
        table = TRANSITIONS[self.script]
        assert all(before != after for before, after in table), "the table lists changes, not stays"
        missing = table - self.changes
        assert not missing, f"{self.script}.lua never made {sorted(map(str, missing))}"


# The variants of a record each script behaves differently on.
SUBMIT_CASES = {
    "window open": {"send_by": FAR_MS},  # SUBMITTING: WAIT
    "window over": {"send_by": 1},  # SUBMITTING/AMBIGUOUS: take the reconciliation lease
    "lease taken": {"send_by": 1, "checker": "other", "check_until": FAR_MS},  # BUSY
}
ABSENT_CASES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {  # (record fields, absent() arguments)
    "absent long enough": ({"checker": "me", "check_until": FAR_MS, "absent_checks": 5, "absent_first": 1},
                           {"checks": 1, "window_ms": 0, "max_attempts": 10}),  # RESEND
    "first absence": ({"checker": "me", "check_until": FAR_MS}, {"checks": 3, "window_ms": 60_000, "max_attempts": 10}),
    "attempts used up": ({"checker": "me", "check_until": FAR_MS, "attempts": 10},
                         {"checks": 1, "window_ms": 0, "max_attempts": 10}),  # EXHAUSTED
    "lease lost": ({"checker": "other", "check_until": FAR_MS}, {"checks": 1, "window_ms": 0, "max_attempts": 10}),
}


def test_submit_lua_agrees_with_the_table(store: Store) -> None:
    seen = Seen(Script.SUBMIT)
    for before in FROM:
        for n, fields in enumerate(SUBMIT_CASES.values()):
            entry = _entry(n)
            _put(store, entry, before, **fields)
            [answer] = store.submit("bulk", [entry], consumer="me", lease_ms=60_000, state_ttl_s=3600, fence="f1",
                                    send_window_ms=60_000, margin_ms=0)
            assert isinstance(answer.state, SubmitAnswer)
            seen.record(before, _state(store, entry))
    seen.covers_the_table()


def test_absent_lua_agrees_with_the_table(store: Store) -> None:
    seen = Seen(Script.ABSENT)
    for before in FROM:
        for n, (fields, args) in enumerate(ABSENT_CASES.values()):
            entry = _entry(n)
            _put(store, entry, before, **fields)
            [verdict] = store.absent([entry], consumer="me", fence="f2", send_window_ms=60_000, **args)
            assert isinstance(verdict.state, AbsentVerdict)
            seen.record(before, _state(store, entry))
    seen.covers_the_table()


def test_settle_lua_agrees_with_the_table(store: Store) -> None:
    """Every outcome from every state; settle.lua's answer says whether it was applied. An
    acknowledge-only outcome changes nothing."""
    seen = Seen(Script.SETTLE)
    kw: dict[str, Any] = {"now_ms": 1, "events_maxlen": 1000, "state_ttl_s": 3600}
    for before in FROM:
        for n, target in enumerate(State):
            entry = _entry(n)
            _put(store, entry, before)
            [applied] = store.settle("bulk", [Outcome(entry.message_id, entry.entry_id, target, ack=False)], **kw)
            after = _state(store, entry)
            assert applied == (after == target != before), f"settle.lua's answer for {before} -> {target}"
            seen.record(before, after)
        entry = _entry(99)
        _put(store, entry, before)
        assert store.settle("bulk", [Outcome.acknowledge(entry.message_id, entry.entry_id)], **kw) == [False]
        seen.record(before, _state(store, entry))
    seen.covers_the_table()


def test_a_policy_rejection_applies_only_to_a_message_never_submitted_or_certainly_not_sent(store: Store) -> None:
    """settle.lua's "p:" guard: REJECTED by the traffic policy from no record or QUEUED; from any other
    state (another worker submitted it meanwhile) nothing changes and the entry is left pending."""
    kw: dict[str, Any] = {"now_ms": 1, "events_maxlen": 1000, "state_ttl_s": 3600}
    for n, before in enumerate(FROM):
        entry = _entry(200 + n)
        _put(store, entry, before)
        outcome = Outcome(entry.message_id, entry.entry_id, State.REJECTED, ack=True, guard="p:")
        [applied] = store.settle("bulk", [outcome], **kw)
        assert applied == (before in (None, State.QUEUED)), before
        assert _state(store, entry) == (State.REJECTED if applied else before)


def test_check_renew_lua_agrees_with_the_table(store: Store) -> None:
    seen = Seen(Script.CHECK_RENEW)
    for before in FROM:
        entry = _entry(0)
        _put(store, entry, before, checker="me", check_until=FAR_MS)
        store.renew_checks([entry.message_id], "me", 60_000)
        seen.record(before, _state(store, entry))
    seen.covers_the_table()


def _derived(store: Store, n: int) -> Entry:
    """An entry really in the bulk outbox, whose message id is derived from its entry id."""
    entry = Entry(f"1-{n + 1}", f"sw-bulk-1-{n + 1}", JOB)
    store.r.xadd(store.outbox("bulk"), {"job": JOB}, id=entry.entry_id)
    return entry


def test_schedule_lua_agrees_with_the_table(store: Store) -> None:
    """A raw entry with a future send_at is held only while its message has no record."""
    seen = Seen(Script.SCHEDULE)
    for n, before in enumerate(FROM):
        entry = _derived(store, n)
        _put(store, entry, before, job=JOB)
        [answer] = store.schedule_entries("bulk", [(entry, None, FAR_MS)], state_ttl_s=3600, idempotency_ttl_s=60)
        assert answer == ("SCHEDULED" if before is None else str(before))
        seen.record(before, _state(store, entry))
    [(mid, queued)] = store.schedule("bulk", [(JOB, None, FAR_MS)], state_ttl_s=3600, idempotency_ttl_s=60)
    assert queued
    seen.record(None, State(store.r.hget(store.msg(mid), "state").decode()))
    seen.covers_the_table()


def test_due_lua_agrees_with_the_table(store: Store) -> None:
    seen = Seen(Script.DUE)
    for n, before in enumerate(FROM):
        entry = _entry(n)
        _put(store, entry, before, job=JOB)
        store.r.zadd(store.scheduled("bulk"), {entry.message_id: 1})
        store.move_due("bulk", state_ttl_s=3600)
        assert store.r.zscore(store.scheduled("bulk"), entry.message_id) is None, "a due member is always removed"
        seen.record(before, _state(store, entry))
    seen.covers_the_table()


def test_cancel_lua_agrees_with_the_table(store: Store) -> None:
    """From every state, by message id; an unrecorded message is cancellable only while its entry is
    in the outbox."""
    seen = Seen(Script.CANCEL)
    for n, before in enumerate(FROM):
        entry = _derived(store, n)
        _put(store, entry, before, job=JOB)
        answer = store.cancel(message_id=entry.message_id, events_maxlen=1000, state_ttl_s=3600)
        after = _state(store, entry)
        assert answer.cancelled == (after == State.CANCELLED != before), f"cancel's answer from {before}"
        seen.record(before, after)
    gone = Entry("1-999", "sw-bulk-1-999", JOB)  # no record and no entry: nothing to cancel
    assert store.cancel(message_id=gone.message_id, events_maxlen=1000, state_ttl_s=3600).outcome == "unknown"
    seen.record(None, _state(store, gone))
    seen.covers_the_table()
