"""The traffic policy: a lane's options -> its rules (`LanePolicy`), and the per-batch decision from
the jobs and the store's answers (pure: no Redis, no clock, no logs).

The dispatcher (worker.dispatch.dispatcher, through worker.dispatch.guarded) runs it for every
claimed batch before anything is sent, in this order, each step only for the jobs the one before let
through:

1. static rules, from the job alone: `countries` (the region of the number itself, by
   `phonenumbers`), `block_number_types` (premium-rate, shared-cost... by default on the lane named
   otp), `max_parts` and `allow_ucs2` (worker.sms_text) -> reasons `country_blocked`,
   `number_type_blocked`, `too_many_parts`, `ucs2_refused`;
2. `suppression` (default on for the lane named bulk): one SMISMEMBER per batch -> `suppressed`;
3. the counted rules, decided and counted inside submit.lua, in the call that records the messages
   as SUBMITTING (worker/lua/lib/guards.lua, one call per SCRIPT_CHUNK messages): the daily spend caps
   (`daily_cap`: messages and parts per UTC day; at a cap the lane pauses with reason `budget`
   until midnight and the batch waits, nothing is dropped), velocity per number and per prefix
   (fixed windows keyed by the window's start, so up to twice a limit can pass across one window
   boundary; a rejected job consumes no quota, an allowed one does even if its POST fails later),
   and `campaign_daily_cap` (a campaign's jobs over it wait, held for a lease and looked at again;
   the lane is not paused) -> reason `velocity` with the rule that fired.
   An account may carry a `daily_cap` too (SMS_ACCOUNTS' `daily_cap`, SMS_ACCOUNT_DAILY_CAP for
   `default`): counted in the same call over every lane of the account (each of them is then
   counted), so it holds across lanes, processes and hosts with the same one-call overshoot.
   At the account's cap the lane whose batch found or reached it pauses `budget`; each other lane of
   the account pauses when its own next batch reaches submit.lua (it is refused there at once, its
   jobs held). Pausing only the caller keeps the atomic call to the keys of one lane and one account,
   never pauses a lane that has nothing to send, never replaces another lane's pause of another
   reason (auth, outage), and holds even while hosts briefly disagree about which lanes an account
   has; a lane with jobs is stopped by its next batch all the same. `sms-worker resume --account A
   --extra N` raises the account's caps for today and lifts the budget pauses of its lanes.

A rejection is final: REJECTED, a `rejected` event with `reason` and `rule`, the entry acknowledged.
When the guards' own state cannot be read (Redis refused the SMISMEMBER or a counter's read), the lane's
`on_guard_error` decides: "open" sends as if allowed (default on otp: a lost login code costs more
than one unchecked SMS), "closed" keeps the batch and pauses the lane briefly with reason
`guard_unavailable` (the default elsewhere). Either way a loud log line and
`sms_policy_guard_errors_total{lane,mode}`.

Only fresh messages are counted (no record yet, or QUEUED and never attempted), in the call that
records them: a retry after an outage, or a takeover of a worker that died before its POST, was
counted when it was first submitted and is neither counted nor refused again.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Generic, NamedTuple, TypeVar

from worker import numbers, sms_text
from worker.settings import DEFAULT_ACCOUNT, LaneConfig
from worker.store.messages import SubmitAnswer
from worker.store.policy import GuardBatch, GuardLimits

# The lanes whose name gives them defaults (the shipped configuration's two lanes).
OTP_LANE, BULK_LANE = "otp", "bulk"
OTP_BLOCKED_TYPES = ("PREMIUM_RATE", "SHARED_COST")


class Reason(StrEnum):
    """Why the policy rejected a job: the `reason` of its `rejected` event and of
    `sms_policy_rejected_total{lane,reason}` (a small fixed set: never a number or an id)."""

    VELOCITY = "velocity"
    COUNTRY_BLOCKED = "country_blocked"
    NUMBER_TYPE_BLOCKED = "number_type_blocked"
    SUPPRESSED = "suppressed"
    TOO_MANY_PARTS = "too_many_parts"
    UCS2_REFUSED = "ucs2_refused"


class HoldReason(StrEnum):
    """Why the policy kept jobs for later (`sms_policy_held_total{lane,reason}`)."""

    BUDGET = "budget"  # the lane is at a daily cap: paused until midnight
    CAMPAIGN_CAP = "campaign_cap"  # the job's campaign is at its daily cap on this lane
    GUARD_UNAVAILABLE = "guard_unavailable"  # the guards' state could not be read (on_guard_error closed)


@dataclass(frozen=True, slots=True)
class Rejection:
    reason: Reason
    rule: str  # the rule that fired, e.g. "velocity.per_number:5/3600s" (the event's `rule`)


@dataclass(frozen=True, slots=True)
class LanePolicy:
    """A lane's rules with the name-dependent defaults resolved."""

    lane: str
    number_limit: int = 0  # velocity per number: at most this many per window (0: off)
    number_window_s: int = 0
    prefix_limit: int = 0
    prefix_window_s: int = 0
    prefix_dropped: int = 0  # digits dropped from the end of the number to make its prefix
    allow_regions: frozenset[str] | None = None
    block_regions: frozenset[str] = frozenset()
    block_types: frozenset[str] = frozenset()
    suppression: bool = False
    max_parts: int | None = None
    allow_ucs2: bool = True
    fail_open: bool = False
    cap_messages: int = 0  # per UTC day (0: no cap)
    cap_parts: int = 0
    campaign_cap: int = 0
    account: str = DEFAULT_ACCOUNT  # the account it sends through, and that account's caps over all its lanes
    account_cap_messages: int = 0
    account_cap_parts: int = 0

    @classmethod
    def of(cls, lane: str, cfg: LaneConfig) -> LanePolicy:
        velocity = cfg.velocity
        per_number = velocity.per_number if velocity else None
        per_prefix = velocity.per_prefix if velocity else None
        countries = cfg.countries
        types = cfg.block_number_types if cfg.block_number_types is not None else (
            list(OTP_BLOCKED_TYPES) if lane == OTP_LANE else [])
        on_error = cfg.on_guard_error or ("open" if lane == OTP_LANE else "closed")
        return cls(
            lane=lane,
            number_limit=per_number.limit if per_number else 0,
            number_window_s=per_number.window_s if per_number else 0,
            prefix_limit=per_prefix.limit if per_prefix else 0,
            prefix_window_s=per_prefix.window_s if per_prefix else 0,
            prefix_dropped=per_prefix.digits_dropped if per_prefix else 0,
            allow_regions=frozenset(countries.allow) if countries and countries.allow is not None else None,
            block_regions=frozenset(countries.block or ()) if countries else frozenset(),
            block_types=frozenset(types),
            suppression=cfg.suppression if cfg.suppression is not None else lane == BULK_LANE,
            max_parts=cfg.max_parts,
            allow_ucs2=cfg.allow_ucs2,
            fail_open=on_error == "open",
            cap_messages=(cfg.daily_cap.messages or 0) if cfg.daily_cap else 0,
            cap_parts=(cfg.daily_cap.parts or 0) if cfg.daily_cap else 0,
            campaign_cap=cfg.campaign_daily_cap or 0,
            account=cfg.account,
            account_cap_messages=(cfg.account_cap.messages or 0) if cfg.account_cap else 0,
            account_cap_parts=(cfg.account_cap.parts or 0) if cfg.account_cap else 0,
        )

    @property
    def needs_number(self) -> bool:
        return bool(self.allow_regions is not None or self.block_regions or self.block_types)

    @property
    def needs_text(self) -> bool:
        return self.max_parts is not None or not self.allow_ucs2 or self.cap_parts > 0 or self.account_cap_parts > 0

    @property
    def account_capped(self) -> bool:
        """Whether the lane's account has a daily cap (every lane of it is then counted)."""
        return bool(self.account_cap_messages or self.account_cap_parts)

    @property
    def counted(self) -> bool:
        """Whether submit.lua counts the lane's batches (velocity or caps, the lane's or its account's)."""
        return bool(self.number_limit or self.prefix_limit or self.cap_messages or self.cap_parts
                    or self.campaign_cap or self.account_capped)

    @property
    def suppression_only(self) -> bool:
        """The bulk lane's default: only the suppression list (the hook then reads nothing else of a job)."""
        return self.suppression and not (self.needs_number or self.needs_text or self.counted)

    @property
    def active(self) -> bool:
        """Whether the lane has any guard at all (a lane without one skips the hook entirely)."""
        return self.needs_number or self.needs_text or self.suppression or self.counted

    @property
    def mode(self) -> str:
        return "open" if self.fail_open else "closed"

    def limits(self) -> GuardLimits:
        return GuardLimits(
            number_limit=self.number_limit, number_window_ms=self.number_window_s * 1000,
            prefix_limit=self.prefix_limit, prefix_window_ms=self.prefix_window_s * 1000,
            cap_messages=self.cap_messages, cap_parts=self.cap_parts, campaign_cap=self.campaign_cap,
            account=self.account if self.account_capped else "",
            account_cap_messages=self.account_cap_messages, account_cap_parts=self.account_cap_parts,
        )

    def describe(self) -> dict[str, Any]:
        """The rules in force, for `sms-worker status` (only those that are on)."""
        rules: dict[str, Any] = {}
        if self.number_limit:
            rules["velocity.per_number"] = f"{self.number_limit}/{self.number_window_s}s"
        if self.prefix_limit:
            rules["velocity.per_prefix"] = (f"{self.prefix_limit}/{self.prefix_window_s}s"
                                            f" (-{self.prefix_dropped} digits)")
        if self.allow_regions is not None:
            rules["countries.allow"] = sorted(self.allow_regions)
        if self.block_regions:
            rules["countries.block"] = sorted(self.block_regions)
        if self.block_types:
            rules["block_number_types"] = sorted(self.block_types)
        if self.suppression:
            rules["suppression"] = True
        if self.max_parts is not None:
            rules["max_parts"] = self.max_parts
        if not self.allow_ucs2:
            rules["allow_ucs2"] = False
        if self.cap_messages or self.cap_parts:
            rules["daily_cap"] = {k: v for k, v in (("messages", self.cap_messages), ("parts", self.cap_parts)) if v}
        if self.campaign_cap:
            rules["campaign_daily_cap"] = self.campaign_cap
        if self.account_capped:
            caps = ", ".join(f"{n:,} {unit}" for unit, n in (("messages", self.account_cap_messages),
                                                                ("parts", self.account_cap_parts)) if n)
            rules["account_daily_cap"] = f"{self.account}: {caps}"
        if rules:
            rules["on_guard_error"] = self.mode
        return rules

    # --- rules named in events -------------------------------------------------------------------
    def number_rule(self) -> str:
        return f"velocity.per_number:{self.number_limit}/{self.number_window_s}s"

    def prefix_rule(self) -> str:
        return f"velocity.per_prefix:{self.prefix_limit}/{self.prefix_window_s}s:-{self.prefix_dropped}"


