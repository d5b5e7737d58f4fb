"""The send path: claim -> validate -> record SUBMITTING -> POST -> classify -> settle with events.

One Dramatiq message runs `Dispatcher.run(lane)`, which loops over batches for a short budget while
holding one of the lane's dispatcher slots (so at most `concurrency` bulks are in flight per lane).
Outcomes follow the table in docs/architecture.md; nothing is ever resent before a reconciliation
says the provider does not have it.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson
import structlog

from worker import events, metrics
from worker.errors import (
    JobValidationError,
    ProviderAmbiguous,
    ProviderAuthError,
    ProviderBadRequest,
    ProviderError,
    ProviderNotActedOn,
    SendWindowClosed,
)
from worker.models import encode_job, plain_job, validate_job
from worker.provider import Provider, SendResponse, SendResult, wire_message_from_dict, wire_request
from worker.ratelimit import RateLimiter
from worker.settings import Settings
from worker.store import FENCE_MARGIN_MS, Entry, Outcome, Store, Submitted

log = structlog.get_logger(__name__)

# How long one Dramatiq message keeps dispatching before it hands over to a fresh message, so a
# long backlog never holds a worker thread past the actor's time limit or a shutdown.
RUN_BUDGET_S = 2.0
# Stale pending entries are looked for at most this often per process and lane.
RECOVER_EVERY_S = 1.0
# A listening dispatcher (see Dispatcher._listen) blocks on Redis in slices this long, so it sees a
# shutdown request within one slice.
LISTEN_SLICE_MS = 250
# Provider status groups that mean "the platform took it".
_ACCEPTED_GROUPS = frozenset({"PENDING", "ACCEPTED", "DELIVERED"})
# The status groups of the contract; any other is a value the API added since this code was written.
_KNOWN_GROUPS = _ACCEPTED_GROUPS | {"UNDELIVERABLE", "EXPIRED", "REJECTED"}
# Outcomes that are our own decisions (not the provider's facts): applied only while we own the message.
_GUARDED = frozenset({"QUEUED", "AMBIGUOUS", "FAILED"})
_DUPLICATE = "REJECTED_DUPLICATE_MESSAGE_ID"


@dataclass
class BatchStats:
    """Counts for the canonical log line of one bulk."""

    accepted: int = 0
    rejected: int = 0
    failed: int = 0
    retry: int = 0
    ambiguous: int = 0
    reconciled: int = 0
    requests: int = 0
    # (entry ids, ms): pending entries to bring back for another attempt after a lane pause.
    retry_in: list[tuple[list[str], int]] = field(default_factory=list)
    bulk_ids: list[str] = field(default_factory=list)


class Wake(Protocol):
    """What the dispatcher asks of the rest of the system (worker.triggers.Triggers in production)."""

    def dispatch(self, lane: str, delay_ms: int = 0) -> object: ...

    def reconcile(self, lane: str, entry_ids: Sequence[str], delay_ms: int) -> None: ...


def _status_dict(result: SendResult) -> dict[str, Any]:
    return result.status.to_wire()


class Dispatcher:
    """Everything a dispatch or reconcile actor needs, built once per worker process."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        provider: Provider,
        limiter: RateLimiter,
        wake: Wake,
        consumer: str,
        stopping: Callable[[], bool] = lambda: False,
        recover_every_s: float = RECOVER_EVERY_S,
        listen: bool = True,
        fence_margin_ms: int = FENCE_MARGIN_MS,
    ) -> None:
        self.settings = settings
        self.store = store
        self.provider = provider
        self.limiter = limiter
        self.wake = wake
        self.consumer = consumer
        self.stopping = stopping
        self.lease_ms = int(settings.sms_lease_s * 1000)
        self.recover_every_s = recover_every_s
        self.listen = listen
        self._last_recover: dict[str, float] = {}
        self._recovering: dict[str, bool] = {}
        self._auth_checked = -1e9
        self._webhook_url = settings.webhook_delivery_url()
        self._send_window_ms = int(settings.send_window_s() * 1000)
        self.fence_margin_ms = fence_margin_ms

    # --- the loop ------------------------------------------------------------------------------
    def run(self, lane: str, budget_s: float = RUN_BUDGET_S) -> int:
        """Send batches of `lane` until it is empty, paused or the budget is spent; returns messages."""
        cfg = self.settings.sms_lanes.get(lane)
        if cfg is None:
            log.error("dispatch_unknown_lane", lane=lane)
            return 0
        if self.store.paused(lane):
            return 0
        slot = f"{self.consumer}:{threading.get_ident()}"
        if not self.store.acquire_slot(lane, slot, cfg.concurrency, self.lease_ms):
            return 0
        handled = 0
        renewed = time.monotonic()
        deadline = renewed + budget_s
        hand_over = False  # start a successor run once this one has released its slot
        try:
            while not self.stopping():
                if time.monotonic() > deadline:
                    hand_over = True  # more may be waiting: a fresh message carries on
                    break
                granted, wait_ms = self.limiter.acquire(lane, cfg.batch_size)
                if not granted:
                    if time.monotonic() + wait_ms / 1000 < deadline:
                        metrics.LIMITER_WAIT.observe(wait_ms / 1000)
                        time.sleep(wait_ms / 1000)
                        continue
                    self.wake.dispatch(lane, delay_ms=wait_ms)
                    break
                claim = self.store.claim(
                    lane, self.consumer, granted, lease_ms=self.lease_ms, max_wait_ms=cfg.max_wait_ms,
                    recover=self._recovering.pop(lane, False) or self._recover_due(lane),
                )
                if claim.kind == "recovered" and len(claim.entries) == granted:
                    # A backlog of stale entries (every batch tried during a provider outage comes
                    # back this way): keep taking it at full speed, not one batch per RECOVER_EVERY_S.
                    self._recovering[lane] = True
                self.limiter.refund(lane, granted - len(claim.entries), request_unused=not claim.entries)
                if not claim.entries:
                    if claim.kind == "wait":
                        self.wake.dispatch(lane, delay_ms=claim.wait_ms)
                    immediate = self.listen and claim.kind == "empty" and cfg.max_wait_ms == 0
                    if immediate and self._listen(lane, claim.last_id, deadline):
                        continue
                    hand_over = immediate and not self.stopping()  # the lane always has a listener
                    break
                if len(claim.entries) == cfg.batch_size:
                    self.wake.dispatch(lane)  # a full batch: likely more behind it, let a sibling help
                handled += self.process(lane, claim.entries)
                # The slot's lease outlasts a run many times over; renewing now and then is enough.
                # (A pause, by this batch or another worker, is seen by the next claim.)
                if time.monotonic() - renewed > self.lease_ms / 3000:
                    self.store.acquire_slot(lane, slot, cfg.concurrency, self.lease_ms)
                    renewed = time.monotonic()
        finally:
            self.store.release_slot(lane, slot)
        if hand_over:
            self.wake.dispatch(lane)  # after the release: the successor must find a slot free
        return handled

    def sweep_unknown_lanes(self, limit: int = 10_000) -> dict[str, int]:
        """Dead-letter the entries of outbox streams whose lane is not configured.

        Anyone can XADD to `{p}:outbox:<anything>`; a lane nobody configured has no dispatcher, so
        without this its jobs would sit there silently for ever. Each is settled FAILED with reason
        `unknown_lane` and a `failed` event (a dead letter an operator can replay onto a real lane),
        at most `limit` per lane and call. Returns the count per lane."""
        swept: dict[str, int] = {}
        for lane in self.store.outbox_lanes():
            if lane in self.settings.sms_lanes:
                continue
            done = 0
            while done < limit:
                claim = self.store.claim(lane, self.consumer, min(1000, limit - done), lease_ms=self.lease_ms,
                                         max_wait_ms=0, recover=True)
                if not claim.entries:
                    break
                outcomes = [self._failed(lane, e, _lenient_job(e.job), "unknown_lane",
                                         f"lane {lane!r} is not configured (SMS_LANES: "
                                         f"{', '.join(self.settings.sms_lanes)})", attempts=0)
                            for e in claim.entries]
                applied = self.store.settle(lane, outcomes, now_ms=events.now_ms(),
                                            events_maxlen=self.settings.sms_events_stream_maxlen,
                                            state_ttl_s=self.settings.sms_state_ttl_s)
                _count(lane, outcomes, applied)
                done += len(claim.entries)
            if done:
                swept[lane] = done
                log.error("unknown_lane_dead_lettered", lane=lane, jobs=done,
                          configured=list(self.settings.sms_lanes))
        return swept

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

    def _recover_due(self, lane: str) -> bool:
        now = time.monotonic()
        if now - self._last_recover.get(lane, -1e9) >= self.recover_every_s:
            self._last_recover[lane] = now
            return True
        return False

    def reconcile(self, lane: str, entry_ids: Sequence[str]) -> int:
        """Take over entries left AMBIGUOUS and settle them after checking the provider's logs."""
        entries = self.store.claim_entries(lane, self.consumer, entry_ids)
        return self.process(lane, entries) if entries else 0

    # --- one batch -----------------------------------------------------------------------------
    def process(self, lane: str, entries: Sequence[Entry]) -> int:
        """Send one claimed batch: validate, record SUBMITTING under a fence, POST, settle.

        Messages a previous attempt may have sent (found SUBMITTING/AMBIGUOUS) are reconciled
        against the provider's logs first, and resent in a POST of their own only on the verdict
        of absent.lua."""
        started = time.perf_counter()
        stats = BatchStats()
        outcomes: list[Outcome] = []
        jobs: dict[str, dict[str, Any]] = {}
        live: list[Entry] = []
        for entry in entries:
            job, problem = self._parse(entry)
            if problem is not None:
                outcomes.append(self._failed(lane, entry, job, "invalid_job", problem, attempts=0))
                stats.failed += 1
                continue
            jobs[entry.message_id] = job
            live.append(entry)
        live = self._drop_duplicate_ids(lane, live, jobs, outcomes)

        to_send: list[Entry] = []
        to_check: list[Entry] = []
        waiting: list[tuple[Entry, int]] = []
        attempts: dict[str, int] = {}
        fence, opened = secrets.token_hex(8), time.monotonic()
        submitted = self.store.submit(
            lane, live, consumer=self._checker(), lease_ms=self.lease_ms, state_ttl_s=self.settings.sms_state_ttl_s,
            fence=fence, send_window_ms=self._send_window_ms, margin_ms=self.fence_margin_ms,
        ) if live else []
        for entry, sub in zip(live, submitted, strict=True):
            attempts[entry.message_id] = sub.attempts
            if sub.state in ("NEW", "QUEUED"):
                to_send.append(entry)
            elif sub.state in ("SUBMITTING", "AMBIGUOUS"):
                to_check.append(entry)
            elif sub.state == "WAIT":
                # Its owner (paused, or slow) may still write the request: nobody looks yet.
                waiting.append((entry, sub.wait_ms))
            elif sub.state != "BUSY":
                # Already settled (a report may have raced ahead): the entry only needs its ack.
                outcomes.append(Outcome(entry.message_id, entry.entry_id, "ACK", ack=True))
        if to_send:
            outcomes += self._send_fenced(lane, to_send, jobs, attempts, stats, fence, opened)
        if to_check:
            resend_fence = secrets.token_hex(8)
            resends, opened = self._reconcile(lane, to_check, jobs, attempts, outcomes, stats, waiting, resend_fence)
            if resends:
                outcomes += self._send_fenced(lane, resends, jobs, attempts, stats, resend_fence, opened, resend=True)
        if outcomes:
            applied = self.store.settle(
                lane, outcomes, now_ms=events.now_ms(), events_maxlen=self.settings.sms_events_stream_maxlen,
                state_ttl_s=self.settings.sms_state_ttl_s,
            )
            _count(lane, outcomes, applied)
            # A stale owner's decisions were not applied: the entries are their new owner's business.
            mine = {o.entry_id for o, done in zip(outcomes, applied, strict=True) if done or not o.guard}
            for entry_ids, delay_ms in stats.retry_in:
                kept = [eid for eid in entry_ids if eid in mine]
                self.store.retry_in(lane, self.consumer, kept, delay_ms, self.lease_ms)
        if waiting:
            delay_ms = max(wait for _, wait in waiting)
            self.wake.reconcile(lane, [e.entry_id for e, _ in waiting], delay_ms)
        log.info(
            "bulk_dispatched", lane=lane, messages=len(entries), requests=stats.requests,
            accepted=stats.accepted, rejected=stats.rejected, failed=stats.failed, retry=stats.retry,
            ambiguous=stats.ambiguous, reconciled=stats.reconciled, waiting=len(waiting), bulk_ids=stats.bulk_ids[:4],
            duration_ms=round((time.perf_counter() - started) * 1000, 1),
        )
        return len(entries)

    def _checker(self) -> str:
        """Who holds a reconciliation lease: this thread of this process (threads share a consumer)."""
        return f"{self.consumer}:{threading.get_ident()}"

    def _send_fenced(
        self, lane: str, entries: list[Entry], jobs: dict[str, dict[str, Any]], attempts: dict[str, int],
        stats: BatchStats, fence: str, opened: float, *, resend: bool = False,
    ) -> list[Outcome]:
        """POST `entries` under `fence`; our own decisions about them are guarded by it.

        The request may be written only before the fence's deadline: the provider calls `alive`
        right before the first byte of each attempt leaves, and it answers no once the local
        deadline (taken before the fence was set, so never later than Redis's) has passed or the
        fence key has expired. A process paused past its window therefore never writes its request;
        a takeover waits out send_by (submit.lua) before it looks in the logs."""
        deadline = opened + self._send_window_ms / 1000

        def alive() -> bool:
            return time.monotonic() < deadline and self.store.fences_alive([fence]) and time.monotonic() < deadline

        sent = self._send(lane, entries, jobs, attempts, stats, alive, resend=resend)
        for o in sent:
            if o.state in _GUARDED:
                o.guard = f"f:{fence}"
        return sent

    def _parse(self, entry: Entry) -> tuple[dict[str, Any], str | None]:
        """The job of an entry, or why it cannot be sent. Every entry is checked, also those written
        by the Python API, which validates too: anyone can write to the outbox with plain Redis
        commands, and one bad job must not fail its whole batch. The fast path costs ~2 us a job."""
        try:
            job = orjson.loads(entry.job)
        except orjson.JSONDecodeError as error:
            return {}, f"job is not JSON: {error}"
        if not isinstance(job, dict):
            return {}, "job is not a JSON object"
        limits = {"max_text_parts": self.settings.sms_max_text_parts,
                  "metadata_max_bytes": self.settings.sms_metadata_max_bytes}
        fast = plain_job(job, **limits, json_size=len(entry.job))
        if fast is not None:
            return fast, None
        try:
            valid = validate_job(job, **limits)
        except JobValidationError as error:
            return job, str(error)
        return orjson.loads(encode_job(valid)), None

    def _drop_duplicate_ids(
        self, lane: str, live: list[Entry], jobs: dict[str, dict[str, Any]], outcomes: list[Outcome]
    ) -> list[Entry]:
        """Only the message that owns a producer id is sent; a repeat is acknowledged and dropped.

        The API claims producer ids at enqueue; jobs written with plain XADD, or whose producer
        died between its two round trips, are claimed here, before anything is sent.
        """
        with_id = [(e, str(jobs[e.message_id]["id"])) for e in live if jobs[e.message_id].get("id") is not None]
        if not with_id:
            return live
        owners = self.store.claim_producer_ids(
            [(pid, e.message_id) for e, pid in with_id], self.settings.sms_idempotency_ttl_s
        )
        repeats = {e.message_id for (e, _), owner in zip(with_id, owners, strict=True) if owner != e.message_id}
        for e in live:
            if e.message_id in repeats:
                log.info("duplicate_producer_id", lane=lane, message_id=e.message_id)
                outcomes.append(Outcome(e.message_id, e.entry_id, "ACK", ack=True))
        return [e for e in live if e.message_id not in repeats]

    # --- reconciliation ------------------------------------------------------------------------
    def _reconcile(
        self, lane: str, entries: list[Entry], jobs: dict[str, dict[str, Any]], attempts: dict[str, int],
        outcomes: list[Outcome], stats: BatchStats, waiting: list[tuple[Entry, int]], fence: str,
    ) -> tuple[list[Entry], float]:
        """Check messages a previous attempt may have sent; returns those to resend under `fence`,
        and the (monotonic) time from before the fence was set.

        Found in the logs: accepted. Missing: absent.lua decides, atomically and only while we
        still hold the reconciliation lease: resend (absent in enough checks over the window),
        check again later, or give up past the attempts limit."""
        found, missing = self._check_logs(lane, entries, jobs, outcomes, stats)
        stats.reconciled += found
        if not missing:
            return [], 0.0
        opened = time.monotonic()
        verdicts = self.store.absent(
            missing, consumer=self._checker(), checks=self.settings.sms_reconcile_checks,
            window_ms=int(self.settings.sms_reconcile_window_s * 1000), fence=fence,
            send_window_ms=self._send_window_ms, max_attempts=self.settings.sms_max_attempts,
        )
        resends: list[Entry] = []
        for e, verdict in zip(missing, verdicts, strict=True):
            attempts[e.message_id] = verdict.attempts
            metrics.RECONCILE.labels(verdict.state.lower()).inc()
            if verdict.state == "RESEND":
                resends.append(e)
            elif verdict.state == "WAIT":
                waiting.append((e, verdict.wait_ms))
            elif verdict.state == "EXHAUSTED":
                failed = self._failed(lane, e, jobs[e.message_id], "retries_exhausted",
                                      "not found at the provider after repeated attempts", verdict.attempts)
                failed.guard = f"c:{self._checker()}"
                outcomes.append(failed)
                stats.failed += 1
            # STALE: another reconciler holds the message now; it is theirs to settle.
        if len(resends) < len(missing):
            log.info("reconcile_verdicts", lane=lane, resend=len(resends),
                     **{v.lower(): n for v, n in _tally(verdicts).items() if v != "RESEND"})
        return resends, opened

    def _check_logs(
        self, lane: str, entries: list[Entry], jobs: dict[str, dict[str, Any]], outcomes: list[Outcome],
        stats: BatchStats,
    ) -> tuple[int, list[Entry]]:
        """Ask GET /sms/3/logs which of these the provider has; returns (found count, missing)."""
        by_id = {e.message_id: e for e in entries}
        checker = self._checker()

        def before_logs_call() -> None:
            # The logs endpoint allows ~2 calls/s: a big check can outlast the lease, so keep it alive.
            self.limiter.wait_for_logs_call()
            self.store.renew_checks(list(by_id), checker, self.lease_ms)

        try:
            found = self.provider.logs_for_message_ids(
                list(by_id), before_request=before_logs_call, on_rate_limited=self.limiter.penalize
            )
        except ProviderError as error:
            # No verdict: leave them pending; a later reconcile (or recovery) asks again.
            log.warning("reconcile_failed", lane=lane, messages=len(entries), error_class=type(error).__name__)
            self.wake.reconcile(lane, [e.entry_id for e in entries], self._reconcile_delay_ms())
            return 0, []
        found = {mid: item for mid, item in found.items() if mid in by_id}
        for mid, item in found.items():
            entry = by_id[mid]
            status = item.status.to_wire() if item.status is not None else None
            outcomes.append(self._accepted(lane, entry, jobs[mid], item.bulk_id, status))
            stats.accepted += 1
        metrics.RECONCILE.labels("found").inc(len(found))
        metrics.RECONCILE.labels("missing").inc(len(entries) - len(found))
        log.info("reconciled", lane=lane, messages=len(entries), found=len(found), missing=len(entries) - len(found))
        return len(found), [e for e in entries if e.message_id not in found]

    def _reconcile_delay_ms(self) -> int:
        return int(self.settings.sms_reconcile_delay_s * 1000)

    # --- sending -------------------------------------------------------------------------------
    def _send(
        self, lane: str, entries: list[Entry], jobs: dict[str, dict[str, Any]], attempts: dict[str, int],
        stats: BatchStats, alive: Callable[[], bool], *, resend: bool,
    ) -> list[Outcome]:
        messages = [
            wire_message_from_dict(
                jobs[e.message_id], e.message_id, default_sender=self.settings.sms_default_sender,
                webhook_url=self._webhook_url,
            )
            for e in entries
        ]
        stats.requests += 1
        metrics.BATCH_SIZE.observe(len(messages))
        try:
            response = self.provider.send(wire_request(messages), on_rate_limited=self.limiter.penalize, fence=alive)
        except ProviderError as error:
            return self._send_failed(lane, entries, jobs, attempts, stats, error, alive, resend=resend)
        return self._classify(lane, entries, jobs, response, stats, resend=resend)

    def _send_failed(
        self, lane: str, entries: list[Entry], jobs: dict[str, dict[str, Any]], attempts: dict[str, int],
        stats: BatchStats, error: ProviderError, alive: Callable[[], bool], *, resend: bool,
    ) -> list[Outcome]:
        """The outcome table for a bulk the provider did not answer with 200."""
        if isinstance(error, ProviderBadRequest):
            if len(entries) > 1:
                # Isolate the bad message(s): each half is sent on its own.
                half = len(entries) // 2
                return self._send(lane, entries[:half], jobs, attempts, stats, alive, resend=resend) + self._send(
                    lane, entries[half:], jobs, attempts, stats, alive, resend=resend
                )
            stats.failed += 1
            detail = "; ".join(f"{v.property}: {v.violation}" for v in error.violations) or str(error)
            e = entries[0]
            return [self._failed(lane, e, jobs[e.message_id], "bad_request", detail, attempts[e.message_id],
                                 answer=error.body)]
        if isinstance(error, SendWindowClosed):
            # This process was paused or starved past the batch's send window: nothing was written,
            # and another worker may own the batch by now. Not an outage: no pause, no attempt counted.
            log.warning("send_window_closed", lane=lane, messages=len(entries), window_s=self._send_window_ms / 1000)
            metrics.FENCED.inc(len(entries))
            stats.retry_in.append(([e.entry_id for e in entries], 0))
            return self._retry_later(lane, entries, jobs, attempts, error, stats, count_attempt=False)
        if isinstance(error, ProviderAuthError):
            self.store.pause(lane, "auth", self.settings.sms_auth_pause_s)
            log.error("provider_auth_failed", lane=lane, status=error.status_code,
                      pause_s=self.settings.sms_auth_pause_s, messages_kept=len(entries))
            stats.retry_in.append(([e.entry_id for e in entries], int(self.settings.sms_auth_pause_s * 1000)))
            return self._retry_later(lane, entries, jobs, attempts, error, stats, count_attempt=False)
        if isinstance(error, ProviderNotActedOn):
            self.store.pause(lane, "provider_unavailable", self.settings.sms_outage_pause_s)
            log.warning("provider_unavailable", lane=lane, status=error.status_code,
                        error_class=type(error).__name__, pause_s=self.settings.sms_outage_pause_s)
            stats.retry_in.append(([e.entry_id for e in entries], int(self.settings.sms_outage_pause_s * 1000)))
            # Certainly not sent: an outage of any length is retried up to the horizon, whatever
            # the number of tries (SMS_MAX_ATTEMPTS bounds sends that may have gone through).
            return self._retry_later(lane, entries, jobs, attempts, error, stats, count_attempt=True,
                                     limit_attempts=False)
        if isinstance(error, ProviderAmbiguous):
            stats.ambiguous += len(entries)
            log.warning("send_ambiguous", lane=lane, messages=len(entries), status=error.status_code,
                        error_class=type(error).__name__)
            self.wake.reconcile(lane, [e.entry_id for e in entries], self._reconcile_delay_ms())
            return [
                Outcome(e.message_id, e.entry_id, "AMBIGUOUS", ack=False, fields={"last_error": _describe(error)})
                for e in entries
            ]
        # Any other answer (an unexpected 4xx): not acted on as far as we can tell, but not safe to
        # repeat forever either; the attempts limit dead-letters it.
        log.error("provider_unexpected_answer", lane=lane, status=error.status_code)
        return self._retry_later(lane, entries, jobs, attempts, error, stats, count_attempt=True)

    def _classify(
        self, lane: str, entries: list[Entry], jobs: dict[str, dict[str, Any]], response: SendResponse,
        stats: BatchStats, *, resend: bool,
    ) -> list[Outcome]:
        """Per-destination outcomes of a 200."""
        self._lift_auth_pauses()
        if response.bulk_id:
            stats.bulk_ids.append(response.bulk_id)
        results = {r.message_id: r for r in response.messages}
        outcomes: list[Outcome] = []
        unanswered: list[Entry] = []
        unknown: list[Entry] = []
        for e in entries:
            result = results.get(e.message_id)
            job = jobs[e.message_id]
            if result is None:
                unanswered.append(e)
                continue
            group, name = result.status.group_name, result.status.name
            if group not in _KNOWN_GROUPS:
                # A status group this code does not know (the API grew one): never guessed into a
                # terminal state. The logs settle it like any ambiguous answer.
                log.warning("provider_unknown_status", lane=lane, message_id=e.message_id, group=group, status=name)
                metrics.UNKNOWN_PROVIDER_VALUES.labels("send_status_group").inc()
                unknown.append(e)
                continue
            if group in _ACCEPTED_GROUPS or (name == _DUPLICATE and resend):
                # A resend answered "duplicate" means our earlier attempt got through.
                outcomes.append(self._accepted(lane, e, job, response.bulk_id, _status_dict(result)))
                stats.accepted += 1
            else:
                outcomes.append(Outcome(
                    e.message_id, e.entry_id, "REJECTED", ack=True,
                    event=events.build("rejected", e.message_id, job, lane=lane, bulk_id=response.bulk_id,
                                       status=_status_dict(result)),
                    fields={"bulk_id": response.bulk_id or "", "status": name},
                ))
                stats.rejected += 1
        for lost, why in ((unanswered, "missing from the provider's answer"), (unknown, "unknown status group")):
            if lost:
                # A 200 that does not tell what became of a message we sent: we cannot know; reconcile it.
                stats.ambiguous += len(lost)
                self.wake.reconcile(lane, [e.entry_id for e in lost], self._reconcile_delay_ms())
                outcomes += [Outcome(e.message_id, e.entry_id, "AMBIGUOUS", ack=False, fields={"last_error": why})
                             for e in lost]
        return outcomes

    def _lift_auth_pauses(self) -> None:
        """The provider just took a request with our key: a lane paused for a 401/403 (by any
        process, e.g. before the key was fixed) need not wait out SMS_AUTH_PAUSE_S. Looked at
        once a second at most."""
        now = time.monotonic()
        if now - self._auth_checked < 1.0:
            return
        self._auth_checked = now
        for lane in self.store.paused_lanes(list(self.settings.sms_lanes), reason="auth"):
            self.store.resume(lane)
            log.info("auth_pause_lifted", lane=lane, why="a request with the same key was accepted")

    def _retry_later(
        self, lane: str, entries: list[Entry], jobs: dict[str, dict[str, Any]], attempts: dict[str, int],
        error: ProviderError, stats: BatchStats, *, count_attempt: bool, limit_attempts: bool = True,
    ) -> list[Outcome]:
        """Not sent, certainly: back to QUEUED, pending in the outbox until recovery takes it again."""
        outcomes = []
        now = time.time()
        for e in entries:
            n = attempts[e.message_id]
            first_s = _entry_time_s(e.entry_id)
            too_many = limit_attempts and n >= self.settings.sms_max_attempts
            if count_attempt and (too_many or now - first_s > self.settings.sms_retry_horizon_s):
                outcomes.append(self._failed(lane, e, jobs[e.message_id], "retries_exhausted", _describe(error), n,
                                             answer=error.body))
                stats.failed += 1
            else:
                fields: dict[str, Any] = {"last_error": _describe(error)}
                if not count_attempt:
                    fields["attempts"] = max(0, n - 1)
                outcomes.append(Outcome(e.message_id, e.entry_id, "QUEUED", ack=False, fields=fields))
                stats.retry += 1
        return outcomes

    # --- outcomes ------------------------------------------------------------------------------
    def _accepted(
        self, lane: str, e: Entry, job: dict[str, Any], bulk_id: str | None, status: dict[str, Any] | None
    ) -> Outcome:
        validity = job.get("validity_period")
        validity_s = 48 * 3600
        if isinstance(validity, dict):
            unit = {"SECONDS": 1, "MINUTES": 60, "HOURS": 3600}.get(validity.get("time_unit", "MINUTES"), 60)
            validity_s = min(int(validity.get("amount", 2880)) * unit, validity_s)
        deadline = events.now_ms() + int((validity_s + self.settings.sms_no_report_grace_s) * 1000)
        return Outcome(
            e.message_id, e.entry_id, "ACCEPTED", ack=True,
            event=events.build("accepted", e.message_id, job, lane=lane, bulk_id=bulk_id, status=status),
            deadline_ms=deadline, fields={"bulk_id": bulk_id or ""},
        )

    def _failed(
        self, lane: str, e: Entry, job: dict[str, Any], reason: str, detail: str, attempts: int,
        answer: object = None,
    ) -> Outcome:
        log.warning("dead_lettered", lane=lane, message_id=e.message_id, reason=reason, detail=detail[:300])
        metrics.DEAD_LETTERS.labels(reason).inc()
        dead = orjson.dumps({
            "message_id": e.message_id, "lane": lane, "entry_id": e.entry_id, "reason": reason,
            "detail": detail, "attempts": attempts, "last_answer": answer, "at": events.now_iso(),
            "job": e.job.decode("utf-8", "replace"),
        }, default=str)
        return Outcome(
            e.message_id, e.entry_id, "FAILED", ack=True,
            event=events.build("failed", e.message_id, job, lane=lane, reason=reason),
            fields={"reason": reason, "lane": lane, "job": e.job.decode("utf-8", "replace")},
            dead_letter=dead,
        )


