"""Scheduled sends and cancel against a real Redis: held in the schedule, moved when due, cancelled
atomically against the dispatcher's submit (worker.store.schedule, worker.cancel)."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest

from worker.cancel import CancelConfig, CancelOutcome, cancel
from worker.devtools.devstack import wait_until
from worker.errors import JobValidationError
from worker.models import State
from worker.outbox import Enqueued, Outbox, OutboxConfig
from worker.settings import Settings
from worker.store import Entry, Store, SubmitAnswer, cancel_steps

CONFIG = CancelConfig(state_ttl_s=3600, events_maxlen=10_000)


def _at(seconds: float) -> str:
    return (datetime.now(UTC) + timedelta(seconds=seconds)).isoformat()


@pytest.fixture
def outbox(settings: Settings, store: Store) -> Outbox:
    return Outbox(OutboxConfig.from_settings(settings), store)


def _events(store: Store) -> list[dict[str, Any]]:
    return [orjson.loads(fields[b"event"]) for _, fields in store.r.xrange(store.events)]


def _outbox_mids(store: Store, lane: str) -> list[str]:
    return [store.entry_message_id(lane, i.decode(), f) for i, f in store.r.xrange(store.outbox(lane))]


def _submit(store: Store, lane: str, entries: list[Entry], fence: str = "f") -> list[SubmitAnswer]:
    answers = store.submit(lane, entries, consumer="me", lease_ms=60_000, state_ttl_s=3600, fence=fence,
                           send_window_ms=60_000)
    return [a.state for a in answers]


def _claim(store: Store, lane: str) -> list[Entry]:
    return store.claim(lane, "me", 1000, lease_ms=60_000, max_wait_ms=0, recover=False).entries


def test_a_future_job_is_held_in_redis_and_moved_to_its_outbox_when_due(store: Store, outbox: Outbox) -> None:
    queued = outbox.enqueue({"to": "41790000001", "text": "later", "send_at": _at(0.6), "metadata": {"k": 1}}, "bulk")
    assert queued.queued
    record = store.message(queued.message_id)
    assert record["state"] == State.SCHEDULED and record["lane"] == "bulk"
    assert store.r.xlen(store.outbox("bulk")) == 0, "nothing is appended before its time"
    assert store.move_due("bulk", state_ttl_s=3600)[0] == 0
    count, first = store.scheduled_counts(["bulk"])["bulk"]
    assert count == 1 and first == int(record["due_ms"])
    assert store.r.ttl(store.msg(queued.message_id)) > 3600, "kept until due, then the state TTL"

    wait_until(lambda: store.move_due("bulk", state_ttl_s=3600)[0] == 1, 5, "the job to become due")
    assert _outbox_mids(store, "bulk") == [queued.message_id]
    assert store.message(queued.message_id)["state"] == State.QUEUED
    assert store.scheduled_counts(["bulk"])["bulk"] == (0, None)
    [entry] = _claim(store, "bulk")
    assert entry.message_id == queued.message_id and orjson.loads(entry.job)["metadata"] == {"k": 1}
    assert _submit(store, "bulk", [entry]) == [SubmitAnswer.QUEUED], "moved jobs are submitted like any"


def test_a_past_send_at_is_appended_at_once(store: Store, outbox: Outbox) -> None:
    queued = outbox.enqueue({"to": "41790000001", "text": "now", "send_at": _at(-3600)}, "bulk")
    assert _outbox_mids(store, "bulk") == [queued.message_id]
    assert store.scheduled_counts(["bulk"])["bulk"] == (0, None)


@pytest.mark.parametrize(("send_at", "says"), [
    ("2026-12-01T09:30:00", "no UTC offset"),
    ("tomorrow", "RFC 3339"),
    ("2026-12-01", "RFC 3339"),
    ("2026-02-30T09:30:00Z", "not a valid date-time"),
    (1764581400, "string"),
])
def test_a_malformed_send_at_is_refused_at_enqueue(store: Store, outbox: Outbox, send_at: object, says: str) -> None:
    with pytest.raises(JobValidationError) as refused:
        outbox.enqueue({"to": "41790000001", "text": "x", "send_at": send_at}, "bulk")
    [problem] = refused.value.problems
    assert problem.field == "send_at" and says in problem.message
    assert store.r.dbsize() == 0, "nothing is written"


def test_a_send_at_beyond_the_horizon_is_refused(settings: Settings, store: Store) -> None:
    outbox = Outbox(OutboxConfig.from_settings(settings.model_copy(update={"sms_schedule_horizon_s": 3600})), store)
    with pytest.raises(JobValidationError, match="SMS_SCHEDULE_HORIZON_S"):
        outbox.enqueue_many([{"to": "41790000001", "text": "ok", "send_at": _at(60)},
                             {"to": "41790000001", "text": "too far", "send_at": _at(7200)}], "bulk")
    assert store.r.dbsize() == 0, "one bad job refuses the whole call"
    assert outbox.enqueue({"to": "41790000001", "text": "ok", "send_at": _at(3500)}, "bulk").queued


def test_a_mixed_call_schedules_some_and_appends_the_rest_in_order(store: Store, outbox: Outbox) -> None:
    jobs = [{"to": "41790000001", "text": f"{i}", **({"send_at": _at(600)} if i % 2 else {})} for i in range(6)]
    answers = outbox.enqueue_many(jobs, "bulk")
    states = [store.message(a.message_id).get("state") for a in answers]
    assert states == [None, "SCHEDULED"] * 3
    assert _outbox_mids(store, "bulk") == [answers[i].message_id for i in (0, 2, 4)]


def test_a_repeated_producer_id_is_scheduled_once(store: Store, outbox: Outbox) -> None:
    first = outbox.enqueue({"to": "41790000001", "text": "a", "id": "rem-1", "send_at": _at(600)}, "bulk")
    again = outbox.enqueue({"to": "41790000001", "text": "a", "id": "rem-1", "send_at": _at(900)}, "bulk")
    assert first.queued and again.duplicate and again.message_id == first.message_id
    assert store.scheduled_counts(["bulk"])["bulk"][0] == 1
    assert store.r.ttl(store.idem("rem-1")) > 600 + 172_800 - 60, "the producer id outlives the wait"


def test_two_movers_at_once_move_each_job_exactly_once(store: Store) -> None:
    now_ms = int(datetime.now(UTC).timestamp() * 1000)
    answers = store.schedule("bulk", [(b'{"to":"41790000001","text":"x"}', None, now_ms - 1)] * 2000,
                             state_ttl_s=3600, idempotency_ttl_s=60)
    go = threading.Barrier(2)
    moved: list[int] = []

    def mover() -> None:
        go.wait()
        while (count := store.move_due("bulk", state_ttl_s=3600, limit=50)[0]) > 0:
            moved.append(count)

    threads = [threading.Thread(target=mover) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    mids = _outbox_mids(store, "bulk")
    assert sum(moved) == 2000 and len(mids) == 2000
    assert sorted(mids) == sorted(mid for mid, _ in answers), "every job once, none twice"


def test_cancel_a_scheduled_job_by_message_id_and_by_producer_id(store: Store, outbox: Outbox) -> None:
    a = outbox.enqueue({"to": "41790000001", "text": "a", "send_at": _at(0.3), "metadata": {"m": 1}}, "bulk")
    b = outbox.enqueue({"to": "41790000002", "text": "b", "id": "order-9", "send_at": _at(0.3)}, "bulk")
    first = cancel(store, CONFIG, message_id=a.message_id)
    assert first.outcome is CancelOutcome.CANCELLED and first.state is State.CANCELLED
    by_id = cancel(store, CONFIG, producer_id="order-9")
    assert by_id.cancelled and by_id.message_id == b.message_id
    again = cancel(store, CONFIG, message_id=a.message_id)
    assert again.outcome is CancelOutcome.NOT_CANCELLABLE and again.state is State.CANCELLED
    assert "cancelled earlier" in again.describe()
    events = _events(store)
    assert [(e["type"], e["message_id"]) for e in events] == [("cancelled", a.message_id), ("cancelled", b.message_id)]
    assert events[0]["metadata"] == {"m": 1} and events[0]["event_id"] == f"{a.message_id}:cancelled"
    assert events[1]["id"] == "order-9"
    assert store.scheduled_counts(["bulk"])["bulk"] == (0, None)
    store.r.zadd(store.scheduled("bulk"), {a.message_id: 0})  # a member left behind is skipped, not moved
    assert store.move_due("bulk", state_ttl_s=3600)[0] == 0
    assert store.r.xlen(store.outbox("bulk")) == 0


def test_cancel_a_queued_job_no_dispatcher_has_submitted(store: Store, outbox: Outbox) -> None:
    """An entry still in the outbox (derived id, or an id given at enqueue) is cancelled; the
    dispatcher that claims it then only acknowledges it."""
    plain = outbox.enqueue({"to": "41790000001", "text": "a"}, "bulk")
    given = outbox.enqueue({"to": "41790000002", "text": "b", "id": "p-1"}, "bulk")
    assert cancel(store, CONFIG, message_id=plain.message_id).cancelled
    assert cancel(store, CONFIG, producer_id="p-1").cancelled
    entries = _claim(store, "bulk")
    assert [e.message_id for e in entries] == [plain.message_id, given.message_id]
    assert _submit(store, "bulk", entries) == [SubmitAnswer.SETTLED, SubmitAnswer.SETTLED]
    assert {e["type"] for e in _events(store)} == {"cancelled"}


def test_cancel_answers_plainly_what_it_did_not_do(store: Store, outbox: Outbox) -> None:
    sent = outbox.enqueue({"to": "41790000001", "text": "a"}, "bulk")
    entries = _claim(store, "bulk")
    assert _submit(store, "bulk", entries) == [SubmitAnswer.NEW]
    answer = cancel(store, CONFIG, message_id=sent.message_id)
    assert answer.outcome is CancelOutcome.NOT_CANCELLABLE and answer.state is State.SUBMITTING
    assert "already SUBMITTING" in answer.describe()
    assert store.message(sent.message_id)["state"] == State.SUBMITTING, "nothing changed"
    assert cancel(store, CONFIG, message_id="sw-bulk-1-1").outcome is CancelOutcome.UNKNOWN
    assert cancel(store, CONFIG, message_id="not-ours").outcome is CancelOutcome.UNKNOWN
    assert cancel(store, CONFIG, producer_id="never-sent").outcome is CancelOutcome.UNKNOWN
    assert _events(store) == [], "no event for a cancel that did nothing"
    with pytest.raises(ValueError, match="message id or a producer id"):
        cancel(store, CONFIG)


def _race(store: Store, entries: list[Entry], mid: str, fence: str) -> dict[str, Any]:
    """Submit (a dispatcher) and cancel of one message started at the same instant in two threads."""
    go = threading.Barrier(2)
    results: dict[str, Any] = {}

    def submitter() -> None:
        go.wait()
        results["submit"] = _submit(store, "bulk", entries, fence=fence)[0]

    def canceller() -> None:
        go.wait()
        results["cancel"] = cancel(store, CONFIG, message_id=mid)

    threads = [threading.Thread(target=submitter), threading.Thread(target=canceller)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    return results


@pytest.mark.parametrize("kind", ["queued", "scheduled-then-due"])
def test_cancel_and_submit_racing_never_both_win(store: Store, outbox: Outbox, kind: str) -> None:
    """Cancel in one thread, the dispatcher's submit in another, 150 times: exactly one wins each time."""
    for n in range(150):
        store.r.flushdb()
        if kind == "queued":
            queued = outbox.enqueue({"to": "41790000001", "text": f"{n}", "id": f"race-{n}"}, "bulk")
        else:
            [(mid, _)] = store.schedule("bulk", [(b'{"to":"41790000001","text":"x"}', None, 1)],
                                        state_ttl_s=3600, idempotency_ttl_s=60)
            assert store.move_due("bulk", state_ttl_s=3600)[0] == 1
            queued = Enqueued(mid, "bulk", True)
        results = _race(store, _claim(store, "bulk"), queued.message_id, f"f{n}")
        submitted = results["submit"] in (SubmitAnswer.NEW, SubmitAnswer.QUEUED)
        cancelled = results["cancel"].cancelled
        assert submitted != cancelled, f"round {n}: submit {results['submit']}, cancel {results['cancel']}"
        state = store.message(queued.message_id)["state"]
        assert state == (State.SUBMITTING if submitted else State.CANCELLED)
        if submitted:
            assert results["cancel"].state is State.SUBMITTING
        assert len(_events(store)) == (1 if cancelled else 0)