class Examined(NamedTuple):
    """One job as the policy sees it: its number (normalised when it parses), prefix, parts and
    campaign, and the static rule it breaks (None: none). A tuple: a batch makes a thousand."""

    number: str
    prefix: str
    parts: int
    campaign: str
    rejection: Rejection | None = None


def examine(policy: LanePolicy, job: dict[str, Any]) -> Examined:
    """The static rules for one (valid) job: countries, number types, parts, UCS-2."""
    return examine_all(policy, [job])[0]


def examine_all(policy: LanePolicy, jobs: Iterable[dict[str, Any]]) -> list[Examined]:
    """`examine` for each of a batch's jobs, the lane's rules looked up once for the batch (this
    runs for every message sent: microseconds here are a visible share of the send path)."""
    dropped = policy.prefix_dropped if policy.prefix_limit else 0
    prefixed = bool(policy.prefix_limit)
    needs_text, needs_number = policy.needs_text, policy.needs_number
    out = []
    for job in jobs:
        raw = str(job.get("to") or "")
        if needs_number:
            number, region, kind = numbers.screen(raw, policy.block_types)
        else:
            number, region, kind = numbers.normal_or_raw(raw), None, None
        # A number no longer than the digits dropped is its own prefix.
        prefix = (number[:-dropped] if dropped and len(number) > dropped else number) if prefixed else ""
        text = job.get("text")
        parts = 1
        rejection: Rejection | None = None
        if needs_text and isinstance(text, str):
            encoding, parts = sms_text.encoding_and_parts(text)
            if not policy.allow_ucs2 and encoding == sms_text.UCS2:
                rejection = Rejection(Reason.UCS2_REFUSED, "allow_ucs2:false")
            elif policy.max_parts is not None and parts > policy.max_parts:
                rejection = Rejection(Reason.TOO_MANY_PARTS, f"max_parts:{policy.max_parts}")
        if rejection is None and needs_number:
            rejection = _number_rule(policy, region, kind)
        campaign = job.get("campaign_reference_id")
        out.append(Examined(number, prefix, parts, campaign if isinstance(campaign, str) else "", rejection))
    return out


