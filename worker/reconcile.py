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

Both share the `logs` rate limit with the running workers. With several icomm accounts
(worker.accounts) a message is checked in the logs of its lane's account (the message records its
lane, not its account), and a bulk id is looked for in every account's logs.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any

from worker.accounts import wire
from worker.dispatch import DispatchConfig, Dispatcher
from worker.errors import ProviderError
from worker.models import State
from worker.producer import connect_triggers
from worker.provider import Provider
from worker.reports import NO_REPORT, ProcessConfig, Processor, SweepConfig, Sweeper
from worker.settings import Settings
from worker.store import Store, consumer_name

# States whose message the dispatcher's own path settles: it may still be (re)sent or found in the logs.
IN_FLIGHT = frozenset({State.SUBMITTING, State.AMBIGUOUS, State.QUEUED})


def awaits_report(message: dict[str, str]) -> bool:
    """Whether a message hash is one a delivery report may still settle."""
    state = message.get("state")
    return state == State.ACCEPTED or (state == State.EXPIRED and message.get("reason") == NO_REPORT)


def force_reconcile(
    settings: Settings, store: Store, *, message_ids: list[str], bulk_ids: list[str]
) -> dict[str, Any]:
    """Settle the given messages (and those of the given bulks) now; returns the summary the CLI prints."""
    recovered: set[str] = set()
    lookup_error = None
    wired = wire(settings, store)
    try:
        provider, limiter = wired.providers[wired.main], wired.limiters[wired.main]
        ids = _message_ids(list(wired.providers.values()), message_ids, bulk_ids)
        before = {mid: store.message(mid) for mid in ids}
        triggers = connect_triggers(settings, store)
        dispatcher = Dispatcher(DispatchConfig.from_settings(settings), store, provider, limiter, triggers,
                                f"reconcile-{consumer_name()}", routes=wired.routes)
        for lane, entry_ids in _in_flight_by_lane(before).items():
            dispatcher.reconcile(lane, entry_ids)
        # Accepted before or just now: their report may be lost (a webhook the provider gave up on).
        looked_up = [mid for mid in ids if awaits_report(store.message(mid))]
        if looked_up:
            processor = Processor(ProcessConfig.from_settings(settings), store, triggers)
            sweeper = Sweeper(SweepConfig.from_settings(settings), store, processor, provider=provider,
                              before_logs_call=limiter.wait_for_logs_call, lane_logs=wired.lane_logs)
            recovered, lookup_error = _recover_reports(sweeper, processor, looked_up)
    finally:
        wired.close()
    after = {mid: store.message(mid).get("state") for mid in ids}
    result = _summary(ids, before, after, looked_up, recovered)
    if lookup_error is not None:
        result["lookup_error"] = lookup_error
    return result


def _message_ids(providers: list[Provider], message_ids: list[str], bulk_ids: list[str]) -> list[str]:
    """The chosen message ids, then those the providers' logs (one per account) list for the chosen
    bulks; each once."""
    ids = list(dict.fromkeys(message_ids))
    for bulk_id in bulk_ids:
        for provider in providers:
            ids += [e.message_id for e in provider.logs(bulk_id=[bulk_id], limit=1000) if e.message_id]
    return list(dict.fromkeys(ids))


def _in_flight_by_lane(messages: dict[str, dict[str, str]]) -> dict[str, list[str]]:
    """lane -> outbox entry ids of the messages still in flight (the dispatcher reconciles by entry)."""
    by_lane: dict[str, list[str]] = defaultdict(list)
    for state in messages.values():
        if state.get("state") in IN_FLIGHT and state.get("entry") and state.get("lane"):
            by_lane[state["lane"]].append(state["entry"])
    return by_lane


def _recover_reports(sweeper: Sweeper, processor: Processor, message_ids: list[str]) -> tuple[set[str], str | None]:
    """Look the messages up in the provider's logs as report sources: (recovered ids, lookup error)."""
    try:
        recovered = sweeper.recover_from_logs(message_ids, raise_errors=True)
    except ProviderError as error:
        return set(), f"{type(error).__name__}: {error}"[:300]
    if recovered:
        processor.process()  # (a backlog left over goes to the workers, woken by it)
    return recovered, None


def _summary(
    ids: list[str], before: dict[str, dict[str, str]], after: dict[str, str | None], looked_up: list[str],
    recovered: set[str],
) -> dict[str, Any]:
    handled = [mid for mid in ids if before[mid].get("state") in IN_FLIGHT or mid in looked_up]
    return {
        "checked": len(ids),
        "unknown": sum(1 for mid in ids if not before[mid]),
        "already_settled": sum(1 for mid in ids if before[mid] and mid not in handled),
        "reconciled": len(handled),
        "now": dict(Counter(after[mid] or "?" for mid in handled)),
        "looked_up": len(looked_up),
        "recovered_from_logs": len(recovered),
        "states": after,
    }
