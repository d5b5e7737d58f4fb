"""The Dramatiq actors: owns their declarations; each unwraps its arguments and calls the code that does the work.

Names and queues come from worker.triggers; what they call is the process's Runtime (worker.runtime).
"""

from __future__ import annotations

import dramatiq

from worker import triggers
from worker.broker import runtime
from worker.runtime import redis_outage_is_one_line

# Bulks are sent from here; several dispatch messages run at once, bounded per lane by slots.


@dramatiq.actor(queue_name=triggers.QUEUE, actor_name=triggers.DISPATCH, max_retries=0)
def dispatch(lane: str) -> None:
    with redis_outage_is_one_line("dispatch"):
        runtime().dispatcher.run(lane)


@dramatiq.actor(queue_name=triggers.QUEUE, actor_name=triggers.SWEEP_OUTBOXES, max_retries=0)
def sweep_outboxes() -> None:
    with redis_outage_is_one_line("sweep_outboxes"):
        runtime().dispatcher.sweep_unknown_lanes()


@dramatiq.actor(queue_name=triggers.QUEUE, actor_name=triggers.RECONCILE, max_retries=0)
def reconcile(lane: str, entry_ids: list[str]) -> None:
    with redis_outage_is_one_line("reconcile"):
        runtime().dispatcher.reconcile(lane, entry_ids)


# Delivery reports (worker.reports): the clock sends the drain and the sweep; drains, webhook calls
# and backlogs wake the processor.


@dramatiq.actor(queue_name=triggers.QUEUE, actor_name=triggers.DRAIN_REPORTS, max_retries=0)
def drain_reports(account: str | None = None) -> None:
    # No argument: the default account's drain (the clock's message for it is unchanged).
    drainer = runtime().drainer_of(account)
    if drainer is None:  # an account no longer configured
        return
    with redis_outage_is_one_line("drain_reports"):
        drainer.drain()


@dramatiq.actor(queue_name=triggers.QUEUE, actor_name=triggers.PROCESS_REPORTS, max_retries=0)
def process_reports() -> None:
    with redis_outage_is_one_line("process_reports"):
        runtime().processor.process()


@dramatiq.actor(queue_name=triggers.QUEUE, actor_name=triggers.SWEEP, max_retries=0)
def sweep() -> None:
    with redis_outage_is_one_line("sweep"):
        runtime().sweeper.sweep()


@dramatiq.actor(queue_name=triggers.QUEUE, actor_name=triggers.RELAY_EVENTS, max_retries=0)
def relay_events() -> None:
    relay = runtime().relay
    if relay is not None:
        relay.run(f"relay-{runtime().dispatcher.consumer}")
