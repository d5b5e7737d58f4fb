"""`sms-worker reconcile`: settle chosen messages now against the provider's logs.

The operator's lever when something looks stuck: messages still in flight (SUBMITTING, AMBIGUOUS,
QUEUED) go through the dispatcher's own path at once — taken over from whoever holds them, checked
in GET /sms/3/logs, accepted if found, resent with the same messageId if not.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any

from worker.dispatch import Dispatcher
from worker.provider import Provider
from worker.ratelimit import RateLimiter
from worker.runtime import make_broker
from worker.settings import Settings
from worker.store import Store, consumer_name
from worker.triggers import Triggers

IN_FLIGHT = {"SUBMITTING", "AMBIGUOUS", "QUEUED"}


def force_reconcile(
    settings: Settings, store: Store, *, message_ids: list[str], bulk_ids: list[str]
) -> dict[str, Any]:
    settings.require_api_key()
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
        dispatcher = Dispatcher(
            settings, store, provider, RateLimiter(settings, store), Triggers(store, broker),
            f"reconcile-{consumer_name()}",
        )
        for lane, entry_ids in by_lane.items():
            dispatcher.reconcile(lane, entry_ids)
    after = {mid: store.message(mid).get("state") for mid in ids}
    in_flight = [mid for mid in ids if before[mid].get("state") in IN_FLIGHT]
    return {
        "checked": len(ids),
        "unknown": sum(1 for mid in ids if not before[mid]),
        "already_settled": sum(1 for mid in ids if before[mid] and before[mid].get("state") not in IN_FLIGHT),
        "reconciled": len(in_flight),
        "now": dict(Counter(after[mid] or "?" for mid in in_flight)),
        "states": after,
    }
