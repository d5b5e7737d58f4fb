"""The baseline design, as most teams first write it: one Dramatiq message and one POST per SMS.

This module holds what producers and the harness need (names, broker, message); the actor itself
is in bench/baseline_actors.py, the module its `dramatiq` workers import:

    BENCH_BASELINE=1 REDIS_URL=... ICOMM_BASE_URL=... ICOMM_API_KEY=... \\
        python -m dramatiq bench.baseline_actors --processes 1 --threads 8

The baseline runs on the same Redis and sandbox as the pipeline, in its own broker namespace.
"""

from __future__ import annotations

from typing import Any

import dramatiq
from dramatiq.brokers.redis import RedisBroker

NAMESPACE = "bench-baseline"
QUEUE = "baseline"
ACTOR = "send_sms"
EVENTS = f"{NAMESPACE}:events"


def make_broker(url: str) -> RedisBroker:
    """Dramatiq's RedisBroker with its default middleware, in the baseline's own namespace."""
    return RedisBroker(url=url, namespace=NAMESPACE)  # type: ignore[no-untyped-call]


def message(message_id: str, to: str, text: str, metadata: dict[str, Any]) -> dramatiq.Message[Any]:
    """What `send_sms.send(...)` enqueues, built without importing the actor module."""
    return dramatiq.Message(queue_name=QUEUE, actor_name=ACTOR, args=(message_id, to, text, metadata),
                            kwargs={}, options={})
