"""`sms-worker reconcile`: settle chosen messages now against the provider's logs.

The operator's lever when something looks stuck:

- messages still in flight (SUBMITTING, AMBIGUOUS, QUEUED) go through the dispatcher's own path at
  once — taken over from whoever holds them, checked in GET /sms/3/logs, accepted if found, resent
  with the same messageId if not;
- messages then awaiting their report (ACCEPTED, or EXPIRED with reason no_report) are looked up in
  GET /sms/3/logs the way the sweep does (worker.reports.Sweeper.recover_from_logs): a final status
  found there is one more report source, a page with source `logs` that the report processor
  applies like any report (idempotent: a report that also arrives gives no second event). One the
  logs show not final yet stays as it is, for its report or the no-report sweep.

Both share the `logs` rate limit with the running workers.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any

from worker.dispatch import Dispatcher
from worker.errors import ProviderError
from worker.provider import Provider
from worker.ratelimit import RateLimiter
from worker.reports import NO_REPORT, Processor, Sweeper
from worker.runtime import make_broker
from worker.settings import Settings
from worker.store import Store, consumer_name
from worker.triggers import Triggers

IN_FLIGHT = {"SUBMITTING", "AMBIGUOUS", "QUEUED"}


def awaits_report(message: dict[str, str]) -> bool:
    """Whether a message hash is one a delivery report may still settle."""
    state = message.get("state")
    return state == "ACCEPTED" or (state == "EXPIRED" and message.get("reason") == NO_REPORT)


def force_reconcile(
    settings: Settings, store: Store, *, message_ids: list[str], bulk_ids: list[str]
) -> dict[str, Any]:
    settings.require_api_key()
    recovered: set[str] = set()
    lookup_error = None
    with Provider(settings) as provider:
        ids = list(dict.fromkeys(message_ids))
        for bulk_id in bulk_ids:
            ids += [e.message_id for e in provider.logs(bulk_id=[bulk_id], limit=1000) if e.message_id]
        ids = list(dict.fromkeys(ids))
        before = {mid: store.message(mid) for mid in ids}
        by_lane: dict[str, list[str]] = defaultdict(list)
        for state in before.values():
            if state.get("state") in IN_FLIGHT and state.get("entry") and state.get("lane"):
                by_lane[state["lane"]].append(state["entry"])
        broker, _ = make_broker(settings)
        triggers = Triggers(store, broker)
        limiter = RateLimiter(settings, store)
        dispatcher = Dispatcher(settings, store, provider, limiter, triggers, f"reconcile-{consumer_name()}")
        for lane, entry_ids in by_lane.items():
            dispatcher.reconcile(lane, entry_ids)
        # Accepted before or just now: their report may be lost (a webhook the provider gave up on).
        looked_up = [mid for mid in ids if awaits_report(store.message(mid))]
        if looked_up:
            processor = Processor(settings, store, triggers)
            sweeper = Sweeper(settings, store, processor, provider=provider,
                              before_logs_call=limiter.wait_for_logs_call)
            try:
                recovered = sweeper.recover_from_logs(looked_up, raise_errors=True)
            except ProviderError as error:
                lookup_error = f"{type(error).__name__}: {error}"[:300]
            if recovered:
                processor.process()  # (a backlog left over goes to the workers, woken by it)
    after = {mid: store.message(mid).get("state") for mid in ids}
    handled = [mid for mid in ids if before[mid].get("state") in IN_FLIGHT or mid in looked_up]
    result: dict[str, Any] = {
        "checked": len(ids),
        "unknown": sum(1 for mid in ids if not before[mid]),
        "already_settled": sum(1 for mid in ids if before[mid] and mid not in handled),
        "reconciled": len(handled),
        "now": dict(Counter(after[mid] or "?" for mid in handled)),
        "looked_up": len(looked_up),
        "recovered_from_logs": len(recovered),
        "states": after,
    }
    if lookup_error is not None:
        result["lookup_error"] = lookup_error
    return result
