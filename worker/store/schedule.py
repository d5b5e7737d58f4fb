"""Scheduled sends and cancel: the lanes' schedules (jobs held until their send_at) and the one atomic cancel.

A scheduled job lives in Redis only: its message hash (state SCHEDULED, the job, `due_ms`) and its
member in `{p}:scheduled:{lane}` scored by the due time. `move_due` (due.lua, run by the clock every
tick) appends each due job to its lane's outbox and makes it QUEUED in one atomic step per call.

Cancel (`cancel_steps`, driven by `ScheduleOps.cancel`, or by any other client such as an asyncio
one) reads the message, builds its `cancelled` event from what it read, and lets cancel.lua decide:
the message is cancelled only if its state is still the one read (SCHEDULED, QUEUED, or no record
while its entry is still in the outbox). The dispatcher's submit.lua decides on the same hash, so
exactly one of them wins: a cancelled message is never POSTed, and one already SUBMITTING is not
cancelled.
"""

from __future__ import annotations

import itertools
import re
import secrets
import time
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, cast

import redis

from worker import events
from worker.errors import EnqueueIncomplete, StoreError
from worker.models import State, lenient_job
from worker.store import resp
from worker.store.base import SCRIPT_CHUNK, StoreBase, load_script
from worker.store.keys import Keys
from worker.store.outbox import DISPATCH_GROUP, Entry, campaign_spec

# Due jobs moved per due.lua call: one call holds Redis for well under a millisecond.
MOVE_CHUNK = 500
# A message id given at enqueue carries the producer's clock; its entry id the server's. Cancel
# looks for such an entry this far around that time (clock skew between hosts) ...
LOOKUP_BEFORE_MS = 5_000
LOOKUP_AFTER_MS = 60_000
# ... reading at most this many entries (a cancel must not walk a backlog of millions).
LOOKUP_MAX_ENTRIES = 100_000
_LOOKUP_PAGE = 1000
CANCEL_TRIES = 5
MESSAGE_ID_MAX = 512

CANCEL_LUA = load_script("cancel")
SCHEDULE_LUA = load_script("schedule")
CANCELLABLE = frozenset({State.SCHEDULED, State.QUEUED})
_STATES = frozenset(State)


class CancelOutcome(StrEnum):
    """What a cancel did."""

    CANCELLED = "cancelled"  # it will never be sent; a `cancelled` event was published
    NOT_CANCELLABLE = "not_cancellable"  # it is past the point of no return (`state` says where); nothing changed
    UNKNOWN = "unknown"  # no such message (or producer id) here, or its records have expired


@dataclass(frozen=True, slots=True)
class CancelAnswer:
    """The answer to one cancel: which message, what happened, and the state it is in now."""

    outcome: CancelOutcome
    message_id: str | None
    state: State | None
    producer_id: str | None = None

    @property
    def cancelled(self) -> bool:
        return self.outcome is CancelOutcome.CANCELLED

    def describe(self) -> str:
        """One plain sentence for people (the CLI prints it)."""
        who = self.message_id or f"producer id {self.producer_id!r}"
        if self.outcome is CancelOutcome.CANCELLED:
            return f"{who}: cancelled; it will not be sent"
        if self.outcome is CancelOutcome.UNKNOWN:
            return f"{who}: unknown (never queued here, or its records have expired); nothing changed"
        if self.state is None:
            return f"{who}: not cancelled, its record holds a state this version does not know"
        return f"{who}: not cancelled, it is already {self.state.value}" + _AFTER.get(self.state, "")


_AFTER = {
    State.SUBMITTING: " (being sent now)",
    State.AMBIGUOUS: " (an attempt may have reached the provider; it is being reconciled)",
    State.CANCELLED: " (cancelled earlier)",
}


Command = tuple[Any, ...]
# A sans-I/O cancel: yields one Redis command at a time, is sent each reply, returns the answer.
CancelSteps = Generator[Command, Any, CancelAnswer]


