"""The baseline's actor: a single-message POST per SMS over a shared keep-alive client, then its event.

Only the baseline's `dramatiq` worker processes import this module (with BENCH_BASELINE=1); see
bench/baseline.py. Each call sends a one-message `POST /sms/3/messages` over one `httpx.Client`
shared by the process's threads, then publishes an `accepted` event with one XADD, so it does
the same visible work per SMS as the pipeline: the provider call and a status event. No state
hash, no idempotency, no rate limit: the baseline is given every shortcut.
"""

from __future__ import annotations

import os
from typing import Any

import dramatiq
import httpx
import orjson
import redis

from bench.baseline import ACTOR, EVENTS, QUEUE, make_broker

if os.environ.get("BENCH_BASELINE") != "1":
    raise RuntimeError("bench.baseline_actors is the baseline workers' module: run it with BENCH_BASELINE=1")

# Module-level wiring, as such code usually is: the broker, one HTTP client, one Redis client.
dramatiq.set_broker(make_broker(os.environ["REDIS_URL"]))
HTTP = httpx.Client(
    base_url=os.environ["ICOMM_BASE_URL"],
    headers={"Authorization": f"App {os.environ['ICOMM_API_KEY']}", "Content-Type": "application/json"},
    timeout=httpx.Timeout(15.0, connect=3.0),
)
REDIS = redis.Redis.from_url(os.environ["REDIS_URL"])


@dramatiq.actor(queue_name=QUEUE, actor_name=ACTOR, max_retries=0)
def send_sms(message_id: str, to: str, text: str, metadata: dict[str, Any]) -> None:
    body = {"messages": [{"sender": "ACME", "destinations": [{"to": to, "messageId": message_id}],
                          "content": {"text": text}}]}
    response = HTTP.post("/sms/3/messages", content=orjson.dumps(body))
    response.raise_for_status()
    result = response.json()
    status = result["messages"][0]["status"]
    event = {"v": 1, "event_id": f"{message_id}:accepted", "type": "accepted", "message_id": message_id,
             "bulk_id": result.get("bulkId"), "to": to, "metadata": metadata, "status": status}
    REDIS.xadd(EVENTS, {"event": orjson.dumps(event)})