def _finish(store: Store, steps: Any, command: Any) -> Any:
    """Drive sans-I/O steps to their answer, starting with `command`."""
    try:
        while True:
            command = steps.send(store.r.execute_command(*command))
    except StopIteration as done:
        return done.value


@pytest.mark.parametrize("scheduled", [False, True])
def test_a_submit_between_cancels_read_and_its_script_wins(store: Store, outbox: Outbox, scheduled: bool) -> None:
    """The worst interleaving, forced: cancel has read the message as cancellable and built its
    event, then a dispatcher submits it, then cancel's script runs. The script sees the change and
    cancel answers with the new state; the message is sent, no `cancelled` event is published."""
    if scheduled:
        [(mid, _)] = store.schedule("bulk", [(b'{"to":"41790000001","text":"x"}', None, 1)], state_ttl_s=3600,
                                    idempotency_ttl_s=60)
        store.move_due("bulk", state_ttl_s=3600)
    else:
        mid = outbox.enqueue({"to": "41790000001", "text": "x"}, "bulk").message_id
    steps = cancel_steps(store, message_id=mid, events_maxlen=1000, state_ttl_s=3600)
    command = steps.send(None)
    while command[0] != "EVAL":
        command = steps.send(store.r.execute_command(*command))
    assert _submit(store, "bulk", _claim(store, "bulk"))[0] in (SubmitAnswer.NEW, SubmitAnswer.QUEUED)
    answer = _finish(store, steps, command)
    assert answer.outcome is CancelOutcome.NOT_CANCELLABLE and answer.state is State.SUBMITTING
    assert store.message(mid)["state"] == State.SUBMITTING
    assert _events(store) == []


