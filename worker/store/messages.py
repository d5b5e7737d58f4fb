"""Message hashes through their life: producer-id claims, submit under a fence, the absent verdicts
of reconciliation, settle with its events and dead letters."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from worker.models import State
from worker.store import resp
from worker.store.base import SCRIPT_CHUNK, StoreBase
from worker.store.outbox import DISPATCH_GROUP, Entry, campaign_spec
from worker.store.policy import GuardBatch, GuardResult

# A takeover waits this long past a SUBMITTING message's send_by before reconciling it: a request
# written just before the deadline is on its way, and a batch's submit calls (one per SCRIPT_CHUNK)
# set its fence a few ms apart.
FENCE_MARGIN_MS = 1000


class SubmitAnswer(StrEnum):
    """submit.lua's answer for one message (see its header): what the dispatcher does with it."""

    NEW = "NEW"  # no record yet: now SUBMITTING under the batch's fence; send it
    QUEUED = "QUEUED"  # was QUEUED (not sent, certainly): now SUBMITTING under the fence; send it
    WAIT = "WAIT"  # SUBMITTING and its owner may still write the request: look again after wait_ms
    BUSY = "BUSY"  # another consumer holds its reconciliation lease: leave it alone
    SUBMITTING = "SUBMITTING"  # a previous attempt may have been sent: we hold the lease; reconcile it
    AMBIGUOUS = "AMBIGUOUS"  # likewise
    SETTLED = "SETTLED"  # in any other state (settled already): only its outbox entry is acknowledged
    # A lane's counted guards (worker/lua/lib/guards.lua); the message is not recorded:
    NUMBER = "NUMBER"  # fresh and over the per-number velocity rule: rejected
    PREFIX = "PREFIX"  # fresh and over the per-prefix velocity rule: rejected
    CAMPAIGN = "CAMPAIGN"  # fresh and its campaign is at its daily cap: held
    BUDGET = "BUDGET"  # its call found the lane (or its account) at a daily cap: held, the lane is paused
    GUARD_ERROR = "GUARD_ERROR"  # the guards' state could not be read, on a lane that fails closed: held


# The answers of the messages a lane's counted guards stopped (the dispatcher hands them to the policy).
GUARD_ANSWERS = frozenset({SubmitAnswer.NUMBER, SubmitAnswer.PREFIX, SubmitAnswer.CAMPAIGN, SubmitAnswer.BUDGET,
                           SubmitAnswer.GUARD_ERROR})


class AbsentVerdict(StrEnum):
    """absent.lua's verdict on one message missing from the provider's logs (see its header)."""

    RESEND = "RESEND"  # absent in enough checks over the window: SUBMITTING under the new fence; resend it
    WAIT = "WAIT"  # AMBIGUOUS, absence recorded: check again after wait_ms
    EXHAUSTED = "EXHAUSTED"  # a resend would pass the attempts limit: dead-letter it
    STALE = "STALE"  # no longer ours (lease lost, or the state moved on): leave it alone


@dataclass(frozen=True, slots=True)
class Submitted:
    """submit.lua's answer for one message, its attempts so far, and for WAIT how long."""

    state: SubmitAnswer
    attempts: int
    wait_ms: int = 0


@dataclass(frozen=True, slots=True)
class Verdict:
    """absent.lua's verdict for one message, its attempts (one more for RESEND/EXHAUSTED), and for WAIT
    how long."""

    state: AbsentVerdict
    attempts: int
    wait_ms: int = 0


@dataclass(slots=True)
class Outcome:
    """What settle.lua records for one message.

    `guard` makes an outcome that is our own decision (not sent, ambiguous, given up) conditional on
    still owning the message: "f:<fence>" (the batch's fence is still the message's) or "c:<consumer>"
    (we still hold its reconciliation lease); "" for the provider's facts (accepted, rejected).

    `ack_only` (made by `Outcome.acknowledge`, `state` None): no state change at all, the outbox
    entry is only acknowledged — its message was settled already, or it repeats a producer id.

    `campaign` is the entry's campaign spec (`campaign_spec`): read for a message with no record
    yet (it is recorded under its campaign), and for an acknowledged repeat the producer API counted
    (it leaves the campaign's counts)."""

    message_id: str
    entry_id: str
    state: State | None
    ack: bool
    event: bytes = b""
    deadline_ms: int | None = None
    fields: dict[str, str | int] | None = None
    dead_letter: bytes = b""
    guard: str = ""
    ack_only: bool = False
    campaign: str = ""

    def __post_init__(self) -> None:
        if self.ack_only != (self.state is None):
            raise ValueError("an outcome has a state unless it only acknowledges its entry")

    @classmethod
    def acknowledge(cls, message_id: str, entry_id: str, *, repeat_of: Entry | None = None) -> Outcome:
        """Acknowledge (and delete) the outbox entry, and change nothing else; `repeat_of`: the entry
        repeats a producer id (a counted one leaves its campaign's counts)."""
        spec = "1" + repeat_of.counted if repeat_of is not None and repeat_of.counted else ""
        return cls(message_id, entry_id, None, ack=True, ack_only=True, campaign=spec)