def cancel_steps(keys: Keys, *, message_id: str | None = None, producer_id: str | None = None,
                 events_maxlen: int, state_ttl_s: int) -> CancelSteps:
    """The commands of one cancel, by message id or producer id (exactly one). Any client can drive
    it (`ScheduleOps.cancel` with redis-py; an asyncio client with redis.asyncio): the decision is
    cancel.lua's, so nothing is decided by what a driver does between two commands."""
    if (message_id is None) == (producer_id is None):
        raise ValueError("cancel takes a message id or a producer id")
    if producer_id is not None:
        found = yield ("GET", keys.idem(producer_id))
        if found is None:
            return CancelAnswer(CancelOutcome.UNKNOWN, None, None, producer_id)
        message_id = _text(found)
    assert message_id is not None
    if len(message_id) > MESSAGE_ID_MAX:  # ours are far shorter; a hostile one costs no regex time
        return CancelAnswer(CancelOutcome.UNKNOWN, message_id[:MESSAGE_ID_MAX] + "...", None, producer_id)
    state: State | None = None
    for _ in range(CANCEL_TRIES):
        raw_state, raw_lane, raw_job = yield ("HMGET", keys.msg(message_id), "state", "lane", "job")
        if raw_state is not None and _text(raw_state) not in _STATES:  # not ours to judge: leave it
            return CancelAnswer(CancelOutcome.NOT_CANCELLABLE, message_id, None, producer_id)
        state = None if raw_state is None else State(_text(raw_state))
        entry = ""
        if state is None:
            located = yield from locate_unrecorded(keys, message_id)
            if located is None:
                # A dispatcher may have submitted and settled it (deleting its entry) during the
                # search: submit.lua writes the hash before settle.lua deletes the entry, so a
                # second read sees it, and a message that exists is never answered "unknown".
                if (yield ("EXISTS", keys.msg(message_id))):
                    continue
                return CancelAnswer(CancelOutcome.UNKNOWN, message_id, None, producer_id)
            lane, entry, job = located
        elif state in CANCELLABLE and raw_lane is not None and raw_job is not None:
            lane, job = _text(raw_lane), bytes(raw_job)
        else:
            return CancelAnswer(CancelOutcome.NOT_CANCELLABLE, message_id, state, producer_id)
        event = events.build("cancelled", message_id, lenient_job(job), lane=lane, reason="cancelled")
        reply = yield ("EVAL", CANCEL_LUA, 4, keys.msg(message_id), keys.events, keys.scheduled(lane),
                       keys.outbox(lane), state.value if state else "NONE", message_id, lane, entry, job, event,
                       events_maxlen, state_ttl_s, campaign_spec(job)[1:])
        if _text(reply[0]) == "CANCELLED":
            return CancelAnswer(CancelOutcome.CANCELLED, message_id, State.CANCELLED, producer_id)
        # CHANGED or GONE: the state moved between the read and the script; read it again.
    return CancelAnswer(CancelOutcome.NOT_CANCELLABLE if state else CancelOutcome.UNKNOWN, message_id, state,
                        producer_id)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def locate_unrecorded(keys: Keys, message_id: str) -> Generator[Command, Any, tuple[str, str, bytes] | None]:
    """(lane, entry id, job) of a message with no record yet, from its lane's outbox, or None."""
    prefix = re.escape(f"{keys.mid_prefix}-")
    # fullmatch, not `$`: "sw-bulk-1-1\n" must not find entry 1-1 and cancel a key that is not its message's.
    derived = re.fullmatch(rf"{prefix}(?P<lane>.+)-(?P<entry>\d+-\d+)", message_id)
    if derived is not None:
        lane, entry = derived["lane"], derived["entry"]
        rows = yield ("XRANGE", keys.outbox(lane), entry, entry)
        for _, fields in stream_rows(rows):
            if b"mid" not in fields and b"job" in fields:  # an entry with its own `mid` is another message
                return lane, entry, fields[b"job"]
        return None
    given = re.fullmatch(rf"{prefix}(?P<lane>.+)-(?P<ms>\d+)-p[0-9a-f]+", message_id)
    if given is None:
        return None
    lane, ms = given["lane"], int(given["ms"])
    start, end, read = f"{max(0, ms - LOOKUP_BEFORE_MS)}-0", f"{ms + LOOKUP_AFTER_MS}-18446744073709551615", 0
    while read < LOOKUP_MAX_ENTRIES:
        rows = stream_rows((yield ("XRANGE", keys.outbox(lane), start, end, "COUNT", _LOOKUP_PAGE)))
        for entry_id, fields in rows:
            if fields.get(b"mid") == message_id.encode() and b"job" in fields:
                return lane, entry_id, fields[b"job"]
        if len(rows) < _LOOKUP_PAGE:
            return None
        read += len(rows)
        start = "(" + rows[-1][0]
    return None