class _Wakes:
    """The clock's wake-ups, recording how many entries each woken lane's outbox held right then."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.seen: list[tuple[str, int]] = []

    def dispatch(self, lane: str, delay_ms: int = 0) -> bool:
        self.seen.append((lane, int(self.store.r.xlen(self.store.outbox(lane)))))
        return True

    def send(self, name: str) -> None: ...

    def process_reports(self) -> None: ...


def test_the_clock_moves_due_jobs_before_it_wakes_their_lane(settings: Settings, store: Store) -> None:
    """One tick moves a backlog of due jobs bigger than one due.lua call, then wakes the lane."""
    from worker.clock import Clock, ClockConfig
    from worker.store.schedule import MOVE_CHUNK

    store.schedule("bulk", [(b'{"to":"41790000001","text":"x"}', None, 1)] * (MOVE_CHUNK + 7), state_ttl_s=3600,
                   idempotency_ttl_s=60)
    wakes = _Wakes(store)
    clock = Clock(ClockConfig.from_settings(settings), store, wakes)  # type: ignore[arg-type]
    assert clock.tick()
    assert store.r.xlen(store.outbox("bulk")) == MOVE_CHUNK + 7
    assert wakes.seen == [("otp", 0), ("bulk", MOVE_CHUNK + 7)], "bulk is woken with its due jobs in the outbox"


def test_cancel_racing_the_clock_and_a_dispatcher_never_both_win(store: Store) -> None:
    """A job just due: one thread moves it and submits it (the clock, then a dispatcher), another
    cancels it, 150 times. Cancelled after the move (QUEUED) is fine; cancelled and submitted never."""
    for n in range(150):
        store.r.flushdb()
        [(mid, _)] = store.schedule("bulk", [(b'{"to":"41790000001","text":"x"}', None, 1)], state_ttl_s=3600,
                                    idempotency_ttl_s=60)
        go = threading.Barrier(2)
        results: dict[str, Any] = {}

        def clock_and_dispatcher(results: dict[str, Any] = results, go: threading.Barrier = go) -> None:
            go.wait()
            store.move_due("bulk", state_ttl_s=3600)
            entries = _claim(store, "bulk")
            results["submit"] = _submit(store, "bulk", entries)[0] if entries else None

        def canceller(results: dict[str, Any] = results, go: threading.Barrier = go, mid: str = mid) -> None:
            go.wait()
            results["cancel"] = cancel(store, CONFIG, message_id=mid)

        threads = [threading.Thread(target=clock_and_dispatcher), threading.Thread(target=canceller)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        submitted = results["submit"] in (SubmitAnswer.NEW, SubmitAnswer.QUEUED)
        assert submitted != results["cancel"].cancelled, f"round {n}: {results}"
        if not submitted:  # cancelled while scheduled (never moved) or once QUEUED (its entry only acknowledged)
            assert results["submit"] in (None, SubmitAnswer.SETTLED)


def test_redis_out_of_memory_schedules_whole_chunks_and_says_which(store: Store, outbox: Outbox) -> None:
    """Under `maxmemory` with noeviction Redis refuses a schedule.lua call before its first write:
    EnqueueIncomplete answers the jobs of the chunks written, None for the others, and no job is
    half written (a hash without its schedule member, or a member without its hash)."""
    from worker.errors import EnqueueIncomplete

    text = "x" * 1500
    jobs = [{"to": "41790000001", "text": text, "id": f"oom-{i}", "send_at": _at(600)} for i in range(800)]
    used = int(store.r.info("memory")["used_memory"])
    store.r.config_set("maxmemory-policy", "noeviction")
    store.r.config_set("maxmemory", used + 700_000)
    try:
        with pytest.raises(EnqueueIncomplete) as refused:
            outbox.enqueue_many(jobs, "bulk")
    finally:
        store.r.config_set("maxmemory", 0)
    answers = refused.value.queued
    written = [a for a in answers if a is not None]
    assert 0 < len(written) < len(jobs) and len(written) % 100 == 0, "whole chunks of 100"
    assert answers[: len(written)] == written, "the chunks before the refused one"
    members = {m.decode() for m in store.r.zrange(store.scheduled("bulk"), 0, -1)}
    assert members == {mid for mid, _ in written}
    assert all(store.message(mid)["state"] == State.SCHEDULED for mid in members)
    assert len(list(store.r.scan_iter(match=store.msg("*")))) == len(written)
    retry = outbox.enqueue_many(jobs, "bulk")  # producer ids make the retry safe
    assert [r.duplicate for r in retry] == [a is not None for a in answers]
    assert store.r.zcard(store.scheduled("bulk")) == len(jobs)


def test_cancel_refuses_look_alike_and_hostile_ids(store: Store, outbox: Outbox) -> None:
    """An id that only resembles a queued message's (a trailing newline, a huge id) or a record in a
    state this version does not know is never cancelled."""
    queued = outbox.enqueue({"to": "41790000001", "text": "a"}, "bulk")
    for fake in (queued.message_id + "\n", "\n" + queued.message_id, queued.message_id + "0" * 600):
        assert cancel(store, CONFIG, message_id=fake).outcome is CancelOutcome.UNKNOWN, repr(fake)
    store.r.hset(store.msg("sw-bulk-odd"), mapping={"state": "FROM_THE_FUTURE", "lane": "bulk", "job": "{}"})
    odd = cancel(store, CONFIG, message_id="sw-bulk-odd")
    assert odd.outcome is CancelOutcome.NOT_CANCELLABLE and "does not know" in odd.describe()
    assert _events(store) == [] and store.r.hget(store.msg("sw-bulk-odd"), "state") == b"FROM_THE_FUTURE"
    [entry] = _claim(store, "bulk")
    assert _submit(store, "bulk", [entry]) == [SubmitAnswer.NEW], "the real message is still sent"