class MessageOps(StoreBase):
    def claim_producer_ids(self, pairs: Sequence[tuple[str, str]], ttl_s: int) -> list[str]:
        """(producer id, message id) pairs -> the message id that owns each producer id.

        The first message to claim a producer id owns it for `ttl_s`; a later one gets the
        owner's message id back and is a repeat.
        """
        if not pairs:
            return []
        earlier = self.pipeline(
            [(b"SET", self.idem(pid), mid, b"NX", b"GET", b"EX", ttl_s) for pid, mid in pairs]
        )
        return [mid if prev is None else prev.decode() for prev, (_, mid) in zip(earlier, pairs, strict=True)]

    def submit(
        self, lane: str, items: Sequence[Entry], *, consumer: str, lease_ms: int, state_ttl_s: int, fence: str,
        send_window_ms: int, margin_ms: int = FENCE_MARGIN_MS,
    ) -> list[Submitted]:
        """Mark messages SUBMITTING under the batch's fence before their POST (submit.lua)."""
        answers, _ = self.submit_guarded(lane, items, None, consumer=consumer, lease_ms=lease_ms,
                                         state_ttl_s=state_ttl_s, fence=fence, send_window_ms=send_window_ms,
                                         margin_ms=margin_ms)
        return answers

    def submit_guarded(
        self, lane: str, items: Sequence[Entry], guards: GuardBatch | None, *, consumer: str, lease_ms: int,
        state_ttl_s: int, fence: str, send_window_ms: int, margin_ms: int = FENCE_MARGIN_MS,
    ) -> tuple[list[Submitted], list[GuardResult]]:
        """`submit`, with the lane's counted guards decided and counted in the same calls (None: the
        lane has none): the answers, and the guards' result of each call (one per SCRIPT_CHUNK)."""
        if guards is not None and len(guards.numbers) != len(items):
            raise ValueError(f"the guards count {len(guards.numbers)} messages of a batch of {len(items)}")
        calls = []
        head = guards.args if guards is not None else []
        for start in range(0, len(items), SCRIPT_CHUNK):
            chunk = items[start : start + SCRIPT_CHUNK]
            args: list[Any] = [state_ttl_s, consumer, lease_ms, fence, send_window_ms, margin_ms, len(head), *head]
            if guards is None:
                for e in chunk:
                    args += [lane, e.entry_id, e.job, campaign_spec(e.job, e.counted)]
            else:
                for k, e in enumerate(chunk, start):
                    args += [lane, e.entry_id, e.job, campaign_spec(e.job, e.counted),
                             guards.numbers[k], guards.prefixes[k], guards.parts[k], guards.campaigns[k]]
            calls.append(([self.fence_key(fence), *(self.msg(e.message_id) for e in chunk)], args))
        replies = self.run_many("submit", calls)
        answers = [Submitted(SubmitAnswer(state.decode()), int(n), int(wait))
                   for _, reply in replies for state, n, wait in reply]
        return answers, [GuardResult.from_head(head) for head, _ in replies if head]

    def fences_alive(self, fences: Sequence[str]) -> bool:
        """True while every one of these fences still lives: their batches may still write requests."""
        keys = {self.fence_key(f) for f in fences}
        with resp.redis_errors():
            return int(self.r.exists(*keys)) == len(keys)

    def absent(
        self, items: Sequence[Entry], *, consumer: str, checks: int, window_ms: int, fence: str, send_window_ms: int,
        max_attempts: int,
    ) -> list[Verdict]:
        """The verdict on messages missing from the provider's logs (absent.lua): RESEND (under the
        new fence), WAIT, EXHAUSTED or STALE, with attempts and the wait."""
        calls = []
        for start in range(0, len(items), SCRIPT_CHUNK):
            chunk = items[start : start + SCRIPT_CHUNK]
            calls.append(([self.fence_key(fence), *(self.msg(e.message_id) for e in chunk)],
                          [consumer, checks, window_ms, fence, send_window_ms, max_attempts]))
        return [Verdict(AbsentVerdict(state.decode()), int(n), int(wait)) for reply in self.run_many("absent", calls)
                for state, n, wait in reply]

    def renew_checks(self, message_ids: Sequence[str], consumer: str, lease_ms: int) -> int:
        """Extend this consumer's reconciliation leases on these messages; how many it still held."""
        calls = [([self.msg(m) for m in message_ids[start : start + SCRIPT_CHUNK]], [consumer, lease_ms])
                 for start in range(0, len(message_ids), SCRIPT_CHUNK)]
        return sum(int(n) for n in self.run_many("check_renew", calls)) if calls else 0

    def settle(self, lane: str, outcomes: Sequence[Outcome], *, now_ms: int, events_maxlen: int,
               state_ttl_s: int) -> list[bool]:
        """Record outcomes with their events (settle.lua); returns whether each was applied."""
        calls = []
        for start in range(0, len(outcomes), SCRIPT_CHUNK):
            keys = [self.outbox(lane), self.events, self.awaiting, self.dlq]
            args: list[Any] = [DISPATCH_GROUP, now_ms, events_maxlen, state_ttl_s]
            for o in outcomes[start : start + SCRIPT_CHUNK]:
                keys.append(self.msg(o.message_id))
                fields = o.fields or {}
                args += [
                    o.message_id, o.entry_id, "" if o.state is None else o.state, "1" if o.ack else "0", o.event,
                    "" if o.deadline_ms is None else o.deadline_ms, o.dead_letter, o.guard, o.campaign, len(fields),
                ]
                for name, value in fields.items():
                    args += [name, value]
            calls.append((keys, args))
        return [bool(x) for reply in self.run_many("settle", calls) for x in reply]

    def message(self, message_id: str) -> dict[str, str]:
        with resp.redis_errors():
            raw = self.r.hgetall(self.msg(message_id))
        return {k.decode(): v.decode() for k, v in raw.items()}
