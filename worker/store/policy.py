"""A lane's counted traffic-policy guards: velocity, daily spend caps (the lane's and its account's)
and campaign caps (policy.lua), one call per batch; and the reads and the one write (`resume --extra`)
of the day's spend, per lane and per account."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from worker.store import resp
from worker.store.base import StoreBase


class GuardAnswer(StrEnum):
    """policy.lua's answer for one message (see its header: each comes as its first letter)."""

    OK = "OK"  # allowed, and counted
    SEEN = "SEEN"  # attempted before (counted then): allowed, not counted again
    NUMBER = "NUMBER"  # over the per-number velocity rule: not counted
    PREFIX = "PREFIX"  # over the per-prefix velocity rule: not counted
    CAMPAIGN = "CAMPAIGN"  # its campaign is at its cap today: not counted, hold it


class Budget(StrEnum):
    UNDER = "under"  # under every cap: the batch was counted
    REFUSED = "refused"  # at or over a cap (the lane's or its account's) already: nothing counted, the lane is paused
    REACHED = "reached"  # this batch was counted and reached a cap: the lane is paused after it


_BUDGET = {0: Budget.UNDER, 1: Budget.REFUSED, 2: Budget.REACHED}
# policy.lua answers a letter per message, all in one string: the first letter of each answer's name.
_ANSWERS = {ord(answer.value[0]): answer for answer in GuardAnswer}


@dataclass(frozen=True, slots=True)
class GuardBatch:
    """A batch's messages as policy.lua counts them: a list per field, in the batch's order (one
    object per batch, not one per message)."""

    message_ids: list[str]
    numbers: list[str]  # normalised
    prefixes: list[str]  # "" each when the lane has no prefix rule
    parts: list[int]
    campaigns: list[str]  # "" for none


@dataclass(frozen=True, slots=True)
class GuardLimits:
    """A lane's counted rules, 0 for off (windows in ms)."""

    number_limit: int = 0
    number_window_ms: int = 0
    prefix_limit: int = 0
    prefix_window_ms: int = 0
    cap_messages: int = 0
    cap_parts: int = 0
    campaign_cap: int = 0
    account: str = ""  # the lane's account when that account has a daily cap ("": none, nothing counted for it)
    account_cap_messages: int = 0
    account_cap_parts: int = 0


@dataclass(frozen=True, slots=True)
class GuardResult:
    budget: Budget
    day: int  # UTC days since the epoch, on the Redis server's clock
    messages: int  # the lane's messages counted today, this batch included
    parts: int
    pause_ms: int  # for a budget pause: until the next UTC midnight
    answers: list[GuardAnswer] = field(default_factory=list)  # empty when REFUSED
    newly_paused: bool = False  # this call paused the lane (its budget pause's one loud log line)
    account_messages: int = 0  # the account's messages counted today over all its lanes (0: no account cap)
    account_parts: int = 0
    lane_at_cap: bool = False  # which caps are reached (REFUSED, REACHED): the lane's own,
    account_at_cap: bool = False  # its account's, or both


@dataclass(frozen=True, slots=True)
class Spend:
    """A lane's spend on one UTC day."""

    day: int
    messages: int
    parts: int
    extra: int  # added to each cap by `sms-worker resume --extra N`

    def at_cap(self, cap_messages: int, cap_parts: int) -> bool:
        """Whether this spend has reached caps of `cap_messages` / `cap_parts` (0: no cap), as policy.lua decides."""
        return bool((cap_messages and self.messages >= cap_messages + self.extra)
                    or (cap_parts and self.parts >= cap_parts + self.extra))


class PolicyOps(StoreBase):
    def guard(self, lane: str, batch: GuardBatch, limits: GuardLimits) -> GuardResult:
        """Decide and count a batch's counted guards in one policy.lua call (one round trip)."""
        args: list[object] = [
            self.policy_prefix(lane), self.pause_key(lane), limits.number_limit, limits.number_window_ms,
            limits.prefix_limit, limits.prefix_window_ms, limits.cap_messages, limits.cap_parts, limits.campaign_cap,
            self.account_policy_prefix(limits.account) if limits.account else "",
            limits.account_cap_messages, limits.account_cap_parts,
        ]
        args += itertools.chain.from_iterable(zip(batch.numbers, batch.prefixes, batch.parts, batch.campaigns,
                                                  strict=True))
        budget, day, messages, parts, pause_ms, answers, newly, acct_messages, acct_parts, reached = self.run(
            "policy", [self.msg(mid) for mid in batch.message_ids], args)
        return GuardResult(_BUDGET[int(budget)], int(day), int(messages), int(parts), int(pause_ms),
                           [_ANSWERS[a] for a in answers], bool(newly), int(acct_messages),
                           int(acct_parts), lane_at_cap=bool(int(reached) & 1), account_at_cap=bool(int(reached) & 2))

    def spend_today(self, lanes: Sequence[str]) -> dict[str, Spend]:
        """Each lane's spend on the server's current UTC day (for status and the metrics)."""
        return self._spend(lanes, self.budget_key)

    def account_spend_today(self, accounts: Sequence[str]) -> dict[str, Spend]:
        """Each account's spend over all its lanes on the server's current UTC day (capped accounts only
        are counted: another one reads as nothing spent)."""
        return self._spend(accounts, self.account_budget_key)

    def _spend(self, names: Sequence[str], key: Callable[[str, int], str]) -> dict[str, Spend]:
        if not names:
            return {}
        day = self._server_day()
        with resp.redis_errors():
            pipe = self.r.pipeline(transaction=False)
            for name in names:
                pipe.hmget(key(name, day), "messages", "parts", "extra")
            replies = pipe.execute()
        return {name: Spend(day, *(int(v or 0) for v in reply)) for name, reply in zip(names, replies, strict=True)}

    def raise_budget(self, lane: str, extra: int) -> Spend:
        """Raise today's caps of `lane` by `extra` (each: messages and parts); the day's spend after it."""
        return self._raise(lane, extra, self.budget_key)

    def raise_account_budget(self, account: str, extra: int) -> Spend:
        """Raise today's caps of `account` (over all its lanes) by `extra` each; the day's spend after it."""
        return self._raise(account, extra, self.account_budget_key)

    def _raise(self, name: str, extra: int, key_of: Callable[[str, int], str]) -> Spend:
        day = self._server_day()
        key = key_of(name, day)
        with resp.redis_errors():
            pipe = self.r.pipeline(transaction=True)
            pipe.hincrby(key, "extra", extra)
            pipe.expire(key, 2 * 86400)
            pipe.hmget(key, "messages", "parts", "extra")
            reply = pipe.execute()[-1]
        return Spend(day, *(int(v or 0) for v in reply))

    def _server_day(self) -> int:
        """Today as policy.lua counts it: UTC days since the epoch on the Redis server's clock."""
        with resp.redis_errors():
            seconds, _ = self.r.time()
        return int(seconds) // 86400