def stream_rows(reply: Any) -> list[tuple[str, dict[bytes, bytes]]]:
    """XRANGE's reply as (entry id, fields), whether a client parsed it already or not."""
    rows = []
    for entry_id, fields in reply or []:
        if not isinstance(fields, dict):
            fields = {fields[i]: fields[i + 1] for i in range(0, len(fields), 2)}
        rows.append((_text(entry_id), {bytes(k) if not isinstance(k, str) else k.encode(): v
                                       for k, v in fields.items()}))
    return rows


# (message id, job JSON, producer id, due ms, outbox entry id or "", the campaign the entry was counted
# under at enqueue or None) per job of a schedule.lua call
ScheduleItem = tuple[str, bytes, str | None, int, str, str | None]


def schedule_calls(keys: Keys, lane: str, items: Sequence[ScheduleItem], *, state_ttl_s: int,
                   idempotency_ttl_s: int) -> list[tuple[list[str], list[Any]]]:
    """The (keys, args) of the schedule.lua calls holding `items`, SCRIPT_CHUNK jobs per call."""
    calls = []
    for start in range(0, len(items), SCRIPT_CHUNK):
        call_keys = [keys.scheduled(lane), keys.outbox(lane)]
        args: list[Any] = [state_ttl_s, idempotency_ttl_s, DISPATCH_GROUP, lane]
        for mid, job, pid, due, entry, counted in items[start : start + SCRIPT_CHUNK]:
            call_keys += [keys.msg(mid), keys.idem(pid) if pid is not None else keys.msg(mid)]
            args += [mid, job, due, entry, campaign_spec(job, counted)]
        calls.append((call_keys, args))
    return calls


def scheduled_answers(replies: Sequence[Any]) -> list[tuple[str, str]]:
    """schedule.lua's replies as (message id, answer) per job."""
    return [(_text(mid), _text(answer)) for reply in replies for mid, answer in reply]


def schedule_steps(keys: Keys, lane: str, jobs: Sequence[tuple[bytes, str | None, int]], *, mid_base: str,
                   state_ttl_s: int, idempotency_ttl_s: int) -> Generator[Command, Any, list[tuple[str, bool]]]:
    """`ScheduleOps.schedule` as sans-I/O steps (one EVAL per chunk) for another client, e.g. an
    asyncio one. `mid_base` starts every message id: `{lane prefix}{ms}-p{a tag of this producer}s`,
    then a counter in hex is appended per job (`new_mid_base`)."""
    items = [(f"{mid_base}{n:x}", job, pid, due, "", None) for n, (job, pid, due) in enumerate(jobs)]
    replies = []
    for call_keys, args in schedule_calls(keys, lane, items, state_ttl_s=state_ttl_s,
                                          idempotency_ttl_s=idempotency_ttl_s):
        replies.append((yield ("EVAL", SCHEDULE_LUA, len(call_keys), *call_keys, *args)))
    return [(mid, answer == "SCHEDULED") for mid, answer in scheduled_answers(replies)]


def new_mid_base(keys: Keys, lane: str) -> str:
    """A fresh base for scheduled message ids: unique per call (a random tag), and of the form an
    id given at enqueue has (`{lane prefix}{ms}-p...`), which cancel and lookups recognise."""
    return f"{keys.lane_prefix(lane)}{int(time.time() * 1000)}-p{secrets.token_hex(4)}s"