_OUTCOME_LABELS = {"ACCEPTED": "accepted", "REJECTED": "rejected", "FAILED": "failed", "QUEUED": "retry",
                   "AMBIGUOUS": "ambiguous"}
_EVENT_TYPES = {"ACCEPTED": "accepted", "REJECTED": "rejected", "FAILED": "failed"}


def _count(lane: str, outcomes: Sequence[Outcome], applied: Sequence[bool]) -> None:
    by_outcome: dict[str, int] = {}
    published: dict[str, int] = {}
    for outcome, done in zip(outcomes, applied, strict=True):
        label = _OUTCOME_LABELS.get(outcome.state)
        if label and done:
            by_outcome[label] = by_outcome.get(label, 0) + 1
            if outcome.event and outcome.state in _EVENT_TYPES:
                published[_EVENT_TYPES[outcome.state]] = published.get(_EVENT_TYPES[outcome.state], 0) + 1
    for label, n in by_outcome.items():
        metrics.MESSAGES.labels(lane, label).inc(n)
    for kind, n in published.items():
        metrics.EVENTS.labels(kind).inc(n)


def _lenient_job(raw: bytes) -> dict[str, Any]:
    """A job's JSON as far as it parses, for the event of one that will never be sent."""
    try:
        job = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return {}
    return job if isinstance(job, dict) else {}


def _tally(verdicts: Sequence[Submitted]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for v in verdicts:
        counts[v.state] = counts.get(v.state, 0) + 1
    return counts


def _describe(error: ProviderError) -> str:
    return f"{type(error).__name__}" + (f" {error.status_code}" if error.status_code else "")


def _entry_time_s(entry_id: str) -> float:
    """Stream entry ids start with the server's time in ms: when the job was queued."""
    try:
        return int(entry_id.split("-", 1)[0]) / 1000
    except ValueError:
        return time.time()
