"""The traffic policy's step in the send path: a lane's guards applied to a claimed batch
(worker/policy.py decides; this runs it against the store).

Before anything is submitted, the rules that need no Redis (countries, number types, parts, UCS-2),
then the suppression list (one SMISMEMBER per batch). The counted rules (velocity, the daily and
campaign caps) are decided and counted by submit.lua itself, in the call that records the messages
as SUBMITTING (worker/lua/lib/guards.lua), and `counted` turns what it stopped into outcomes.
Rejections become REJECTED outcomes the dispatcher settles with the batch (a `rejected` event with
reason and rule); jobs kept for later (a daily cap, a campaign's cap, guards unreadable on a lane
that fails closed) stay pending and come back after a delay; the rest is sent. A lane without any
guard skips all of it.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import structlog

from worker import metrics, numbers
from worker.dispatch.classify import Item, PauseReason, policy_rejected
from worker.dispatch.config import DispatchConfig
from worker.errors import StoreError
from worker.policy import (
    GuardPlan,
    HoldReason,
    LanePolicy,
    Reason,
    examine_all,
    guard_batch,
    plan_counted,
    plan_static,
    plan_unguarded,
    suppression_numbers,
)
from worker.store import Outcome, Store, SubmitAnswer
from worker.store.policy import Budget, GuardBatch, GuardResult

# The send path's logger: these lines belong with the batch's own.
log = structlog.get_logger("worker.dispatch")


@dataclass(slots=True)
class Checked:
    """A batch after the guards that run before submit.lua: what to submit, what they rejected, and
    the counted guards submit.lua applies to `send` (None: the lane has none, or they are skipped)."""

    send: list[Item]
    rejected: list[Outcome] = field(default_factory=list)
    counted: GuardBatch | None = None


class Guard:
    """Every lane's policy, built once per dispatcher."""

    def __init__(self, config: DispatchConfig, store: Store, consumer: str) -> None:
        self.config = config
        self.store = store
        self.consumer = consumer
        self.policies = {lane: LanePolicy.of(lane, cfg) for lane, cfg in config.lanes.items()}
        # What submit.lua takes for a lane's counted rules: the same for every batch of the lane.
        self._guard_args = {lane: store.guard_args(lane, policy.limits(), policy.fail_open)
                            for lane, policy in self.policies.items() if policy.counted}

    def check(self, lane: str, items: list[Item]) -> Checked:
        """The guards before submit: the static rules and the suppression list (held items are
        already released)."""
        policy = self.policies.get(lane)
        if policy is None or not policy.active or not items:
            return Checked(items)
        if policy.suppression_only:
            checked = self._suppressed_only(lane, items)
            if checked is not None:
                return checked
        examined = examine_all(policy, [item.job for item in items])
        suppressed = None
        if policy.suppression:
            try:
                suppressed = self.store.suppressed(suppression_numbers(examined))
            except StoreError as failed:
                plan, rest = plan_static(policy, items, examined, None)
                plan_unguarded(plan, rest, fail_open=policy.fail_open)
                self._unguarded(lane, policy, len(rest), type(failed).__name__, str(failed))
                return Checked(plan.send, self._carry_out(lane, plan))
        plan, rest = plan_static(policy, items, examined, suppressed)
        counted = guard_batch(self._guard_args[lane], rest) if policy.counted and rest else None
        return Checked([item for item, _ in rest], self._carry_out(lane, plan), counted)

    def counted(self, lane: str, answered: Sequence[tuple[Item, SubmitAnswer]], results: Sequence[GuardResult]
                ) -> list[Outcome]:
        """What submit.lua's guards stopped (`answered`: each with its answer) and their result per
        call: the rejections to settle; the held jobs released for later; the loud lines."""
        policy = self.policies[lane]
        failed = [result for result in results if result.error]
        if failed:  # Redis's error names its kind first ("WRONGTYPE Operation against a key ...")
            error = failed[0].error
            self._unguarded(lane, policy, sum(r.decided for r in failed), error.split(" ", 1)[0], error)
        noted = next((r for r in results if r.budget != Budget.UNDER), None)
        if noted is not None:
            self._note_budget(lane, policy, noted, newly=any(r.newly_paused for r in results))
        return self._carry_out(lane, plan_counted(policy, answered))

    def _carry_out(self, lane: str, plan: GuardPlan[Item]) -> list[Outcome]:
        """A plan's rejections as outcomes (with their metrics and log line); its held jobs released."""
        rejected = [policy_rejected(lane, item.entry, item.job, rejection.reason, rejection.rule)
                    for item, rejection in plan.rejected]
        reasons = Counter(rejection.reason for _, rejection in plan.rejected)
        for reason, n in reasons.items():
            metrics.POLICY_REJECTED.labels(lane, reason).inc(n)
        if reasons:
            log.info("policy_rejected", lane=lane, **{str(r): n for r, n in reasons.items()})
        for why, held in plan.held.items():
            self._hold(lane, why, held)
        return rejected

    def _unguarded(self, lane: str, policy: LanePolicy, messages: int, error_class: str, error: str) -> None:
        """Never silent: the guards did not decide these messages (on_guard_error did)."""
        log.error("policy_guard_unavailable", lane=lane, on_guard_error=policy.mode, messages=messages,
                  error_class=error_class, error=error[:200])
        metrics.POLICY_GUARD_ERRORS.labels(lane, policy.mode).inc()

    def _suppressed_only(self, lane: str, items: list[Item]) -> Checked | None:
        """A lane whose only guard is the suppression list (bulk's default): one SMISMEMBER of the
        batch's numbers and nothing built per job unless one is on the list; None when the list
        cannot be read (the general path then applies the lane's on_guard_error). An empty list (a
        deployment that keeps none) costs one SCARD per batch and no number is normalised: a number
        added after it is as one added after the SMISMEMBER would be, too late for this batch."""
        try:
            if self.store.suppression_size() == 0:
                return Checked(items)
            flags = self.store.suppressed([numbers.normal_or_raw(str(item.job.get("to") or "")) for item in items])
        except StoreError:
            return None
        if not any(flags):
            return Checked(items)
        send = [item for item, flag in zip(items, flags, strict=True) if not flag]
        rejected = [policy_rejected(lane, item.entry, item.job, Reason.SUPPRESSED, "suppression")
                    for item, flag in zip(items, flags, strict=True) if flag]
        metrics.POLICY_REJECTED.labels(lane, Reason.SUPPRESSED).inc(len(rejected))
        log.info("policy_rejected", lane=lane, **{str(Reason.SUPPRESSED): len(rejected)})
        return Checked(send, rejected)

    def _note_budget(self, lane: str, policy: LanePolicy, result: GuardResult, *, newly: bool) -> None:
        """The one loud line when a batch finds (or brings) its lane, or its account, at a daily cap
        (an error when this batch paused the lane, `newly`)."""
        resume = []
        account: dict[str, object] = {}
        if result.lane_at_cap or not result.account_at_cap:
            resume.append(f"sms-worker resume --lane {lane} --extra N")
        if result.account_at_cap:
            resume.append(f"sms-worker resume --account {policy.account} --extra N")
            account = {"account": policy.account, "account_messages_today": result.account_messages,
                       "account_parts_today": result.account_parts,
                       "account_cap_messages": policy.account_cap_messages or None,
                       "account_cap_parts": policy.account_cap_parts or None}
        getattr(log, "error" if newly else "info")(
            "lane_budget_paused", lane=lane, messages_today=result.messages, parts_today=result.parts,
            cap_messages=policy.cap_messages or None, cap_parts=policy.cap_parts or None,
            paused_for_s=round(result.pause_ms / 1000), batch_sent=result.budget == Budget.REACHED,
            **account, resume=" and ".join(resume))

    def _hold(self, lane: str, why: HoldReason, items: list[Item]) -> None:
        """Keep jobs pending and bring them back later, like a paused lane's (nothing dropped, no event)."""
        metrics.POLICY_HELD.labels(lane, why).inc(len(items))
        if why == HoldReason.GUARD_UNAVAILABLE:
            delay_ms = int(self.config.outage_pause_s * 1000)
        elif why == HoldReason.BUDGET:
            # Due at once: no claim takes anything while the lane is paused, so they come back the
            # moment the pause ends (midnight, or `resume --extra N`).
            delay_ms = 0
        else:
            delay_ms = self.config.lease_ms  # a campaign over its cap: looked at again a lease later
        if why != HoldReason.BUDGET:
            log.info("policy_held", lane=lane, reason=why, messages=len(items), delay_ms=delay_ms)
        with contextlib.suppress(StoreError):  # unreachable Redis: the lease brings them back anyway
            if why == HoldReason.GUARD_UNAVAILABLE:
                self.store.pause(lane, PauseReason.GUARD_UNAVAILABLE, self.config.outage_pause_s)
            self.store.retry_in(lane, self.consumer, [item.entry_id for item in items], delay_ms,
                                self.config.lease_ms)