def _number_rule(policy: LanePolicy, region: str | None, kind: str | None) -> Rejection | None:
    """The country and number-type rules, from the number's region and its blocked type (None: none)."""
    if policy.allow_regions is not None and region not in policy.allow_regions:
        # A number whose region is unknown is not proven allowed: an allow-list refuses it.
        return Rejection(Reason.COUNTRY_BLOCKED, "countries.allow")
    if region is not None and region in policy.block_regions:
        return Rejection(Reason.COUNTRY_BLOCKED, "countries.block")
    if kind is not None:
        return Rejection(Reason.NUMBER_TYPE_BLOCKED, f"block_number_types:{kind}")
    return None


T = TypeVar("T")


@dataclass(slots=True)
class GuardPlan(Generic[T]):
    """What the policy decided for a batch."""

    send: list[T] = field(default_factory=list)
    rejected: list[tuple[T, Rejection]] = field(default_factory=list)
    held: dict[HoldReason, list[T]] = field(default_factory=dict)  # kept for later, by why

    def hold(self, why: HoldReason, item: T) -> None:
        self.held.setdefault(why, []).append(item)


def plan_static(policy: LanePolicy, items: Sequence[T], examined: Sequence[Examined],
                suppressed: Sequence[bool] | None) -> tuple[GuardPlan[T], list[tuple[T, Examined]]]:
    """The static rules and the suppression list: the rejected ones in a plan, and the rest (with
    what was examined) for the counted rules."""
    plan: GuardPlan[T] = GuardPlan()
    rest: list[tuple[T, Examined]] = []
    flags = iter(suppressed) if suppressed is not None else None
    for item, seen in zip(items, examined, strict=True):
        if seen.rejection is not None:
            plan.rejected.append((item, seen.rejection))
            continue
        if flags is not None and next(flags):
            plan.rejected.append((item, Rejection(Reason.SUPPRESSED, "suppression")))
            continue
        rest.append((item, seen))
    return plan, rest


