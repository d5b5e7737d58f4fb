"""A lane's counted traffic-policy guards: velocity, daily spend caps (the lane's and its account's)
and campaign caps, as submit.lua takes them and answers (worker/lua/lib/guards.lua: decided and
counted in the call that records the messages as SUBMITTING); and the reads and the one write
(`resume --extra`) of the day's spend, per lane and per account."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from worker.store import resp
from worker.store.base import StoreBase


class Budget(StrEnum):
    UNDER = "under"  # under every cap: the batch was counted
    REFUSED = "refused"  # at or over a cap (the lane's or its account's) already: nothing counted, the lane is paused
    REACHED = "reached"  # this batch was counted and reached a cap: the lane is paused after it


_BUDGET = {0: Budget.UNDER, 1: Budget.REFUSED, 2: Budget.REACHED}


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
class GuardBatch:
    """A batch's counted guards as submit.lua applies them: the lane's rules and on_guard_error
    (`PolicyOps.guard_args`, the same for every batch of the lane), and per message (in the order
    the batch is submitted) what the rules count: a list per field, one object per batch."""

    args: list[object]
    numbers: list[str]  # normalised
    prefixes: list[str]  # "" each when the lane has no prefix rule
    parts: list[int]
    campaigns: list[str]  # "" for none


@dataclass(frozen=True, slots=True)
class GuardResult:
    """The guards' answer for one submit.lua call (its reply's head, see guards.lua)."""

    budget: Budget
    day: int  # UTC days since the epoch, on the Redis server's clock
    messages: int  # the lane's messages counted today, this call included
    parts: int
    pause_ms: int  # for a budget pause: until the next UTC midnight
    newly_paused: bool = False  # this call paused the lane (its budget pause's one loud log line)
    account_messages: int = 0  # the account's messages counted today over all its lanes (0: no account cap)
    account_parts: int = 0
    lane_at_cap: bool = False  # which caps are reached (REFUSED, REACHED): the lane's own,
    account_at_cap: bool = False  # its account's, or both
    error: str = ""  # Redis refused a read of the guards' state: nothing was counted (on_guard_error decides)
    decided: int = 0  # the messages of the call

    @classmethod
    def from_head(cls, head: Sequence[Any]) -> GuardResult:
        budget, day, messages, parts, pause_ms, newly, acct_messages, acct_parts, reached, error, decided = head
        return cls(_BUDGET[int(budget)], int(day), int(messages), int(parts), int(pause_ms), bool(newly),
                   int(acct_messages), int(acct_parts), lane_at_cap=bool(int(reached) & 1),
                   account_at_cap=bool(int(reached) & 2), error=error.decode(errors="replace"),
                   decided=int(decided))


@dataclass(frozen=True, slots=True)
class Spend:
    """A lane's spend on one UTC day."""

    day: int
    messages: int
    parts: int
    extra: int  # added to each cap by `sms-worker resume --extra N`

    def at_cap(self, cap_messages: int, cap_parts: int) -> bool:
        """Whether this spend has reached caps of `cap_messages` / `cap_parts` (0: no cap), as guards.lua decides."""
        return bool((cap_messages and self.messages >= cap_messages + self.extra)
                    or (cap_parts and self.parts >= cap_parts + self.extra))


class PolicyOps(StoreBase):
    def guard_args(self, lane: str, limits: GuardLimits, fail_open: bool) -> list[object]:
        """The 13 arguments of a lane's counted guards in a submit.lua call (guards.lua's header)."""
        return [
            self.policy_prefix(lane), self.pause_key(lane), limits.number_limit, limits.number_window_ms,
            limits.prefix_limit, limits.prefix_window_ms, limits.cap_messages, limits.cap_parts, limits.campaign_cap,
            self.account_policy_prefix(limits.account) if limits.account else "",
            limits.account_cap_messages, limits.account_cap_parts, "open" if fail_open else "closed",
        ]

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
        """Today as guards.lua counts it: UTC days since the epoch on the Redis server's clock."""
        with resp.redis_errors():
            seconds, _ = self.r.time()
        return int(seconds) // 86400