class ScheduleOps(StoreBase):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._schedule_tag = secrets.token_hex(4)
        self._schedule_counter = itertools.count()

    def schedule(self, lane: str, jobs: Sequence[tuple[bytes, str | None, int]], *, state_ttl_s: int,
                 idempotency_ttl_s: int) -> list[tuple[str, bool]]:
        """Hold (job JSON, producer id, due ms) jobs in the lane's schedule; (message id, newly
        scheduled) per job, False for a producer id queued before (its first message id returned).

        Each schedule.lua call (SCRIPT_CHUNK jobs) is written whole or not at all, one call at a
        time. When Redis refuses a call (out of memory, read-only...) EnqueueIncomplete says which
        jobs were written (`.queued[i]`, None for nothing); a lost connection is a plain StoreError
        (the chunk in flight unknown: retrying is safe for jobs with a producer id)."""
        base = f"{self.lane_prefix(lane)}{int(time.time() * 1000)}-p{self._schedule_tag}s"
        items: list[ScheduleItem] = [(f"{base}{next(self._schedule_counter):x}", job, pid, due, "", None)
                                     for job, pid, due in jobs]
        answers: list[tuple[str, bool] | None] = []
        for call_keys, args in schedule_calls(self, lane, items, state_ttl_s=state_ttl_s,
                                              idempotency_ttl_s=idempotency_ttl_s):
            try:
                reply = self.run("schedule", call_keys, args)
            except StoreError as error:
                if not isinstance(error.__cause__, redis.ResponseError):
                    raise
                answers += [None] * (len(items) - len(answers))
                raise EnqueueIncomplete(f"{error} (scheduling: {sum(a is not None for a in answers)} of "
                                        f"{len(items)} jobs answered)", answers) from error
            answers += [(mid, answer == "SCHEDULED") for mid, answer in scheduled_answers([reply])]
        return cast(list[tuple[str, bool]], answers)

    def schedule_entries(self, lane: str, entries: Sequence[tuple[Entry, str | None, int]], *, state_ttl_s: int,
                         idempotency_ttl_s: int) -> list[str]:
        """Move outbox entries whose job has a future send_at (written with plain XADD) to the
        schedule; per entry "SCHEDULED" (acknowledged and deleted from the outbox), "DUPLICATE", or
        the state of a message that has a record already (the schedule moved it here when due, or
        it was cancelled): that entry is left to the dispatcher."""
        items: list[ScheduleItem] = [(e.message_id, e.job, pid, due, e.entry_id, e.counted) for e, pid, due in entries]
        return [answer for _, answer in self._schedule(lane, items, state_ttl_s, idempotency_ttl_s)]

    def _schedule(self, lane: str, items: Sequence[ScheduleItem], state_ttl_s: int,
                  idempotency_ttl_s: int) -> list[tuple[str, str]]:
        calls = schedule_calls(self, lane, items, state_ttl_s=state_ttl_s, idempotency_ttl_s=idempotency_ttl_s)
        return scheduled_answers(self.run_many("schedule", calls))

    def move_due(self, lane: str, *, state_ttl_s: int, limit: int = MOVE_CHUNK) -> tuple[int, int | None]:
        """Move the lane's due jobs to its outbox (QUEUED); (jobs moved, next due ms or None)."""
        moved, first = self.run("due", [self.scheduled(lane), self.outbox(lane)], [self.msg(""), limit, state_ttl_s])
        return int(moved), (None if int(first) < 0 else int(first))

    def scheduled_counts(self, lanes: Sequence[str]) -> dict[str, tuple[int, int | None]]:
        """lane -> (scheduled jobs, the earliest due ms or None), one round trip."""
        commands: list[tuple[Any, ...]] = []
        for lane in lanes:
            commands += [(b"ZCARD", self.scheduled(lane)), (b"ZRANGE", self.scheduled(lane), 0, 0, b"WITHSCORES")]
        replies = self.pipeline(commands)
        out: dict[str, tuple[int, int | None]] = {}
        for i, lane in enumerate(lanes):
            count, first = replies[2 * i], replies[2 * i + 1]
            if first and isinstance(first[0], list):  # RESP3 pairs
                first = first[0]
            out[lane] = (int(count), int(float(first[1])) if first else None)
        return out

    def cancel(self, *, message_id: str | None = None, producer_id: str | None = None, events_maxlen: int,
               state_ttl_s: int) -> CancelAnswer:
        """Cancel one message that no dispatcher has submitted yet (see `cancel_steps`)."""
        steps = cancel_steps(self, message_id=message_id, producer_id=producer_id, events_maxlen=events_maxlen,
                             state_ttl_s=state_ttl_s)
        reply: Any = None
        with resp.redis_errors():
            try:
                command = steps.send(None)
                while True:
                    reply = self.r.execute_command(*command)
                    command = steps.send(reply)
            except StopIteration as done:
                answer: CancelAnswer = done.value
                return answer