def suppression_numbers(examined: Sequence[Examined]) -> list[str]:
    """The numbers to look up in the suppression list: those of the jobs no static rule rejected,
    in order (plan_static reads the answers in the same order)."""
    return [seen.number for seen in examined if seen.rejection is None]


def guard_batch(args: list[object], rest: Sequence[tuple[Any, Examined]]) -> GuardBatch:
    """The messages left for the counted rules, as submit.lua takes them (`args`: the lane's)."""
    return GuardBatch(args, [seen.number for _, seen in rest], [seen.prefix for _, seen in rest],
                      [seen.parts for _, seen in rest], [seen.campaign for _, seen in rest])


# submit.lua's answers for the messages its guards stopped (worker/lua/lib/guards.lua).
_HOLDS = {SubmitAnswer.CAMPAIGN: HoldReason.CAMPAIGN_CAP, SubmitAnswer.BUDGET: HoldReason.BUDGET,
          SubmitAnswer.GUARD_ERROR: HoldReason.GUARD_UNAVAILABLE}


def plan_counted(policy: LanePolicy, stopped: Iterable[tuple[T, SubmitAnswer]]) -> GuardPlan[T]:
    """The messages submit.lua's guards did not record, as a plan: velocity rejections, and the jobs
    kept for later (a daily cap, a campaign at its cap, guards unreadable on a lane that fails closed)."""
    plan: GuardPlan[T] = GuardPlan()
    for item, answer in stopped:
        if answer == SubmitAnswer.NUMBER:
            plan.rejected.append((item, Rejection(Reason.VELOCITY, policy.number_rule())))
        elif answer == SubmitAnswer.PREFIX:
            plan.rejected.append((item, Rejection(Reason.VELOCITY, policy.prefix_rule())))
        else:
            plan.hold(_HOLDS[answer], item)
    return plan


def plan_unguarded(plan: GuardPlan[T], rest: Sequence[tuple[T, Examined]], *, fail_open: bool) -> GuardPlan[T]:
    """The guards could not be read: send the rest (open) or keep it (closed)."""
    for item, _ in rest:
        if fail_open:
            plan.send.append(item)
        else:
            plan.hold(HoldReason.GUARD_UNAVAILABLE, item)
    return plan
