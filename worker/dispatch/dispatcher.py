"""The Dispatcher: the send path's loop and its I/O — claims, submit, POST, reconciliation, settle.

One Dramatiq message runs `Dispatcher.run(lane)`, which loops over batches for a short budget while
holding one of the lane's dispatcher slots (so at most `concurrency` bulks are in flight per lane).
What becomes of each message is decided in worker.dispatch.classify; this module performs the
decisions. Nothing is ever resent before a reconciliation says the provider does not have it.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import structlog

from worker import events, metrics
from worker.dispatch.classify import (
    GUARDED,
    Decision,
    Item,
    RetryIn,
    accepted,
    classify_error,
    classify_response,
    give_up,
    plan_absent,
    plan_submitted,
)
from worker.dispatch.config import LISTEN_SLICE_MS, RUN_BUDGET_S, DispatchConfig, Route
from worker.dispatch.counts import count_settled, note_verdicts
from worker.dispatch.guarded import Guard
from worker.dispatch.jobs import later_than, parse_job
from worker.errors import ProviderError
from worker.models import State, lenient_job
from worker.provider import Provider, wire_message_from_dict, wire_request
from worker.ratelimit import RateLimiter
from worker.settings import DEFAULT_ACCOUNT, LaneConfig
from worker.sms_text import sms_parts
from worker.store import Claim, ClaimKind, Entry, Outcome, Store

# The logger keeps the name it had when the send path was one module.
log = structlog.get_logger("worker.dispatch")


class Wake(Protocol):
    """What the dispatcher asks of the rest of the system (worker.triggers.Triggers in production)."""

    def dispatch(self, lane: str, delay_ms: int = 0) -> object: ...

    def reconcile(self, lane: str, entry_ids: Sequence[str], delay_ms: int) -> None: ...


@dataclass(slots=True)
class _Batch:
    """One claimed batch on its way: the outcomes decided so far and what is left to do after settle."""

    lane: str
    outcomes: list[Outcome] = field(default_factory=list)
    retry_in: list[RetryIn] = field(default_factory=list)
    waiting: list[tuple[str, int]] = field(default_factory=list)  # (entry id, ms) to reconcile later
    requests: int = 0
    reconciled: int = 0  # found in the provider's logs
    bulk_ids: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class _Step:
    """What the run loop does next: process `entries`, go round again, or stop (and maybe hand over)."""

    entries: list[Entry] = field(default_factory=list)
    stop: bool = False
    hand_over: bool = False


_AGAIN = _Step()


class Dispatcher:
    """Everything a dispatch or reconcile actor needs, built once per worker process."""

    def __init__(
        self,
        config: DispatchConfig,
        store: Store,
        provider: Provider,
        limiter: RateLimiter,
        wake: Wake,
        consumer: str,
        stopping: Callable[[], bool] = lambda: False,
        routes: Mapping[str, Route] | None = None,
    ) -> None:
        self.config = config
        self.store = store
        # The default account's; a lane of another account has its own in `routes` (lane -> Route).
        self.provider = provider
        self.limiter = limiter
        self._default_route = Route(provider, limiter, DEFAULT_ACCOUNT,
                                    tuple(lane for lane in config.lanes if routes is None or lane not in routes),
                                    config.webhook_url)
        self.routes: dict[str, Route] = dict(routes or {})
        self.wake = wake
        self.consumer = consumer
        self.stopping = stopping
        self._last_recover: dict[str, float] = {}
        self._recovering: dict[str, bool] = {}
        self._auth_checked: dict[str, float] = {}
        self._guard = Guard(config, store, consumer)

    # --- the loop ------------------------------------------------------------------------------
    def run(self, lane: str, budget_s: float = RUN_BUDGET_S) -> int:
        """Send batches of `lane` until it is empty, paused or the budget is spent; returns messages."""
        cfg = self.config.lanes.get(lane)
        if cfg is None:
            log.error("dispatch_unknown_lane", lane=lane)
            return 0
        if self.store.paused(lane):
            return 0
        slot = self._checker()
        if not self.store.acquire_slot(lane, slot, cfg.concurrency, self.config.lease_ms):
            return 0
        try:
            handled, hand_over = self._batches(lane, cfg, slot, time.monotonic() + budget_s)
        finally:
            self.store.release_slot(lane, slot)
        if hand_over:
            self.wake.dispatch(lane)  # after the release: the successor must find a slot free
        return handled

    def _batches(self, lane: str, cfg: LaneConfig, slot: str, deadline: float) -> tuple[int, bool]:
        """The run's batches: (messages handled, whether a successor run should carry on)."""
        handled = 0
        renewed = time.monotonic()
        while not self.stopping():
            if time.monotonic() > deadline:
                return handled, True  # more may be waiting: a fresh message carries on
            step = self._next_batch(lane, cfg, deadline)
            if step.stop:
                return handled, step.hand_over
            if not step.entries:
                continue
            if len(step.entries) == cfg.batch_size:
                self.wake.dispatch(lane)  # a full batch: likely more behind it, let a sibling help
            handled += self.process(lane, step.entries)
            # The slot's lease outlasts a run many times over; renewing now and then is enough.
            # (A pause, by this batch or another worker, is seen by the next claim.)
            if time.monotonic() - renewed > self.config.lease_ms / 3000:
                self.store.acquire_slot(lane, slot, cfg.concurrency, self.config.lease_ms)
                renewed = time.monotonic()
        return handled, False

    def _next_batch(self, lane: str, cfg: LaneConfig, deadline: float) -> _Step:
        """Tokens from the limiter, then a claim of as many entries."""
        limiter = self.route(lane).limiter
        granted, wait_ms = limiter.acquire(lane, cfg.batch_size)
        if not granted:
            if time.monotonic() + wait_ms / 1000 < deadline:
                metrics.LIMITER_WAIT.observe(wait_ms / 1000)
                time.sleep(wait_ms / 1000)
                return _AGAIN
            self.wake.dispatch(lane, delay_ms=wait_ms)
            return _Step(stop=True)
        claim = self.store.claim(
            lane, self.consumer, granted, lease_ms=self.config.lease_ms, max_wait_ms=cfg.max_wait_ms,
            recover=self._recovering.pop(lane, False) or self._recover_due(lane),
        )
        if claim.kind == ClaimKind.RECOVERED and len(claim.entries) == granted:
            # A backlog of stale entries (every batch tried during a provider outage comes back
            # this way): keep taking it at full speed, not one batch per recover_every_s.
            self._recovering[lane] = True
        limiter.refund(lane, granted - len(claim.entries), request_unused=not claim.entries)
        if claim.entries:
            return _Step(claim.entries)
        return self._nothing_claimed(lane, cfg, claim, deadline)

    def _nothing_claimed(self, lane: str, cfg: LaneConfig, claim: Claim, deadline: float) -> _Step:
        if claim.kind == ClaimKind.WAIT:
            self.wake.dispatch(lane, delay_ms=claim.wait_ms)
        immediate = self.config.listen and claim.kind == ClaimKind.EMPTY and cfg.max_wait_ms == 0
        if immediate and self._listen(lane, claim.last_id, deadline):
            return _AGAIN
        return _Step(stop=True, hand_over=immediate and not self.stopping())  # the lane always has a listener

    def _listen(self, lane: str, after_id: str, deadline: float) -> bool:
        """Wait on the outbox of an immediate lane (max wait 0, like otp) for the rest of the budget;
        True when a job arrived. A listening dispatcher claims a new job within a millisecond of
        its XADD, where a wake-up message's trip through Dramatiq took 20-200 ms on a busy
        machine. At the deadline the run hands over to a fresh message, so the lane always has a
        listener (one blocked thread and connection, and a Dramatiq message every RUN_BUDGET_S)."""
        while not self.stopping():
            left_ms = int((deadline - time.monotonic()) * 1000)
            if left_ms <= 0:
                return False
            if self.store.wait_for_new(lane, after_id, min(left_ms, LISTEN_SLICE_MS)):
                return True
        return False

    def route(self, lane: str) -> Route:
        """The provider, limiter and account of `lane` (the default account's for a lane not routed)."""
        return self.routes.get(lane) or self._default_route

    def _recover_due(self, lane: str) -> bool:
        now = time.monotonic()
        if now - self._last_recover.get(lane, -1e9) >= self.config.recover_every_s:
            self._last_recover[lane] = now
            return True
        return False

    def sweep_unknown_lanes(self, limit: int = 10_000) -> dict[str, int]:
        """Dead-letter the entries of outbox streams whose lane is not configured.

        Anyone can XADD to `{p}:outbox:<anything>`; a lane nobody configured has no dispatcher, so
        without this its jobs would sit there silently for ever. Each is settled FAILED with reason
        `unknown_lane` and a `failed` event (a dead letter an operator can replay onto a real lane),
        at most `limit` per lane and call. Returns the count per lane."""
        swept: dict[str, int] = {}
        configured = ", ".join(self.config.lanes)
        for lane in self.store.outbox_lanes():
            if lane in self.config.lanes:
                continue
            done = 0
            while done < limit:
                claim = self.store.claim(lane, self.consumer, min(1000, limit - done), lease_ms=self.config.lease_ms,
                                         max_wait_ms=0, recover=True)
                if not claim.entries:
                    break
                batch = _Batch(lane)
                for e in claim.entries:
                    self._perform(batch, give_up(lane, e, lenient_job(e.job), "unknown_lane",
                                                 f"lane {lane!r} is not configured (SMS_LANES: {configured})", 0))
                self._settle(batch)
                done += len(claim.entries)
            if done:
                swept[lane] = done
                log.error("unknown_lane_dead_lettered", lane=lane, jobs=done, configured=list(self.config.lanes))
        return swept

    def reconcile(self, lane: str, entry_ids: Sequence[str]) -> int:
        """Take over entries left AMBIGUOUS and settle them after checking the provider's logs."""
        entries = self.store.claim_entries(lane, self.consumer, entry_ids)
        return self.process(lane, entries) if entries else 0

    # --- one batch -----------------------------------------------------------------------------
    def process(self, lane: str, entries: Sequence[Entry]) -> int:
        """Send one claimed batch: validate, apply the lane's guards (worker/dispatch/guarded.py; the
        counted ones inside submit.lua), record SUBMITTING under a fence, POST, settle.

        Messages a previous attempt may have sent (found SUBMITTING/AMBIGUOUS) are reconciled
        against the provider's logs first, and resent in a POST of their own only on the verdict
        of absent.lua."""
        started = time.perf_counter()
        batch = _Batch(lane)
        checked = self._guard.check(lane, self._held(batch, self._first_owners(batch, self._readable(batch, entries))))
        batch.outcomes += checked.rejected
        items = checked.send
        fence, opened = secrets.token_hex(8), time.monotonic()
        answers, guarded = self.store.submit_guarded(
            lane, [item.entry for item in items], checked.counted, consumer=self._checker(),
            lease_ms=self.config.lease_ms, state_ttl_s=self.config.state_ttl_s, fence=fence,
            send_window_ms=self.config.send_window_ms, margin_ms=self.config.fence_margin_ms,
        ) if items else ([], [])
        plan = plan_submitted(items, answers)
        if checked.counted is not None:
            # The lane's counted guards ran in submit.lua: what they stopped is rejected or held.
            batch.outcomes += self._guard.counted(lane, plan.stopped, guarded)
        batch.waiting += plan.waiting
        batch.outcomes += [Outcome.acknowledge(item.message_id, item.entry_id) for item in plan.acknowledge]
        if plan.send:
            limiter = self.route(lane).limiter
            if limiter.limits_messages:
                # Tokens were granted per message before the claim; multi-part texts owe the rest.
                limiter.charge_parts(lane, sum(sms_parts(item.job["text"]) - 1 for item in plan.send))
            self._send_fenced(batch, plan.send, fence, opened)
        if plan.check:
            self._reconcile(batch, plan.check)
        self._settle(batch)
        if batch.waiting:
            delay_ms = max(wait for _, wait in batch.waiting)
            self.wake.reconcile(lane, [entry_id for entry_id, _ in batch.waiting], delay_ms)
        self._log_batch(batch, len(entries), started)
        return len(entries)

    def _readable(self, batch: _Batch, entries: Sequence[Entry]) -> list[Item]:
        """The entries whose job can be sent; the others are dead-lettered (`invalid_job`)."""
        items = []
        for entry in entries:
            job, problem = parse_job(entry.job, max_text_parts=self.config.max_text_parts,
                                     metadata_max_bytes=self.config.metadata_max_bytes)
            if problem is None:
                items.append(Item(entry, job))
            else:
                self._perform(batch, give_up(batch.lane, entry, job, "invalid_job", problem, 0))
        return items

    def _first_owners(self, batch: _Batch, items: list[Item]) -> list[Item]:
        """Only the message that owns a producer id is sent; a repeat is acknowledged and dropped.

        The API claims producer ids at enqueue; jobs written with plain XADD, or whose producer
        died between its two round trips, are claimed here, before anything is sent.
        """
        with_id = [(item, str(item.job["id"])) for item in items if item.job.get("id") is not None]
        if not with_id:
            return items
        owners = self.store.claim_producer_ids(
            [(pid, item.message_id) for item, pid in with_id], self.config.idempotency_ttl_s
        )
        repeats = {item.message_id for (item, _), owner in zip(with_id, owners, strict=True)
                   if owner != item.message_id}
        for item in items:
            if item.message_id in repeats:
                log.info("duplicate_producer_id", lane=batch.lane, message_id=item.message_id)
                batch.outcomes.append(Outcome.acknowledge(item.message_id, item.entry_id, repeat_of=item.entry))
        return [item for item in items if item.message_id not in repeats]

    def _held(self, batch: _Batch, items: list[Item]) -> list[Item]:
        """Entries written with plain XADD whose send_at is still ahead go to the lane's schedule
        (acknowledged and deleted there, appended again when due); the others are sent. An entry the
        schedule appended itself has a record already, so clock skew never holds it twice."""
        now_ms, later, held = events.now_ms(), [], set()
        for item in (item for item in items if "send_at" in item.job):
            due, problem = later_than(item.job, now_ms, self.config.schedule_horizon_s)
            if problem is not None:
                self._perform(batch, give_up(batch.lane, item.entry, item.job, "invalid_job", problem, 0))
                held.add(item.message_id)
            elif due is not None:
                later.append((item, due))
        if later:
            answers = self.store.schedule_entries(
                batch.lane, [(item.entry, item.job.get("id"), due) for item, due in later],
                state_ttl_s=self.config.state_ttl_s, idempotency_ttl_s=self.config.idempotency_ttl_s)
            held |= {item.message_id for (item, _), answer in zip(later, answers, strict=True)
                     if answer in ("SCHEDULED", "DUPLICATE")}
            log.info("scheduled_from_outbox", lane=batch.lane, entries=len(later))
        return [item for item in items if item.message_id not in held] if held else items

    def _checker(self) -> str:
        """Who holds a slot or a reconciliation lease: this thread of this process (threads share a consumer)."""
        return f"{self.consumer}:{threading.get_ident()}"

    def _settle(self, batch: _Batch) -> None:
        """Record the batch's outcomes, then bring back the entries a lane pause kept (ours only)."""
        if not batch.outcomes:
            return
        applied = self.store.settle(
            batch.lane, batch.outcomes, now_ms=events.now_ms(), events_maxlen=self.config.events_maxlen,
            state_ttl_s=self.config.state_ttl_s,
        )
        count_settled(batch.lane, batch.outcomes, applied)
        # A stale owner's decisions were not applied: the entries are their new owner's business.
        mine = {o.entry_id for o, done in zip(batch.outcomes, applied, strict=True) if done or not o.guard}
        for retry in batch.retry_in:
            kept = [eid for eid in retry.entry_ids if eid in mine]
            self.store.retry_in(batch.lane, self.consumer, kept, retry.delay_ms, self.config.lease_ms)

    def _log_batch(self, batch: _Batch, messages: int, started: float) -> None:
        """The canonical log line of one bulk."""
        states = Counter(o.state for o in batch.outcomes)
        log.info(
            "bulk_dispatched", lane=batch.lane, messages=messages, requests=batch.requests,
            accepted=states[State.ACCEPTED], rejected=states[State.REJECTED], failed=states[State.FAILED],
            retry=states[State.QUEUED], ambiguous=states[State.AMBIGUOUS], reconciled=batch.reconciled,
            waiting=len(batch.waiting), bulk_ids=batch.bulk_ids[:4],
            duration_ms=round((time.perf_counter() - started) * 1000, 1),
        )

    def _perform(self, batch: _Batch, decision: Decision) -> None:
        """Carry out a decision's actions now, and keep its outcomes for the batch's settle."""
        lane = batch.lane
        for note in decision.notes:
            getattr(log, note.level)(note.event, lane=lane, **note.fields)
        for dead in decision.dead_letters:
            log.warning("dead_lettered", lane=lane, message_id=dead.message_id, reason=dead.reason,
                        detail=dead.detail[:300])
            metrics.DEAD_LETTERS.labels(dead.reason).inc()
        if decision.fenced:
            metrics.FENCED.inc(decision.fenced)
        if decision.unknown_statuses:
            metrics.UNKNOWN_PROVIDER_VALUES.labels("send_status_group").inc(decision.unknown_statuses)
        if decision.pause is not None:
            self.store.pause(lane, decision.pause.reason, decision.pause.seconds)
        for entry_ids in decision.reconcile:
            self.wake.reconcile(lane, entry_ids, self.config.reconcile_delay_ms)
        if decision.retry_in is not None:
            batch.retry_in.append(decision.retry_in)
        if decision.bulk_id:
            batch.bulk_ids.append(decision.bulk_id)
        batch.outcomes += decision.outcomes

    # --- sending -------------------------------------------------------------------------------
    def _send_fenced(
        self, batch: _Batch, items: list[Item], fence: str, opened: float, *, resend: bool = False
    ) -> None:
        """POST `items` under `fence`; our own decisions about them are guarded by it.

        The request may be written only before the fence's deadline: the provider calls `alive`
        right before the first byte of each attempt leaves, and it answers no once the local
        deadline (taken before the fence was set, so never later than Redis's) has passed or the
        fence key has expired. A process paused past its window therefore never writes its request;
        a takeover waits out send_by (submit.lua) before it looks in the logs."""
        deadline = opened + self.config.send_window_ms / 1000

        def alive() -> bool:
            return time.monotonic() < deadline and self.store.fences_alive([fence]) and time.monotonic() < deadline

        self._post(batch, items, alive, f"f:{fence}", resend=resend)

    def _post(self, batch: _Batch, items: list[Item], alive: Callable[[], bool], guard: str, *, resend: bool) -> None:
        """One bulk request, and the decision on its answer performed at once (our own decisions
        guarded by `guard`); a 400 for several messages is split in halves, each sent on its own,
        until the bad message is alone."""
        route = self.route(batch.lane)
        messages = [
            wire_message_from_dict(item.job, item.message_id, default_sender=self.config.default_sender,
                                   webhook_url=route.webhook_url)
            for item in items
        ]
        batch.requests += 1
        metrics.BATCH_SIZE.observe(len(messages))
        try:
            response = route.provider.send(wire_request(messages), on_rate_limited=route.limiter.penalize, fence=alive)
        except ProviderError as error:
            decision = classify_error(self.config, batch.lane, items, error, now_ms=events.now_ms())
        else:
            self._lift_auth_pauses(route)
            decision = classify_response(self.config, batch.lane, items, response, resend=resend,
                                         now_ms=events.now_ms())
        if decision.split:
            half = len(items) // 2
            self._post(batch, items[:half], alive, guard, resend=resend)
            self._post(batch, items[half:], alive, guard, resend=resend)
            return
        for o in decision.outcomes:
            if o.state in GUARDED:
                o.guard = guard
        self._perform(batch, decision)

    def _lift_auth_pauses(self, route: Route) -> None:
        """The provider just took a request with the key of `route`'s account: a lane of that account
        paused for a 401/403 (by any process, e.g. before the key was fixed) need not wait out
        SMS_AUTH_PAUSE_S. Another account's lanes keep theirs: their key is another one. Looked at
        once a second per account at most."""
        now = time.monotonic()
        if now - self._auth_checked.get(route.account, -1e9) < 1.0 or not route.lanes:
            return
        self._auth_checked[route.account] = now
        for lane in self.store.paused_lanes(list(route.lanes), reason="auth"):
            self.store.resume(lane)
            log.info("auth_pause_lifted", lane=lane, account=route.account,
                     why="a request with the same key was accepted")

    # --- reconciliation ------------------------------------------------------------------------
    def _reconcile(self, batch: _Batch, items: list[Item]) -> None:
        """Check messages a previous attempt may have sent, and resend those absent.lua says to.

        Found in the logs: accepted. Missing: absent.lua decides, atomically and only while we
        still hold the reconciliation lease: resend (absent in enough checks over the window),
        check again later, or give up past the attempts limit."""
        fence = secrets.token_hex(8)
        missing = self._check_logs(batch, items)
        if not missing:
            return
        opened = time.monotonic()  # before the fence is set
        verdicts = self.store.absent(
            [item.entry for item in missing], consumer=self._checker(), checks=self.config.reconcile_checks,
            window_ms=self.config.reconcile_window_ms, fence=fence, send_window_ms=self.config.send_window_ms,
            max_attempts=self.config.max_attempts,
        )
        plan = plan_absent(batch.lane, missing, verdicts, checker=self._checker())
        note_verdicts(batch.lane, verdicts)
        batch.waiting += plan.waiting
        self._perform(batch, plan.decision)
        if plan.resend:
            self._send_fenced(batch, plan.resend, fence, opened, resend=True)

    def _check_logs(self, batch: _Batch, items: list[Item]) -> list[Item]:
        """Ask GET /sms/3/logs which of these the provider has: those are accepted; returns the
        missing ones (none when the logs could not be read: a later reconcile asks again)."""
        by_id = {item.message_id: item for item in items}
        checker = self._checker()
        # The logs of the account that sent them: the lane's (module docstring of worker.accounts).
        route = self.route(batch.lane)

        def before_logs_call() -> None:
            # The logs endpoint allows ~2 calls/s: a big check can outlast the lease, so keep it alive.
            route.limiter.wait_for_logs_call()
            self.store.renew_checks(list(by_id), checker, self.config.lease_ms)

        try:
            found = route.provider.logs_for_message_ids(
                list(by_id), before_request=before_logs_call, on_rate_limited=route.limiter.penalize
            )
        except ProviderError as error:
            # No verdict: leave them pending; a later reconcile (or recovery) asks again.
            log.warning("reconcile_failed", lane=batch.lane, messages=len(items), error_class=type(error).__name__)
            self.wake.reconcile(batch.lane, [item.entry_id for item in items], self.config.reconcile_delay_ms)
            return []
        found = {mid: entry for mid, entry in found.items() if mid in by_id}
        for mid, entry in found.items():
            item = by_id[mid]
            status = entry.status.to_wire() if entry.status is not None else None
            batch.outcomes.append(accepted(batch.lane, item.entry, item.job, entry.bulk_id, status,
                                           now_ms=events.now_ms(), grace_s=self.config.no_report_grace_s))
        batch.reconciled += len(found)
        metrics.RECONCILE.labels("found").inc(len(found))
        metrics.RECONCILE.labels("missing").inc(len(items) - len(found))
        log.info("reconciled", lane=batch.lane, messages=len(items), found=len(found), missing=len(items) - len(found))
        return [item for item in items if item.message_id not in found]
